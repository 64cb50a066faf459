"""Benchmark grids: models x datasets/categories x parameter values, one CSV row per job.

The YAML file (configs/benchmark/example.yaml shows every key):

    base:      a run config as in configs/*.yaml, without `model`: every job starts from it
    models:    list; each a model name, or a mapping {name, <model params>, grid: {...}}
    datasets:  list of dataset sections (format, root, ...) with `categories: [...]` (or `category`)
               and an optional `name` for the tables; default: base's dataset
    grid:      mapping of dotted config keys to lists of values
    speed:     runtimes, batch_size (N), repeats, max_seconds of the speed measurements
    plots:     metrics: the metrics drawn as heat maps

Grid axes are exactly: the `models` list, the `datasets` list, each dataset's `categories`, every
key of `grid`, and every key of a model's own `grid` (for that model only).  The jobs are their
cartesian product.  Every other value is literal, lists included (`layers: [blocks.1, blocks.2]`);
a grid over a list-valued setting lists the lists: `model.layers: [[blocks.1], [blocks.1, blocks.2]]`.

A job's id is '<model>-<dataset>-<category>-<hash of its config>', so a rerun into the same output
folder knows which jobs are done: rows with status 'ok' are kept and skipped, failed ones are run
again (their `attempts` grows; `error` holds the last error until a retry succeeds).
"""
from __future__ import annotations

import copy
import csv
import hashlib
import itertools
import json
import math
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import _unknown_key, apply_overrides, config_from_dict, dump_yaml, load_yaml
from ..errors import (
    ConfigError,
    Interval,
    ListOf,
    OneOf,
    param_error,
    validate_params,
)
from ..metrics import METRIC_KEYS
from .jobs import COLUMNS, RUNTIMES

OWNER = "the benchmark config"
TOP_KEYS = ("base", "models", "datasets", "grid", "speed", "plots")
RESULTS_NAME = "results.csv"
# Beneath the user's base: a benchmark keeps metrics and checkpoints, not thousands of images.
BENCHMARK_DEFAULTS: dict[str, Any] = {"visualization": {"save_images": False}}

SPEED_RULES = {
    "runtimes": ListOf(OneOf(*RUNTIMES), 0),
    "batch_size": Interval(int, 1, 1024),
    "repeats": Interval(int, 1, 10_000),
    "max_seconds": Interval(float, 0, None, "neither"),
}
SPEED_DEFAULTS = {"runtimes": list(RUNTIMES), "batch_size": 8, "repeats": 20, "max_seconds": 10.0}
PLOT_RULES = {"metrics": ListOf(OneOf(*METRIC_KEYS), 0)}
PLOT_DEFAULTS = {"metrics": ["image_AUROC", "pixel_AUROC", "pixel_AUPRO"]}
MAX_ID = 80


# --------------------------------------------------------------------------- the spec
@dataclass
class BenchmarkSpec:
    """A benchmark file, checked: the mapping as written plus its sections with defaults."""

    raw: dict[str, Any]
    base: dict[str, Any]
    models: list[dict[str, Any]]
    datasets: list[dict[str, Any]]
    grid: dict[str, list[Any]]
    speed: dict[str, Any]
    plots: dict[str, Any]


