"""One benchmark job: a plain, picklable dict in; a JSON-able result row out.

    job = {"id": "padim-demo-brick-1a2b3c4d",          # stable: derived from the job's config
           "config": {...},                            # a raw run config (what config_from_dict takes)
           "labels": {"model", "dataset", "category", "params"},
           "speed": {"runtimes", "batch_size", "repeats", "max_seconds"},
           "keep_run": True,                           # False: the run folder is a temp folder, removed after
           "device": "auto",                           # the config's trainer.device
           "gpu": False, "device_index": None}         # set by the dispatcher (pinned to one GPU: its index)

`run_job` runs the Engine (fit, calibrate, test) in this process, then loads the run in each
runtime to measure speed.  It never raises for a failed job: the row says status 'failed' and
carries the error, so that a worker on another machine sends back what went wrong.  Nothing it
returns refers to the worker's disk except the `run_dir` column, informative only.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from ..metrics import METRIC_KEYS

RUNTIMES = ("torch", "onnx", "openvino")
RUNTIME_MODULES = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}
SPEED_KEYS = ("error", "device", "size_mb", "b1_throughput_ips", "b1_latency_p50_ms", "b1_latency_p95_ms",
              "bN_throughput_ips", "bN_latency_p50_ms", "bN_latency_p95_ms")

# The result row: these columns, in this order, in every benchmark CSV (then one `param.<key>` column
# per grid axis).  A value that does not apply is left empty.  Durations are the engine's (seconds;
# total_seconds is the whole job on its worker, speed measurements included).  peak_rss_mb is the
# worker process's peak resident memory during fit/calibrate/test (what it held before included);
# peak_gpu_mb is torch's peak allocation on the job's GPU.  checkpoint_mb and <runtime>_size_mb are
# sizes on disk.  <runtime>_b1_* are measured at batch 1, <runtime>_bN_* at batch speed_batch_size.
COLUMNS: list[str] = [
    "job_id", "status", "error", "attempts", "model", "dataset", "category", "params",
    "fit_seconds", "calibrate_seconds", "test_seconds", "total_seconds",
    *METRIC_KEYS,
    "peak_rss_mb", "peak_gpu_mb", "checkpoint_mb", "n_train", "n_test", "device",
    "speed_batch_size", *(f"{r}_{k}" for r in RUNTIMES for k in SPEED_KEYS),
    "worker", "run_dir", "started_at", "finished_at",
]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def describe_error(exc: BaseException) -> str:
    """One line: 'Type: message', plus where it was raised unless it is one of our own errors."""
    from ..errors import AnomalensError

    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    if not isinstance(exc, AnomalensError):
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            text += f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})"
    return text


def failed_row(job: dict[str, Any], error: str) -> dict[str, Any]:
    """The row of a job that produced no result of its own (e.g. its worker died)."""
    return {**_identity(job), "status": "failed", "error": error, "finished_at": now()}


def _identity(job: dict[str, Any]) -> dict[str, Any]:
    import json

    labels = job["labels"]
    return {"job_id": job["id"], "model": labels["model"], "dataset": labels["dataset"],
            "category": labels["category"], "params": json.dumps(labels["params"], sort_keys=True)}


def runtime_missing(runtime: str) -> str | None:
    """Why a runtime cannot be measured here (its package is not installed), or None."""
    module = RUNTIME_MODULES[runtime]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken install
        found = False
    return None if found else f"not installed ({module}; pip install 'anomalens[export]')"


# --------------------------------------------------------------------------- the job
def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Fit, calibrate and test one config, then measure each runtime; returns the result row."""
    from .. import progress
    from ..config import apply_overrides, config_from_dict

    row: dict[str, Any] = {**_identity(job), "status": "failed", "error": "", "started_at": now(),
                           "worker": f"{socket.gethostname()}:{os.getpid()}"}
    started = time.perf_counter()
    was_enabled = progress._enabled
    progress.set_enabled(False)  # bars from many workers would garble the client's terminal
    tmp = None
    try:
        data = job["config"]
        if not job.get("keep_run", True):
            tmp = tempfile.mkdtemp(prefix="anomalens-job-")
            data = apply_overrides(data, {"project.root": tmp})
        config = config_from_dict(data)
        warm_imports(config.model_name)
        row.update(_fit_and_test(config, job.get("device_index"), job.get("keep_run", True)))
        row.update(measure_runtimes(Path(row.pop("_run_dir")), config, job["speed"], row["device"]))
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a failed job is a result: its row carries the error
        row["error"] = describe_error(exc)
    finally:
        progress.set_enabled(was_enabled)
        row.pop("_run_dir", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    row["total_seconds"] = time.perf_counter() - started
    row["finished_at"] = now()
    return row


def warm_imports(model: str) -> None:
    """Import what a job uses before the engine times it: in a fresh worker, importing timm (and
    torchvision, dynamo) takes longer than fitting a small model, and would be counted as fitting."""
    import timm  # noqa: F401

    from .. import backbones, metrics, postprocess, training  # noqa: F401
    from ..data import dataset, formats  # noqa: F401
    from ..registry import get_model_class

    get_model_class(model)


def _fit_and_test(config: Any, device_index: int | None, keep_run: bool) -> dict[str, Any]:
    import torch

    from ..deploy.export import PeakMemory
    from ..engine import CHECKPOINT_NAME, Engine

    if device_index is not None:
        # Pinned by the dispatcher: 'cuda' (the config's device) then means this device, for the
        # engine, the checkpoint loader and the torch inferencer alike.
        torch.cuda.set_device(device_index)
    engine = Engine(config)
    on_gpu = engine.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as memory:
        run_dir = engine.run()
    device = f"cuda:{torch.cuda.current_device()}" if on_gpu else str(engine.device)
    return {
        **{k: engine.timings.get(k) for k in ("fit_seconds", "calibrate_seconds", "test_seconds")},
        **engine.metrics,
        "peak_rss_mb": memory.peak_mb,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
        "checkpoint_mb": (run_dir / CHECKPOINT_NAME).stat().st_size / 2**20,
        "n_train": len(engine.splits.train), "n_test": len(engine.test_predictions.score),
        "device": device, "run_dir": str(run_dir) if keep_run else "", "_run_dir": str(run_dir),
    }


# --------------------------------------------------------------------------- speed
def measure_runtimes(run_dir: Path, config: Any, speed: dict[str, Any], device: str) -> dict[str, Any]:
    """Speed and size of the run in each asked runtime.  A runtime that is not installed, or that
    fails to export or load, gets its reason in `<runtime>_error`; the job still succeeds."""
    from ..deploy.export import artifact_size, export, split_tensors
    from ..engine import CHECKPOINT_NAME

    n = int(speed["batch_size"])
    out: dict[str, Any] = {"speed_batch_size": n}
    wanted = [r for r in RUNTIMES if r in speed["runtimes"]]
    if not wanted:
        return out
    images = split_tensors(config, "test", limit=n)[1]
    onnx_path = None
    for runtime in wanted:
        missing = runtime_missing(runtime)
        if missing:
            out[f"{runtime}_error"] = missing
            continue
        try:
            if runtime == "torch":
                artifact = run_dir / CHECKPOINT_NAME
            elif runtime == "onnx":
                artifact = onnx_path = export(run_dir, "onnx", evaluate=False).path
            else:  # OpenVINO converts the ONNX export when there is one, instead of tracing again
                artifact = export(run_dir, "openvino", onnx=onnx_path, evaluate=False).path
            inferencer = _load(artifact, runtime, device)
            out[f"{runtime}_device"] = str(inferencer.device)
            out[f"{runtime}_size_mb"] = artifact_size(artifact) / 2**20
            for tag, batch in (("b1", 1), ("bN", n)):
                out.update({f"{runtime}_{tag}_{k}": v for k, v in
                            time_predict(inferencer, images, batch, speed["repeats"], speed["max_seconds"]).items()})
        except Exception as exc:  # noqa: BLE001 - one runtime's failure is a value of its columns
            out[f"{runtime}_error"] = describe_error(exc)
    return out


def _load(artifact: Path, runtime: str, device: str) -> Any:
    from ..deploy.inferencer import Inferencer
    from ..errors import ConfigError

    try:
        return Inferencer.load(artifact, device=device.split(":")[0], runtime=runtime)
    except ConfigError:
        if device == "cpu":
            raise
        # e.g. ONNX Runtime without its CUDA provider: measure on the CPU (the device column says so)
        return Inferencer.load(artifact, device="cpu", runtime=runtime)


def time_predict(inferencer: Any, images: Any, batch_size: int, repeats: int, max_seconds: float) -> dict[str, float]:
    """Latency P50/P95 (ms) and throughput (images/s) of inferencer.predict on batches of batch_size."""
    import numpy as np

    from ..deploy.export import time_calls

    batch = images[:batch_size]
    if len(batch) < batch_size:  # a tiny split: repeat images to fill the batch
        batch = batch.repeat((batch_size + len(batch) - 1) // len(batch), 1, 1, 1)[:batch_size]
    seconds = time_calls(lambda: inferencer.predict(batch), int(repeats), warmup=2, max_seconds=float(max_seconds))
    return {"throughput_ips": float(batch_size / np.median(seconds)),
            "latency_p50_ms": float(np.percentile(seconds, 50) * 1e3),
            "latency_p95_ms": float(np.percentile(seconds, 95) * 1e3)}


__all__ = ["run_job", "failed_row", "measure_runtimes", "time_predict", "runtime_missing", "COLUMNS", "RUNTIMES"]
