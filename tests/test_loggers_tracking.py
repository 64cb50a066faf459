"""MLflow and TensorBoard in one real run: read the MLflow run back through its client (temp sqlite
store) and the TensorBoard event files through EventAccumulator; both must hold what the local
record holds."""
import csv
import io
import json
import os
import socket
import warnings
from importlib import metadata
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from anomalens.callbacks import CallbackList
from anomalens.engine import Engine
from anomalens.models.base import AnomalyOutput
from conftest import tiny_run_config

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def tiny_config(root, tmp, **logging):
    return tiny_run_config(root, tmp, {"logger": ["mlflow", "tensorboard"], **logging})


def guard_sockets(mp: pytest.MonkeyPatch) -> list:
    """Record (and fail) every connection to, or name lookup of, a non-loopback host."""
    attempts, connect, getaddrinfo = [], socket.socket.connect, socket.getaddrinfo

    def loopback(host) -> bool:
        return host in (None, "localhost") or str(host).startswith("127.") or host == "::1"

    def guarded_connect(self, address):
        if isinstance(address, tuple) and not loopback(address[0]):
            attempts.append(address)
            raise OSError(f"blocked by the test: {address}")
        return connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not loopback(host):
            attempts.append(host)
            raise socket.gaierror(f"blocked by the test: {host}")
        return getaddrinfo(host, *args, **kwargs)

    mp.setattr(socket.socket, "connect", guarded_connect)
    mp.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


@pytest.fixture(scope="module")
def run(tiny_demo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        attempts = guard_sockets(mp)
        engine = Engine(tiny_config(tiny_demo_root, tmp))
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a tracker failure would be a UserWarning
            run_dir = engine.run()
    summary = json.loads((run_dir / "metrics.json").read_text())
    saved = {f"{p.parent.name}/{p.stem}": p for p in (run_dir / "images").glob("*/*.png")}
    return SimpleNamespace(engine=engine, run_dir=run_dir, root=tmp / "runs", summary=summary, saved=saved,
                           attempts=attempts)


def test_local_mlflow_and_tensorboard_open_no_outside_connection(run):
    assert run.attempts == []


def rgb(data) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB"))


# --------------------------------------------------------------------------- MLflow
@pytest.fixture(scope="module")
def mlflow_run(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.root.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("mvtec-brick")
    [found] = client.search_runs([experiment.experiment_id])
    return client, found


def test_mlflow_run_is_in_the_local_sqlite_store(run, mlflow_run):
    client, found = mlflow_run
    assert (run.root / "mlflow.db").is_file()
    assert found.info.run_name == f"padim-{run.run_dir.name}" and found.info.status == "FINISHED"
    assert found.info.artifact_uri.startswith((run.root.resolve() / "mlartifacts").as_uri())


def test_mlflow_params_tags_and_metrics(run, mlflow_run):
    client, found = mlflow_run
    params, tags, metrics = found.data.params, found.data.tags, found.data.metrics
    assert params["model.name"] == "padim" and params["dataset.image_size"] == "64"
    assert params["logging.logger"] == "['mlflow', 'tensorboard']" and params["logging.mlflow.tracking_uri"] == "None"
    assert tags["model"] == "padim" and tags["category"] == "brick" and tags["run_dir"] == str(run.run_dir)
    if "git/commit" in tags:
        assert tags["mlflow.source.git.commit"] == tags["git/commit"]
    for key, value in run.summary["metrics"].items():
        if value == value:  # NaN metrics are not sent
            assert metrics[key] == pytest.approx(value), key
    [point] = client.get_metric_history(found.info.run_id, "image_AUROC")
    assert point.step == 0
    assert metrics["time/fit_seconds"] == pytest.approx(run.summary["timings"]["fit_seconds"])
    assert 0 < metrics["system/ram_used_percent"] <= 100


def test_mlflow_artifacts_table_packages_code_and_images(run, mlflow_run, tmp_path):
    client, found = mlflow_run
    run_id = found.info.run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names >= {"scores.csv", "scores.json", "metrics.json", "code", "environment", "images"}
    local = client.download_artifacts(run_id, "scores.csv", str(tmp_path))
    assert open(local).read() == (run.run_dir / "scores.csv").read_text()
    table = json.loads(open(client.download_artifacts(run_id, "scores.json", str(tmp_path))).read())
    rows = list(csv.DictReader(open(run.run_dir / "scores.csv")))
    assert table["columns"][:3] == ["path", "defect_type", "label"] and len(table["data"]) == len(rows)
    packages = open(client.download_artifacts(run_id, "environment/requirements.txt", str(tmp_path))).read()
    assert f"mlflow=={metadata.version('mlflow')}" in packages.splitlines()
    assert [a.path for a in client.list_artifacts(run_id, "code")] == ["code/code.zip"]

    # Images carry their name (key) and step: '<defect>/<stem>' is stored as '<defect>~<stem>'.
    pngs = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    keys = {p.split("/")[-1].split("+step+")[0].replace("~", "/"): p for p in pngs}
    assert set(keys) == set(run.saved) and len(keys) == 3
    assert all("+step+0+" in p for p in pngs)
    name, path = sorted(keys.items())[0]
    assert np.array_equal(rgb(client.download_artifacts(run_id, path, str(tmp_path))), rgb(run.saved[name]))


# --------------------------------------------------------------------------- TensorBoard
@pytest.fixture(scope="module")
def events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run.run_dir / "tensorboard"),
                                   size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_scalars(run, events):
    tags = set(events.Tags()["scalars"])
    for key, value in run.summary["metrics"].items():
        if value == value:
            [point] = events.Scalars(key)
            assert point.step == 0 and point.value == pytest.approx(value, rel=1e-6), key
    assert {"time/fit_seconds", "time/test_seconds", "system/cpu_percent"} <= tags


def test_tensorboard_images_match_the_saved_ones(run, events):
    assert set(events.Tags()["images"]) == set(run.saved)
    for name, path in run.saved.items():
        [event] = events.Images(name)
        assert event.step == 0 and np.array_equal(rgb(event.encoded_image_string), rgb(path))


def test_tensorboard_hparams_and_text(run, events):
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["model.name"].string_value == "padim" and hparams["dataset.image_size"].number_value == 64
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert "image_AUROC" in {m.name.tag for m in experiment.experiment.metric_infos}

    text = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]
            if tag.startswith("run/")}
    first = next(csv.DictReader(open(run.run_dir / "scores.csv")))
    assert f"| {first['path']} | {first['defect_type']} |" in text["run/scores/text_summary"]
    assert f"torch=={metadata.version('torch')}" in text["run/packages/text_summary"]


