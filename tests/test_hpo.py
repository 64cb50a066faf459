"""Hyper-parameter search: spec parsing, Optuna studies (report, workers, resume, pruning, failures),
the Spearman ranking against scipy, and the Comet Optimizer adapter with a fake optimizer."""
import csv
import json
import math

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy.stats import spearmanr

from anomalens.callbacks import Callback, CallbackList, StopRun
from anomalens.config import load_config
from anomalens.engine import Engine
from anomalens.errors import ConfigError
from anomalens.loggers import TRACKERS
from anomalens.loggers.base import Tracker
from anomalens.pipelines import comet_optimizer as co
from anomalens.pipelines.hpo import Param, PrunedRun, PruningCallback, TrialRecord, run_hpo, spec_from_dict
from anomalens.pipelines.hpo_report import importance, parameter_statistics, spearman_ranking

# blocks.1 has 24 channels: every n_features below fits every layer choice.
PADIM = {"name": "padim", "weights": "none", "layers": ["blocks.1"], "n_features": 8}
SPACE = {
    "model.n_features": {"type": "int", "low": 8, "high": 24, "step": 8},
    "model.blur_sigma": {"type": "log_float", "low": 0.5, "high": 8.0},
    "model.layers": [["blocks.1"], ["blocks.1", "blocks.2"]],
}


def base(root, tmp, model=PADIM, **sections):
    data = {
        "model": dict(model),
        "dataset": {"format": "mvtec", "root": str(root), "category": "brick", "image_size": 64, "batch_size": 8},
        "visualization": {"save_images": False},
        "trainer": {"progress": False},
        "project": {"root": str(tmp / "runs")},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


def hpo_spec(root, tmp, space=SPACE, model=PADIM, sections=None, **settings):
    data = {"base": base(root, tmp, model, **(sections or {})), "search_space": space, "sampler": "random",
            "n_trials": 3, **settings}
    return spec_from_dict(data, default_name="study")


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class FakeTracker(Tracker):
    """Records the backend calls (registered as logger 'fake' in the study fixture)."""

    name = "fake"
    instances: list = []

    def __init__(self, config):
        super().__init__(config)
        self.calls = []
        FakeTracker.instances.append(self)

    def start(self, engine):
        self.calls.append(("start", engine.run_dir))

    def log_params(self, params):
        self.calls.append(("params", params))

    def log_tags(self, tags):
        self.calls.append(("tags", tags))

    def log_metrics(self, metrics, step):
        self.calls.append(("metrics", metrics, step))

    def log_image(self, image, name, step):
        self.calls.append(("image", name, image.shape))

    def log_file(self, path):
        self.calls.append(("file", path.name))

    def finish(self, failed=False):
        self.calls.append(("finish", failed))


# --------------------------------------------------------------------------- search space
def test_search_space_parsing_and_values():
    n = Param.parse("model.n_features", {"type": "int", "low": 10, "high": 40, "step": 10})
    assert (n.type, n.low, n.high, n.step) == ("int", 10, 40, 10)
    assert n.grid(5) == [10, 20, 30, 40]
    s = Param.parse("model.blur_sigma", {"type": "log_float", "low": 0.5, "high": 8.0})
    assert s.type == "float" and s.log and s.low == 0.5
    assert s.grid(5) == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0])
    lr = Param.parse("trainer.optimizer.lr", {"type": "float", "low": 1e-4, "high": 1e-2, "log": True})
    assert lr == s.__class__("trainer.optimizer.lr", "float", 1e-4, 1e-2, None, True)
    layers = Param.parse("model.layers", [["blocks.1"], ["blocks.1", "blocks.2"]])  # list shorthand
    assert layers.type == "categorical" and layers.labelled
    assert layers.encode(["blocks.1", "blocks.2"]) == "[blocks.1, blocks.2]"
    assert layers.decode("[blocks.1, blocks.2]") == ["blocks.1", "blocks.2"]
    assert layers.numeric(["blocks.1", "blocks.2"]) == 1.0
    flags = Param.parse("model.flag", {"type": "categorical", "choices": [False, True, None]})
    assert not flags.labelled and flags.decode(True) is True and flags.decode("null") is None
    assert [flags.numeric(v) for v in (False, True, None)] == [0.0, 1.0, 2.0]
    for p in (n, s, lr, layers, flags):  # the resolved spec that workers read parses back the same
        assert Param.parse(p.key, p.to_dict()) == p


