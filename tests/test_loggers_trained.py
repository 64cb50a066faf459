"""A trained model (two epochs) logged to Comet (offline), MLflow and TensorBoard in one real run:
every tracker holds the per-epoch losses and validation metrics at their epoch, and the final
metrics and prediction images at the last epoch, under the same names."""
import io
import json
import warnings
import zipfile
from types import SimpleNamespace

import pytest

from anomalens.config import config_from_dict
from anomalens.engine import Engine

pytest.importorskip("comet_ml")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

EPOCHS = 2
PER_EPOCH = ("train_loss", "val_loss", "val_image_AUROC")  # val_image_AUROC: the validation split has defects


@pytest.fixture(scope="module")
def trained(tiny_demo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    config = config_from_dict({
        "model": {"name": "autoencoder", "width": 4},
        "dataset": {"format": "mvtec", "root": str(tiny_demo_root), "category": "brick", "image_size": 64,
                    "batch_size": 8, "val_source": "test", "val_ratio": 0.5},
        "visualization": {"max_images": 2},
        "trainer": {"progress": False, "max_epochs": EPOCHS},
        "project": {"root": str(tmp / "runs")},
        "logging": {"logger": ["comet", "mlflow", "tensorboard"], "comet": {"mode": "offline"}},
    })
    with pytest.MonkeyPatch.context() as mp:
        for name in ("COMET_API_KEY", "COMET_PROJECT_NAME", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        engine = Engine(config)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a tracker failure would be a UserWarning
            run_dir = engine.run()
    summary = json.loads((run_dir / "metrics.json").read_text())
    saved = sorted(f"{p.parent.name}/{p.stem}" for p in (run_dir / "images").glob("*/*.png"))
    return SimpleNamespace(engine=engine, run_dir=run_dir, root=tmp / "runs", summary=summary, saved=saved,
                           history=engine.history)


def expected_epochs(trained):
    """{name: {epoch: value}} as the engine's training history recorded them."""
    out = {}
    for name in PER_EPOCH:
        out[name] = {row["epoch"]: row[name] for row in trained.history if name in row}
        assert sorted(out[name]) == list(range(1, EPOCHS + 1)), name
    return out


def test_history_has_every_epoch(trained):
    assert len(trained.history) == EPOCHS and len(trained.saved) == 2


def test_comet_archive_has_losses_per_epoch_and_images_at_the_last(trained):
    [archive] = sorted((trained.run_dir / "comet").glob("*.zip"))
    with zipfile.ZipFile(archive) as zf:
        messages = [json.loads(line) for line in zf.read("messages.json").decode().splitlines() if line.strip()]
    metrics = {}
    for m in messages:
        if m["type"] == "metric_msg":
            metric = m["payload"]["metric"]
            metrics.setdefault(metric["metricName"], {})[metric["step"]] = float(metric["metricValue"])
    for name, per_epoch in expected_epochs(trained).items():
        assert metrics[name] == pytest.approx(per_epoch), name
    assert metrics["image_AUROC"] == pytest.approx({EPOCHS: trained.summary["metrics"]["image_AUROC"]})
    images = sorted((u["additional_params"]["figName"], u["additional_params"]["step"])
                    for u in (m["payload"] for m in messages if m["type"] == "file_upload")
                    if u["upload_type"] == "visualization")
    assert images == [(name, EPOCHS) for name in trained.saved]


def test_mlflow_has_losses_per_epoch_and_images_at_the_last(trained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{trained.root.resolve()}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("mvtec-brick").experiment_id])
    params = run.data.params  # resolved: the model's default and the training settings the run used
    assert params["model.latent_channels"] == "16" and params["trainer.optimizer.name"] == "adam"
    for name, per_epoch in expected_epochs(trained).items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert history == pytest.approx(per_epoch), name
    [point] = client.get_metric_history(run.info.run_id, "image_AUROC")
    assert point.step == EPOCHS and point.value == pytest.approx(trained.summary["metrics"]["image_AUROC"])
    pngs = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    names = sorted(p.split("/")[-1].split("+step+")[0].replace("~", "/") for p in pngs)
    assert names == trained.saved and all(f"+step+{EPOCHS}+" in p for p in pngs)


def test_tensorboard_has_losses_per_epoch_and_images_at_the_last(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained.run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for name, per_epoch in expected_epochs(trained).items():
        assert {s.step: s.value for s in events.Scalars(name)} == pytest.approx(per_epoch, rel=1e-6), name
    [point] = events.Scalars("image_AUROC")
    assert point.step == EPOCHS
    assert sorted(events.Tags()["images"]) == trained.saved
    assert all(events.Images(name)[0].step == EPOCHS for name in trained.saved)


def test_nothing_was_lost_locally(trained):
    for name in ("config.yaml", "metrics.json", "scores.csv", "model.pt"):
        assert (trained.run_dir / name).is_file(), name
    assert io.StringIO((trained.run_dir / "scores.csv").read_text()).readline().startswith("path,")
