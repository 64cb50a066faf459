"""CLI sub-commands of the deploy package: export, validate, predict.

    anomalens export --run RUN --format onnx|openvino|torch [--precision fp32|fp16|int8] [--out PATH]
    anomalens validate ARTIFACT --run RUN [--runtime ...]
    anomalens predict --model ARTIFACT_OR_RUN --input DIR|IMAGE|VIDEO [--runtime ...] [--batch-size N]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError

RUNTIME_CHOICES = ["torch", "onnx", "openvino"]


def _console():
    from rich.console import Console

    return Console()


def _no_overrides(command: str, overrides: dict[str, Any]) -> None:
    if overrides:
        raise ConfigError(f"{command} takes no config overrides. Got {', '.join('--' + k for k in overrides)}.")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


# --------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .export import INT8_MIN_CHANNELS, export

    _no_overrides("export", overrides)
    result = export(args.run, args.format, args.precision, args.out, batch_size=args.batch_size,
                    calibration=args.calibration, calibration_size=args.calibration_size, onnx=args.onnx)
    console = _console()
    batch = result.metadata["batch_size"]
    console.print(f"Exported {result.metadata['model']} as {args.format} {args.precision} "
                  f"({'any batch size' if batch is None else f'fixed batch of {batch}'}) in {result.seconds:.1f} s: "
                  f"[bold]{result.path}[/bold]")
    if "int8_scope" in result.metadata:
        rest = ("bfloat16 on CPUs with AMX / AVX512-BF16, else float32" if result.metadata["inference_precision"] == "bf16"
                else "float32")
        console.print(f"8-bit: the convolutions (except depthwise ones and those under {INT8_MIN_CHANNELS} input "
                      f"channels) and matrix products of {', '.join(result.metadata['int8_scope'])} (calibrated on "
                      f"{result.metadata['calibration']['images']} images); the rest is {rest}.")
    if result.evaluation:
        ev = result.evaluation
        console.print(f"Image AUROC on the test split ({ev['n_test']} images): {ev['auroc']:.4f} "
                      f"vs {ev['reference_auroc']:.4f} for the run (drop {ev['auroc_drop']:+.4f}).")
        if ev["auroc_drop"] > 0.01:
            console.print(f"[bold yellow]{args.precision} costs more than 0.01 AUROC on this run; "
                          "prefer fp32, fp16 or bf16.[/bold yellow]")
    else:
        console.print(f"Check it against the run: anomalens validate {result.path} --run {Path(args.run)}")
    return 0


# --------------------------------------------------------------------------- validate
def cmd_validate(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from rich.table import Table

    from .export import validate

    _no_overrides("validate", overrides)
    report = validate(args.artifact, args.run, runtime=args.runtime, batch_size=args.batch_size,
                      repeats=args.repeats, limit=args.limit)
    p, meta = report.parity, report.metadata
    table = Table(title=f"{meta['model']} · {meta['runtime']} · {meta.get('precision', 'fp32')} vs torch "
                        f"({p.n_images} test images)", header_style="bold")
    table.add_column("Check")
    table.add_column("Value", justify="right")
    tol = f"<= {p.atol:g} + {p.rtol:g}·|ref|"
    table.add_row("Max score difference (abs / rel)", f"{p.max_abs_score_diff:.3g} / {p.max_rel_score_diff:.3g}")
    table.add_row(f"Scores within {tol}", "yes" if p.scores_within_tolerance else "NO")
    table.add_row(f"Maps within {tol}", "yes" if p.maps_within_tolerance else "NO")
    table.add_row("Labels differing (off the threshold)", f"{p.label_flips} ({p.label_flips_off_threshold})")
    table.add_row("Mask pixels differing (off the threshold)", f"{p.mask_flips} ({p.mask_flips_off_threshold})")
    if report.engine_score_mismatches is not None:
        table.add_row("Scores differing from the run's scores.csv", str(report.engine_score_mismatches))
        table.add_row("Labels differing from the run (off the threshold)", str(report.engine_label_flips_off_threshold))
    if report.auroc:
        a = report.auroc
        table.add_row("Image AUROC (torch → artifact)", f"{a['reference_auroc']:.4f} → {a['auroc']:.4f}")
    s = report.speed
    table.add_row("Latency, batch 1 (P50 / P95)", f"{s['latency_p50_ms']:.1f} / {s['latency_p95_ms']:.1f} ms")
    table.add_row(f"Throughput, batch {s['throughput_batch']}", f"{s['throughput_ips']:.1f} images/s")
    table.add_row("Peak memory (added by the runtime)", f"{report.peak_memory_mb:.0f} MiB ({report.added_memory_mb:+.0f})")
    table.add_row("Size on disk", f"{report.size_mb:.2f} MiB")
    console = _console()
    console.print(table)
    if meta.get("precision", "fp32") != "fp32":
        console.print(f"{meta['precision']} artifacts are not held to the fp32 parity contract; "
                      "judge them by the AUROC change.")
        return 0
    console.print("[bold green]Parity: OK[/bold green]" if report.ok else "[bold red]Parity: FAILED[/bold red]")
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .inferencer import Inferencer, predict_to_folder

    _no_overrides("predict", overrides)
    inferencer = Inferencer.load(args.model, device=args.device, runtime=args.runtime)
    model = Path(args.model)
    default = (model if model.is_dir() else model.parent) / "predictions"
    out_dir = Path(args.out) if args.out else default
    csv_path = predict_to_folder(inferencer, args.input, out_dir, batch_size=args.batch_size, mode=args.mode,
                                 save_images=not args.no_images)
    _console().print(f"Predictions ({inferencer.runtime_name}): [bold]{csv_path}[/bold] and predictions.json")
    return 0


# --------------------------------------------------------------------------- parsers
def add_commands(subparsers: Any) -> None:
    """Register export, validate and predict on the CLI's sub-parsers."""
    from .export import FORMATS, PRECISIONS

    p = subparsers.add_parser("export", help="export a run to torch, ONNX or OpenVINO (fp32, fp16, int8)",
                              description="The artifact holds pre-processing (the backbone's normalisation), the "
                                          "model and post-processing (normalisation, thresholds), plus metadata.")
    p.add_argument("--run", required=True, help="run folder or checkpoint file")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="fp16, bf16, int8: openvino only")
    p.add_argument("--out", help="output file or folder (default: RUN/export/...)")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="fix the graph's batch size (default: any batch when the model allows it, else 1)")
    p.add_argument("--calibration", help="int8: folder of good images to calibrate on (default: the run's train split)")
    p.add_argument("--calibration-size", type=_positive, default=300, help="int8: number of calibration images")
    p.add_argument("--onnx", help="openvino fp32 | fp16 | bf16: convert this ONNX export of the run instead of tracing "
                   "the model again (int8 traces its own graph)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("validate", help="check an exported model against its run: parity, speed, memory, size")
    p.add_argument("artifact", help="exported model (.pt, .onnx, .xml) or folder")
    p.add_argument("--run", required=True, help="the run it was exported from")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, help="default: the artifact's own")
    p.add_argument("--batch-size", type=_positive, default=8, help="batch size of the throughput measurement")
    p.add_argument("--repeats", type=_positive, default=30, help="timed batch-1 calls")
    p.add_argument("--limit", type=_positive, help="check only the first N test images")
    p.set_defaults(func=cmd_validate)

    p = subparsers.add_parser("predict", help="score images, folders or videos with a run or an exported model")
    p.add_argument("--model", "--run", dest="model", required=True,
                   help="run folder, checkpoint, or exported model (.pt, .onnx, .xml)")
    p.add_argument("--input", required=True, help="an image, a video, or a folder of them")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, help="default: the model file's own")
    p.add_argument("--out", help="output folder (default: predictions/ beside the model)")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--mode", choices=["full", "simple"], default="simple")
    p.add_argument("--no-images", action="store_true", help="write the CSV and JSON only")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_predict)
