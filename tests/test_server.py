"""The serving endpoint: same decisions as the inferencer, strict 4xx answers for bad input, bounded load."""
import asyncio
import base64
import importlib.util
import io
import json
import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from anomalens.config import config_from_dict  # noqa: E402
from anomalens.data.io import read_image  # noqa: E402
from anomalens.deploy.inferencer import Inferencer  # noqa: E402
from anomalens.deploy.server import ServeSettings, create_app, decode_image, rle_decode, rle_encode  # noqa: E402
from anomalens.engine import Engine, load_checkpoint, save_checkpoint  # noqa: E402
from anomalens.errors import ConfigError  # noqa: E402
from anomalens.visualization import heatmap  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """64 px models gain nothing from intra-op threads, while idle OpenMP workers on a busy shared CPU cost seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run_dir(tiny_demo_root, tmp_path_factory):
    config = config_from_dict({
        "model": {"name": "padim", "weights": "none"},
        "dataset": {"format": "mvtec", "root": str(tiny_demo_root), "category": "brick", "image_size": 64},
        "visualization": {"save_images": False}, "trainer": {"progress": False},
        "project": {"root": str(tmp_path_factory.mktemp("serve") / "runs")},
    })
    return Engine(config).run()


@pytest.fixture(scope="module")
def inferencer(run_dir):
    return Inferencer.load(run_dir, device="cpu")


@pytest.fixture(scope="module")
def test_images(tiny_demo_root):
    return sorted((tiny_demo_root / "brick" / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def split_inferencer(run_dir, inferencer, test_images, tmp_path_factory):
    """The run with thresholds moved into the test data, so that both labels and non-empty masks occur.

    Returns the inferencer and the 3 lowest- and 3 highest-scoring test images.
    """
    out = inferencer.predict(torch.cat([inferencer.to_tensor(read_image(p)) for p in test_images]))
    config, model, post = load_checkpoint(run_dir)
    post.image_threshold.fill_(out.score.median())
    post.pixel_threshold.fill_(out.anomaly_map.flatten().quantile(0.9))
    path = tmp_path_factory.mktemp("split") / "model.pt"
    save_checkpoint(path, config, model, post)
    order = out.score.argsort().tolist()
    return Inferencer.load(path, device="cpu"), [test_images[i] for i in order[:3] + order[-3:]]


@pytest.fixture(scope="module")
def client(inferencer):
    with TestClient(create_app(inferencer), raise_server_exceptions=False) as c:
        yield c


def upload(path_or_bytes, name="part.png", content_type="image/png"):
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    return {"file": (name, data, content_type)}


def png_bytes(array, **save):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def b64_png(data):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def expected(inferencer, path):
    return inferencer.predict(inferencer.to_tensor(read_image(path)))


def rle_to_mask(rle):
    """Independent decoder: walk the runs, fill column by column."""
    height, width = rle["size"]
    flat, value = [], False
    for count in rle["counts"]:
        flat.extend([value] * count)
        value = not value
    return np.array(flat, dtype=bool).reshape(width, height).T


# --------------------------------------------------------------------------- same decisions as the engine
def test_predict_gives_the_inferencers_exact_scores_labels_and_masks(split_inferencer):
    inferencer, paths = split_inferencer
    client = TestClient(create_app(inferencer))
    threshold = inferencer.image_threshold
    labels, areas = set(), []
    for path in paths:
        body = client.post("/predict", files=upload(path, path.name), params={"mask": "rle"}).json()
        ref = expected(inferencer, path)
        assert body["filename"] == path.name
        assert body["score"] == float(ref.score[0])  # identical, not close
        assert body["norm_score"] == float(ref.norm_score[0])
        assert body["label"] == ("defect" if bool(ref.pred_label[0]) else "good")
        assert body["threshold"] == threshold
        mask = ref.pred_mask[0, 0].numpy()
        assert body["mask"]["format"] == "rle" and body["mask"]["size"] == [64, 64]
        np.testing.assert_array_equal(rle_to_mask(body["mask"]), mask)
        assert body["defect_area"] == pytest.approx(mask.mean())
        labels.add(body["label"])
        areas.append(body["defect_area"])
    assert labels == {"good", "defect"} and max(areas) > 0  # both decisions and real masks were exercised


def test_png_mask_and_heat_map_match_the_inferencer(split_inferencer):
    inferencer, paths = split_inferencer
    client = TestClient(create_app(inferencer))
    path = paths[-1]
    body = client.post("/predict", files=upload(path), data={"heatmap": "true"}).json()
    ref = expected(inferencer, path)
    assert ref.pred_mask.any() and not ref.pred_mask.all()
    assert body["mask"]["format"] == "png"
    np.testing.assert_array_equal(b64_png(body["mask"]["data"]), ref.pred_mask[0, 0].numpy().astype(np.uint8) * 255)
    assert body["heatmap"]["size"] == [64, 64]
    np.testing.assert_array_equal(b64_png(body["heatmap"]["data"]), heatmap(ref.norm_map[0, 0]))
    assert "mask" not in client.post("/predict", files=upload(path), params={"mask": "none"}).json()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "JPEG"])
def test_uploads_decode_exactly_like_read_image(tmp_path, mode, client, inferencer):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    path = tmp_path / ("x.jpg" if mode == "JPEG" else "x.png")
    if mode == "JPEG":
        Image.fromarray(rgb).save(path, quality=80)
    elif mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, (40, 56), dtype=np.uint16)).save(path)
    elif mode == "RGBA":
        Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(path)
    else:
        Image.fromarray(rgb).convert(mode).save(path)
    np.testing.assert_array_equal(decode_image(path.read_bytes()), read_image(path))
    body = client.post("/predict", files=upload(path)).json()
    assert body["score"] == float(expected(inferencer, path).score[0])


def test_batch_equals_one_forward_pass_of_the_same_images(client, inferencer, test_images):
    paths = test_images[:3]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    results = client.post("/predict/batch", files=files, params={"mask": "rle"}).json()["results"]
    ref = inferencer.predict(torch.cat([inferencer.to_tensor(read_image(p)) for p in paths]))
    assert [r["filename"] for r in results] == [p.name for p in paths]
    assert [r["score"] for r in results] == ref.score.tolist()
    for i, r in enumerate(results):
        np.testing.assert_array_equal(rle_to_mask(r["mask"]), ref.pred_mask[i, 0].numpy())
    # A batch decides like single requests (scores equal up to batched-kernel rounding).
    singles = [client.post("/predict", files=upload(p)).json()["score"] for p in paths]
    np.testing.assert_allclose([r["score"] for r in results], singles, rtol=1e-5)


def test_metadata_and_health(client, inferencer):
    meta = client.get("/metadata").json()
    assert meta["model"] == "padim" and meta["input_size"] == [64, 64] and meta["runtime"] == "torch"
    assert meta["image_threshold"] == inferencer.image_threshold
    assert meta["pixel_threshold"] == inferencer.pixel_threshold
    params = meta["model_params"]  # every parameter the model ran with, defaults resolved
    assert params["weights"] == "none" and params["n_features"] == 100 and params["local_colour"] is True
    assert not {"path", "source", "config"} & set(meta)  # no server file paths leak out
    assert meta["limits"] == {"max_upload_mb": 20.0, "max_concurrency": 2, "max_batch_files": 32,
                              "max_image_pixels": 50_000_000}
    assert client.get("/health").json() == {"status": "ok", "model": "padim", "runtime": "torch", "running": 0,
                                            "waiting": 0, "max_concurrency": 2}


def test_rle_round_trip():
    rng = np.random.default_rng(1)
    for mask in [rng.random((7, 5)) > 0.5, np.ones((3, 4), bool), np.zeros((4, 3), bool), np.eye(4, dtype=bool)]:
        rle = rle_encode(mask)
        assert sum(rle["counts"]) == mask.size and rle["size"] == list(mask.shape)
        np.testing.assert_array_equal(rle_to_mask(rle), mask)
        np.testing.assert_array_equal(rle_decode(rle), mask)
    assert rle_encode(np.array([[True, False], [True, True]]))["counts"] == [0, 2, 1, 1]  # column-major, 0s first


# --------------------------------------------------------------------------- bad input: exact answers
def _with_dimensions(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRC), pixel data unchanged."""
    ihdr = png[12:16] + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