@pytest.mark.parametrize("spec, message", [
    ({"type": "int", "low": 1}, "needs 'high'"),
    ({"type": "int", "low": 5, "high": 5}, "'high' parameter of search_space 'k' must be an int greater than low"),
    ({"type": "int", "low": 1.5, "high": 5}, "'low' parameter of search_space 'k' must be an int. Got 1.5"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "must be a float > 0 \\(log: true\\). Got 0.0"),
    ({"type": "float", "low": 0.0, "high": 1.0, "step": -0.1}, "'step' parameter"),
    ({"type": "float", "low": 0.1, "high": 1.0, "step": 0.1, "log": True}, "both log: true and a step"),
    ({"type": "float", "lo": 0.0, "high": 1.0}, "Unknown key 'lo'.*Did you mean 'low'"),
    ({"type": "uniform", "low": 0.0, "high": 1.0}, "'type' parameter .* Got 'uniform'"),
    ({"type": "categorical", "choices": []}, "must be a non-empty list"),
    ({"type": "categorical", "choices": [1, 1]}, "without duplicates"),
    ("0.1..1", "must be a mapping"),
])
def test_search_space_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        Param.parse("k", spec)


@pytest.mark.parametrize("change, message", [
    ({"n_trial": 3}, "Unknown key 'n_trial' in the HPO file. Did you mean 'n_trials'"),
    ({"search_space": {}}, "needs a 'search_space'"),
    ({"objective": {"metric": "accuracy"}}, "'metric' parameter of the HPO objective must be one of"),
    ({"objective": {"metric": "image_AUROC", "direction": "up"}}, "'direction'"),
    ({"n_trials": None}, "n_trials may be null only for a grid search"),
    ({"n_trials": 0}, "'n_trials' parameter"),
    ({"search_space": {"model.n_features": {"type": "int", "low": 0, "high": 10}}},
     "allows 0, which the config rejects: The 'n_features' parameter of PaDiM must be an int in \\[1, inf\\)"),
    ({"search_space": {"dataset.imgsize": [64, 128]}}, "Unknown config key 'dataset.imgsize'"),
    ({"search_space": {"trainer.optimizer.lr": {"type": "log_float", "low": 1e-4, "high": 1e-2}}},
     "has no effect: padim is not trained"),
    ({"pruner": {"name": "median", "percentile": 5}}, "Invalid pruner settings"),
    ({"pruner": {"name": "median", "monitor": "train_loss"}}, "'monitor' parameter of the HPO pruner"),
    ({"pruner": "median", "backend": "comet"}, "Pruning needs the optuna backend"),
    ({"sampler": "cmaes"}, "'name' parameter of the HPO sampler must be one of 'tpe', 'random', 'grid'"),
    ({"overrides": ["dataset.image_size", 128]}, "'overrides' of the HPO file must be a mapping"),
])
def test_spec_errors(tmp_path, change, message):
    data = {"base": base(tmp_path, tmp_path), "search_space": SPACE, "sampler": "random", "n_trials": 3, **change}
    with pytest.raises(ConfigError, match=message):
        spec_from_dict(data)


