"""A full disk for a tracker's own files, with the real SDKs: the run completes, its local record is
complete, each tracker says so in one warning, and Comet prints no upload command for an archive
it could not finish."""
import contextlib
import errno
import io
import json
import os
import re
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from anomalens.callbacks import Callback
from anomalens.engine import Engine
from conftest import tiny_run_config

pytest.importorskip("comet_ml")
pytest.importorskip("tensorboard")

RECORD = ("config.yaml", "metrics.json", "scores.csv", "model.pt")


class FullFile:
    """A file on a disk with `budget[0]` bytes left: a write past it fails with ENOSPC."""

    def __init__(self, file, budget):
        self._file, self._budget = file, budget

    def write(self, data):
        if len(data) > self._budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __iter__(self):
        return iter(self._file)


def fill_disk(mp: pytest.MonkeyPatch, on_full_disk, budget: int) -> list:
    """Files opened for writing at a path for which `on_full_disk(path)` is true share `budget` bytes
    (the tracker folders' disk); every other file is written as usual (the run folder's disk)."""
    left, opened, original = [budget], [], io.open

    def open_(file, mode="r", *args, **kwargs):
        handle = original(file, mode, *args, **kwargs)
        path = Path(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else None
        if path is not None and any(c in mode for c in "wax+") and on_full_disk(path):
            opened.append(path)
            return FullFile(handle, left)
        return handle

    mp.setattr(io, "open", open_)
    mp.setattr("builtins.open", open_)
    return opened


def run_engine(config):
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        run_dir = Engine(config).run()
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)
                and "Tracker." in str(w.message)]
    return SimpleNamespace(run_dir=run_dir, warnings=messages, printed=out.getvalue())


def assert_complete_record(run_dir):
    for name in RECORD:
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "images").rglob("*.png"))) == 3
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"]["image_AUROC"] >= 0


# TensorBoard's writer thread fails first; its traceback must not be printed besides the one warning.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_tracker_folders_filling_up_mid_run_leave_a_complete_run(tiny_demo_root, tmp_path, monkeypatch):
    for name in ("COMET_API_KEY", "COMET_PROJECT_NAME"):
        monkeypatch.delenv(name, raising=False)
    config = tiny_run_config(tiny_demo_root, tmp_path, {"logger": ["comet", "tensorboard"], "comet": {"mode": "offline"}})
    # Room for the start of the run (Comet's empty archive, TensorBoard's first events), not for all of it.
    opened = fill_disk(monkeypatch, lambda p: p.parent.name in ("comet", "tensorboard"), budget=20_000)
    done = run_engine(config)

    assert {p.parent.name for p in opened} == {"comet", "tensorboard"}  # both trackers wrote to the full disk
    assert_complete_record(done.run_dir)
    [archive] = sorted((done.run_dir / "comet").glob("*.zip"))
    comet, tensorboard = sorted(done.warnings)  # one warning per tracker, no more
    assert comet == (f"CometTracker.on_run_end failed and is disabled for this run: OSError: Comet's offline archive "
                     f"{archive} is incomplete (is the disk full?); this Comet experiment is lost, the run's local "
                     "record is complete.")
    # TensorBoard writes in a thread: its error surfaces at the tracker's next call, whichever that is.
    assert re.fullmatch(r"TensorBoardTracker\.on_\w+ failed and is disabled for this run: OSError: \[Errno 28\] "
                        r"No space left on device", tensorboard)
    assert "Upload it with" not in done.printed  # no upload command for a broken archive


def test_a_complete_comet_archive_still_prints_its_upload_command(tiny_demo_root, tmp_path, monkeypatch):
    """The check above does not reject a good archive (the budget is never reached)."""
    for name in ("COMET_API_KEY", "COMET_PROJECT_NAME"):
        monkeypatch.delenv(name, raising=False)
    config = tiny_run_config(tiny_demo_root, tmp_path, {"logger": "comet", "comet": {"mode": "offline"}})
    fill_disk(monkeypatch, lambda p: p.parent.name == "comet", budget=10**9)
    done = run_engine(config)
    [archive] = sorted((done.run_dir / "comet").glob("*.zip"))
    assert done.warnings == [] and f"Upload it with: comet upload {archive}\n" in done.printed