@pytest.fixture(scope="module")
def small_png():
    return png_bytes(np.full((16, 16, 3), 128, np.uint8))


@pytest.mark.parametrize("kwargs, status, message", [
    ({"files": upload(b"")}, 422, "File 'part.png' is empty."),
    ({"files": upload(b"hello, not an image")}, 415,
     "File 'part.png' is not an image format Pillow can read (send PNG, JPEG, BMP, TIFF or WebP)."),
    ({"files": {"image": ("a.png", b"x", "image/png")}}, 422, "Unknown field 'image'. Accepted: file, mask, heatmap."),
    ({"data": {"mask": "png"}, "files": {"other": ("", b"", "")}}, 422,
     "Unknown field 'other'. Accepted: file, mask, heatmap."),
    ({"content": b'{"file": "abc"}', "headers": {"content-type": "application/json"}}, 415,
     "Send multipart/form-data with the image in a 'file' field. Got content type 'application/json' instead."),
    ({"content": b"raw bytes"}, 415,
     "Send multipart/form-data with the image in a 'file' field. Got content type 'none' instead."),
    ({"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data"}}, 400,
     "Missing boundary in multipart."),
    ({"params": {"mask": "gif"}}, 422, "The 'mask' option must be one of png, rle, none. Got 'gif' instead."),
    ({"params": {"heatmap": "maybe"}}, 422, "The 'heatmap' option must be true or false. Got 'maybe' instead."),
    ({"params": {"masks": "rle"}}, 422, "Unknown query parameter 'masks'. Accepted: mask, heatmap."),
    ({"params": {"mask": "rle"}, "data": {"mask": "png"}}, 422,
     "The 'mask' option is given twice with different values."),
])
def test_bad_requests_get_exact_4xx_messages(client, small_png, kwargs, status, message):
    kwargs = dict(kwargs)
    if "files" not in kwargs and ("params" in kwargs or "data" in kwargs):
        kwargs.setdefault("files", upload(small_png))
    response = client.post("/predict", **kwargs)
    assert (response.status_code, response.json()) == (status, {"error": message})


