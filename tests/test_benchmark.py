"""Benchmark grids: expansion and its errors (pure), GPU pinning (no GPU needed), a two-worker process
pool run with a failing job, its resume through the CLI, and a Dask LocalCluster run that logs a
summary run to TensorBoard."""
from __future__ import annotations

import csv
import re
import shutil
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from anomalens.errors import ConfigError
from anomalens.pipelines.benchmark import expand, load_spec, read_results, run_benchmark
from anomalens.pipelines.executors import DeviceSlots, FuturesExecutor, dispatch, wants_gpu
from anomalens.pipelines.jobs import COLUMNS, runtime_missing

REPO = Path(__file__).resolve().parents[1]
TINY_PADIM = {"name": "padim", "weights": "none", "layers": ["blocks.1"]}
FAST_SPEED = {"runtimes": ["torch"], "batch_size": 4, "repeats": 3, "max_seconds": 2}


def base(root, **sections):
    return {"dataset": {"format": "mvtec", "root": str(root), "image_size": 64, "batch_size": 8},
            "trainer": {"device": "cpu"}, **sections}


# --------------------------------------------------------------------------- grid expansion
def test_grid_is_the_cartesian_product_of_the_axes_and_lists_elsewhere_are_literal():
    spec = load_spec({
        "base": {"dataset": {"image_size": 64}},
        "models": [{**TINY_PADIM, "layers": ["blocks.1", "blocks.2"], "grid": {"model.n_features": [8, 16]}},
                   "patchcore"],
        "datasets": [{"format": "demo", "name": "demo", "categories": ["brick", "grass"]}],
        "grid": {"seed": [0, 1]},
    })
    jobs = expand(spec)
    assert len(jobs) == 2 * 2 * 2 + 2 * 2  # padim: categories x seeds x n_features; patchcore: categories x seeds
    padim = [j for j in jobs if j["labels"]["model"] == "padim"]
    assert {(j["labels"]["category"], j["labels"]["params"]["seed"], j["config"]["model"]["n_features"])
            for j in padim} == {(c, s, n) for c in ("brick", "grass") for s in (0, 1) for n in (8, 16)}
    assert all(j["config"]["model"]["layers"] == ["blocks.1", "blocks.2"] for j in padim)  # one literal value
    patchcore = [j for j in jobs if j["labels"]["model"] == "patchcore"]
    assert all("model.n_features" not in j["labels"]["params"] for j in patchcore)  # a model's grid is its own
    assert all(j["config"]["dataset"]["image_size"] == 64 and j["config"]["visualization"]["save_images"] is False
               for j in jobs)
    assert len({j["id"] for j in jobs}) == len(jobs)
    assert jobs[0]["id"].startswith("padim-demo-brick-")

    # Ids are stable, follow the config, and ignore the speed settings (changing those reruns nothing).
    assert [j["id"] for j in expand(spec)] == [j["id"] for j in jobs]
    faster = load_spec({**spec.raw, "speed": {"runtimes": ["torch"], "repeats": 2}})
    assert [j["id"] for j in expand(faster)] == [j["id"] for j in jobs]
    other_seed = load_spec({**spec.raw, "grid": {"seed": [0, 2]}})
    assert [j["id"] for j in expand(other_seed)][:2] == [j["id"] for j in jobs][:2]
    assert set(j["id"] for j in expand(other_seed)) != set(j["id"] for j in jobs)


def test_a_grid_over_a_list_valued_setting_lists_the_lists():
    spec = load_spec({"models": [TINY_PADIM], "grid": {"model.layers": [["blocks.1"], ["blocks.1", "blocks.2"]]}})
    assert [j["config"]["model"]["layers"] for j in expand(spec)] == [["blocks.1"], ["blocks.1", "blocks.2"]]


def test_the_example_config_expands_and_cli_style_overrides_apply():
    spec = load_spec(REPO / "configs" / "benchmark" / "example.yaml",
                     {"base.dataset.image_size": 64, "grid.seed": [1, 2], "speed.runtimes": ["torch"]})
    jobs = expand(spec)
    assert {j["labels"]["model"] for j in jobs} == {"padim", "patchcore"}
    assert len(jobs) == (2 + 1) * 2 * 2  # (padim n_features x 2, patchcore) x 2 categories x 2 seeds
    assert all(j["config"]["dataset"]["image_size"] == 64 and j["speed"]["runtimes"] == ["torch"] for j in jobs)


