"""CLI sub-command of the benchmark pipeline.

    anomalens benchmark --config bench.yaml [--out DIR] [--workers N] [--scheduler local|tcp://HOST:PORT]
                        [--base.dataset.root /data] [--speed.runtimes "[torch]"] [--grid.seed "[0, 1]"]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def cmd_benchmark(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .benchmark import print_summary, run_benchmark

    out = args.out or Path("runs") / "benchmark" / Path(args.config).stem
    result = run_benchmark(args.config, out, workers=args.workers, scheduler=args.scheduler, overrides=overrides)
    print_summary(result)
    return 1 if result.failed else 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "benchmark", help="run a grid of models x datasets x parameters; CSV, plots, trackers (resumable)",
        description="Runs every job of a benchmark grid (see configs/benchmark/example.yaml) and writes "
                    "OUT/results.csv (one row per job), OUT/plots/*.png and OUT/jobs/<id>.yaml. A rerun with "
                    "the same --out skips finished jobs and retries failed ones. Keys of the benchmark file "
                    "can be overridden: --base.dataset.root /data --speed.runtimes '[torch]' --grid.seed '[0, 1]'. "
                    "Exits with 1 when a job failed.")
    p.add_argument("--config", required=True, help="benchmark YAML file")
    p.add_argument("--out", help="output folder (default: runs/benchmark/<config name>)")
    p.add_argument("--workers", type=_positive, default=1,
                   help="jobs at once: 1 runs them in this process; N > 1 a local process pool "
                        "(or N Dask workers with --scheduler local)")
    p.add_argument("--scheduler", help="'local' starts a Dask LocalCluster; tcp://HOST:PORT sends jobs to a "
                                       "Dask cluster (pip install 'anomalens[distributed]')")
    p.set_defaults(func=cmd_benchmark)
