"""Command line: anomalens train | test | models | data demo, plus the feature packages' commands
(export | validate | predict | serve ...).

Any config value can be overridden with a dotted flag, e.g.
    anomalens train --config configs/patchcore.yaml --dataset.root /data/mvtec --dataset.category bottle
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from .errors import AnomalensError, ConfigError

METRIC_ROWS = [
    ("image_AUROC", "Image AUROC"), ("image_F1max", "Image F1 (best threshold)"),
    ("image_F1", "Image F1 (chosen threshold)"), ("pixel_AUROC", "Pixel AUROC"), ("pixel_F1max", "Pixel F1 (best)"),
    ("pixel_AUPRO", "Pixel AUPRO (FPR <= 0.3)"), ("false_reject_rate", "False-reject rate (good parts rejected)"),
    ("escape_rate", "Escape rate (defects passed)"), ("image_threshold", "Image threshold (raw score)"),
    ("pixel_threshold", "Pixel threshold (raw map)"),
]


def parse_overrides(extra: list[str]) -> dict[str, Any]:
    """['--dataset.root', '/x', '--seed=3'] -> {'dataset.root': '/x', 'seed': 3}."""
    from .config import parse_value

    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"Unexpected argument {token!r}: overrides look like --section.key value.")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise ConfigError(f"The override --{key} needs a value, e.g. --{key} VALUE.")
            value, i = extra[i + 1], i + 1
        out[key] = parse_value(value)
        i += 1
    return out


def _console():
    from rich.console import Console

    return Console()


def print_metrics(metrics: dict[str, float], title: str, timings: dict[str, float] | None = None,
                  fit_info: dict[str, Any] | None = None) -> None:
    """The metric table; then the timings, and what the model chose from the data (`fit_info`)."""
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    for key, label in METRIC_ROWS:
        if key in metrics:
            v = metrics[key]
            table.add_row(label, "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}")
    for key, v in (timings or {}).items():
        table.add_row(key.replace("_", " "), f"{v:.2f}")
    for key, v in (fit_info or {}).items():
        table.add_row(key.replace("_", " "), _shown(v))
    _console().print(table)


def _shown(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .config import load_config
    from .engine import Engine
    from .progress import set_enabled

    config = load_config(args.config, overrides)
    set_enabled(config.trainer.progress)
    engine = Engine(config)
    run_dir = engine.run()
    print_metrics(engine.metrics, f"{config.model_name} on {config.dataset_name}/{config.dataset.category} (test split)",
                  engine.timings, engine.model.fit_info)
    _console().print(f"Run folder: [bold]{run_dir}[/bold]")
    return 0


def cmd_test(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .config import apply_overrides, config_from_dict
    from .engine import Engine, load_checkpoint

    config, model, post = load_checkpoint(args.run)
    # The run's images and tracker runs stay as they were; a re-test only writes metrics_retest.json
    # and scores_retest.csv (so it needs none of the trackers' SDKs either).
    quiet = {"visualization.save_images": False, "visualization.show_images": False, "logging.logger": "csv"}
    config = config_from_dict(apply_overrides(config.to_dict(), {**quiet, **overrides}))
    engine = Engine(config)
    engine.run_dir = Path(args.run)
    engine.setup()
    engine.model, engine.postprocessor = model.to(engine.device), post.to(engine.device)
    metrics = engine.test()
    engine.write_record(suffix="_retest")
    print_metrics(metrics, f"Re-test of {args.run}")
    return 0


def cmd_models(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from rich.table import Table

    from .registry import get_model_class, list_models

    table = Table(title="Models", show_header=True, header_style="bold")
    table.add_column("Name")
    table.add_column("Description")
    for name in list_models():
        table.add_row(name, get_model_class(name).description)
    _console().print(table)
    return 0


def cmd_data(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .data.demo import make_demo_dataset

    root = make_demo_dataset(args.out, image_size=args.image_size, seed=args.seed)
    _console().print(f"Demo dataset written to [bold]{root}[/bold]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomalens", description="Visual anomaly detection for industrial inspection.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fit, calibrate and test a model; write a run folder",
                       description="Any config value can be overridden: --dataset.category bottle --seed 3")
    p.add_argument("--config", help="YAML config (see configs/); defaults apply when omitted")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="re-evaluate a run on its test split (dataset.* overrides allowed)")
    p.add_argument("--run", required=True, help="run folder")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("models", help="list the available models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("data", help="datasets: `anomalens data demo --out DIR` writes the demo dataset")
    p.add_argument("what", choices=["demo"])
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)

    # Feature packages add their own sub-commands: each module has add_commands(subparsers),
    # and each command function has the signature func(args, overrides) -> exit code.
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


# Modules that contribute sub-commands (their heavy imports stay inside the command functions).
COMMAND_MODULES: list[str] = ["anomalens.deploy.commands", "anomalens.deploy.serve_command",
                              "anomalens.loggers.commands", "anomalens.pipelines.commands",
                              "anomalens.pipelines.hpo_commands"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(extra)
        return args.func(args, overrides)
    except AnomalensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