@pytest.mark.parametrize("spec, message", [
    ({"modles": ["padim"]}, "Unknown config key 'modles'. Did you mean 'models'?"),
    ({"models": []}, "The 'models' parameter of the benchmark config must be a non-empty list"),
    ({"models": [{"n_features": 8}]}, "The 'models[0]' parameter of the benchmark config must be a model name"),
    ({"models": ["padim"], "base": {"model": {"name": "padim"}}}, "must not have a 'model' section"),
    ({"models": ["padim"], "grid": {"seed": 3}},
     "The 'grid.seed' parameter of the benchmark config must be a non-empty list of values"),
    ({"models": ["padim"], "grid": [1, 2]}, "The 'grid' parameter of the benchmark config must be a mapping"),
    ({"models": ["padim"], "grid": {"model.name": ["padim"]}}, "cannot be a grid axis: list models under 'models'"),
    ({"models": [{"name": "padim", "grid": {"seed": [1]}}], "grid": {"seed": [2]}},
     "The grid axis 'seed' is set both in 'grid' and in the grid of model 'padim'"),
    ({"models": ["padim"], "datasets": [{"categories": "brick"}]},
     "The 'datasets[0].categories' parameter of the benchmark config must be a non-empty list"),
    ({"models": ["padim"], "speed": {"runtimes": ["tensorrt"]}},
     "The 'runtimes' parameter of the benchmark config's 'speed' section must be"),
    ({"models": ["padim"], "plots": {"colour": "red"}}, "Unknown parameter 'colour' for the benchmark config's 'plots'"),
])
def test_a_bad_benchmark_file_is_one_config_error(spec, message):
    with pytest.raises(ConfigError) as info:
        expand(load_spec(spec))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("grid, message", [
    ({"dataset.imagesize": [64]}, "Benchmark job padim on brick with dataset.imagesize=64: Unknown config key "
                                  "'dataset.imagesize'. Did you mean 'image_size'?"),
    ({"model.n_features": [8, 0]}, "The 'n_features' parameter of PaDiM must be an int in [1, inf). Got 0 instead."),
    ({"model.n_features": [8, 8]}, "Two benchmark jobs have the same config"),
])
def test_every_job_config_is_checked_before_anything_runs(grid, message):
    with pytest.raises(ConfigError) as info:
        expand(load_spec({"models": [TINY_PADIM], "grid": grid}))
    assert message in str(info.value)


# --------------------------------------------------------------------------- GPU pinning
def test_which_jobs_take_a_gpu():
    assert wants_gpu("auto", 2) and wants_gpu("cuda", 1) and wants_gpu("cuda", 0)
    assert not wants_gpu("auto", 0) and not wants_gpu("cpu", 2)
    slots = DeviceSlots(2)
    assert [slots.acquire(), slots.acquire(), slots.acquire()] == [0, 1, None]
    slots.release(1)
    assert slots.acquire() == 1
    with pytest.raises(ValueError):
        slots.release(5)


def test_gpu_jobs_are_pinned_one_per_device_while_cpu_jobs_run_beside_them():
    lock, active, peak, seen = threading.Lock(), Counter(), Counter(), []

    def fake_job(job):
        key = job["device_index"]
        with lock:
            active[key] += 1
            peak[key] = max(peak[key], active[key])
            seen.append((job["id"], job["gpu"], key))
        time.sleep(0.02)
        with lock:
            active[key] -= 1
        return {"job_id": job["id"], "status": "ok"}

    jobs = [{"id": f"g{i}", "device": "cuda" if i % 2 else "auto"} for i in range(8)]
    jobs += [{"id": f"c{i}", "device": "cpu"} for i in range(3)]
    executor = FuturesExecutor(ThreadPoolExecutor(5), capacity=5, gpus=2, fn=fake_job)
    results = []
    with executor:
        dispatch(jobs, executor, lambda job, row: results.append((job, row)))
    assert sorted(r["job_id"] for _, r in results) == sorted(j["id"] for j in jobs)
    by_id = {i: (gpu, index) for i, gpu, index in seen}
    assert all(by_id[f"g{i}"][0] and by_id[f"g{i}"][1] in (0, 1) for i in range(8))
    assert all(by_id[f"c{i}"] == (False, None) for i in range(3))
    assert peak[0] == 1 and peak[1] == 1  # never two jobs on one device
    assert {index for _, index in by_id.values()} == {0, 1, None}
    assert executor.gpu_slots.acquire() == 0 and executor.gpu_slots.acquire() == 1  # every device handed back

    # Without CUDA devices, a job that asks for 'cuda' is sent anyway (its row will say why it failed).
    cpu_only = FuturesExecutor(ThreadPoolExecutor(1), capacity=1, gpus=0, fn=fake_job)
    with cpu_only:
        dispatch([{"id": "x", "device": "cuda"}], cpu_only, lambda job, row: results.append((job, row)))
    assert results[-1][0]["device_index"] is None


