"""Inferencer: one interface over torch, ONNX Runtime and OpenVINO, and the predict command."""
import csv
import json
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from anomalens.cli import main  # noqa: E402
from anomalens.config import config_from_dict  # noqa: E402
from anomalens.data.dataset import image_to_tensor  # noqa: E402
from anomalens.data.io import read_image  # noqa: E402
from anomalens.deploy.export import default_artifact_path, export  # noqa: E402
from anomalens.deploy.inferencer import Inferencer, video_frames  # noqa: E402
from anomalens.engine import Engine  # noqa: E402
from anomalens.errors import AnomalensError, ConfigError, DataError  # noqa: E402


@pytest.fixture(scope="module")
def run(tiny_demo_root, tmp_path_factory):
    """A tiny PaDiM run with its ONNX and OpenVINO FP32 exports at the default places."""
    config = config_from_dict({
        "model": {"name": "padim", "weights": "none", "layers": ["blocks.1", "blocks.2"], "n_features": 32},
        "dataset": {"format": "mvtec", "root": str(tiny_demo_root), "category": "brick", "image_size": 64,
                    "batch_size": 8},
        "visualization": {"save_images": False}, "trainer": {"progress": False, "device": "cpu"},
        "project": {"root": str(tmp_path_factory.mktemp("inferencer"))},
    })
    run_dir = Engine(config).run()
    onnx_path = export(run_dir, "onnx").path
    export(run_dir, "openvino", onnx=onnx_path)
    return run_dir


@pytest.fixture(scope="module")
def test_images(tiny_demo_root):
    return sorted((tiny_demo_root / "brick" / "test").rglob("*.png"))


def test_load_picks_the_runtime_from_the_artifact(run):
    onnx_path, xml_path = default_artifact_path(run, "onnx"), default_artifact_path(run, "openvino")
    cases = [(run, None, "torch", run / "model.pt"), (run / "model.pt", None, "torch", run / "model.pt"),
             (onnx_path, None, "onnx", onnx_path), (xml_path, None, "openvino", xml_path),
             (onnx_path, "openvino", "openvino", onnx_path),  # OpenVINO reads ONNX files too
             (run, "onnx", "onnx", onnx_path), (run, "openvino", "openvino", xml_path)]  # a run's own exports
    for path, runtime, expected, file in cases:
        inferencer = Inferencer.load(path, device="cpu", runtime=runtime)
        assert inferencer.runtime_name == expected and inferencer.metadata["runtime"] == expected
        assert inferencer.metadata["path"] == str(file)
        assert inferencer.image_size == (64, 64) and inferencer.metadata["model"] == "padim"


def test_every_runtime_returns_the_same_post_processed_output(run, test_images):
    images = torch.cat([image_to_tensor(read_image(p), (64, 64))[None] for p in test_images[:3]])
    outputs = [Inferencer.load(run, runtime=r).predict(images) for r in ("torch", "onnx", "openvino")]
    for out in outputs:
        assert out.score.shape == (3,) and out.anomaly_map.shape == (3, 1, 64, 64)
        assert out.pred_label.dtype == torch.bool and out.pred_mask.shape == (3, 1, 64, 64)
        assert out.norm_score.device.type == "cpu"
        # decisions follow the normalised values: threshold at exactly 0.5
        assert torch.equal(out.pred_label, out.norm_score >= 0.5)
        assert torch.equal(out.pred_mask, out.norm_map >= 0.5)
    for out in outputs[1:]:
        torch.testing.assert_close(out.score, outputs[0].score, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path, runtime, message", [
    ("missing", None, "No model found at '{tmp}/missing': pass a run folder, its model.pt, or an exported model "
                      "(.pt, .onnx, .xml)."),
    ("model.tflite", None, "Unknown model file type '.tflite' ('{tmp}/model.tflite'): expected .pt, .onnx or .xml."),
    ("model.xml", "onnx", "A .xml file cannot run on the onnx runtime; export the run with `anomalens export "
                          "--format onnx` first."),
    ("model.onnx", "tensorrt", "The 'runtime' parameter of Inferencer.load must be one of 'torch', 'onnx', "
                               "'openvino'. Got 'tensorrt' instead."),
])
def test_load_mistakes_read_as_one_line(tmp_path, path, runtime, message):
    if path != "missing":
        (tmp_path / path).write_text("")
    with pytest.raises(AnomalensError) as err:
        Inferencer.load(tmp_path / path, runtime=runtime)
    assert str(err.value) == message.format(tmp=tmp_path)


def test_a_run_without_the_requested_export_says_how_to_make_it(run, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "model.pt", bare / "model.pt")
    with pytest.raises(ConfigError) as err:
        Inferencer.load(bare, runtime="openvino")
    assert str(err.value) == (f"Run '{bare}' has no openvino export yet; create it with: anomalens export --run {bare} "
                              "--format openvino")