def test_spec_defaults_base_file_and_overrides(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "padim.yaml").write_text(yaml.safe_dump(base(tmp_path, tmp_path)))
    data = {"base": "padim.yaml", "overrides": {"dataset.image_size": 96}, "search_space": SPACE,
            "objective": {"metric": "false_reject_rate"}}
    spec = spec_from_dict(data, base_dir=tmp_path / "cfg", default_name="hpo-x", overrides={"seed": 7})
    assert spec.base["dataset"]["image_size"] == 96 and spec.base["seed"] == 7
    assert spec.direction == "minimize" and spec.split == "test" and spec.n_trials == 20
    assert spec.output == tmp_path / "runs" / "hpo" / "hpo-x"
    assert spec.storage_url == f"sqlite:///{(spec.output / 'study.db').resolve()}"


# --------------------------------------------------------------------------- a study and its report
@pytest.fixture(scope="module")
def study(tiny_demo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hpo")
    FakeTracker.instances.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TRACKERS, "fake", f"{__name__}:FakeTracker")
        spec = hpo_spec(tiny_demo_root, tmp, sections={"logging": {"logger": "fake"}}, log_trials=False)
        report = run_hpo(spec)
    return spec, report


def test_study_records_every_trial(study):
    spec, report = study
    assert [r.number for r in report.records] == [0, 1, 2]
    assert [r.state for r in report.records] == ["complete"] * 3, [r.error for r in report.records]
    rows = read_csv(report.files["trials_csv"])
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    for row, record in zip(rows, report.records, strict=True):
        assert float(row["value"]) == pytest.approx(record.value, rel=1e-5)
        assert float(row["image_AUROC"]) == pytest.approx(record.value, rel=1e-5)
        assert int(row["model.n_features"]) == record.params["model.n_features"] in (8, 16, 24)
        assert 0.5 <= float(row["model.blur_sigma"]) <= 8.0
        assert yaml.safe_load(row["model.layers"]) == record.params["model.layers"]
        assert row["run_dir"].endswith(f"trial-{record.number:04d}") and row["worker"]
    summary = json.loads(report.files["summary"].read_text())
    assert summary["trials"]["total"] == 3 and summary["best"]["number"] == report.best.number


def test_best_config_is_complete_and_reproduces_the_best_trial(study):
    spec, report = study
    best = report.best
    assert best.value == max(r.value for r in report.records)
    text = report.files["best_config"].read_text()
    assert text.startswith(f"# Best config of HPO study 'study': trial {best.number} of 3")
    config = load_config(report.files["best_config"])
    flat = config.flat()
    for key, value in best.params.items():
        assert flat[key] == value
    assert config.dataset.image_size == 64 and config.project.root == spec.base["project"]["root"]
    assert config.logging.logger == "fake"
    # The user's `anomalens train --config best_config.yaml` (the fake tracker is gone by now).
    engine = Engine(load_config(report.files["best_config"], {"logging.logger": "csv"}))
    engine.run()
    assert engine.metrics["image_AUROC"] == pytest.approx(best.value)


def test_plots_are_drawn(study):
    _, report = study
    for name in ("history", "parallel_coordinates", "params_vs_metric"):
        image = np.asarray(Image.open(report.files[name]).convert("L"), dtype=float)
        assert image.shape[0] > 200 and image.shape[1] > 300, name
        assert (image < 128).mean() > 0.005, name  # lines and text, not a blank canvas


def test_parameter_statistics_are_ranked(study):
    spec, report = study
    rows = read_csv(report.files["param_stats"])
    assert {r["parameter"] for r in rows} == set(spec.space)
    rhos = [abs(float(r["spearman_rho"])) if r["spearman_rho"] not in ("", "nan") else -1 for r in rows]
    assert rhos == sorted(rhos, reverse=True)
    importances = {s.key: s.importance for s in report.stats}
    assert all(v is not None and v >= 0 for v in importances.values())
    assert sum(importances.values()) == pytest.approx(1.0)