def test_a_worker_failure_becomes_a_failed_row():
    def crash(job):
        raise MemoryError("killed")

    rows = []
    with FuturesExecutor(ThreadPoolExecutor(1), capacity=1, gpus=0, fn=crash) as executor:
        dispatch([{"id": "a", "device": "cpu", "labels": {"model": "padim", "dataset": "d", "category": "c",
                                                          "params": {}}}],
                 executor, lambda job, row: rows.append(row))
    assert rows[0]["status"] == "failed" and rows[0]["error"].startswith("worker failed: MemoryError: killed")


def test_a_runtime_that_is_not_installed_is_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)
    assert runtime_missing("torch") is None
    assert "not installed (openvino; pip install 'anomalens[export]')" == runtime_missing("openvino")


# --------------------------------------------------------------------------- a local pool run, resumed
def pool_spec(root, later):
    return {
        "base": base(root),
        # The second entry points at a dataset folder that does not exist yet: that job fails.
        "models": [{**TINY_PADIM, "grid": {"model.n_features": [8, 16]}},
                   {**TINY_PADIM, "n_features": 4, "grid": {"dataset.root": [str(later)]}}],
        "datasets": [{"categories": ["brick"]}],
        "speed": FAST_SPEED,
    }


@pytest.fixture(scope="module")
def pool_run(tiny_demo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    spec_path = tmp / "bench.yaml"
    spec_path.write_text(yaml.safe_dump(pool_spec(tiny_demo_root, tmp / "later")))
    result = run_benchmark(spec_path, tmp / "out", workers=2)
    with open(result.csv, newline="") as fh:
        header = next(csv.reader(fh))
    return SimpleNamespace(tmp=tmp, spec_path=spec_path, result=result, header=header,
                           rows={r["job_id"]: r for r in read_results(result.csv)})


def test_pool_run_writes_one_row_per_job_with_stable_columns(pool_run):
    result = pool_run.result
    assert pool_run.header == COLUMNS + ["param.dataset.root", "param.model.n_features"]
    assert len(pool_run.rows) == 3 and "process pool of 2 workers" in result.executor
    ok = [r for r in pool_run.rows.values() if r["status"] == "ok"]
    assert sorted(r["param.model.n_features"] for r in ok) == [8, 16]
    assert len({r["worker"] for r in ok}) == 2  # two processes ran them
    for r in ok:
        assert r["error"] is None and r["attempts"] == 1 and r["device"] == "cpu"
        for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1max"):
            assert 0.0 <= r[key] <= 1.0, key
        assert r["n_train"] > 0 and r["n_test"] == 10
        assert r["fit_seconds"] > 0 and r["test_seconds"] > 0 and r["total_seconds"] >= r["fit_seconds"]
        assert r["peak_rss_mb"] > 50 and r["checkpoint_mb"] > 0 and r["peak_gpu_mb"] is None
        assert r["speed_batch_size"] == 4
        for tag in ("b1", "bN"):
            assert r[f"torch_{tag}_throughput_ips"] > 0
            assert 0 < r[f"torch_{tag}_latency_p50_ms"] <= r[f"torch_{tag}_latency_p95_ms"]
        assert r["torch_size_mb"] == pytest.approx(r["checkpoint_mb"], rel=1e-4)
        assert r["onnx_error"] is None and r["onnx_bN_throughput_ips"] is None  # not asked for
        assert (Path(r["run_dir"]) / "metrics.json").is_file() and f"padim-{Path(r['run_dir']).name}" == r["job_id"]
        assert Path(r["run_dir"]).is_relative_to(result.out / "runs")


def test_a_failed_job_keeps_its_error_and_the_others_their_results(pool_run):
    [failed] = [r for r in pool_run.rows.values() if r["status"] != "ok"]
    assert failed["dataset"] == "later" and failed["attempts"] == 1
    assert failed["error"].startswith("DataError: Dataset folder not found") and "later" in failed["error"]
    assert failed["image_AUROC"] is None and failed["run_dir"] is None
    assert [r["job_id"] for r in pool_run.result.failed] == [failed["job_id"]]
    for job_id in pool_run.rows:  # each job's full config, ready for `anomalens train --config`
        config = yaml.safe_load((pool_run.result.out / "jobs" / f"{job_id}.yaml").read_text())
        assert config["model"]["name"] == "padim" and f"padim-{config['project']['run_name']}" == job_id


def test_plots_are_written(pool_run):
    names = sorted(p.name for p in pool_run.result.plots)
    assert names == ["heatmap_image_AUROC.png", "heatmap_pixel_AUPRO.png", "heatmap_pixel_AUROC.png",
                     "throughput_vs_auroc.png"]
    for path in pool_run.result.plots:
        image = np.asarray(Image.open(path).convert("L"), dtype=float)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 10, path.name


def test_a_rerun_skips_finished_jobs_and_retries_the_failed_one(pool_run, monkeypatch, capsys):
    from anomalens import cli
    from anomalens.deploy import export as export_module

    before = read_results(pool_run.result.csv)
    runs_before = sorted(p.parent for p in (pool_run.result.out / "runs").rglob("metrics.json"))
    shutil.copytree(Path(yaml.safe_load(pool_run.spec_path.read_text())["base"]["dataset"]["root"]),
                    pool_run.tmp / "later")  # the missing dataset appears

    # Speed settings are not part of a job's id: ask for every runtime now, with OpenVINO broken.
    real_export = export_module.export

    def export(run, fmt="onnx", *args, **kwargs):
        if fmt == "openvino":
            raise RuntimeError("no OpenVINO today")
        return real_export(run, fmt, *args, **kwargs)

    monkeypatch.setattr(export_module, "export", export)
    code = cli.main(["benchmark", "--config", str(pool_run.spec_path), "--out", str(pool_run.result.out),
                     "--speed.runtimes", "[torch, onnx, openvino]"])
    out = capsys.readouterr().out
    assert code == 0 and "2 from an earlier run" in out and "Ran 1 jobs on this process" in out

    after = {r["job_id"]: r for r in read_results(pool_run.result.csv)}
    assert list(after) == [r["job_id"] for r in before]
    for old in before:
        new = after[old["job_id"]]
        if old["status"] == "ok":  # skipped: the very same row
            assert new == old
        else:  # retried, now with its dataset
            assert new["status"] == "ok" and new["attempts"] == 2 and new["error"] is None
            assert new["started_at"] >= old["finished_at"]
            assert 0.0 <= new["image_AUROC"] <= 1.0
            assert new["onnx_bN_throughput_ips"] > 0 and new["onnx_size_mb"] > 0 and new["onnx_error"] is None
            assert re.fullmatch(r"RuntimeError: no OpenVINO today \(at test_benchmark\.py:\d+\)", new["openvino_error"])
            assert new["openvino_bN_throughput_ips"] is None
    runs_after = sorted(p.parent for p in (pool_run.result.out / "runs").rglob("metrics.json"))
    assert len(runs_after) == len(runs_before) + 1 and set(runs_before) <= set(runs_after)


# --------------------------------------------------------------------------- Dask
def test_dask_local_cluster_run_logs_a_summary_run_and_shuts_down(tiny_demo_root, tmp_path):
    pytest.importorskip("distributed")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = {"base": base(tiny_demo_root, logging={"logger": "tensorboard"}),
            "models": [{**TINY_PADIM, "grid": {"model.n_features": [8, 16]}}], "speed": FAST_SPEED}
    result = run_benchmark(spec, tmp_path / "out", workers=2, scheduler="local",
                           cluster_options={"processes": False})
    assert [r["status"] for r in result.rows] == ["ok", "ok"], [r["error"] for r in result.rows]
    assert all(r["torch_bN_throughput_ips"] > 0 and 0 <= r["image_AUROC"] <= 1 for r in result.rows)
    address = result.executor.split()[2]
    assert result.executor.startswith("Dask at tcp://127.0.0.1:") and "local cluster" in result.executor
    host, port = address[len("tcp://"):].rsplit(":", 1)
    with pytest.raises(OSError):  # the scheduler is gone
        socket.create_connection((host, int(port)), timeout=1).close()

    # One tracked run per job (from its engine), plus the benchmark's summary run.
    for r in result.rows:
        assert any((Path(r["run_dir"]) / "tensorboard").iterdir())
    [summary] = list((tmp_path / "out" / "runs" / "benchmark").glob("*/tensorboard"))
    events = EventAccumulator(str(summary), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    assert events.Scalars("jobs_ok")[0].value == 2 and events.Scalars("jobs_failed")[0].value == 0
    best = max(r["image_AUROC"] for r in result.rows)
    assert events.Scalars("best/image_AUROC")[0].value == pytest.approx(best, abs=1e-5)
    assert set(events.Tags()["images"]) == {f"summary/{p.stem}" for p in result.plots}
    table = events.Tensors("run/results/text_summary")[0].tensor_proto.string_val[0].decode()
    assert all(r["job_id"] in table for r in result.rows)


def test_jobs_go_to_an_existing_dask_scheduler_by_its_address(tiny_demo_root, tmp_path):
    # A cluster the benchmark did not start (as on other machines): results come back to the client.
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                                       host="127.0.0.1", dashboard_address=None)
    try:
        spec = {"base": base(tiny_demo_root), "models": [{**TINY_PADIM, "n_features": 8}], "speed": FAST_SPEED}
        result = run_benchmark(spec, tmp_path / "out", scheduler=cluster.scheduler_address)
        assert result.executor == f"Dask at {cluster.scheduler_address}"  # not ours to close
        [row] = result.rows
        assert row["status"] == "ok", row["error"]
        assert 0 <= row["image_AUROC"] <= 1 and row["torch_b1_throughput_ips"] > 0
        assert cluster.scheduler_info["workers"]  # the cluster outlives the benchmark
    finally:
        cluster.close()


# --------------------------------------------------------------------------- the summary-run API
def test_log_summary_opens_logs_and_closes_one_run(tmp_path):
    from anomalens.config import config_from_dict
    from anomalens.loggers.base import RunFolder, Tracker

    calls = []

    class Recording(Tracker):
        def __getattribute__(self, name):
            if name in ("start", "log_params", "log_tags", "log_metrics", "log_table", "log_image", "finish"):
                return lambda *args, **kwargs: calls.append((name, args, kwargs))
            return object.__getattribute__(self, name)

    png = tmp_path / "plot.png"
    Image.fromarray(np.full((4, 5, 3), 200, np.uint8)).save(png)
    tracker = Recording(config_from_dict({}))
    tracker.log_summary(tmp_path / "summary", {"a": 1}, {"model": "benchmark"}, {"ok": 2.0, "bad": float("nan")},
                        tables=[tmp_path / "results.csv"], images=[png])
    assert [c[0] for c in calls] == ["start", "log_params", "log_tags", "log_metrics", "log_table", "log_image",
                                     "finish"]
    assert calls[0][1][0] == RunFolder(tracker.config, tmp_path / "summary") and (tmp_path / "summary").is_dir()
    assert calls[3][1:] == (({"ok": 2.0},), {"step": 0})  # NaN dropped
    assert calls[5][1][1:] == ("summary/plot", 0) and calls[5][1][0].shape == (4, 5, 3)
    assert calls[-1][2] == {} and not tracker.started


def test_scheduler_errors_are_one_line():
    pytest.importorskip("distributed")
    from anomalens.errors import AnomalensError
    from anomalens.pipelines.executors import DaskExecutor, make_executor

    with pytest.raises(AnomalensError, match="--scheduler must be 'local' or an address like tcp://HOST:8786"):
        make_executor(2, "127.0.0.1:8786")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(AnomalensError, match=f"Cannot reach the Dask scheduler at tcp://127.0.0.1:{port} .*"
                                             "start one with `dask scheduler`, or use --scheduler local"):
        DaskExecutor(f"tcp://127.0.0.1:{port}", timeout=1)
