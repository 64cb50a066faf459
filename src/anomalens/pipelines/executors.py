"""Where benchmark jobs run: in this process, a local process pool, or a Dask cluster.

Every executor takes a job (a plain dict, see jobs.py) and gives back its result row; nothing
travels through the disk, so Dask workers may be on other machines (they need anomalens and the
dataset path, nothing else).  The dispatcher keeps at most `capacity` jobs in flight and, on a
machine with CUDA devices, at most one GPU job per device: it hands each GPU job a free device
index and takes it back when the job ends.

Remote Dask workers pick their own device: start one worker process per GPU, each seeing one
device and advertising it, e.g. `CUDA_VISIBLE_DEVICES=0 dask worker tcp://HOST:8786 --nthreads 1
--resources GPU=1` (or dask-cuda's `dask cuda worker`); GPU jobs then ask for `GPU=1`.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import AnomalensError, missing_dependency
from .jobs import describe_error, failed_row, run_job

Job = dict[str, Any]
Row = dict[str, Any]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def wants_gpu(device: str, cuda_devices: int) -> bool:
    """Does a job with `trainer.device` = device run on a GPU, on a machine with cuda_devices of them?"""
    return device == "cuda" or (device == "auto" and cuda_devices > 0)


class DeviceSlots:
    """Free GPU indices: a GPU job takes one for as long as it runs, so one job runs per device."""

    def __init__(self, count: int):
        self.count = count
        self._free = list(range(count))

    def acquire(self) -> int | None:
        return self._free.pop(0) if self._free else None

    def release(self, index: int) -> None:
        if index in self._free or not 0 <= index < self.count:
            raise ValueError(f"GPU {index} was not taken")
        self._free.append(index)
        self._free.sort()


# --------------------------------------------------------------------------- executors
class Executor:
    """submit(job) -> future; wait_any(futures) -> the finished ones; result(future) -> row."""

    capacity: int = 1
    gpu_slots: DeviceSlots | None = None  # None: the workers pick their own device (remote Dask)
    name = "executor"

    def submit(self, job: Job) -> Any:
        raise NotImplementedError

    def wants_gpu(self, device: str) -> bool:
        """Does a job with `trainer.device` = device take a GPU here?"""
        return wants_gpu(device, self.gpu_slots.count if self.gpu_slots is not None else 0)

    def wait_any(self, futures: list[Any]) -> Iterable[Any]:
        return cf.wait(futures, return_when=cf.FIRST_COMPLETED).done

    def result(self, future: Any) -> Row:
        return future.result()

    def close(self, wait: bool = True) -> None:
        """Stop the workers this executor started (wait=False: do not wait for running jobs)."""

    def describe(self) -> str:
        return self.name

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self.close(wait=kind is None)  # interrupted (Ctrl-C): do not wait for the jobs in flight


class SerialExecutor(Executor):
    """Jobs one after the other in this process (workers = 1): simplest to debug."""

    name = "this process"

    def __init__(self, fn: Callable[[Job], Row] = run_job, gpus: int | None = None):
        self.fn = fn
        self.gpu_slots = DeviceSlots(cuda_device_count() if gpus is None else gpus)

    def submit(self, job: Job) -> cf.Future:
        future: cf.Future = cf.Future()
        future.set_result(self.fn(job))
        return future


class FuturesExecutor(Executor):
    """Any concurrent.futures executor (the local process pool; a thread pool in tests)."""

    name = "a pool"

    def describe(self) -> str:
        return f"{self.name} of {self.capacity} workers"

    def __init__(self, pool: cf.Executor, capacity: int, gpus: int, fn: Callable[[Job], Row] = run_job,
                 rebuild: Callable[[], cf.Executor] | None = None):
        self.pool, self.capacity, self.fn, self._rebuild = pool, capacity, fn, rebuild
        self.gpu_slots = DeviceSlots(gpus)

    def submit(self, job: Job) -> cf.Future:
        return self.pool.submit(self.fn, job)

    def result(self, future: cf.Future) -> Row:
        try:
            return future.result()
        except cf.BrokenExecutor:
            # A worker died (killed for memory, a crash in native code): every job in flight is lost;
            # start fresh workers for the jobs still to run.  The lost ones are retried on resume.
            if self._rebuild is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = self._rebuild()
            raise

    def close(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=True)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def process_pool(workers: int) -> FuturesExecutor:
    """`workers` spawned processes (spawn: CUDA and forked threads do not mix), CPU threads shared out."""
    import multiprocessing

    threads = max(1, cpu_count() // workers)

    def make() -> cf.Executor:
        return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker, initargs=(threads,))

    executor = FuturesExecutor(make(), workers, cuda_device_count(), rebuild=make)
    executor.name = "a local process pool"
    return executor


def import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise missing_dependency("dask.distributed", "distributed") from None
    return distributed


class DaskExecutor(Executor):
    """A Dask cluster: `scheduler` is 'tcp://HOST:PORT' (an existing one) or 'local' (a LocalCluster
    of `workers` processes on this machine, listening on 127.0.0.1 only, closed at the end)."""

    name = "dask"

    def __init__(self, scheduler: str, workers: int = 1, cluster_options: dict[str, Any] | None = None,
                 timeout: float = 10.0):
        distributed = import_distributed()
        self.distributed, self.cluster = distributed, None
        if scheduler == "local":
            options: dict[str, Any] = {"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                       "host": "127.0.0.1", "dashboard_address": None, **(cluster_options or {})}
            if not options["processes"]:
                options.setdefault("protocol", "tcp")  # in one process, but over real sockets: jobs are sent
            self.cluster = distributed.LocalCluster(**options)
            self.client = distributed.Client(self.cluster)
            if options["processes"]:
                # Dask starts workers with OMP_NUM_THREADS=1; share this machine's cores out instead.
                self.client.run(_init_worker, max(1, cpu_count() // max(1, options["n_workers"])))
        else:
            try:
                self.client = distributed.Client(scheduler, timeout=timeout)
            except (OSError, TimeoutError) as exc:
                raise AnomalensError(f"Cannot reach the Dask scheduler at {scheduler} ({describe_error(exc)}); "
                                     "start one with `dask scheduler`, or use --scheduler local.") from None
        workers_info = self.client.scheduler_info().get("workers", {})
        self.gpu_resource = any("GPU" in (w.get("resources") or {}) for w in workers_info.values())
        if self.cluster is not None:
            # Our own workers on this machine: pin GPU jobs here, as the process pool does.
            self.capacity = max(1, sum(w.get("nthreads", 1) for w in workers_info.values()))
            self.gpu_slots = DeviceSlots(cuda_device_count())
        else:
            # A shared cluster: send everything, the scheduler queues it (workers may join later).
            self.capacity = 1 << 30
            self.gpu_slots = None

    def wants_gpu(self, device: str) -> bool:
        if self.gpu_slots is None:  # remote workers: 'auto' may well find a GPU there
            return device != "cpu"
        return super().wants_gpu(device)

    @property
    def address(self) -> str:
        return self.client.scheduler.address

    def describe(self) -> str:
        return f"Dask at {self.address}" + (" (a local cluster)" if self.cluster is not None else "")

    def submit(self, job: Job) -> Any:
        resources = {"GPU": 1} if job.get("gpu") and self.gpu_slots is None and self.gpu_resource else None
        # A fresh key per attempt: Dask would otherwise hand back a failed attempt's cached result.
        return self.client.submit(run_job, job, key=f"anomalens-{job['id']}-{uuid.uuid4().hex[:8]}", pure=False,
                                  resources=resources)

    def wait_any(self, futures: list[Any]) -> Iterable[Any]:
        return self.distributed.wait(futures, return_when="FIRST_COMPLETED").done

    def close(self, wait: bool = True) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(workers: int = 1, scheduler: str | None = None,
                  cluster_options: dict[str, Any] | None = None) -> Executor:
    """serial (workers 1), a local process pool (workers > 1), or Dask (scheduler 'local' or an address)."""
    if workers < 1:
        raise AnomalensError(f"--workers must be at least 1. Got {workers} instead.")
    if scheduler:
        if scheduler != "local" and "://" not in scheduler:
            raise AnomalensError(f"--scheduler must be 'local' or an address like tcp://HOST:8786. "
                                 f"Got {scheduler!r} instead.")
        return DaskExecutor(scheduler, workers, cluster_options)
    if workers == 1:
        return SerialExecutor()
    return process_pool(workers)


# --------------------------------------------------------------------------- dispatch
def dispatch(jobs: Iterable[Job], executor: Executor, on_result: Callable[[Job, Row], None]) -> None:
    """Run every job on `executor`, calling on_result(job, row) in this thread as each one ends.

    A job's `device` is its config's trainer.device.  GPU jobs wait for a free device when the
    executor pins devices (each gets job['device_index']); CPU jobs behind them start meanwhile.  A job whose worker failed (rather than the job itself)
    gets a 'failed' row with that error.
    """
    pending: deque[Job] = deque(jobs)
    running: dict[Any, Job] = {}
    slots = executor.gpu_slots

    def next_job() -> Job | None:
        for i, job in enumerate(pending):
            gpu, index = executor.wants_gpu(job.get("device", "auto")), None
            if gpu and slots is not None and slots.count:
                index = slots.acquire()
                if index is None:
                    continue
            del pending[i]
            return {**job, "gpu": gpu, "device_index": index}
        return None

    try:
        while pending or running:
            while len(running) < executor.capacity:
                job = next_job()
                if job is None:
                    break
                try:
                    running[executor.submit(job)] = job
                except Exception as exc:  # noqa: BLE001 - e.g. the job could not be sent
                    _release(slots, job)
                    on_result(job, failed_row(job, f"not started: {describe_error(exc)}"))
            if not running:
                continue
            for future in list(executor.wait_any(list(running))):
                job = running.pop(future)
                _release(slots, job)
                try:
                    row = executor.result(future)
                except Exception as exc:  # noqa: BLE001 - the worker failed, not the job
                    row = failed_row(job, f"worker failed: {describe_error(exc)}")
                on_result(job, row)
    finally:
        for future in running:
            future.cancel()


def _release(slots: DeviceSlots | None, job: Job) -> None:
    if slots is not None and job.get("device_index") is not None:
        slots.release(job["device_index"])


__all__ = ["DeviceSlots", "Executor", "SerialExecutor", "FuturesExecutor", "DaskExecutor", "make_executor",
           "dispatch", "wants_gpu", "process_pool"]
