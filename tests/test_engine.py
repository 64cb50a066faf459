"""End to end: a run on tiny demo data writes a complete, reloadable run folder."""
import csv
import json

import pytest
import torch

from anomalens.callbacks import Callback
from anomalens.config import config_from_dict
from anomalens.deploy.inferencer import Inferencer
from anomalens.engine import Engine, load_checkpoint
from anomalens.errors import AnomalensError
from anomalens.metrics import auroc


def tiny_config(root, tmp_path, model="padim", **sections):
    data = {
        "model": {"name": model, "weights": "none"},
        "dataset": {"format": "mvtec", "root": str(root), "category": "brick", "image_size": 64, "batch_size": 8},
        "visualization": {"max_images": 3},
        "trainer": {"progress": False},
        "project": {"root": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return config_from_dict(data)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            object.__getattribute__(self, "calls").append(name)
        return object.__getattribute__(self, name)


class Exploding(Callback):
    def on_test_batch_end(self, engine, batch, output):
        raise OSError("disk full")


@pytest.fixture(scope="module")
def padim_run(tiny_demo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    recorder = Recorder()
    engine = Engine(tiny_config(tiny_demo_root, tmp), callbacks=[recorder, Exploding()])
    with pytest.warns(UserWarning, match=r"Exploding\.on_test_batch_end failed and is disabled for this run: "
                                         r"OSError: disk full"):
        run_dir = engine.run()
    return engine, run_dir, recorder


def test_run_folder_layout_and_record(padim_run):
    engine, run_dir, _ = padim_run
    assert run_dir.parts[-4:-1] == ("padim", "mvtec", "brick")
    for name in ("config.yaml", "metrics.json", "scores.csv", "model.pt"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["n_test"] == len(engine.splits.test) > 0
    assert set(summary["metrics"]) >= {"image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1", "false_reject_rate",
                                       "escape_rate", "image_threshold"}
    assert summary["timings"]["fit_seconds"] > 0
    assert summary["fit_info"] == engine.model.fit_info and set(summary["fit_info"]) == {"flips_used",
                                                                                         "mirror_distance_ratio"}
    rows = list(csv.DictReader(open(run_dir / "scores.csv")))
    assert len(rows) == summary["n_test"]
    # metrics.json agrees with an AUROC recomputed from the score table
    labels = [int(r["label"]) for r in rows]
    assert auroc(labels, [float(r["score"]) for r in rows]) == pytest.approx(summary["metrics"]["image_AUROC"], abs=1e-6)
    assert len(list((run_dir / "images").rglob("*.png"))) == 3  # visualization.max_images


def test_hooks_run_in_order_and_a_failing_callback_never_breaks_the_run(padim_run):
    _, _, recorder = padim_run
    order = [c for c in recorder.calls if c != "on_test_batch_end"]
    assert order == ["on_run_start", "on_fit_start", "on_fit_end", "on_calibrate_end", "on_test_start",
                     "on_test_end", "on_run_end"]
    assert "on_test_batch_end" in recorder.calls


def test_thresholds_come_from_validation_not_test(padim_run):
    engine, _, _ = padim_run
    val, test = {r.path for r in engine.splits.val}, {r.path for r in engine.splits.test}
    train = {r.path for r in engine.splits.train}
    assert val and not (val & test) and not (val & train)
    assert engine.postprocessor.method == "false_alarm_rate"  # validation holds good images only


def test_reloaded_run_reproduces_the_engine_decisions(padim_run):
    engine, run_dir, _ = padim_run
    config, model, post = load_checkpoint(run_dir)
    assert config == engine.config
    inferencer = Inferencer.load(run_dir, device="cpu")
    records = engine.splits.test[:4]
    from anomalens.data.dataset import AnomalyDataset

    images = torch.stack([AnomalyDataset(records, 64)[i].image for i in range(len(records))])
    out = inferencer.predict(images)
    expected = {p: s for p, s in zip(engine.test_predictions.path, engine.test_predictions.score, strict=True)}
    for record, score in zip(records, out.score, strict=True):
        assert float(score) == pytest.approx(expected[record.path], rel=1e-5)


def test_checkpoint_keeps_every_parameter_so_a_later_default_cannot_change_the_model(padim_run, monkeypatch):
    from anomalens.models.padim import PaDiM

    _, run_dir, _ = padim_run
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    assert saved["format_version"] == 2
    assert saved["model_params"]["local_colour"] is True and saved["model_params"]["blur_sigma"] == 4.0
    monkeypatch.setattr(PaDiM, "defaults", {**PaDiM.defaults, "blur_sigma": 1.0, "local_colour": False})
    _, model, _ = load_checkpoint(run_dir)
    assert model.hparams["blur_sigma"] == 4.0 and model.hparams["local_colour"] is True


def test_format_1_checkpoints_load_with_the_parameters_of_their_time(tiny_demo_root, tmp_path):
    # Format 1 stored only the parameters the config set; PaDiM had no colour channels then, did not
    # average its embeddings and scored an image by its map's maximum.
    data = tiny_config(tiny_demo_root, tmp_path).to_dict()
    data["model"].update(local_colour=False, score_share=0.0, neighbourhood=1)
    engine = Engine(config_from_dict(data))
    run_dir = engine.run()
    payload = torch.load(run_dir / "model.pt", weights_only=True)
    payload["format_version"] = 1
    del payload["model_params"]
    payload["config"]["model"] = {"name": "padim", "weights": "none"}  # local_colour was not a key yet
    torch.save(payload, tmp_path / "old.pt")
    _, model, _ = load_checkpoint(tmp_path / "old.pt")
    assert model.hparams["local_colour"] is False and model.hparams["score_share"] == 0.0
    assert model.hparams["neighbourhood"] == 1
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images).score, engine.model.cpu().eval()(images).score)
    # A state that fits no model of this version is one clear error, not a torch traceback.
    payload["model_state"]["colour_scale"] = torch.ones(())  # a buffer this PaDiM (no colour) does not have
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(AnomalensError, match=r"^Checkpoint '.*bad\.pt' \(anomalens .*\) does not fit this "
                                             r"version's PaDiM: .*Unexpected key\(s\) in state_dict: \"colour_scale\""):
        load_checkpoint(tmp_path / "bad.pt")


def test_a_parameter_added_after_a_checkpoint_takes_the_value_of_its_time(padim_run, tmp_path):
    # PaDiM's score_share and neighbourhood came after format 2: a checkpoint without them scored by
    # the map's maximum and did not average its embeddings.
    _, run_dir, _ = padim_run
    payload = torch.load(run_dir / "model.pt", weights_only=True)
    assert payload["model_params"]["score_share"] == 0.01 and payload["model_params"]["neighbourhood"] == 3
    del payload["model_params"]["score_share"], payload["model_params"]["neighbourhood"]
    torch.save(payload, tmp_path / "older.pt")
    _, model, _ = load_checkpoint(tmp_path / "older.pt")
    assert model.hparams["score_share"] == 0.0 and model.hparams["neighbourhood"] == 1
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    torch.testing.assert_close(out.score, out.anomaly_map.amax(dim=(1, 2, 3)))


def test_run_dirs_are_never_overwritten(tiny_demo_root, tmp_path):
    config = tiny_config(tiny_demo_root, tmp_path, project={"run_name": "same"})
    first = Engine(config).make_run_dir()
    second = Engine(config).make_run_dir()
    assert first != second and second.name == "same-2"


def test_validation_from_test_uses_f1_and_removes_those_images_from_test(tiny_demo_root, tmp_path):
    config = tiny_config(tiny_demo_root, tmp_path, dataset={"val_source": "test", "val_ratio": 0.4},
                         visualization={"save_images": False})
    engine = Engine(config)
    engine.run()
    assert engine.postprocessor.method == "f1"
    assert not ({r.path for r in engine.splits.val} & {r.path for r in engine.splits.test})


def _fitted_on(engine, records):
    from anomalens.engine import OnDevice, build_model, make_loader, seed_everything

    seed_everything(engine.config.seed)  # the same random backbone (weights: none) as the engine's
    model = build_model(engine.config)
    return model.fit(OnDevice(make_loader(records, engine.config), torch.device("cpu")))


def test_one_pass_models_are_refitted_with_the_good_validation_images(padim_run):
    engine, run_dir, _ = padim_run
    assert engine.timings["refit_seconds"] > 0
    both = _fitted_on(engine, [*engine.splits.train, *engine.splits.val])
    train_only = _fitted_on(engine, engine.splits.train)
    torch.testing.assert_close(engine.model.mean, both.mean)
    assert not torch.allclose(engine.model.mean, train_only.mean)
    # The checkpoint holds the refitted model, with the thresholds calibrated before the refit.
    _, saved, post = load_checkpoint(run_dir)
    torch.testing.assert_close(saved.mean, both.mean)
    assert float(post.image_threshold) == float(engine.postprocessor.image_threshold)


def test_refit_can_be_switched_off(tiny_demo_root, tmp_path):
    engine = Engine(tiny_config(tiny_demo_root, tmp_path, trainer={"refit": False}, visualization={"save_images": False}))
    engine.run()
    assert "refit_seconds" not in engine.timings
    torch.testing.assert_close(engine.model.mean, _fitted_on(engine, engine.splits.train).mean)


def test_patchcore_learns_the_validation_images_on_top_of_its_fit(tiny_demo_root, tmp_path):
    engine = Engine(tiny_config(tiny_demo_root, tmp_path, model="patchcore", visualization={"save_images": False}))
    run_dir = engine.run()
    train_only = _fitted_on(engine, engine.splits.train)
    bank, grown = train_only.memory_bank, engine.model.memory_bank
    good_val = sum(r.label == 0 for r in engine.splits.val)
    assert good_val > 0
    assert len(grown) == len(bank) + round(0.1 * good_val * 64)  # 64 px: an 8 x 8 patch grid per image
    torch.testing.assert_close(grown[:len(bank)], bank)  # the fitted bank stays; the update adds rows
    _, saved, _ = load_checkpoint(run_dir)
    torch.testing.assert_close(saved.memory_bank, grown)
    assert saved.fit_info == engine.model.fit_info and "flips_used" in saved.fit_info
