"""What every tracker shares: config checks, missing SDKs, the hooks' contract, system facts,
packages, git and the source snapshot."""
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from anomalens.config import config_from_dict
from anomalens.data.sample import Batch
from anomalens.engine import Engine
from anomalens.errors import ConfigError, MissingDependencyError
from anomalens.loggers import Tracker, build_trackers, system
from anomalens.loggers.base import finite, flatten
from anomalens.models.base import AnomalyOutput


def config(**sections):
    return config_from_dict({"model": {"name": "padim", "weights": "none"}, "trainer": {"progress": False},
                             **sections})


# --------------------------------------------------------------------------- config
def test_local_loggers_build_no_tracker():
    assert build_trackers(config(logging={"logger": "csv"})) == []
    assert build_trackers(config(logging={"logger": ["csv", "none"]})) == []


def test_unknown_logger_is_named_with_the_choices():
    with pytest.raises(ConfigError, match=r"^Unknown logger 'wandb'\. Available: comet, csv, mlflow, none, "
                                          r"tensorboard\.$"):
        build_trackers(config(logging={"logger": ["csv", "wandb"]}))


def test_tracker_sub_sections_are_checked_even_when_unused():
    with pytest.raises(ConfigError, match=r"^Unknown config key 'logging\.comet\.mod'\. Allowed keys in "
                                          r"'logging\.comet': mode, workspace\.$"):
        build_trackers(config(logging={"comet": {"mod": "offline"}}))
    with pytest.raises(ConfigError, match=r"^The 'logging\.comet\.mode' parameter of the config must be one of "
                                          r"'auto', 'online', 'offline'\. Got 'offline!' instead\.$"):
        build_trackers(config(logging={"comet": {"mode": "offline!"}}))
    with pytest.raises(ConfigError, match=r"^The 'logging\.mlflow\.tracking_uri' parameter of the config must be "
                                          r"a str or None\. Got 5 instead\.$"):
        build_trackers(config(logging={"mlflow": {"tracking_uri": 5}}))
    with pytest.raises(ConfigError, match=r"^The 'logging\.comet' parameter of the config must be a mapping\. "
                                          r"Got 'offline' instead\.$"):
        config(logging={"comet": "offline"})


def test_a_tracker_is_built_once_per_name():
    pytest.importorskip("torch.utils.tensorboard")
    trackers = build_trackers(config(logging={"logger": ["tensorboard", "csv", "tensorboard"]}))
    assert [type(t).__name__ for t in trackers] == ["TensorBoardTracker"]


@pytest.mark.parametrize("logger, module, package, extra", [
    ("comet", "comet_ml", "comet_ml", "comet"),
    ("mlflow", "mlflow", "mlflow", "mlflow"),
    ("tensorboard", "torch.utils.tensorboard", "tensorboard", "tensorboard"),
])
def test_missing_sdk_fails_before_the_run_with_the_pip_command(monkeypatch, tmp_path, logger, module, package, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    for name in [m for m in sys.modules if m.startswith(f"anomalens.loggers.{logger}")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(MissingDependencyError, match=rf"^{package} is required for this feature\. Install it with: "
                                                     rf"pip install 'anomalens\[{extra}\]'$"):
        Engine(config(logging={"logger": ["csv", logger]}, project={"root": str(tmp_path)}))
    assert not list(tmp_path.iterdir())  # nothing was started


def test_logged_parameters_are_the_resolved_config():
    """Model defaults and a trained model's training settings, as the run uses them."""
    from anomalens.loggers.base import resolved_config

    params = flatten(resolved_config(config_from_dict({"model": {"name": "autoencoder", "width": 4},
                                                       "trainer": {"max_epochs": 2}})))
    assert params["model.width"] == 4 and params["model.latent_channels"] == 16  # the model's default
    assert params["trainer.max_epochs"] == 2 and params["trainer.optimizer.name"] == "adam"  # resolved settings
    assert params["trainer.optimizer.lr"] == 1e-3
    padim = flatten(resolved_config(config()))
    assert padim["model.n_features"] == 100 and padim["trainer.optimizer"] is None  # not trained: left as set


def test_flatten_and_finite():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2], "f": {}}) == {"a.b": 1, "a.c.d": None,
                                                                             "e": [1, 2], "f": {}}
    assert finite({"x": 1, "y": float("nan"), "z": float("inf"), "w": np.float32(0.5), "b": True, "s": "1"}) == {
        "x": 1.0, "w": 0.5}