def test_report_goes_to_the_trackers(study):
    spec, report = study
    started = [t for t in FakeTracker.instances if t.calls]
    assert len(started) == 1  # log_trials: false -> only the summary run
    calls = started[0].calls
    assert calls[0] == ("start", spec.output) and calls[-1] == ("finish", False)
    params = next(c[1] for c in calls if c[0] == "params")
    assert params["hpo.metric"] == "image_AUROC" and params["best.model.n_features"] == report.best.params[
        "model.n_features"]
    per_trial = [c for c in calls if c[0] == "metrics" and "hpo/image_AUROC" in c[1]]
    assert [c[2] for c in per_trial] == [0, 1, 2]
    assert per_trial[-1][1]["hpo/best_image_AUROC"] == pytest.approx(report.best.value)
    assert {c[1] for c in calls if c[0] == "image"} == {"hpo/history", "hpo/parallel_coordinates",
                                                       "hpo/params_vs_metric"}
    assert {c[1] for c in calls if c[0] == "file"} == {"trials.csv", "best_config.yaml", "param_stats.csv",
                                                      "summary.json"}


# --------------------------------------------------------------------------- workers, resume, failures
AUTOENCODER = {"name": "autoencoder", "width": 4}
LR_SPACE = {"trainer.optimizer.lr": {"type": "log_float", "low": 1e-4, "high": 1e-2}}
ONE_EPOCH = {"trainer": {"max_epochs": 1, "max_steps": 2}}


def test_two_workers_share_one_storage_and_a_study_resumes(tiny_demo_root, tmp_path):
    # The autoencoder keeps the worker processes light (no timm import): this test is about the storage.
    spec = hpo_spec(tiny_demo_root, tmp_path, space=LR_SPACE, model=AUTOENCODER, sections=ONE_EPOCH, n_trials=4)
    report = run_hpo(spec, workers=2)
    assert sorted(r.number for r in report.records) == [0, 1, 2, 3]
    assert all(r.state == "complete" for r in report.records), [r.error for r in report.records]
    by_worker = {}
    for r in report.records:
        by_worker.setdefault(r.worker, []).append(r.number)
    assert len(by_worker) == 2 and sorted(len(v) for v in by_worker.values()) == [2, 2]
    assert len(read_csv(report.files["trials_csv"])) == 4

    again = hpo_spec(tiny_demo_root, tmp_path, space=LR_SPACE, model=AUTOENCODER, sections=ONE_EPOCH, n_trials=1)
    with pytest.raises(ConfigError, match="already exists .* with 4 trials. Pass --resume"):
        run_hpo(again)
    report = run_hpo(again, resume=True)
    assert [r.number for r in report.records] == [0, 1, 2, 3, 4]
    assert len(read_csv(report.files["trials_csv"])) == 5


def test_failed_trials_are_recorded_and_the_grid_goes_on(tiny_demo_root, tmp_path):
    space = {"model.layers": [["blocks.99"], ["blocks.1"]]}
    spec = hpo_spec(tiny_demo_root, tmp_path, space=space, sampler="grid", n_trials=None)
    report = run_hpo(spec)
    states = {r.params["model.layers"][0]: r for r in report.records}
    assert set(states) == {"blocks.99", "blocks.1"}
    assert states["blocks.99"].state == "fail" and "blocks.99" in states["blocks.99"].error
    assert states["blocks.1"].state == "complete" and report.best is states["blocks.1"]
    rows = {r["model.layers"]: r for r in read_csv(report.files["trials_csv"])}
    assert "blocks.99" in rows["[blocks.99]"]["error"] and rows["[blocks.1]"]["error"] == ""


# --------------------------------------------------------------------------- pruning