def test_missing_file_and_text_file_field(client):
    response = client.post("/predict", files={"mask": (None, b"rle")}, data={"file": "not a file"})
    assert (response.status_code, response.json()) == (422, {"error": "The 'file' field must be a file upload, "
                                                                      "not text."})
    response = client.post("/predict", files={"mask": (None, b"rle")})
    assert (response.status_code, response.json()) == (
        422, {"error": "Missing the 'file' field: upload the image as multipart form field 'file'."})


def test_truncated_and_oversized_images(client, small_png, test_images):
    png = test_images[0].read_bytes()
    response = client.post("/predict", files=upload(png[: len(png) // 2]))
    assert (response.status_code, response.json()) == (
        422, {"error": "File 'part.png' is a corrupt or truncated image: image file is truncated."})
    jpeg = io.BytesIO()
    Image.open(test_images[0]).convert("RGB").save(jpeg, format="JPEG")
    response = client.post("/predict", files=upload(jpeg.getvalue()[:400], "a.jpg", "image/jpeg"))
    assert response.status_code == 422 and response.json()["error"].startswith("File 'a.jpg' is a corrupt or")
    # Declared dimensions are refused from the header, before any pixel is decoded.
    response = client.post("/predict", files=upload(_with_dimensions(small_png, 10_000, 6_000)))
    assert (response.status_code, response.json()) == (413, {"error": (
        "Image 'part.png' is 10000x6000 pixels; the limit is 50000000 pixels (ServeSettings.max_image_pixels).")})
    response = client.post("/predict", files=upload(_with_dimensions(small_png, 100_000, 100_000)))
    assert response.status_code == 413 and "decompression-bomb" in response.json()["error"]


def test_file_counts(inferencer, small_png):
    with TestClient(create_app(inferencer, ServeSettings(max_batch_files=2))) as c:
        two = [("file", ("a.png", small_png, "image/png")), ("file", ("b.png", small_png, "image/png"))]
        response = c.post("/predict", files=two)
        assert (response.status_code, response.json()) == (
            422, {"error": "Too many files: at most 1 per request. Use /predict/batch for several images."})
        three = [("files", (f"{i}.png", small_png, "image/png")) for i in range(3)]
        response = c.post("/predict/batch", files=three)
        assert (response.status_code, response.json()) == (413, {"error": "Too many files: at most 2 per request."})
        assert len(c.post("/predict/batch", files=three[:2]).json()["results"]) == 2
        response = c.post("/predict/batch", files=[("files", ("ok.png", small_png, "image/png")),
                                                   ("files", ("bad.png", b"junk", "image/png"))])
        assert response.status_code == 415 and response.json()["error"].startswith("File 'bad.png' is not")


# --------------------------------------------------------------------------- upload size
LIMIT_MSG = "Request body exceeds the 0.25 MB upload limit (serve --max-upload-mb)."


def test_declared_oversized_body_is_refused_before_reading(inferencer):
    app = create_app(inferencer, ServeSettings(max_upload_mb=0.25))
    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "root_path": "", "query_string": b"",
             "headers": [(b"content-length", str(2**20).encode()), (b"content-type", b"multipart/form-data; b=x")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert reads == []  # not one byte of the body was read
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"]) == {"error": LIMIT_MSG}


def test_streamed_oversized_body_is_cut_off(inferencer, small_png):
    app = create_app(inferencer, ServeSettings(max_upload_mb=0.25))
    pulled = []

    async def chunks():  # no Content-Length: chunked transfer
        for i in range(64):
            pulled.append(i)
            yield b"\0" * 16384

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            streamed = await c.post("/predict", content=chunks(),
                                    headers={"content-type": "multipart/form-data; boundary=x"})
            whole = await c.post("/predict", files=upload(b"\0" * 300_000))
            fine = await c.post("/predict", files=upload(small_png))
        return streamed, whole, fine

    streamed, whole, fine = asyncio.run(go())
    assert (streamed.status_code, streamed.json()) == (413, {"error": LIMIT_MSG})
    assert len(pulled) < 64  # it stopped reading once past the limit
    assert (whole.status_code, whole.json()) == (413, {"error": LIMIT_MSG})
    assert fine.status_code == 200


def test_settings_are_validated():
    with pytest.raises(ConfigError, match=r"^The 'max_concurrency' parameter of ServeSettings must be an int in "
                                          r"\[1, 256\]. Got 0 instead.$"):
        ServeSettings(max_concurrency=0)


# --------------------------------------------------------------------------- fuzz
def test_fuzzed_uploads_never_get_a_500_and_the_server_keeps_serving(client, small_png, test_images):
    rng = np.random.default_rng(1234)
    png, jpeg = test_images[0].read_bytes(), io.BytesIO()
    Image.open(test_images[0]).convert("RGB").save(jpeg, format="JPEG")
    jpeg = jpeg.getvalue()
    requests = []
    for _ in range(12):
        requests.append({"files": upload(rng.bytes(int(rng.integers(1, 4096))))})
    for data in (png, jpeg):
        for cut in rng.integers(1, len(data) - 1, 8):
            requests.append({"files": upload(data[:cut])})
        flipped = bytearray(data)
        for i in rng.integers(8, len(data), 20):
            flipped[i] ^= 0xFF
        requests.append({"files": upload(bytes(flipped))})
    requests += [
        {"files": upload(b"")},
        {"files": upload(_with_dimensions(small_png, 2**31 - 1, 2**31 - 1))},
        {"files": upload(_with_dimensions(small_png, 0, 16))},
        {"files": upload(png, content_type="text/plain"), "params": {"mask": "bogus"}},
        {"content": png, "headers": {"content-type": "image/png"}},
        {"content": b"not json", "headers": {"content-type": "application/json"}},
        {"json": {"file": base64.b64encode(png).decode()}},
        {"data": {"file": "abc"}},
        {"files": {"file": ("a.png", png, "image/png"), "extra": ("b.png", png, "image/png")}},
        {"content": b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
         "headers": {"content-type": "multipart/form-data; boundary=b"}},
        {"content": rng.bytes(2048), "headers": {"content-type": "multipart/form-data; boundary=zz"}},
        {"headers": {"content-type": "multipart/form-data; boundary=zz"}},
    ]
    statuses = set()
    for kwargs in requests:
        response = client.post("/predict", **kwargs)
        if response.status_code == 200:  # a flipped byte in pixel data may still decode: then it must score
            assert set(response.json()) >= {"score", "label", "mask"}
            continue
        assert 400 <= response.status_code < 500, (kwargs.keys(), response.status_code, response.text)
        error = response.json()["error"]
        assert isinstance(error, str) and error and "\n" not in error
        statuses.add(response.status_code)
    for path, method in (("/predict", "GET"), ("/nowhere", "GET"), ("/health", "POST")):
        response = client.request(method, path)
        assert response.status_code in (404, 405) and "error" in response.json()
    assert {400, 413, 415, 422} <= statuses
    assert client.post("/predict", files=upload(test_images[0])).status_code == 200  # still serving


# --------------------------------------------------------------------------- concurrency and load
class Watched:
    """An inferencer wrapper that records how many predictions overlap and on which threads they run."""

    def __init__(self, inner):
        self.inner, self.active, self.peak, self.threads = inner, 0, 0, set()
        self.lock = threading.Lock()
        self.metadata, self.device = inner.metadata, inner.device

    def to_tensor(self, image):
        return self.inner.to_tensor(image)

    def predict(self, images):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.threads.add(threading.get_ident())
        time.sleep(0.05)  # long enough for waiting requests to pile up
        try:
            return self.inner.predict(images)
        finally:
            with self.lock:
                self.active -= 1


def test_inference_is_bounded_and_off_the_event_loop(inferencer, small_png):
    watched = Watched(inferencer)
    app = create_app(watched, ServeSettings(max_concurrency=2))

    async def go():
        loop_thread = threading.get_ident()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            answers = await asyncio.gather(*(c.post("/predict", files=upload(small_png)) for _ in range(6)))
        return loop_thread, answers

    loop_thread, answers = asyncio.run(go())
    assert [a.status_code for a in answers] == [200] * 6
    assert watched.peak == 2
    assert loop_thread not in watched.threads


@contextmanager
def uvicorn_server(app):
    """uvicorn on 127.0.0.1 (a free port) in a thread; always stopped."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
    assert not thread.is_alive()


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_load_test_over_loopback_has_zero_errors(inferencer, test_images):
    bench = _load_benchmark()
    payloads = [(p.name, p.read_bytes()) for p in test_images]
    with uvicorn_server(create_app(inferencer, ServeSettings(max_concurrency=2))) as url:
        report = asyncio.run(bench.run_load(url, payloads, n_requests=40, concurrency=4, time_limit=45))
        health = httpx.get(f"{url}/health").json()
    assert report["errors"] == 0, report["first_error"]
    assert report["requests"] == 40 and report["concurrency"] == 4
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["max_ms"]
    assert report["requests_per_s"] == pytest.approx(40 / report["wall_s"], rel=0.01)
    assert health["running"] == 0 and health["waiting"] == 0


def test_serve_command_reports_bad_settings_and_missing_models(capsys, tmp_path):
    from anomalens.cli import main

    assert main(["serve", "--model", str(tmp_path), "--max-concurrency", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("error: The 'max_concurrency' parameter of ServeSettings must be an "
                                               "int in [1, 256]. Got 0 instead.")
    assert main(["serve", "--model", str(tmp_path / "none")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: No model found at ") and out == ""  # refused before announcing a server