# --------------------------------------------------------------------------- a real full file system
@pytest.fixture
def full_tmpfs(tmp_path):
    """A small tmpfs, filled up: a real ENOSPC (needs the right to mount, e.g. root in a container)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                                                         str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root, or no CAP_SYS_ADMIN); the simulated full disk "
                    "above covers the same path")
    try:
        for name in ("comet", "tensorboard"):
            (mount / name).mkdir()
        with contextlib.suppress(OSError), open(mount / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_every_tracker_on_a_really_full_disk(tiny_demo_root, tmp_path, monkeypatch, full_tmpfs):
    pytest.importorskip("mlflow")
    for name in ("COMET_API_KEY", "COMET_PROJECT_NAME", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    make_run_dir = Engine.make_run_dir

    def tracker_folders_on_the_full_disk(self):
        run_dir = make_run_dir(self)
        for name in ("comet", "tensorboard"):
            (run_dir / name).symlink_to(full_tmpfs / name)
        return run_dir

    monkeypatch.setattr(Engine, "make_run_dir", tracker_folders_on_the_full_disk)
    config = tiny_run_config(tiny_demo_root, tmp_path, {
        "logger": ["comet", "mlflow", "tensorboard"], "comet": {"mode": "offline"},
        "mlflow": {"tracking_uri": f"sqlite:///{full_tmpfs}/mlflow.db"}})
    done = run_engine(config)

    assert_complete_record(done.run_dir)
    assert len(done.warnings) == 3, done.warnings
    by_tracker = {w.split(".")[0]: w for w in done.warnings}
    assert set(by_tracker) == {"CometTracker", "MlflowTracker", "TensorBoardTracker"}
    assert all("\n" not in w for w in done.warnings)  # one line each: no SQL statement dumped
    assert by_tracker["MlflowTracker"] == ("MlflowTracker.on_run_start failed and is disabled for this run: "
                                           "TrackerError: OperationalError: (sqlite3.OperationalError) database or "
                                           "disk is full")
    assert by_tracker["TensorBoardTracker"].endswith("OSError: [Errno 28] No space left on device")
    assert "Upload it with" not in done.printed


class CometFolderGone(Callback):
    """Replaces the run's comet/ folder by a file before Comet writes its archive there."""

    def on_test_end(self, engine, metrics):
        shutil.rmtree(engine.run_dir / "comet")
        (engine.run_dir / "comet").write_text("not a folder")


def test_an_archive_comet_had_to_write_elsewhere_is_the_one_reported(tiny_demo_root, tmp_path, monkeypatch):
    for name in ("COMET_API_KEY", "COMET_PROJECT_NAME"):
        monkeypatch.delenv(name, raising=False)
    config = tiny_run_config(tiny_demo_root, tmp_path, {"logger": "comet", "comet": {"mode": "offline"}})
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        engine = Engine(config, callbacks=[CometFolderGone()])
        run_dir = engine.run()
    assert [str(w.message) for w in caught if "Tracker." in str(w.message)] == []
    [tracker] = [cb for cb in engine.callbacks.callbacks if type(cb).__name__ == "CometTracker"]
    [archive] = tracker.archives()
    try:
        assert archive.parent != run_dir / "comet" and archive.is_file()  # Comet's temporary folder
        assert f"Upload it with: comet upload {archive}\n" in out.getvalue()
        with zipfile.ZipFile(archive) as zf:
            assert json.loads(zf.read("experiment.json"))["project_name"] == "mvtec-brick"
    finally:
        shutil.rmtree(archive.parent, ignore_errors=True)
    assert_complete_record(run_dir)
