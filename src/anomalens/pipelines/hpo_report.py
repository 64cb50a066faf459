"""The HPO report: what a study found, as files in its output folder and in the trackers.

    trials.csv          every trial: number, state, objective, its values, all its metrics, duration, worker,
                        run folder, error
    best_config.yaml    the best trial's complete config: `anomalens train --config best_config.yaml`
    param_stats.csv     per searched key: Spearman rho and p-value against the objective (ranked by |rho|)
                        and Optuna's importance (fANOVA)
    summary.json        the same facts in one file
    plots/              history.png, parallel_coordinates.png, params_vs_metric.png

Spearman's rho is computed over completed trials.  A categorical key enters it as the position of
its value in `choices`, so its rho means something only when the choices are listed in a
meaningful order (small to large, off to on); importance has no such caveat.  Everything works
from TrialRecords, so both backends (Optuna, Comet Optimizer) get the same report.
"""
from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .hpo import HpoSpec, Param, TrialRecord, _label, import_optuna

PLOTS = ("history", "parallel_coordinates", "params_vs_metric")


@dataclass
class ParamStat:
    key: str
    rho: float
    p_value: float
    n: int
    importance: float | None = None
    encoding: str = "value"


@dataclass
class HpoReport:
    output: Path
    records: list[TrialRecord]
    best: TrialRecord | None
    stats: list[ParamStat]
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def count(self, state: str) -> int:
        return sum(r.state == state for r in self.records)


# --------------------------------------------------------------------------- statistics
def completed(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    return sorted((r for r in records if r.state == "complete" and r.value is not None and math.isfinite(r.value)),
                  key=lambda r: r.number)


def best_record(records: Sequence[TrialRecord], direction: str) -> TrialRecord | None:
    done = completed(records)
    if not done:
        return None
    sign = 1.0 if direction == "maximize" else -1.0
    return max(done, key=lambda r: (sign * r.value, -r.number))  # ties: the earliest trial


def spearman_ranking(columns: Mapping[str, Sequence[float]], y: Sequence[float]) -> list[tuple[str, float, float, int]]:
    """(name, rho, p-value, n) per column against y, ranked by |rho| (undefined ones last).

    Pairs with a NaN on either side are dropped; fewer than 3 pairs or a constant column give NaN.
    """
    from scipy.stats import spearmanr

    rows = []
    y = np.asarray(y, dtype=float)
    for name, x in columns.items():
        x = np.asarray(x, dtype=float)
        keep = np.isfinite(x) & np.isfinite(y)
        xs, ys = x[keep], y[keep]
        if keep.sum() < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
            rows.append((name, math.nan, math.nan, int(keep.sum())))
            continue
        result = spearmanr(xs, ys)
        rows.append((name, float(result.statistic), float(result.pvalue), int(keep.sum())))
    return sorted(rows, key=lambda r: (math.isnan(r[1]), -abs(r[1]) if not math.isnan(r[1]) else 0.0))


def parameter_columns(records: Sequence[TrialRecord], space: Mapping[str, Param]) -> dict[str, list[float]]:
    """Numeric column per searched key over completed trials (categoricals: index in `choices`)."""
    done = completed(records)
    return {key: [param.numeric(r.params[key]) if key in r.params else math.nan for r in done]
            for key, param in space.items()}


def importance(records: Sequence[TrialRecord], spec: HpoSpec) -> tuple[dict[str, float], str]:
    """Optuna's parameter importance (fANOVA) over completed trials, and a note when not computed."""
    done = completed(records)
    if len(done) < 2:
        return {}, f"parameter importance needs at least 2 completed trials (got {len(done)})"
    try:
        optuna = import_optuna()
    except ImportError as exc:
        return {}, f"parameter importance not computed: {exc}"
    study = optuna.create_study(direction=spec.direction)
    distributions = {key: p.distribution() for key, p in spec.space.items()}
    for r in done:
        if not all(key in r.params for key in spec.space):
            continue
        params = {key: spec.space[key].encode(r.params[key]) for key in spec.space}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=r.value))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            found = optuna.importance.get_param_importances(study, evaluator=evaluator)
            return {k: float(v) for k, v in found.items()}, ""
    except Exception as exc:  # noqa: BLE001 - e.g. no variation at all: the report goes on without it
        return {}, f"parameter importance not computed: {type(exc).__name__}: {exc}"