def load_spec(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> BenchmarkSpec:
    """Read and check a benchmark YAML file (or mapping); `overrides` set dotted keys of the file,
    e.g. {'base.dataset.root': '/data', 'speed.runtimes': ['torch'], 'grid.seed': [0, 1]}."""
    raw = load_yaml(source) if isinstance(source, (str, Path)) else copy.deepcopy(dict(source))
    for key, value in (overrides or {}).items():
        if key.startswith("grid."):  # grid keys are dotted themselves
            grid = raw.get("grid")
            raw["grid"] = {**(grid if isinstance(grid, dict) else {}), key[len("grid."):]: value}
        else:
            raw = apply_overrides(raw, {key: value})
    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown_key(key, list(TOP_KEYS), "a benchmark config")

    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise param_error(OWNER, "base", "a mapping of config sections (as in configs/*.yaml)", base)
    if "model" in base:
        raise ConfigError("The 'base' section of the benchmark config must not have a 'model' section: "
                          "list models under 'models'.")

    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise param_error(OWNER, "models", "a non-empty list of model names or {name: ..., <param>: ...} mappings",
                          models)
    model_entries = []
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise param_error(OWNER, f"models[{i}]", "a model name or a mapping with a 'name'", entry)
        entry = dict(entry)
        entry["grid"] = _check_grid(entry.get("grid"), f"models[{i}].grid")
        model_entries.append(entry)

    datasets = raw.get("datasets")
    if datasets is None:
        datasets = [{}]
    if not isinstance(datasets, list) or not datasets:
        raise param_error(OWNER, "datasets", "a non-empty list of dataset sections", datasets)
    dataset_entries = []
    for i, entry in enumerate(datasets):
        if not isinstance(entry, dict):
            raise param_error(OWNER, f"datasets[{i}]", "a dataset section (format, root, categories, ...)", entry)
        entry = dict(entry)
        if "categories" in entry and "category" in entry:
            raise ConfigError(f"The entry datasets[{i}] of the benchmark config has both 'category' and "
                              "'categories': keep one.")
        categories = entry.pop("categories", None)
        if categories is None:
            categories = [entry.pop("category")] if "category" in entry else [None]
        elif not (isinstance(categories, list) and categories and all(isinstance(c, str) for c in categories)):
            raise param_error(OWNER, f"datasets[{i}].categories", "a non-empty list of category names", categories)
        name = entry.pop("name", None)
        if name is not None and not isinstance(name, str):
            raise param_error(OWNER, f"datasets[{i}].name", "a str", name)
        dataset_entries.append({"name": name, "categories": categories, "section": entry})

    grid = _check_grid(raw.get("grid"), "grid")
    for entry in model_entries:
        both = sorted(set(grid) & set(entry["grid"]))
        if both:
            raise ConfigError(f"The grid axis {both[0]!r} is set both in 'grid' and in the grid of model "
                              f"{entry['name']!r}: keep one.")
    speed = _section(raw.get("speed"), "speed", SPEED_RULES, SPEED_DEFAULTS)
    plots = _section(raw.get("plots"), "plots", PLOT_RULES, PLOT_DEFAULTS)
    return BenchmarkSpec(raw, base, model_entries, dataset_entries, grid, speed, plots)


def _check_grid(grid: Any, where: str) -> dict[str, list[Any]]:
    if grid is None:
        return {}
    if not isinstance(grid, dict):
        raise param_error(OWNER, where, "a mapping of dotted config keys to lists of values, "
                          "e.g. {'dataset.image_size': [128, 256]}", grid)
    for key, values in grid.items():
        if not isinstance(key, str) or not key or key in ("model.name", "model"):
            raise ConfigError(f"The key {key!r} of '{where}' in the benchmark config cannot be a grid axis: "
                              "list models under 'models'." if key in ("model.name", "model") else
                              f"The key {key!r} of '{where}' in the benchmark config must be a dotted config key.")
        if not isinstance(values, list) or not values:
            raise param_error(OWNER, f"{where}.{key}", "a non-empty list of values (a list-valued setting is a "
                              "list of lists: [[a, b], [c]])", values)
    return dict(grid)


def _section(values: Any, name: str, rules: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise param_error(OWNER, name, "a mapping", values)
    validate_params(f"{OWNER}'s '{name}' section", values, rules)
    out = {**copy.deepcopy(defaults), **values}
    for key, rule in rules.items():  # 10 -> 10.0 where a float is expected
        if isinstance(rule, Interval) and rule.kind is float and isinstance(out[key], int):
            out[key] = float(out[key])
    return out


# --------------------------------------------------------------------------- the grid
def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _product(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def job_hash(config: Mapping[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def expand(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """Every job of the grid, in a stable order (models, then datasets, categories, grid values).

    Each job's config is validated here, so that a mistake fails before anything runs.
    """
    jobs: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    base = deep_merge(BENCHMARK_DEFAULTS, spec.base)
    for model in spec.models:
        model_section = {k: v for k, v in model.items() if k != "grid"}
        for dataset in spec.datasets:
            for category in dataset["categories"]:
                section = dict(dataset["section"])
                if category is not None:
                    section["category"] = category
                for combo in _product({**spec.grid, **model["grid"]}):
                    data = deep_merge(base, {"model": model_section, "dataset": section})
                    data = apply_overrides(data, combo)
                    job = _job(data, combo, dataset["name"], spec.speed)
                    if job["id"] in seen:
                        raise ConfigError(f"Two benchmark jobs have the same config ({seen[job['id']]} and "
                                          f"{_describe(job)}): remove the repeated grid value.")
                    seen[job["id"]] = _describe(job)
                    jobs.append(job)
    return jobs


def _job(data: dict[str, Any], params: dict[str, Any], dataset_name: str | None, speed: dict[str, Any]) -> dict:
    from ..config import DatasetConfig

    section = data.get("dataset") if isinstance(data.get("dataset"), dict) else {}
    label = f"{data['model'].get('name')} on {section.get('category', DatasetConfig.category)}"
    if params:
        label += " with " + ", ".join(f"{k}={v!r}" for k, v in params.items())
    try:
        config = config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"Benchmark job {label}: {exc}") from None
    dataset = dataset_name or (Path(config.dataset.root).name if config.dataset.root else config.dataset.format)
    labels = {"model": config.model_name, "dataset": dataset, "category": config.dataset.category, "params": params}
    job_id = _slug(f"{config.model_name}-{dataset}-{config.dataset.category}")[:MAX_ID] + "-" + job_hash(data)
    return {"id": job_id, "config": data, "labels": labels, "speed": dict(speed), "device": config.trainer.device,
            "keep_run": True}


def _describe(job: dict[str, Any]) -> str:
    labels = job["labels"]
    text = f"{labels['model']} on {labels['dataset']}/{labels['category']}"
    return text + (" " + json.dumps(labels["params"]) if labels["params"] else "")


def variant(row: Mapping[str, Any]) -> str:
    """'padim n_features=50': the model and its grid values (dataset axes aside), for tables and plots."""
    params = row.get("params") or {}
    if isinstance(params, str):
        params = json.loads(params) if params else {}
    parts = [f"{k.split('.')[-1]}={_short(v)}" for k, v in params.items()
             if k not in ("dataset.category", "dataset.root", "dataset.format")]
    return " ".join([str(row["model"]), *parts])


def _short(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# --------------------------------------------------------------------------- CSV
TEXT_COLUMNS = {"job_id", "status", "error", "model", "dataset", "category", "params", "device", "worker",
                "run_dir", "started_at", "finished_at", *(f"{r}_{k}" for r in RUNTIMES for k in ("error", "device"))}


def param_columns(jobs: list[dict[str, Any]]) -> list[str]:
    return sorted({f"param.{k}" for job in jobs for k in job["labels"]["params"]})


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, ".6g")
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def write_results(path: Path, rows: list[dict[str, Any]], extra_columns: list[str]) -> None:
    """One row per job, COLUMNS then the `param.<key>` columns; written whole and atomically."""
    columns = COLUMNS + [c for c in extra_columns if c not in COLUMNS]
    columns += sorted({k for r in rows for k in r} - set(columns))  # old rows' param columns stay
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})
    tmp.replace(path)


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a results CSV, numbers as floats (ints where whole), empty cells as None."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _parse(column: str, text: str | None) -> Any:
    if text is None or text == "":
        return None
    if column in TEXT_COLUMNS:
        return text
    if column.startswith("param."):
        try:
            return json.loads(text)
        except ValueError:
            return text
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and column in ("attempts", "n_train", "n_test", "speed_batch_size") \
        else value


# --------------------------------------------------------------------------- running
@dataclass
class BenchmarkResult:
    out: Path
    csv: Path
    rows: list[dict[str, Any]]  # this grid's rows, in grid order, as read back from the CSV
    ran: list[str] = field(default_factory=list)  # job ids run this time
    skipped: list[str] = field(default_factory=list)  # job ids already done
    plots: list[Path] = field(default_factory=list)
    executor: str = ""  # where the jobs ran, e.g. 'Dask at tcp://127.0.0.1:8786'

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "ok"]


def run_benchmark(source: str | Path | Mapping[str, Any], out: str | Path, workers: int = 1,
                  scheduler: str | None = None, overrides: Mapping[str, Any] | None = None,
                  cluster_options: dict[str, Any] | None = None) -> BenchmarkResult:
    """Run (or resume) a benchmark grid into `out`: results.csv, plots/, jobs/<id>.yaml, runs/.

    workers: 1 runs jobs in this process; more runs a local process pool of that size, or that many
    Dask workers with scheduler='local'.  scheduler: 'local' (a LocalCluster) or 'tcp://HOST:PORT'.
    Run folders go to `base.project.root` when set, else to <out>/runs, except on a remote Dask
    cluster, whose workers use a temporary folder each (results come back as rows either way).
    """
    from ..progress import bar
    from .executors import make_executor

    spec = load_spec(source, overrides)
    out = Path(out).resolve()
    jobs = expand(spec)
    remote = bool(scheduler) and scheduler != "local"
    user_root = (spec.base.get("project") or {}).get("root")
    runs_root = user_root or (None if remote else str(out / "runs"))
    runtime = {"logging.project": (spec.base.get("logging") or {}).get("project") or f"benchmark-{out.name}"}
    if runs_root is not None:
        runtime["project.root"] = runs_root
    summary_config = _summary_config(spec, {**runtime, "project.root": runs_root or str(out / "runs")})
    trackers = _summary_trackers(summary_config)  # a missing tracker SDK fails here, before any job

    out.mkdir(parents=True, exist_ok=True)
    (out / "jobs").mkdir(exist_ok=True)
    (out / "benchmark.yaml").write_text(_dump(spec.raw))
    for job in jobs:
        # Trackers name a run '<model>-<run folder>': with this folder name, that is the job id.
        run_name = (spec.base.get("project") or {}).get("run_name") or job["id"].removeprefix(
            _slug(job["labels"]["model"]) + "-")
        job["config"] = apply_overrides(job["config"], {**runtime, "project.run_name": run_name})
        job["keep_run"] = runs_root is not None
        (out / "jobs" / f"{job['id']}.yaml").write_text(dump_yaml(config_from_dict(job["config"])))

    csv_path = out / RESULTS_NAME
    previous = {r["job_id"]: r for r in read_results(csv_path)}
    rows = dict(previous)
    extra = param_columns(jobs)
    done = [j["id"] for j in jobs if (previous.get(j["id"]) or {}).get("status") == "ok"]
    todo = [j for j in jobs if j["id"] not in set(done)]
    counts = {"ok": 0, "failed": 0}

    def on_result(job: dict[str, Any], row: dict[str, Any]) -> None:
        row["attempts"] = int((previous.get(job["id"]) or {}).get("attempts") or 0) + 1
        row.update({f"param.{k}": v for k, v in job["labels"]["params"].items()})
        rows[job["id"]] = row
        write_results(csv_path, _ordered(rows, jobs), extra)  # after every job: a crash loses nothing
        counts["ok" if row["status"] == "ok" else "failed"] += 1
        progress_bar.advance()
        progress_bar.show(ok=counts["ok"], failed=counts["failed"])

    title = f"Benchmark: {len(todo)} jobs" + (f" ({len(done)} done before)" if done else "")
    where = "nowhere: every job was done before"
    if todo:
        with make_executor(workers, scheduler, cluster_options) as executor, bar(title, total=len(todo)) as progress_bar:
            from .executors import dispatch

            where = executor.describe()
            dispatch(todo, executor, on_result)
    write_results(csv_path, _ordered(rows, jobs), extra)
    by_id = {r["job_id"]: r for r in read_results(csv_path)}
    result = BenchmarkResult(out, csv_path, [by_id[j["id"]] for j in jobs], [j["id"] for j in todo], done,
                             executor=where)
    result.plots = write_plots(result.rows, out / "plots", spec.plots["metrics"])
    if trackers and todo:  # a rerun that ran nothing has nothing new to log
        _log_summary(trackers, summary_config, spec, result)
    return result


def _ordered(rows: dict[str, dict[str, Any]], jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This grid's rows in grid order, then rows of jobs no longer in the grid (kept, not lost)."""
    ids = [j["id"] for j in jobs]
    return [rows[i] for i in ids if i in rows] + [r for k, r in rows.items() if k not in set(ids)]


def _dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


# --------------------------------------------------------------------------- trackers
def _summary_config(spec: BenchmarkSpec, runtime: dict[str, Any]) -> Any:
    """The base config as the summary run's config; its model name, 'benchmark', names the run."""
    config = config_from_dict(apply_overrides(deep_merge(BENCHMARK_DEFAULTS, spec.base), runtime))
    return replace(config, model={"name": "benchmark"})


def _summary_trackers(config: Any) -> list[Any]:
    from ..loggers import build_trackers

    return build_trackers(config)


def _log_summary(trackers: list[Any], config: Any, spec: BenchmarkSpec, result: BenchmarkResult) -> None:
    """One tracker run per tracker for the whole benchmark: the CSV, the plots and aggregate metrics.
    (Each job logged its own run from its engine.)  A failing tracker warns; the results stay."""
    from ..loggers.base import flatten

    folder = Path(config.project.root) / "benchmark" / time.strftime("%Y-%m-%d_%H-%M-%S")
    folder.mkdir(parents=True, exist_ok=True)
    ok = [r for r in result.rows if r["status"] == "ok"]
    metrics: dict[str, float] = {"jobs": len(result.rows), "jobs_ok": len(ok), "jobs_failed": len(result.failed)}
    for key in spec.plots["metrics"]:
        values = [r[key] for r in ok if isinstance(r.get(key), float) and math.isfinite(r[key])]
        if values:
            metrics[f"best/{key}"], metrics[f"mean/{key}"] = max(values), sum(values) / len(values)
    params = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flatten(spec.raw).items()}
    tags = {"model": "benchmark", "dataset": "+".join(dict.fromkeys(r["dataset"] for r in result.rows)),
            "category": "+".join(dict.fromkeys(r["category"] for r in result.rows)), "benchmark/out": str(result.out)}
    for tracker in trackers:
        try:
            tracker.log_summary(folder, params, tags, metrics, tables=[result.csv], images=result.plots)
        except Exception as exc:  # noqa: BLE001 - the benchmark's own record is complete without it
            warnings.warn(f"{type(tracker).__name__} could not log the benchmark summary: "
                          f"{type(exc).__name__}: {exc}", stacklevel=2)


# --------------------------------------------------------------------------- plots
def write_plots(rows: list[dict[str, Any]], folder: Path, metrics: list[str]) -> list[Path]:
    """heatmap_<metric>.png (model variant x dataset/category) and throughput_vs_auroc.png."""
    folder.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r["status"] == "ok"]
    written = [p for metric in metrics if (p := _heatmap(ok, metric, folder / f"heatmap_{metric}.png"))]
    scatter = _scatter(ok, folder / "throughput_vs_auroc.png")
    return written + ([scatter] if scatter else [])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _heatmap(rows: list[dict[str, Any]], metric: str, path: Path) -> Path | None:
    import numpy as np
    from matplotlib.figure import Figure

    cells: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if _finite(r.get(metric)):
            cells.setdefault((variant(r), f"{r['dataset']}/{r['category']}"), []).append(float(r[metric]))
    if not cells:
        return None
    names = list(dict.fromkeys(k[0] for k in cells))
    columns = list(dict.fromkeys(k[1] for k in cells))
    values = np.full((len(names), len(columns)), np.nan)
    for (name, column), v in cells.items():
        values[names.index(name), columns.index(column)] = float(np.mean(v))  # repeated cells (seeds): mean
    fig = Figure(figsize=(min(2.5 + 1.2 * len(columns), 24), min(1.5 + 0.45 * len(names), 24)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    lo, hi = np.nanmin(values), np.nanmax(values)
    for i, j in itertools.product(range(len(names)), range(len(columns))):
        if np.isfinite(values[i, j]):
            dark = hi > lo and (values[i, j] - lo) / (hi - lo) < 0.5
            ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(f"{metric} per model and category (test split)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _scatter(rows: list[dict[str, Any]], path: Path) -> Path | None:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    markers = {"torch": "o", "onnx": "s", "openvino": "^"}
    names = list(dict.fromkeys(variant(r) for r in rows))
    colours = {n: (f"C{i}" if len(names) <= 10 else f"C{i % 10}") for i, n in enumerate(names)}
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    drawn: set[str] = set()
    for r in rows:
        points = []
        for runtime, marker in markers.items():
            x, y = r.get(f"{runtime}_bN_throughput_ips"), r.get("image_AUROC")
            if _finite(x) and _finite(y) and x > 0:
                ax.scatter(x, y, marker=marker, color=colours[variant(r)], s=45, alpha=0.85, zorder=3)
                points.append((x, y))
                drawn.add(runtime)
        if len(points) > 1:  # one job's runtimes, joined: same accuracy, different speed
            ax.plot(*zip(*sorted(points), strict=True), color=colours[variant(r)], alpha=0.3, linewidth=1)
    if not drawn:
        return None
    ax.set_xscale("log")
    batch = next((r.get("speed_batch_size") for r in rows if r.get("speed_batch_size")), "N")
    ax.set_xlabel(f"throughput at batch {batch} (images/s, log scale)")
    ax.set_ylabel("image AUROC (test split)")
    ax.set_title("Accuracy vs speed: one point per job and runtime")
    ax.grid(True, alpha=0.3)
    handles: list[Any] = [Patch(color=colours[n], label=n) for n in names[:20]]
    handles += [Line2D([], [], color="grey", marker=markers[rt], linestyle="", label=rt) for rt in markers
                if rt in drawn]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------- terminal
SUMMARY_COLUMNS = [("image_AUROC", "image\nAUROC", ".3f"), ("pixel_AUROC", "pixel\nAUROC", ".3f"),
                   ("pixel_AUPRO", "pixel\nAUPRO", ".3f"), ("image_F1", "image\nF1", ".3f"),
                   ("fit_seconds", "fit\ns", ".1f"), ("torch_bN_throughput_ips", "torch\nimg/s", ".0f")]


def print_summary(result: BenchmarkResult) -> None:
    """A table of every job (key metrics, fit time, torch batch-N throughput), then the errors."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title=f"Benchmark: {len(result.rows)} jobs ({len(result.skipped)} from an earlier run)",
                  header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("model", overflow="fold", min_width=10)
    table.add_column("data", overflow="fold", min_width=8)
    table.add_column("", no_wrap=True)
    for _, label, _ in SUMMARY_COLUMNS:
        table.add_column(label, justify="right", no_wrap=True)
    for r in result.rows:
        ok = r["status"] == "ok"
        values = [format(r[k], spec) if _finite(r.get(k)) else "" for k, _, spec in SUMMARY_COLUMNS]
        table.add_row(escape(variant(r)), escape(f"{r['dataset']}/{r['category']}"),
                      "[green]ok[/green]" if ok else "[red]FAIL[/red]", *values)
    console.print(table)
    for r in result.failed:
        console.print(f"[red]failed[/red] {r['job_id']} (attempt {r.get('attempts')}): {escape(str(r.get('error')))}",
                      highlight=False)
    console.print(f"Ran {len(result.ran)} jobs on {escape(result.executor)}. Results: [bold]{result.csv}[/bold]")
    for p in result.plots:
        console.print(f"Plot: {p}")


__all__ = ["load_spec", "expand", "run_benchmark", "BenchmarkSpec", "BenchmarkResult", "read_results",
           "write_results", "write_plots", "print_summary", "variant"]