def test_pruning_stops_a_trained_model(tiny_demo_root, tmp_path):
    # val_loss > 0 is reported as -val_loss (the study maximises AUROC), always below the threshold's
    # lower bound 0: every trial must be pruned at its first validation.
    spec = hpo_spec(tiny_demo_root, tmp_path, space=LR_SPACE, model=AUTOENCODER, n_trials=2,
                    sections={"trainer": {"max_epochs": 3}},
                    pruner={"name": "threshold", "lower": 0.0, "monitor": "val_loss"})
    report = run_hpo(spec)
    assert [r.state for r in report.records] == ["pruned", "pruned"], [r.error for r in report.records]
    for r in report.records:
        assert list(r.intermediate) == [1] and r.intermediate[1] < 0
        assert r.error.startswith("pruned after epoch 1: val_loss = ") and r.run_dir
        assert not (tmp_path / r.run_dir / "model.pt").exists()  # stopped before the checkpoint
    assert report.best is None and "best_config" not in report.files


def test_a_pruner_that_never_fires_lets_the_trial_finish(tiny_demo_root, tmp_path):
    spec = hpo_spec(tiny_demo_root, tmp_path, space=LR_SPACE, model=AUTOENCODER, n_trials=1,
                    sections={"trainer": {"max_epochs": 3}},
                    pruner={"name": "threshold", "lower": -1e9, "monitor": "val_loss"})
    (record,) = run_hpo(spec).records
    assert record.state == "complete" and list(record.intermediate) == [1, 2, 3]


class FakeTrial:
    def __init__(self, prune_at=None):
        self.reports, self.prune_at = [], prune_at

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return self.reports[-1][0] == self.prune_at


def test_pruning_callback_reports_in_the_study_direction_and_passes_the_engine():
    maximise = PruningCallback(FakeTrial(), None, "image_AUROC", "maximize")
    maximise.on_train_epoch_end(None, 1, {"train_loss": 1.0, "val_loss": 0.5})
    assert maximise.monitor == "val_loss" and maximise.trial.reports == [(1, -0.5)]
    twin = PruningCallback(FakeTrial(), None, "image_AUROC", "maximize")
    twin.on_train_epoch_end(None, 1, {"val_loss": 0.5, "val_image_AUROC": 0.8})
    assert twin.monitor == "val_image_AUROC" and twin.trial.reports == [(1, 0.8)]
    minimise = PruningCallback(FakeTrial(prune_at=2), "val_loss", "escape_rate", "minimize")
    minimise.on_train_epoch_end(None, 1, {"val_loss": 0.5})
    callbacks = CallbackList([minimise])
    with pytest.raises(PrunedRun, match="pruned after epoch 2"):  # never swallowed as a broken callback
        callbacks("on_train_epoch_end", None, 2, {"val_loss": 0.4})
    assert minimise.trial.reports == [(1, 0.5), (2, 0.4)]

    class Broken(Callback):
        def on_fit_end(self, engine):
            raise RuntimeError("boom")

    with pytest.warns(UserWarning, match="Broken.on_fit_end failed"):
        CallbackList([Broken()])("on_fit_end", None)  # other errors still are
    assert issubclass(PrunedRun, StopRun)


# --------------------------------------------------------------------------- statistics
def test_spearman_ranking_matches_scipy():
    rng = np.random.default_rng(0)
    y = rng.normal(size=40)
    columns = {"strong": y + 0.3 * rng.normal(size=40), "negative": -y + 1.5 * rng.normal(size=40),
               "noise": rng.normal(size=40), "constant": np.full(40, 2.0),
               "with_nan": np.where(np.arange(40) % 4 == 0, np.nan, y ** 3)}
    ranking = spearman_ranking(columns, y)
    expected = {}
    for name, x in columns.items():
        keep = ~np.isnan(x)
        expected[name] = spearmanr(x[keep], y[keep]) if name != "constant" else None
    for name, rho, p, n in ranking:
        if name == "constant":
            assert math.isnan(rho) and math.isnan(p) and n == 40
        else:
            assert rho == pytest.approx(expected[name].statistic) and p == pytest.approx(expected[name].pvalue)
    order = sorted((k for k in columns if k != "constant"), key=lambda k: -abs(expected[k].statistic))
    assert [r[0] for r in ranking] == [*order, "constant"]
    assert ranking[0][0] == "with_nan" and ranking[0][3] == 30  # y**3 is monotone in y: rho = 1 on 30 pairs
    assert ranking[2][0] == "negative" and ranking[2][1] < 0