# --------------------------------------------------------------------------- graphs, failures
class TinyModel(torch.nn.Module):
    def __init__(self, traceable=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)
        self.traceable = traceable

    def forward(self, images):
        anomaly_map = self.conv(images)
        if not self.traceable:
            anomaly_map = anomaly_map[anomaly_map > float(anomaly_map.mean())].reshape(1, 1, -1, 1)  # data-dependent
        return AnomalyOutput(anomaly_map.amax(dim=(1, 2, 3)), anomaly_map)


def fake_engine(config, run_dir, model):
    run_dir.mkdir(parents=True)
    return SimpleNamespace(config=config, run_dir=run_dir, device=torch.device("cpu"), timings={}, model=model)


@pytest.mark.parametrize("traceable", [True, False])
def test_tensorboard_graph_or_its_text_form(tiny_demo_root, tmp_path, traceable):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from anomalens.loggers.tensorboard import TensorBoardTracker

    config = tiny_config(tiny_demo_root, tmp_path, logger="tensorboard", log_graph=True)
    tracker = TensorBoardTracker(config)
    engine = fake_engine(config, tmp_path / "run", TinyModel(traceable))
    for hook in ("on_run_start", "on_calibrate_end", "on_run_end"):
        getattr(tracker, hook)(engine)
    events = EventAccumulator(str(engine.run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    if traceable:
        assert any(node.op == "aten::_convolution" for node in events.Graph().node)
    else:
        text = events.Tensors("model/graph/text_summary")[0].tensor_proto.string_val[0].decode()
        assert text.startswith("(not traceable: ") and "Conv2d(3, 1" in text


def test_mlflow_graph_is_a_text_artifact(run, tiny_demo_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from anomalens.loggers.mlflow import MlflowTracker

    store = f"sqlite:///{run.root.resolve()}/mlflow.db"  # reuse the module's store: creating one takes seconds
    config = tiny_config(tiny_demo_root, tmp_path, logger="mlflow", log_graph=True, project="graph-test",
                         mlflow={"tracking_uri": store})
    tracker = MlflowTracker(config)
    engine = fake_engine(config, tmp_path / "run", TinyModel())
    for hook in ("on_run_start", "on_calibrate_end", "on_run_end"):
        getattr(tracker, hook)(engine)
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("graph-test")
    assert client.get_run(tracker.run_id).info.experiment_id == experiment.experiment_id
    assert experiment.artifact_location == (run.root.resolve() / "mlartifacts" / "graph-test").as_uri()
    text = open(client.download_artifacts(tracker.run_id, "model/graph.txt", str(tmp_path))).read()
    assert text.startswith("TinyModel(\n  (conv): Conv2d(3, 1") and "parameters: 28\n" in text


def test_unreachable_mlflow_server_is_one_warning(tiny_demo_root, tmp_path):
    from anomalens.loggers.mlflow import MlflowTracker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tiny_config(tiny_demo_root, tmp_path, logger="mlflow",
                         mlflow={"tracking_uri": f"http://127.0.0.1:{port}"})
    tracker = MlflowTracker(config)
    hooks = CallbackList([tracker])
    engine = fake_engine(config, tmp_path / "run", TinyModel())
    with pytest.warns(UserWarning) as caught:
        for hook in ("on_run_start", "on_calibrate_end", "on_test_end", "on_run_end"):
            hooks(hook, engine, *([{"image_AUROC": 1.0}] if hook == "on_test_end" else []))
    assert [str(w.message) for w in caught] == [
        f"MlflowTracker.on_run_start failed and is disabled for this run: ConnectionError: the MLflow tracking "
        f"server at http://127.0.0.1:{port} is unreachable ([Errno 111] Connection refused)"]
    assert hooks.callbacks == []


def test_mlflow_tracking_uri_precedence(tiny_demo_root, tmp_path, monkeypatch):
    from anomalens.loggers.mlflow import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tiny_config(tiny_demo_root, tmp_path)
    assert tracking_uri(default) == f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db"  # the runs root's store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(default) == "http://127.0.0.1:5999"
    configured = tiny_config(tiny_demo_root, tmp_path, mlflow={"tracking_uri": "sqlite:////data/mlflow.db"})
    assert tracking_uri(configured) == "sqlite:////data/mlflow.db"  # the config wins over the environment


def test_mlflow_telemetry_is_off():
    from anomalens.loggers.mlflow import import_mlflow

    import_mlflow()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
