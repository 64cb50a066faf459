"""`anomalens ui` for real: serve the MLflow UI of a runs root on 127.0.0.1, load a run's page in
headless Chromium (the UI is a JavaScript app, so read the DOM after it ran), stop the server."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch

from anomalens.cli import main
from anomalens.config import config_from_dict

pytest.importorskip("mlflow")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def logged_run(root, tmp_path):
    """One MLflow run in <root>/mlflow.db, logged by the tracker as the engine would."""
    from anomalens.loggers.mlflow import MlflowTracker

    config = config_from_dict({"model": {"name": "padim", "weights": "none"}, "logging": {"logger": "mlflow"},
                               "visualization": {"save_images": False, "log_images": False},
                               "project": {"root": str(root)}})
    run_dir = root / "padim" / "demo" / "brick" / "ui-check"
    run_dir.mkdir(parents=True)
    engine = SimpleNamespace(config=config, run_dir=run_dir, device=torch.device("cpu"),
                             timings={"fit_seconds": 2.5}, model=None)
    tracker = MlflowTracker(config)
    tracker.on_run_start(engine)
    tracker.on_test_end(engine, {"image_AUROC": 0.8765, "pixel_AUPRO": 0.4321})
    tracker.on_run_end(engine)
    experiment = tracker.client.get_experiment_by_name("demo-brick")
    return experiment.experiment_id, tracker.run_id


def dump_dom(url: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120)
    return done.stdout


def test_ui_without_a_store_says_what_to_do(tmp_path, capsys):
    assert main(["ui", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: No MLflow store at '{tmp_path / 'mlflow.db'}': train with "
                                       "--logging.logger mlflow first, or pass --root with the runs root you "
                                       "trained into.\n")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed and could not be installed by `make test` "
                                             "(apt-get install chromium); the MLflow UI page cannot be checked")
def test_ui_serves_the_runs_root_and_the_run_shows_up_in_chromium(tmp_path):
    root = tmp_path / "runs"
    experiment_id, run_id = logged_run(root, tmp_path)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "anomalens.cli", "ui", "--root", str(root), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = server.stdout.readline()  # printed once the server answers
        assert line == f"MLflow UI for {root.resolve()}: http://127.0.0.1:{port}  (Ctrl+C to stop)\n"
        # Each project's runs page is printed next, and it lists the run by name ...
        runs_url = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs"
        assert server.stdout.readline() == f"  demo-brick: {runs_url}\n"
        runs_page = dump_dom(runs_url)
        assert "padim-ui-check" in runs_page and "demo-brick" in runs_page
        # ... and the run's own page shows its metrics and parameters.
        text = dump_dom(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{run_id}")
        assert "padim-ui-check" in text  # the run name
        assert "image_AUROC" in text and "0.8765" in text and "pixel_AUPRO" in text
        assert "time/fit_seconds" in text and "model.name" in text
    finally:
        server.send_signal(signal.SIGTERM)  # what a supervisor sends: the command stops its server too
        try:
            server.wait(timeout=30)
        finally:
            try:
                os.killpg(server.pid, signal.SIGKILL)  # in case anything of ours is left
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    while port_open(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not port_open(port)