# --------------------------------------------------------------------------- hooks
class Recording(Tracker):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = []

    def __getattribute__(self, name):
        if name in ("start", "log_params", "log_tags", "log_metrics", "log_packages", "log_code", "log_graph",
                    "log_image", "log_table", "log_file", "finish"):
            calls = object.__getattribute__(self, "calls")
            return lambda *args, **kwargs: calls.append((name, args, kwargs))
        return object.__getattribute__(self, name)

    def called(self, name):
        return [args for n, args, _ in self.calls if n == name]


def fake_engine(cfg, run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(config=cfg, run_dir=run_dir, device=torch.device("cpu"), timings={"fit_seconds": 3.0},
                           model=None)


def batch_and_output(n=3, size=32):
    g = torch.Generator().manual_seed(0)
    batch = Batch(image=torch.rand(n, 3, size, size, generator=g), label=torch.tensor([0, 1, 1][:n]),
                  mask=(torch.rand(n, 1, size, size, generator=g) > 0.8).float(),
                  has_mask=torch.tensor([False, True, True][:n]),
                  path=[f"/d/{t}/{i:03d}.png" for i, t in enumerate(["good", "crack", "stain"][:n])],
                  defect_type=["good", "crack", "stain"][:n])
    norm_map = torch.rand(n, 1, size, size, generator=g)
    output = AnomalyOutput(score=torch.rand(n, generator=g), anomaly_map=norm_map * 3,
                           norm_score=torch.rand(n, generator=g), norm_map=norm_map,
                           pred_label=torch.tensor([False, True, False][:n]), pred_mask=norm_map > 0.5)
    return batch, output


def test_hooks_before_the_run_starts_log_nothing(tmp_path):
    """`anomalens test` re-tests without on_run_start: a tracker then stays silent."""
    tracker = Recording(config())
    engine = fake_engine(tracker.config, tmp_path)
    tracker.on_test_start(engine)
    tracker.on_test_batch_end(engine, *batch_and_output())
    tracker.on_test_end(engine, {"image_AUROC": 1.0})
    tracker.on_run_end(engine)
    assert tracker.calls == []


def test_what_a_run_logs_and_when(tmp_path):
    cfg = config(visualization={"save_images": False, "max_images": 2}, project={"root": str(tmp_path)})
    tracker = Recording(cfg)
    engine = fake_engine(cfg, tmp_path / "run")
    (engine.run_dir / "scores.csv").write_text("path,defect_type,label,score,norm_score,pred_label\n")
    tracker.on_run_start(engine)
    tracker.on_train_epoch_end(engine, 4, {"loss": 0.25, "val_loss": float("nan")})
    batch, output = batch_and_output()
    tracker.on_test_batch_end(engine, batch, output)
    tracker.on_test_end(engine, {"image_AUROC": 0.9, "pixel_AUROC": float("nan")})
    tracker.on_run_end(engine)

    names = [name for name, _, _ in tracker.calls]
    assert names[:6] == ["start", "log_params", "log_tags", "log_packages", "log_code", "log_metrics"]
    assert names[-1] == "finish" and tracker.calls[-1][2] == {}
    [(params,)] = tracker.called("log_params")
    assert params.items() >= flatten(cfg.to_dict()).items() and params["model.name"] == "padim"
    assert params["model.n_features"] == 100 and "model.n_features" not in cfg.model  # PaDiM's default, resolved
    [(tags,)] = tracker.called("log_tags")
    assert tags["model"] == "padim" and tags["run_dir"] == str(engine.run_dir)
    assert int(tags["system/cpu_count"]) >= 1
    metrics = [(args[0], kwargs["step"]) for name, args, kwargs in tracker.calls if name == "log_metrics"]
    assert metrics[0] == ({"loss": 0.25}, 4)  # NaN dropped
    assert metrics[1] == ({"image_AUROC": 0.9}, 4)  # final metrics at the last epoch
    assert metrics[2][0]["time/fit_seconds"] == 3.0 and metrics[2][1] == 4
    [(table,)] = tracker.called("log_table")
    assert table == engine.run_dir / "scores.csv"

    # Nothing was saved (save_images false), so the tracker rendered its own: max_images of them.
    from anomalens.visualization import render

    images = tracker.called("log_image")
    assert [(name, step) for _, name, step in images] == [("good/000", 4), ("crack/001", 4)]
    expected = render(batch.image[1], output.norm_map[1], pred_mask=output.pred_mask[1], gt_mask=batch.mask[1],
                      score=float(output.norm_score[1]), label=True, mode="full", title="001.png")
    assert np.array_equal(images[1][0], expected)


def test_log_images_false_sends_no_image(tmp_path):
    cfg = config(visualization={"save_images": False, "log_images": False})
    tracker = Recording(cfg)
    engine = fake_engine(cfg, tmp_path)
    tracker.on_run_start(engine)
    tracker.on_test_batch_end(engine, *batch_and_output())
    tracker.on_run_end(engine)
    assert tracker.called("log_image") == []


def test_a_failed_run_is_closed_as_failed(tmp_path):
    tracker = Recording(config())
    engine = fake_engine(tracker.config, tmp_path)
    tracker.on_run_start(engine)
    tracker.on_exception(engine, RuntimeError("boom"))
    tracker.on_exception(engine, RuntimeError("again"))  # closed once only
    assert [(n, k) for n, _, k in tracker.calls if n == "finish"] == [("finish", {"failed": True})]


# --------------------------------------------------------------------------- system facts
def test_installed_packages_match_importlib_metadata():
    expected = {f"{d.metadata['Name'].lower()}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]}
    packages = system.installed_packages()
    assert set(packages) <= expected and f"torch=={metadata.version('torch')}" in packages
    assert list(packages) == sorted(packages, key=lambda p: p.split("==")[0])


def test_system_facts_and_load():
    import psutil

    info = system.system_info()
    assert info["system/cpu_count"] == psutil.cpu_count() and info["system/torch"] == torch.__version__
    assert info["system/ram_total_gb"] == pytest.approx(psutil.virtual_memory().total / 2**30, abs=0.01)
    load = system.system_metrics()
    assert 0 <= load["system/cpu_percent"] <= 100 and 0 < load["system/ram_used_percent"] <= 100
    assert load["system/process_rss_gb"] == pytest.approx(psutil.Process().memory_info().rss / 2**30, rel=0.2)


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0, reason="no git")
def test_git_commit_and_dirty_flag(tmp_path):
    assert system.git_info(tmp_path) == {}
    git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "train.py").write_text("print(1)\n")
    git(tmp_path, "add", "train.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    info = system.git_info(tmp_path)
    assert info == {"git/commit": git(tmp_path, "rev-parse", "HEAD"), "git/branch": "main", "git/dirty": "false",
                    "git/root": str(tmp_path.resolve())}
    (tmp_path / "train.py").write_text("print(2)\n")
    assert system.git_info(tmp_path)["git/dirty"] == "true"


def test_source_snapshot_holds_the_package_source_once(tmp_path, monkeypatch):
    script = tmp_path / "my_experiment.py"
    script.write_text("# the user's own script\n")
    monkeypatch.setattr(sys, "argv", [str(script)])
    path = system.source_snapshot(tmp_path)
    assert path == tmp_path / "code.zip"
    import anomalens.engine as engine_module

    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert zf.read("anomalens/engine.py").decode() == Path(engine_module.__file__).read_text()
        assert zf.read("script/my_experiment.py").decode() == "# the user's own script\n"
    assert "anomalens/loggers/base.py" in names and not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    stamp = os.stat(path).st_mtime_ns
    assert system.source_snapshot(tmp_path) == path and os.stat(path).st_mtime_ns == stamp  # shared, not rewritten


def test_make_test_installs_chromium_for_the_ui_check():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    target = re.search(r"^test: .*?(?=^\S|\Z)", makefile, re.S | re.M).group(0)
    assert 'command -v chromium || (apt-get update && apt-get install -y chromium) || echo "chromium unavailable"' \
        in target
