"""Comet: an offline run opens no outside connection and its archive holds everything we log;
an online run that cannot reach Comet falls back to an offline archive."""
import contextlib
import csv
import io
import ipaddress
import json
import socket
import subprocess
import time
import warnings
import zipfile
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from anomalens.callbacks import Callback
from anomalens.config import config_from_dict
from anomalens.engine import Engine
from anomalens.errors import ConfigError
from conftest import tiny_run_config

pytest.importorskip("comet_ml")


def _is_loopback(host) -> bool:
    if host in (None, "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def guard_sockets(mp: pytest.MonkeyPatch) -> list:
    """Fail (and record) every attempt to resolve or connect to a non-loopback address."""
    attempts = []
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def guarded(original):
        def call(self, address):
            if isinstance(address, tuple) and not _is_loopback(address[0]):
                attempts.append(("connect", address))
                raise OSError(f"blocked by the test: {address}")
            return original(self, address)
        return call

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            attempts.append(("getaddrinfo", host))
            raise socket.gaierror(f"blocked by the test: {host}")
        return getaddrinfo(host, *args, **kwargs)

    mp.setattr(socket.socket, "connect", guarded(connect))
    mp.setattr(socket.socket, "connect_ex", guarded(connect_ex))
    mp.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


def tiny_config(root, tmp, **logging):
    return tiny_run_config(root, tmp, {"logger": "comet", "comet": {"mode": "offline"}, **logging})


def read_archive(path: Path):
    with zipfile.ZipFile(path) as zf:
        experiment = json.loads(zf.read("experiment.json"))
        messages = [json.loads(line) for line in zf.read("messages.json").decode().splitlines() if line.strip()]
        files = {name: zf.read(name) for name in zf.namelist()}
    return experiment, messages, files


def of_type(messages, kind):
    return [m["payload"] for m in messages if m["type"] == kind]


@pytest.fixture(scope="module")
def offline_run(tiny_demo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comet")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("COMET_API_KEY", "COMET_PROJECT_NAME", "COMET_WORKSPACE", "COMET_URL_OVERRIDE"):
            mp.delenv(name, raising=False)
        attempts = guard_sockets(mp)
        engine = Engine(tiny_config(tiny_demo_root, tmp, log_graph=True))
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)  # independent of ours
        with contextlib.redirect_stdout(out):
            run_dir = engine.run()
    archives = sorted((run_dir / "comet").glob("*.zip"))
    return SimpleNamespace(engine=engine, run_dir=run_dir, attempts=attempts, printed=out.getvalue(),
                           commit=head.stdout.strip() if head.returncode == 0 else None,
                           archives=archives, content=read_archive(archives[0]) if archives else None)


def test_offline_run_opens_no_outside_connection(offline_run):
    assert offline_run.attempts == []


def test_offline_archive_and_exact_upload_command(offline_run):
    assert len(offline_run.archives) == 1
    archive = offline_run.archives[0]
    assert f"Upload it with: comet upload {archive}\n" in offline_run.printed
    experiment, _, _ = offline_run.content
    assert experiment["project_name"] == "mvtec-brick"
    assert set(experiment["tags"]) == {"padim", "mvtec", "brick"}


def test_archive_holds_config_metrics_and_run_facts(offline_run):
    _, messages, _ = offline_run.content
    params = {p["param"]["paramName"]: p["param"]["paramValue"] for p in of_type(messages, "parameter_msg")}
    flat = offline_run.engine.config.flat()
    assert params["model.name"] == "padim" and params["dataset.image_size"] == 64
    assert params["logging.comet.mode"] == "offline"  # nested sections are flattened
    assert set(params) >= {k for k in flat if not isinstance(flat[k], dict)}

    metrics = {(p["metric"]["metricName"], p["metric"]["step"]): p["metric"]["metricValue"]
               for p in of_type(messages, "metric_msg")}
    summary = json.loads((offline_run.run_dir / "metrics.json").read_text())
    for key in ("image_AUROC", "pixel_AUROC", "image_threshold", "false_reject_rate", "escape_rate"):
        assert float(metrics[(key, 0)]) == pytest.approx(summary["metrics"][key])
    assert float(metrics[("time/test_seconds", 0)]) == pytest.approx(summary["timings"]["test_seconds"])
    assert 0 < float(metrics[("system/ram_used_percent", 0)]) <= 100

    others = {p["key"]: p["value"] for p in of_type(messages, "log_other")}
    assert others["model"] == "padim" and others["run_dir"] == str(offline_run.run_dir)
    if offline_run.commit:  # the tests run from a git checkout
        assert others["git/commit"] == offline_run.commit

    packages = of_type(messages, "installed_packages")[0]["installed_packages"]
    assert f"torch=={metadata.version('torch')}" in packages and f"comet_ml=={metadata.version('comet_ml')}" in packages
    graph = of_type(messages, "graph")[0]["graph"]
    assert graph.startswith("PaDiM(")


def test_archive_holds_images_table_and_source(offline_run):
    _, messages, files = offline_run.content
    uploads = of_type(messages, "file_upload")
    saved = {f"{p.parent.name}/{p.stem}": p for p in (offline_run.run_dir / "images").glob("*/*.png")}
    images = {u["additional_params"]["figName"]: u for u in uploads if u["upload_type"] == "visualization"}
    assert set(images) == set(saved) and len(saved) == 3
    for name, upload in images.items():
        assert upload["additional_params"]["step"] == 0
        sent = np.asarray(Image.open(io.BytesIO(files[upload["file_path"]])).convert("RGB"))
        assert np.array_equal(sent, np.asarray(Image.open(saved[name]).convert("RGB")))

    table = next(u for u in uploads if u["additional_params"].get("fileName") == "scores.csv")
    sent_rows = list(csv.reader(io.StringIO(files[table["file_path"]].decode())))
    assert sent_rows == list(csv.reader(open(offline_run.run_dir / "scores.csv", newline="")))

    code = {u["additional_params"]["fileName"]: u for u in uploads if u["upload_type"] == "source_code"}
    engine_py = Path(__import__("anomalens.engine").engine.__file__)
    assert files[code["anomalens/engine.py"]["file_path"]].decode() == engine_py.read_text()


def test_local_record_is_complete_with_comet(offline_run):
    for name in ("config.yaml", "metrics.json", "scores.csv", "model.pt", "code.zip"):
        assert (offline_run.run_dir / name).is_file(), name


# --------------------------------------------------------------------------- online, without Comet
def fake_engine(config, run_dir):
    run_dir.mkdir(parents=True)
    return SimpleNamespace(config=config, run_dir=run_dir, device="cpu", timings={"fit_seconds": 1.5},
                           model=torch.nn.Linear(2, 2))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_online_without_network_falls_back_to_offline_losing_nothing(tiny_demo_root, tmp_path, monkeypatch, capsys):
    from anomalens.loggers.comet import CometTracker

    attempts = guard_sockets(monkeypatch)
    monkeypatch.setenv("COMET_API_KEY", "abcdefghij0123456789ABCDE")
    monkeypatch.setenv("COMET_URL_OVERRIDE", f"http://127.0.0.1:{closed_port()}/clientlib/")
    tracker = CometTracker(tiny_config(tiny_demo_root, tmp_path, comet={"mode": "auto"}))
    assert tracker.online
    engine = fake_engine(tracker.config, tmp_path / "run")
    expected = (r"Comet is unavailable \(ConnectionError: the Comet server at http://127\.0\.0\.1:\d+/clientlib/ "
                r"is unreachable .*\); this run is logged to an offline archive in ")
    with pytest.warns(UserWarning, match=expected):
        tracker.on_run_start(engine)
    tracker.on_test_end(engine, {"image_AUROC": 0.75, "pixel_AUROC": float("nan")})
    tracker.on_run_end(engine)
    assert attempts == []
    [archive] = tracker.archives()
    assert f"comet upload {archive}" in capsys.readouterr().out
    _, messages, _ = read_archive(archive)
    metrics = {p["metric"]["metricName"]: p["metric"]["metricValue"] for p in of_type(messages, "metric_msg")}
    assert float(metrics["image_AUROC"]) == 0.75 and "pixel_AUROC" not in metrics  # NaN is not sent
    assert float(metrics["time/fit_seconds"]) == 1.5


def test_rejected_key_falls_back_to_offline(tiny_demo_root, tmp_path, monkeypatch):
    import anomalens.loggers.comet as comet_module

    guard_sockets(monkeypatch)
    monkeypatch.setenv("COMET_API_KEY", "abcdefghij0123456789ABCDE")
    tracker = comet_module.CometTracker(tiny_config(tiny_demo_root, tmp_path, comet={"mode": "online"}))
    monkeypatch.setattr(comet_module, "check_reachable", lambda *a: None)

    def rejected(*args, **kwargs):
        raise tracker.comet.exceptions.InvalidAPIKey("abcdefghij0123456789ABCDE", None)

    monkeypatch.setattr(tracker.comet, "Experiment", rejected)
    engine = fake_engine(tracker.config, tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.on_run_start(engine)
        tracker.on_run_end(engine)
    [message] = [str(w.message) for w in caught if "Comet is unavailable" in str(w.message)]
    assert message.startswith("Comet is unavailable (InvalidAPIKey: ('<api key>', None)); this run is logged to an "
                              "offline archive in ")
    assert not tracker.online and len(tracker.archives()) == 1


def test_online_mode_without_key_is_a_config_error(tiny_demo_root, tmp_path, monkeypatch):
    from anomalens.loggers.comet import CometTracker

    monkeypatch.delenv("COMET_API_KEY", raising=False)
    monkeypatch.setenv("COMET_CONFIG", str(tmp_path / "no-such.config"))
    with pytest.raises(ConfigError, match=r"^logging\.comet\.mode is 'online' but no Comet API key was found: set "
                                          r"COMET_API_KEY \(or run `comet login`\), or set logging\.comet\.mode to "
                                          r"'offline'\.$"):
        CometTracker(tiny_config(tiny_demo_root, tmp_path, comet={"mode": "online"}))
    assert not CometTracker(tiny_config(tiny_demo_root, tmp_path, comet={"mode": "auto"})).online


def test_error_tracking_started_by_an_earlier_comet_import_is_stopped(monkeypatch):
    import logging

    import sentry_sdk
    from comet_ml.error_tracking import api

    from anomalens.loggers.comet import import_comet

    attempts = guard_sockets(monkeypatch)
    api.setup_sentry_error_tracker()  # what `import comet_ml` does for half of its users
    assert sentry_sdk.get_client().is_active()
    import_comet()
    assert not sentry_sdk.get_client().is_active()
    assert not [h for h in logging.getLogger("comet_ml").handlers if "sentry" in type(h).__module__]
    logging.getLogger("comet_ml").error("an error that Sentry would have reported")
    assert attempts == []


def test_the_socket_guard_fails_an_outside_connection(monkeypatch):
    """The guard above is what makes the offline test meaningful: check that it does catch one."""
    attempts = guard_sockets(monkeypatch)
    with socket.socket() as s, pytest.raises(OSError, match="blocked by the test"):
        s.connect(("192.0.2.1", 443))  # TEST-NET-1: never routed
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("www.comet.com", 443)
    import requests  # what comet_ml and Sentry's transport go through

    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get("https://www.comet.com/api/isAlive/ping", timeout=2)
    assert attempts[:2] == [("connect", ("192.0.2.1", 443)), ("getaddrinfo", "www.comet.com")]
    assert attempts[2] == ("getaddrinfo", "www.comet.com") and len(attempts) >= 3


# --------------------------------------------------------------------------- online, network lost mid-run
class FakeComet:
    """A loopback stand-in for the Comet server: accepts the handshake and every message, until stopped."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        requests = self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def reply(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                requests.append(self.path)
                body = {}
                if self.path.endswith("/isAlive/ver"):
                    body = {"version": "3.30.0"}  # recent enough for Comet's fallback to offline
                elif self.path.endswith("/logger/add/run"):
                    body = {"runId": "run-1", "project_id": "project-1", "lastOffset": 0}
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = reply

            def log_message(self, *args):
                pass

        import threading

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/clientlib/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received_metrics(self) -> bool:
        return any(path.endswith("/batch/logger/experiment/metric") for path in self.requests)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()  # from now on: connection refused, as with the network gone


class NetworkGoesDown(Callback):
    """Stops the server once calibration is logged: per-epoch losses went online, the test results can't."""

    def __init__(self, server):
        self.server = server

    def on_calibrate_end(self, engine):
        # Comet sends metrics in timed batches: on a loaded machine the first may not have left yet.
        deadline = time.monotonic() + 30
        while not self.server.received_metrics() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.server.stop()


def test_online_run_losing_the_network_mid_run_keeps_everything_in_an_archive(tiny_demo_root, tmp_path,
                                                                               monkeypatch):
    attempts = guard_sockets(monkeypatch)
    server = FakeComet()
    monkeypatch.setenv("COMET_API_KEY", "abcdefghij0123456789ABCDE")
    monkeypatch.setenv("COMET_URL_OVERRIDE", server.url)
    monkeypatch.delenv("COMET_PROJECT_NAME", raising=False)
    config = config_from_dict({
        "model": {"name": "autoencoder", "width": 4},
        "dataset": {"format": "mvtec", "root": str(tiny_demo_root), "category": "brick", "image_size": 64,
                    "batch_size": 8},
        "visualization": {"max_images": 2},
        "trainer": {"progress": False, "max_epochs": 2},
        "project": {"root": str(tmp_path / "runs")},
        "logging": {"logger": "comet", "comet": {"mode": "auto"}},
    })
    engine = Engine(config, callbacks=[])
    engine.callbacks.callbacks.append(NetworkGoesDown(server))  # after the tracker: it logs first
    [tracker] = [cb for cb in engine.callbacks.callbacks if type(cb).__name__ == "CometTracker"]
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        run_dir = engine.run()

    assert tracker.online and attempts == []
    assert server.received_metrics()  # it was online
    [archive] = sorted((run_dir / "comet").glob("*.zip"))
    assert f"Upload it with: comet upload --force-reupload {archive}\n" in out.getvalue()
    ours = [str(w.message) for w in caught if "Comet" in str(w.message) and issubclass(w.category, UserWarning)]
    assert ours == [f"Comet lost its connection during the run; everything logged is kept in the offline archive "
                    f"{archive}. Upload it with the command printed at the end."]
    for name in ("config.yaml", "metrics.json", "scores.csv", "model.pt"):
        assert (run_dir / name).is_file(), name

    experiment, messages, _ = read_archive(archive)
    assert experiment["project_name"] == "mvtec-brick"
    metrics = {}
    for p in of_type(messages, "metric_msg"):
        metrics.setdefault(p["metric"]["metricName"], {})[p["metric"]["step"]] = float(p["metric"]["metricValue"])
    history = {row["epoch"]: row["train_loss"] for row in engine.history}
    assert metrics["train_loss"] == pytest.approx(history)  # logged while online: kept too
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["image_AUROC"] == pytest.approx({2: summary["metrics"]["image_AUROC"]})  # after the loss
    params = {p["param"]["paramName"]: p["param"]["paramValue"] for p in of_type(messages, "parameter_msg")}
    assert params["model.name"] == "autoencoder"
    uploads = of_type(messages, "file_upload")
    figures = sorted(u["additional_params"]["figName"] for u in uploads if u["upload_type"] == "visualization")
    assert figures == sorted(f"{p.parent.name}/{p.stem}" for p in (run_dir / "images").glob("*/*.png"))
    assert any(u["additional_params"].get("fileName") == "scores.csv" for u in uploads)


@pytest.mark.parametrize("project, env_project, expected", [
    (None, None, "mvtec-brick"),  # '<dataset>-<category>' by default
    (None, "line-3", "line-3"),  # COMET_PROJECT_NAME
    ("from-config", "line-3", "from-config"),  # logging.project wins
])
def test_project_and_workspace_names(tiny_demo_root, tmp_path, monkeypatch, project, env_project, expected):
    from anomalens.loggers.comet import CometTracker

    monkeypatch.delenv("COMET_API_KEY", raising=False)
    monkeypatch.setenv("COMET_WORKSPACE", "quality-team")
    if env_project:
        monkeypatch.setenv("COMET_PROJECT_NAME", env_project)
    else:
        monkeypatch.delenv("COMET_PROJECT_NAME", raising=False)
    tracker = CometTracker(tiny_config(tiny_demo_root, tmp_path, project=project))
    engine = fake_engine(tracker.config, tmp_path / "run")
    tracker.on_run_start(engine)
    tracker.on_run_end(engine)
    [archive] = tracker.archives()
    experiment, _, _ = read_archive(archive)
    assert (experiment["project_name"], experiment["workspace"]) == (expected, "quality-team")