def test_inputs_are_resized_on_the_host_like_the_training_data(run, test_images):
    inferencer = Inferencer.load(run, device="cpu")
    image = read_image(test_images[0])
    big = np.kron(image, np.ones((2, 2, 1), dtype=np.uint8))  # 128 px: predict must resize it
    expected = image_to_tensor(big, (64, 64))[None]
    torch.testing.assert_close(inferencer.to_tensor(big), expected, rtol=0, atol=0)
    raw = torch.from_numpy(big).permute(2, 0, 1)[None]
    ref = inferencer.predict(expected)
    for given in (raw.float() / 255, raw, (raw.float() / 255).numpy()):  # float, uint8, numpy
        torch.testing.assert_close(inferencer.predict(given).score, ref.score, rtol=0, atol=0)
    with pytest.raises(DataError, match=r"^predict expects images of shape \(B, 3, H, W\)\. Got \(1, 4, 8, 8\)"):
        inferencer.predict(torch.zeros(1, 4, 8, 8))


def test_a_fixed_batch_graph_gets_full_chunks_and_the_padding_is_dropped(run, test_images):
    inferencer = Inferencer.load(run, device="cpu")
    images = torch.cat([inferencer.to_tensor(read_image(p)) for p in test_images[:5]])
    single = [inferencer.predict(images[i:i + 1]) for i in range(5)]
    seen, runtime = [], inferencer.runtime

    def fixed(x):
        seen.append(len(x))
        return runtime(x)

    inferencer.runtime = fixed
    inferencer.metadata = {**inferencer.metadata, "batch_size": 2}
    out = inferencer.predict(images)
    assert seen == [2, 2, 2] and out.score.shape == (5,) and out.pred_mask.shape == (5, 1, 64, 64)
    torch.testing.assert_close(out.score, torch.cat([s.score for s in single]), rtol=1e-5, atol=1e-6)


def test_openvino_inferencer_can_be_shared_by_threads(run, test_images):
    inferencer = Inferencer.load(default_artifact_path(run, "openvino"))
    images = [inferencer.to_tensor(read_image(p)) for p in test_images[:4]]
    expected = [inferencer.predict(x).score for x in images]
    results = {}

    def work(i):
        for _ in range(5):
            results[i] = inferencer.predict(images[i]).score

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        torch.testing.assert_close(results[i], expected[i], rtol=0, atol=0)


def test_predict_command_on_an_onnx_model_writes_csv_json_and_pictures(run, tiny_demo_root, tmp_path):
    source = tiny_demo_root / "brick" / "test"
    model = default_artifact_path(run, "onnx")
    assert main(["predict", "--model", str(model), "--input", str(source), "--out", str(tmp_path),
                 "--batch-size", "3"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    n_images = len(list(source.rglob("*.png")))
    assert len(rows) == n_images and {r["frame"] for r in rows} == {""}
    assert len(list((tmp_path / "images").rglob("*.png"))) == n_images
    summary = json.loads((tmp_path / "predictions.json").read_text())
    assert summary["runtime"] == "onnx" and summary["model"] == "padim" and len(summary["predictions"]) == n_images
    assert summary["n_defect"] == sum(r["label"] == "defect" for r in rows)
    # the ONNX model's decisions equal the engine's test decisions for the same files
    engine = {r["path"]: r for r in csv.DictReader(open(run / "scores.csv"))}
    for row in rows:
        assert float(row["score"]) == pytest.approx(float(engine[row["path"]]["score"]), rel=1e-4)
        assert (row["label"] == "defect") == (engine[row["path"]]["pred_label"] == "1")


def test_predict_command_keeps_run_as_an_alias_and_takes_a_runtime(run, test_images, tmp_path):
    assert main(["predict", "--run", str(run), "--runtime", "openvino", "--input", str(test_images[0]),
                 "--out", str(tmp_path), "--no-images"]) == 0
    summary = json.loads((tmp_path / "predictions.json").read_text())
    assert summary["runtime"] == "openvino" and len(summary["predictions"]) == 1
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_predict_command_scores_every_frame_of_a_video(run, test_images, tmp_path, suffix):
    iio = pytest.importorskip("imageio.v3")
    if suffix == ".mp4":
        pytest.importorskip("imageio_ffmpeg")
    frames = np.stack([read_image(p) for p in test_images[:4]])
    video = tmp_path / f"clip{suffix}"
    iio.imwrite(video, frames, **({"fps": 4} if suffix == ".mp4" else {}))
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run), "--input", str(video), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["frame"] for r in rows] == ["0", "1", "2", "3"] and {r["path"] for r in rows} == {str(video)}
    assert sorted(p.name for p in (out / "images" / "clip").iterdir()) == [f"frame_{i:06d}.png" for i in range(4)]
    # each row scores the decoded frame, as an independent inferencer call shows
    inferencer = Inferencer.load(run)
    decoded = torch.cat([inferencer.to_tensor(f) for f in video_frames(video)])
    scores = inferencer.predict(decoded).score
    assert [float(r["score"]) for r in rows] == pytest.approx(scores.tolist(), rel=1e-5)


def test_predict_command_reports_a_missing_input_in_one_line(run, tmp_path, capsys):
    assert main(["predict", "--model", str(run), "--input", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: Input not found: '{tmp_path / 'nope'}'.\n"