def test_parameter_statistics_on_records(tmp_path):
    space = {"model.n_features": {"type": "int", "low": 1, "high": 100},
             "model.layers": [["blocks.1"], ["blocks.1", "blocks.2"], ["blocks.2", "blocks.4"]]}
    spec = spec_from_dict({"base": base(tmp_path, tmp_path), "search_space": space, "n_trials": 5})
    rng = np.random.default_rng(1)
    layers = [c for c in spec.space["model.layers"].choices]
    records, xs, idx, ys = [], [], [], []
    for i in range(12):
        k, j = int(rng.integers(1, 101)), int(rng.integers(0, 3))
        value = 0.01 * k + 0.2 * rng.normal()
        records.append(TrialRecord(i, "complete", value, {"model.n_features": k, "model.layers": layers[j]}))
        xs.append(k), idx.append(j), ys.append(value)
    records.append(TrialRecord(12, "fail", None, {"model.n_features": 1, "model.layers": layers[0]}, error="x"))
    records.append(TrialRecord(13, "pruned", None, {"model.n_features": 100, "model.layers": layers[2]}))
    stats, notes = parameter_statistics(records, spec)
    assert notes == []
    by_key = {s.key: s for s in stats}
    assert by_key["model.n_features"].rho == pytest.approx(spearmanr(xs, ys).statistic)
    assert by_key["model.layers"].rho == pytest.approx(spearmanr(idx, ys).statistic)  # choice index
    assert by_key["model.layers"].encoding == "choice index" and by_key["model.layers"].n == 12
    assert [s.key for s in stats] == sorted(by_key, key=lambda k: -abs(by_key[k].rho))
    assert importance(records[:1] + records[12:], spec) == (
        {}, "parameter importance needs at least 2 completed trials (got 1)")


# --------------------------------------------------------------------------- Comet Optimizer
def comet_spec(tmp_path, **settings):
    space = {"model.n_features": {"type": "int", "low": 10, "high": 40},
             "model.blur_sigma": {"type": "float", "low": 0.5, "high": 8.0, "log": True},
             "model.seed": {"type": "int", "low": 0, "high": 20, "step": 10},
             "dataset.image_size": [64, 96],
             "model.layers": [["blocks.1"], ["blocks.1", "blocks.2"]],
             "model.backbone": ["tf_efficientnet_lite0", "resnet18"]}
    data = {"base": base(tmp_path, tmp_path), "search_space": space, "backend": "comet", "n_trials": 6,
            **settings}
    return spec_from_dict(data, default_name="cstudy")


def test_comet_config_translation(tmp_path):
    spec = comet_spec(tmp_path, comet={"retryLimit": 5, "trials": 2})
    config = co.validate_config(co.build_config(spec))
    assert config["algorithm"] == "bayes" and config["name"] == "cstudy" and config["trials"] == 2
    assert config["spec"] == {"metric": "image_AUROC", "objective": "maximize", "maxCombo": 6, "seed": 42,
                              "retryLimit": 5}
    assert config["parameters"] == {
        "model.n_features": {"type": "integer", "min": 10, "max": 40, "scalingType": "uniform"},
        "model.blur_sigma": {"type": "float", "min": 0.5, "max": 8.0, "scalingType": "loguniform"},
        "model.seed": {"type": "discrete", "values": [0, 10, 20]},
        "dataset.image_size": {"type": "discrete", "values": [64, 96]},
        "model.layers": {"type": "categorical", "values": ["[blocks.1]", "[blocks.1, blocks.2]"]},
        "model.backbone": {"type": "categorical", "values": ["tf_efficientnet_lite0", "resnet18"]},
    }
    grid = co.build_config(comet_spec(tmp_path, sampler="grid", n_trials=None, grid_size=3))
    assert grid["algorithm"] == "grid" and grid["spec"]["maxCombo"] == 0 and grid["spec"]["gridSize"] == 3
    assert co.build_config(comet_spec(tmp_path, sampler="random"))["algorithm"] == "random"


