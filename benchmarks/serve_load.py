"""Load test of `anomalens serve`: requests/s and P50/P95 latency of POST /predict on loopback.

Starts the real server (`anomalens serve`, its own process, uvicorn on 127.0.0.1 and a free port)
for a run, sends N requests with an async httpx client at concurrency C, bounded in count and in
time, prints one JSON line and fails (exit 1) on any error.  The server is always stopped.

    .venv/bin/python benchmarks/serve_load.py --run runs/padim/mvtec/brick/<run-id>
    .venv/bin/python benchmarks/serve_load.py --requests 400 --concurrency 8     # trains a demo run first

Without --run, a PaDiM run is trained on the demo data (brick, --image-size px).  Images sent: the
run's test images (or --images DIR), cycled.  Timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


async def run_load(url: str, payloads: Sequence[tuple[str, bytes]], n_requests: int, concurrency: int,
                   time_limit: float = 60.0, path: str = "/predict", params: dict | None = None,
                   request_timeout: float = 30.0) -> dict:
    """POST `n_requests` uploads (cycling `payloads`) with `concurrency` workers; stop early at `time_limit` s.

    Returns counts, requests/s and latency percentiles (ms); `errors` counts non-200 answers and
    transport failures, `first_error` describes the first one.
    """
    import httpx
    import numpy as np

    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    deadline = time.perf_counter() + time_limit
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=request_timeout, limits=limits) as client:
        async def worker() -> None:
            nonlocal issued
            while issued < n_requests and time.perf_counter() < deadline:
                name, data = payloads[issued % len(payloads)]
                issued += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post(path, files={"file": (name, data, "image/png")}, params=params)
                    if response.status_code != 200:
                        errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start

    ms = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    return {
        "requests": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
        "concurrency": concurrency, "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2) if wall > 0 else 0.0,
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "max_ms": round(float(ms.max()), 1),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(model: str | Path, max_concurrency: int, startup_timeout: float = 120.0,
                   extra_args: Sequence[str] = ()) -> Iterator[str]:
    """`anomalens serve` in a child process on 127.0.0.1; yields its URL once /health answers; always stops it."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "anomalens.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--max-concurrency", str(max_concurrency), "--log-level", "warning", *extra_args]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"The server exited with code {proc.returncode} before answering.")
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"The server did not answer /health within {startup_timeout:.0f} s.")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def train_demo_run(image_size: int, out: Path) -> Path:
    from anomalens.config import config_from_dict
    from anomalens.data.demo import ensure_demo
    from anomalens.engine import Engine

    root = ensure_demo(out / "demo", image_size=image_size, categories=["brick"], n_train=40, n_test_good=10,
                       n_test_defect=20)
    config = config_from_dict({
        "model": {"name": "padim"},
        "dataset": {"format": "mvtec", "root": str(root), "category": "brick", "image_size": image_size},
        "visualization": {"save_images": False}, "trainer": {"progress": False, "device": "cpu"},
        "project": {"root": str(out / "runs")},
    })
    return Engine(config).run()


def test_images(run: Path, images: str | None) -> list[tuple[str, bytes]]:
    from anomalens.deploy.inferencer import list_images
    from anomalens.engine import load_checkpoint

    if images is None:
        config = load_checkpoint(run)[0]
        images = str(Path(config.dataset.root) / config.dataset.category / "test")
    return [(p.name, p.read_bytes()) for p in list_images(images)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="run folder or artifact to serve (default: train a demo PaDiM run)")
    parser.add_argument("--images", help="folder of images to send (default: the run's test images)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8, help="client connections in flight")
    parser.add_argument("--server-concurrency", type=int, default=2, help="serve --max-concurrency")
    parser.add_argument("--time-limit", type=float, default=120.0, help="stop issuing requests after this (s)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=256, help="demo run only")
    parser.add_argument("--mask", default="png", choices=["png", "rle", "none"])
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="anomalens-serve-") as tmp:
        run = Path(args.run) if args.run else train_demo_run(args.image_size, Path(tmp))
        payloads = test_images(run, args.images)
        with running_server(run, args.server_concurrency) as url:
            params = {"mask": args.mask}
            warm = asyncio.run(run_load(url, payloads, args.warmup, 1, args.time_limit, params=params))
            report = asyncio.run(run_load(url, payloads, args.requests, args.concurrency, args.time_limit,
                                          params=params))
    report.update(run=str(args.run or "demo padim"), images=len(payloads), server_concurrency=args.server_concurrency,
                  warmup_errors=warm["errors"], mask=args.mask)
    print(json.dumps(report))
    return 0 if report["errors"] == 0 and warm["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
