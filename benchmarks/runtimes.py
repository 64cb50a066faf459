"""CPU speed and accuracy of every runtime and precision, side by side with torch in one run.

For each model (PatchCore, PaDiM by default) a run is trained on one demo category (or taken from
--run), exported to ONNX and to OpenVINO FP32 / FP16 / BF16 / INT8, and every artifact is measured on
the run's test split exactly like `anomalens validate` does: batch-1 latency (P50), throughput
at batch N (images/s), image AUROC, and FP32 parity with torch.  Speeds are reported as ratios
to torch measured in the same process, minutes apart.

    .venv/bin/python benchmarks/runtimes.py                        # patchcore + padim, brick, 256 px
    .venv/bin/python benchmarks/runtimes.py --models padim --run padim=runs/padim/demo/brick/r1
    .venv/bin/python benchmarks/runtimes.py --throughput-exports   # throughput of fixed-batch artifacts

Timings on a shared machine are noisy: compare only numbers from the same run.  When other jobs
load the CPU, torch's OpenMP threads spin against them and its multi-threaded timings collapse
(5-10x slower in our runs) while ONNX Runtime's and OpenVINO's pools degrade gracefully; use
--threads 1 there for a fair per-core comparison.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = [("torch", "fp32"), ("onnx", "fp32"), ("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "bf16"),
            ("openvino", "int8")]


def train(model: str, category: str, image_size: int, root: str | None, project: str) -> Path:
    from anomalens.config import config_from_dict
    from anomalens.engine import Engine

    config = config_from_dict({
        "model": {"name": model}, "dataset": {"format": "demo", "root": root, "category": category,
                                              "image_size": image_size},
        "visualization": {"save_images": False}, "trainer": {"progress": False, "device": "cpu"},
        "project": {"root": project},
    })
    return Engine(config).run()


def export_all(run: Path, batch: int | None) -> tuple[dict[tuple[str, str], Path], dict[str, float]]:
    """Every variant's artifact (at a fixed `batch` under RUN/export/batch-N/, or the default exports)
    and its export seconds."""
    from anomalens.deploy.export import export

    def out(name: str) -> Path | None:
        return None if batch is None else run / "export" / f"batch-{batch}" / name

    artifacts: dict[tuple[str, str], Path] = {("torch", "fp32"): run}
    t0 = time.perf_counter()
    onnx_path = export(run, "onnx", out=out("onnx"), batch_size=batch).path
    seconds = {"onnx": time.perf_counter() - t0}
    artifacts[("onnx", "fp32")] = onnx_path
    for precision in ("fp32", "fp16", "bf16", "int8"):
        t0 = time.perf_counter()
        artifacts[("openvino", precision)] = export(run, "openvino", precision, out=out(f"openvino_{precision}"),
                                                    onnx=onnx_path, evaluate=False, batch_size=batch).path
        seconds[f"openvino_{precision}"] = time.perf_counter() - t0
    return artifacts, seconds


def measure(run: Path, batch_size: int, repeats: int, max_seconds: float, threads: int | None,
            rounds: int = 3, throughput_exports: bool = False) -> list[dict]:
    """One row per variant: accuracy and parity of the default artifact, its batch-1 latency, and
    batch-N throughput: of the same artifact, or with `throughput_exports` of the variant exported
    at a fixed batch N (torch has one form: its eager model)."""
    import torch

    from anomalens.deploy.export import compare_outputs, measure_speed, predict_all, split_tensors, time_calls
    from anomalens.deploy.inferencer import Inferencer
    from anomalens.engine import load_checkpoint
    from anomalens.metrics import auroc

    config, _, post = load_checkpoint(run, "cpu")
    records, images = split_tensors(config, "test")
    labels = np.array([r.label for r in records])
    artifacts, export_s = export_all(run, None)
    fixed = export_all(run, batch_size)[0] if throughput_exports else {}

    rows, reference, inferencers = [], None, {}
    for fmt, precision in VARIANTS:
        inferencer = Inferencer.load(artifacts[(fmt, precision)], device="cpu", threads=threads)
        inferencers[(fmt, precision)] = inferencer
        out = predict_all(inferencer, images, batch_size)
        row = {"model": config.model_name, "runtime": fmt, "precision": precision,
               "inference_precision": inferencer.metadata.get("inference_precision", "f32"),
               "image_auroc": float(auroc(labels, out.score.numpy())),
               "graph_batch": inferencer.batch_size,
               "export_s": export_s.get(fmt if fmt != "openvino" else f"openvino_{precision}")}
        if reference is None:
            reference = out
        else:
            parity = compare_outputs(reference, out, float(post.image_threshold), float(post.pixel_threshold))
            row.update(parity_ok=parity.ok, max_rel_score_diff=parity.max_rel_score_diff,
                       label_flips=parity.label_flips, mask_flips=parity.mask_flips)
        if fixed and fmt != "torch":  # the throughput artifact must compute the same outputs
            batched = Inferencer.load(fixed[(fmt, precision)], device="cpu", threads=threads)
            inferencers[(fmt, precision, "throughput")] = batched
            check = compare_outputs(reference, predict_all(batched, images, batch_size), float(post.image_threshold),
                                    float(post.pixel_threshold))
            row.update(throughput_graph_batch=batched.batch_size, throughput_max_rel_score_diff=check.max_rel_score_diff,
                       throughput_parity_ok=check.ok if precision == "fp32" else None)
        rows.append(row)
    batch = images[torch.arange(batch_size) % len(images)]  # a tiny split: its images repeat to fill the batch
    # Speed in interleaved rounds, best of each: on a shared machine a neighbour's burst then slows
    # one round of every runtime instead of all the rounds of one.
    for _ in range(rounds):
        for row in rows:
            key = (row["runtime"], row["precision"])
            speed = measure_speed(inferencers[key], images, batch_size, repeats, max_seconds)
            if (*key, "throughput") in inferencers:  # throughput of the fixed-batch artifact instead
                batched = inferencers[(*key, "throughput")]
                per_batch = time_calls(lambda b=batched: b.predict(batch), max(3, repeats // batch_size), warmup=1,
                                       max_seconds=max_seconds)
                speed["throughput_ips"] = float(len(batch) / np.median(per_batch))
            if "throughput_ips" not in row:
                row.update(speed)
            else:
                row["throughput_ips"] = max(row["throughput_ips"], speed["throughput_ips"])
                for name in ("latency_p50_ms", "latency_p95_ms"):
                    row[name] = min(row[name], speed[name])
    for row in rows:
        print(json.dumps(row), file=sys.stderr, flush=True)
    inferencers.clear()
    gc.collect()
    base = rows[0]
    for row in rows:
        row["latency_ratio"] = base["latency_p50_ms"] / row["latency_p50_ms"]  # > 1: faster than torch
        row["throughput_ratio"] = row["throughput_ips"] / base["throughput_ips"]
        row["auroc_drop"] = base["image_auroc"] - row["image_auroc"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | runtime | precision | latency b1 P50 (ms) | speed-up | throughput (img/s) | speed-up "
             "| image AUROC | AUROC drop | fp32 parity |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        # With throughput exports, both artifacts of a variant must hold the parity contract.
        ok = r.get("parity_ok") and r.get("throughput_parity_ok") is not False
        diff = max(r.get("max_rel_score_diff", 0.0), r.get("throughput_max_rel_score_diff", 0.0))
        parity = "reference" if r["runtime"] == "torch" else (
            ("ok" if ok else "FAILED") if r["precision"] == "fp32" else f"n/a (max rel. diff {diff:.1e})")
        # INT8 of a backbone computes what it leaves float in bf16 (on AMX / AVX512-BF16 CPUs).
        precision = r["precision"] + (" (+bf16)" if r["precision"] == "int8" and r["inference_precision"] == "bf16" else "")
        lines.append(f"| {r['model']} | {r['runtime']} | {precision} | {r['latency_p50_ms']:.1f} | "
                     f"{r['latency_ratio']:.2f}x | {r['throughput_ips']:.1f} | {r['throughput_ratio']:.2f}x | "
                     f"{r['image_auroc']:.4f} | {r['auroc_drop']:+.4f} | {parity} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--category", default="brick")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--demo-root", help="demo dataset folder (default: the cache)")
    parser.add_argument("--run", action="append", default=[], metavar="MODEL=RUN_DIR", help="reuse a trained run")
    parser.add_argument("--batch-size", type=int, default=8, help="batch of the throughput measurement")
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 calls per runtime")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time cap per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best of each is kept")
    parser.add_argument("--threads", type=int, help="CPU threads for every runtime (default: each one's own)")
    parser.add_argument("--throughput-exports", action="store_true",
                        help="also export every variant at a fixed batch of --batch-size and measure throughput on "
                        "those (the backbone's CPU steps unroll into such graphs); latency, accuracy and parity stay "
                        "those of the default exports")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)

    from anomalens.progress import set_enabled

    set_enabled(False)
    given = dict(item.split("=", 1) for item in args.run)
    project = tempfile.mkdtemp(prefix="anomalens-runtimes-")
    rows = []
    for model in args.models:
        run = Path(given[model]) if model in given else train(model, args.category, args.image_size, args.demo_root,
                                                               project)
        rows += measure(run, args.batch_size, args.repeats, args.max_seconds, args.threads, args.rounds,
                        args.throughput_exports)
    threads = f"{args.threads} thread(s) per runtime" if args.threads else "default threads"
    exported = (f" (artifacts exported at a fixed batch of {args.batch_size}, outputs checked against torch)"
                if args.throughput_exports else "")
    print(f"CPU: {os.cpu_count()} cores, {threads}; batch {args.batch_size} for throughput{exported}; "
          f"{args.category} at {args.image_size} px\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