GOOD = {"algorithm": "bayes", "spec": {"metric": "image_AUROC", "objective": "maximize"},
        "parameters": {"x": {"type": "integer", "min": 1, "max": 5}}}


@pytest.mark.parametrize("change, message", [
    ({"algorithm": "bayesian"}, "'algorithm' parameter of the Comet optimizer config must be one of 'bayes'"),
    ({"spec": {"metric": "m", "maxCombo": -1}}, "'spec.maxCombo' parameter .* must be an int in \\[0, inf\\)"),
    ({"spec": {"metric": "m", "objective": "max"}}, "'spec.objective'"),
    ({"spec": {"metric": "m", "maxcombo": 3}}, "Unknown key 'spec.maxcombo'"),
    ({"spec": {"objective": "minimize"}}, "needs a 'metric'"),
    ({"trials": 0}, "'trials' parameter"),
    ({"budget": 3}, "Unknown key 'budget'"),
    ({"parameters": {}}, "'parameters' parameter"),
    ({"parameters": {"x": {"type": "int", "min": 1, "max": 5}}}, "'type' parameter of the Comet optimizer "
                                                                 "parameter 'x'"),
    ({"parameters": {"x": {"type": "integer", "min": 5, "max": 1}}}, "'max' parameter .* greater than min"),
    ({"parameters": {"x": {"type": "integer", "min": 1.5, "max": 3}}}, "'min' parameter .* must be an int"),
    ({"parameters": {"x": {"type": "float", "min": 0.0, "max": 1.0, "scalingType": "loguniform"}}},
     "'min' parameter .* must be > 0 \\(scalingType loguniform\\)"),
    ({"parameters": {"x": {"type": "float", "min": 0.0, "max": 1.0, "scalingType": "normal"}}}, "needs 'mu'"),
    ({"parameters": {"x": {"type": "float", "min": 0.0, "max": 1.0, "scalingType": "log"}}}, "'scalingType'"),
    ({"parameters": {"x": {"type": "categorical", "values": [1, 2]}}}, "'values' parameter .* each a str"),
    ({"parameters": {"x": {"type": "discrete", "values": []}}}, "'values' parameter"),
    ({"parameters": {"x": {"type": "discrete", "values": [1], "min": 0}}}, "Unknown key 'min'"),
])
def test_comet_config_validation(change, message):
    assert co.validate_config(GOOD) is GOOD
    with pytest.raises(ConfigError, match=message):
        co.validate_config({**GOOD, **change})


def test_comet_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="Unknown key 'maxCombo' in 'comet'"):
        comet_spec(tmp_path, comet={"maxCombo": 3})
    with pytest.raises(ConfigError, match="are Optuna's"):
        comet_spec(tmp_path, sampler={"name": "tpe", "n_startup_trials": 3})


class FakeExperiment:
    def __init__(self, params, count, kwargs):
        self.params, self.optimizer, self.kwargs = params, {"count": count, "pid": "p", "trial": 1}, kwargs
        self.metrics, self.others, self.ended = {}, {}, False

    def get_parameter(self, name):
        return self.params[name]

    def log_metrics(self, metrics):
        self.metrics.update(metrics)

    def log_other(self, key, value):
        self.others[key] = value

    def end(self):
        self.ended = True