def parameter_statistics(records: Sequence[TrialRecord], spec: HpoSpec) -> tuple[list[ParamStat], list[str]]:
    done = completed(records)
    ranking = spearman_ranking(parameter_columns(records, spec.space), [r.value for r in done])
    imp, note = importance(records, spec)
    stats = [ParamStat(name, rho, p, n, imp.get(name),
                       "choice index" if spec.space[name].type == "categorical" else "value")
             for name, rho, p, n in ranking]
    notes = [note] if note else []
    if len(done) < 3:
        notes.append(f"Spearman rho needs at least 3 completed trials (got {len(done)})")
    return stats, notes


# --------------------------------------------------------------------------- files
def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value if isinstance(value, (int, str)) else _label(value)


def write_trials_csv(records: Sequence[TrialRecord], spec: HpoSpec, path: Path) -> Path:
    metric_keys = sorted({k for r in records for k in r.metrics})
    keys = list(spec.space) + sorted({k for r in records for k in r.params} - set(spec.space))
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["number", "state", "value", *keys, *metric_keys, "duration_s", "worker", "run_dir", "error"])
        for r in sorted(records, key=lambda r: r.number):
            writer.writerow([r.number, r.state, _cell(r.value), *(_cell(r.params.get(k)) for k in keys),
                             *(_cell(r.metrics.get(k)) for k in metric_keys), _cell(r.duration_s), r.worker,
                             r.run_dir, r.error])
    return path


def write_best_config(spec: HpoSpec, best: TrialRecord, path: Path, n_trials: int) -> Path:
    from ..config import dump_yaml

    config = spec.base_config(best.params)
    header = (f"# Best config of HPO study '{spec.study_name}': trial {best.number} of {n_trials}, "
              f"{spec.metric} = {best.value:.6g} ({spec.direction}, {spec.split} split).\n"
              + "".join(f"#   {k}: {_label(v)}\n" for k, v in best.params.items())
              + f"# Train it with: anomalens train --config {path.name}\n")
    path.write_text(header + dump_yaml(config))
    return path


def write_param_stats(stats: Sequence[ParamStat], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "parameter", "spearman_rho", "p_value", "abs_rho", "n", "importance", "encoding"])
        for i, s in enumerate(stats, 1):
            writer.writerow([i, s.key, _cell(s.rho), _cell(s.p_value), _cell(abs(s.rho)), s.n, _cell(s.importance),
                             s.encoding])
    return path


def mask_url(url: str | None) -> str | None:
    """A storage URL without its password (summaries and trackers never show one)."""
    if not url or "@" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    # The object API with an Agg canvas: no pyplot, no global backend switch in the user's session.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_history(records: Sequence[TrialRecord], spec: HpoSpec, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    done = completed(records)
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    x = [r.number for r in done]
    y = [r.value for r in done]
    pick = max if spec.direction == "maximize" else min
    best = [pick(y[:i + 1]) for i in range(len(y))]
    ax.scatter(x, y, s=18, color="tab:blue", label="trial")
    ax.step(x, best, where="post", color="tab:red", label="best so far")
    counts = {s: sum(r.state == s for r in records) for s in ("complete", "pruned", "fail")}
    ax.set_title(f"Optimisation history: {counts['complete']} complete, {counts['pruned']} pruned, "
                 f"{counts['fail']} failed")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{spec.metric} ({spec.direction})")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _unit(param: Param, value: Any) -> float:
    """A value on its axis of the parallel-coordinates plot, in [0, 1]."""
    if param.type == "categorical":
        return param.index(value) / max(1, len(param.choices) - 1)
    lo, hi, v = float(param.low), float(param.high), float(value)
    if param.log:
        lo, hi, v = math.log(lo), math.log(hi), math.log(v)
    return (v - lo) / (hi - lo)


