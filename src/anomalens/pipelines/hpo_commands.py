"""CLI sub-command: `anomalens hpo --config hpo.yaml [--workers N] [--resume]` (see pipelines/hpo.py)."""
from __future__ import annotations

import argparse
import math
from typing import Any


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "hpo", help="hyper-parameter search over any config field (Optuna, or the Comet Optimizer)",
        description="Search the config keys of an HPO file (configs/hpo/) and report the best config, every "
                    "trial, parameter importance and plots. Dotted overrides apply to the base config, "
                    "e.g. --dataset.root /data/mvtec --dataset.category bottle.")
    p.add_argument("--config", required=True, help="HPO YAML: base config, search_space, objective, ...")
    p.add_argument("--n-trials", type=int, help="trials to run now (default: the file's n_trials)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the study on this machine (default 1); other machines join "
                        "with the same --storage and --resume")
    p.add_argument("--resume", action="store_true", help="add trials to an existing study instead of refusing")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<output>/study.db), e.g. "
                                     "postgresql://user:password@host/db for workers on many machines")
    p.add_argument("--study-name", help="study name (default: hpo-<file name>)")
    p.add_argument("--output", help="report folder (default: <project.root>/hpo/<study name>)")
    p.add_argument("--backend", choices=["optuna", "comet"], help="override the file's backend")
    p.set_defaults(func=cmd_hpo)


def cmd_hpo(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .hpo import load_spec, run_hpo

    spec = load_spec(args.config, overrides, n_trials=args.n_trials, storage=args.storage,
                     study_name=args.study_name, output=args.output, backend=args.backend)
    report = run_hpo(spec, workers=args.workers, resume=args.resume)

    console = Console()
    counts = ", ".join(f"{report.count(s)} {s}" for s in ("complete", "pruned", "fail") if report.count(s))
    console.print(f"Study [bold]{spec.study_name}[/bold]: {len(report.records)} trials ({counts or 'none'})")
    if report.best is not None:
        table = Table(title=f"Best trial {report.best.number}: {spec.metric} = {report.best.value:.4f}",
                      show_header=True, header_style="bold")
        table.add_column("Parameter")
        table.add_column("Best value")
        table.add_column("Spearman rho", justify="right")
        table.add_column("p-value", justify="right")
        table.add_column("Importance", justify="right")
        for s in report.stats:
            table.add_row(escape(s.key), _show(report.best.params.get(s.key)), _num(s.rho, "+.3f"), _num(s.p_value, ".3g"),
                          _num(s.importance, ".3f"))
        console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    for name, path in report.files.items():
        console.print(f"{name.replace('_', ' ')}: {escape(str(path))}")
    return 0 if report.best is not None else 1


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _show(value: Any) -> str:
    from rich.markup import escape

    from .hpo import _label

    return f"{value:.4g}" if isinstance(value, float) else escape(_label(value))  # [blocks.1] is not markup