class FakeOptimizer:
    """Hands out parameter sets the way comet_ml.Optimizer does (labels as strings, numbers as numbers)."""

    made: list = []

    def __init__(self, config):
        self.config, self.experiments = config, []
        FakeOptimizer.made.append(self)

    def get_id(self):
        return "opt-123"

    def get_experiments(self, **kwargs):
        assigned = [{"model.n_features": 12, "model.layers": "[blocks.1]"},
                    {"model.n_features": 30.0, "model.layers": "[blocks.1, blocks.2]"},
                    {"model.n_features": 20, "model.layers": "[blocks.1]"}]
        for i, params in enumerate(assigned, 1):
            experiment = FakeExperiment(params, i, kwargs)
            self.experiments.append(experiment)
            yield experiment


def test_comet_backend_drives_trials_with_a_fake_optimizer(tiny_demo_root, tmp_path):
    space = {"model.n_features": {"type": "int", "low": 10, "high": 40},
             "model.layers": [["blocks.1"], ["blocks.1", "blocks.2"]]}
    data = {"base": base(tiny_demo_root, tmp_path), "search_space": space, "backend": "comet", "n_trials": 2}
    spec = spec_from_dict(data, default_name="cstudy")
    FakeOptimizer.made.clear()
    report = run_hpo(spec, optimizer_factory=FakeOptimizer)
    (optimizer,) = FakeOptimizer.made
    assert optimizer.config == co.build_config(spec)  # validated, then handed to the Optimizer
    assert len(optimizer.experiments) == 2  # n_trials caps the loop
    assert [r.params for r in report.records] == [{"model.n_features": 12, "model.layers": ["blocks.1"]},
                                                  {"model.n_features": 30,
                                                   "model.layers": ["blocks.1", "blocks.2"]}]
    for record, experiment in zip(report.records, optimizer.experiments, strict=True):
        assert record.state == "complete", record.error
        assert experiment.ended and experiment.metrics["image_AUROC"] == record.value  # the objective goes back
        assert experiment.kwargs["project_name"] == "mvtec-brick" and experiment.kwargs["log_code"] is False
    assert len(read_csv(report.files["trials_csv"])) == 2 and report.files["best_config"].is_file()
    assert json.loads((spec.output / "comet_optimizer.json").read_text())["id"] == "opt-123"
    with pytest.raises(ConfigError, match="already has 2 trials .* Pass --resume"):
        run_hpo(spec, optimizer_factory=FakeOptimizer)


def test_comet_backend_needs_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.comet.config either
    monkeypatch.setenv("COMET_CONFIG", str(tmp_path / "none.config"))
    with pytest.raises(ConfigError, match="backend: comet needs a Comet API key.*COMET_API_KEY"):
        co.make_optimizer(GOOD)


# --------------------------------------------------------------------------- the command
def test_hpo_command(tiny_demo_root, tmp_path, capsys):
    from anomalens.cli import main

    (tmp_path / "padim.yaml").write_text(yaml.safe_dump(base(tiny_demo_root, tmp_path)))
    hpo_file = tmp_path / "hpo" / "search.yaml"
    hpo_file.parent.mkdir()
    hpo_file.write_text(yaml.safe_dump({"base": "../padim.yaml", "search_space": {"model.layers": [["blocks.1"]]},
                                        "sampler": "grid", "n_trials": None}))
    assert main(["hpo", "--config", str(hpo_file), "--n-trials", "1", "--dataset.image_size", "64"]) == 0
    out = capsys.readouterr().out
    assert "Study hpo-search: 1 trials (1 complete)" in out
    assert "model.layers" in out and "[blocks.1]" in out  # a list value printed, not eaten as markup
    assert "Spearman rho needs at least 3 completed trials (got 1)" in out
    output = tmp_path / "runs" / "hpo" / "hpo-search"
    assert (output / "best_config.yaml").is_file() and (output / "study.db").is_file()
    assert main(["hpo", "--config", str(hpo_file), "--workers", "0"]) == 2  # an AnomalensError, one line
    assert "'workers' parameter" in capsys.readouterr().err