def plot_parallel_coordinates(records: Sequence[TrialRecord], spec: HpoSpec, path: Path) -> Path:
    from matplotlib import colormaps

    done = [r for r in completed(records) if all(k in r.params for k in spec.space)]
    keys = list(spec.space)
    values = np.array([r.value for r in done], dtype=float)
    lo, hi = values.min(), values.max()
    span = hi - lo if hi > lo else 1.0
    fig = _figure(max(6, 1.8 * (len(keys) + 1)), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["viridis"]
    # Best last, so it is drawn on top.
    order = np.argsort(values if spec.direction == "maximize" else -values)
    for i in order:
        r = done[i]
        ys = [_unit(spec.space[k], r.params[k]) for k in keys] + [(r.value - lo) / span]
        colour = (r.value - lo) / span if spec.direction == "maximize" else 1 - (r.value - lo) / span
        ax.plot(range(len(ys)), ys, color=cmap(colour), alpha=0.8, linewidth=1.5)
    for j, key in enumerate(keys):
        p = spec.space[key]
        ax.axvline(j, color="black", linewidth=0.8)
        if p.type == "categorical":
            for c_i, choice in enumerate(p.choices):
                ax.text(j + 0.03, c_i / max(1, len(p.choices) - 1), _label(choice)[:28], fontsize=7, va="center")
        else:
            ax.text(j + 0.03, 0, f"{p.low:g}", fontsize=7, va="bottom")
            ax.text(j + 0.03, 1, f"{p.high:g}", fontsize=7, va="top")
    ax.axvline(len(keys), color="black", linewidth=0.8)
    ax.text(len(keys) + 0.03, 0, f"{lo:.4g}", fontsize=7, va="bottom")
    ax.text(len(keys) + 0.03, 1, f"{hi:.4g}", fontsize=7, va="top")
    ax.set_xticks(range(len(keys) + 1))
    ax.set_xticklabels([*keys, spec.metric], rotation=20, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(keys) + 0.5)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{len(done)} completed trials (colour: {spec.metric}, yellow = best)", fontsize=10)
    return _save(fig, path)


def plot_params_vs_metric(records: Sequence[TrialRecord], spec: HpoSpec, stats: Sequence[ParamStat],
                          path: Path) -> Path:
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    done = completed(records)
    rho = {s.key: s.rho for s in stats}
    keys = [s.key for s in stats]  # ranked by |rho|
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = _figure(4.2 * ncols, 3.2 * nrows)
    for i, key in enumerate(keys):
        p = spec.space[key]
        ax = fig.add_subplot(nrows, ncols, i + 1)
        pts = [(p.numeric(r.params[key]), r.value) for r in done if key in r.params]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=18, color="tab:blue")
        if p.type == "categorical":
            ax.set_xticks(range(len(p.choices)))
            ax.set_xticklabels([_label(c)[:24] for c in p.choices], rotation=20, ha="right", fontsize=7)
        elif p.log:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        r = rho[key]
        ax.set_title(f"{key}  (rho {r:+.2f})" if not math.isnan(r) else key, fontsize=9)
        ax.set_ylabel(spec.metric, fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- trackers
def log_to_trackers(spec: HpoSpec, report: HpoReport) -> list[str]:
    """One summary run per configured tracker: study settings, best values, per-trial objective (step =
    trial number), parameter statistics, the plots and the report files.  A failing tracker warns."""
    from ..loggers import build_trackers
    from ..loggers.base import load_rgb

    config = spec.base_config()
    logged = []
    # The trackers' start() reads config, run_dir and device of the run it records: here, the study.
    run = SimpleNamespace(config=config, run_dir=report.output, device="cpu")
    metric = spec.metric
    params: dict[str, Any] = {"hpo.study_name": spec.study_name, "hpo.backend": spec.backend,
                              "hpo.sampler": spec.sampler["name"], "hpo.pruner": spec.pruner["name"],
                              "hpo.metric": metric, "hpo.direction": spec.direction, "hpo.split": spec.split,
                              "hpo.n_trials": spec.n_trials, "hpo.storage": mask_url(spec.storage_url)
                              if spec.backend == "optuna" else None,
                              **{f"search_space.{k}": p.describe() for k, p in spec.space.items()}}
    if report.best is not None:
        params.update({f"best.{k}": _cell(v) for k, v in report.best.params.items()})
    for tracker in build_trackers(config):
        started = False
        try:
            tracker.start(run)
            started = True
            tracker.log_params(params)
            tracker.log_tags({"model": config.model_name, "dataset": config.dataset_name,
                              "category": config.dataset.category, "run_dir": str(report.output),
                              "hpo_study": spec.study_name, "kind": "hpo-summary"})
            pick = max if spec.direction == "maximize" else min
            best_so_far = None
            for r in completed(report.records):
                best_so_far = r.value if best_so_far is None else pick(best_so_far, r.value)
                tracker.log_metrics({f"hpo/{metric}": r.value, f"hpo/best_{metric}": best_so_far}, step=r.number)
            final = {"hpo/n_complete": report.count("complete"), "hpo/n_pruned": report.count("pruned"),
                     "hpo/n_failed": report.count("fail")}
            if report.best is not None:
                final[f"best_{metric}"] = report.best.value
            for s in report.stats:
                if not math.isnan(s.rho):
                    final[f"spearman_rho/{s.key}"] = s.rho
                if s.importance is not None:
                    final[f"importance/{s.key}"] = s.importance
            last = max((r.number for r in report.records), default=0)
            tracker.log_metrics({k: float(v) for k, v in final.items()}, step=last)
            for name in PLOTS:
                if name in report.files:
                    tracker.log_image(load_rgb(report.files[name]), f"hpo/{name}", last)
            for name in ("trials_csv", "best_config", "param_stats", "summary"):
                if name in report.files:
                    tracker.log_file(report.files[name])
            started = False
            tracker.finish()
            tracker.report()
            logged.append(tracker.name)
        except Exception as exc:  # noqa: BLE001 - the local report stands whatever a tracker does
            warnings.warn(f"Logging the HPO report to {tracker.name} failed: {type(exc).__name__}: {exc}",
                          stacklevel=2)
            if started:
                try:
                    tracker.finish(failed=True)
                except Exception:  # noqa: BLE001
                    pass
    return logged


# --------------------------------------------------------------------------- all of it
def write_report(spec: HpoSpec, records: Sequence[TrialRecord], elapsed: float | None = None) -> HpoReport:
    out = spec.output
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r.number)
    best = best_record(records, spec.direction)
    stats, notes = parameter_statistics(records, spec)
    report = HpoReport(out, list(records), best, stats, notes=notes)
    files = report.files
    files["trials_csv"] = write_trials_csv(records, spec, out / "trials.csv")
    files["param_stats"] = write_param_stats(stats, out / "param_stats.csv")
    if best is not None:
        files["best_config"] = write_best_config(spec, best, out / "best_config.yaml", len(records))
        plots = out / "plots"
        plots.mkdir(exist_ok=True)
        files["history"] = plot_history(records, spec, plots / "history.png")
        files["parallel_coordinates"] = plot_parallel_coordinates(records, spec, plots / "parallel_coordinates.png")
        files["params_vs_metric"] = plot_params_vs_metric(records, spec, stats, plots / "params_vs_metric.png")
    else:
        notes.append("no trial completed: no best config, no plots (see the errors in trials.csv)")
    summary = {
        "study_name": spec.study_name, "backend": spec.backend,
        "storage": mask_url(spec.storage_url) if spec.backend == "optuna" else None,
        "objective": {"metric": spec.metric, "direction": spec.direction, "split": spec.split},
        "search_space": {k: p.to_dict() for k, p in spec.space.items()},
        "trials": {s: report.count(s) for s in ("complete", "pruned", "fail", "running")} | {"total": len(records)},
        "elapsed_seconds": elapsed,
        "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                           "run_dir": best.run_dir, "metrics": best.metrics},
        "parameters": [{"parameter": s.key, "spearman_rho": _finite(s.rho), "p_value": _finite(s.p_value),
                        "n": s.n, "importance": s.importance, "encoding": s.encoding} for s in stats],
        "notes": notes,
        "files": {k: str(v) for k, v in files.items()},
    }
    files["summary"] = out / "summary.json"
    files["summary"].write_text(json.dumps(summary, indent=2, default=str))
    log_to_trackers(spec, report)
    return report


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


__all__ = ["HpoReport", "ParamStat", "write_report", "spearman_ranking", "parameter_statistics", "importance",
           "best_record", "mask_url"]
