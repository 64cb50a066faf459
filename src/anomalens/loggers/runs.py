"""Local runs: find them under a runs root, list them, compare them (terminal and HTML).

Works from the run folders alone (config.yaml, metrics.json, scores.csv, images/), whatever
trackers were used: the local record is the source of truth.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

from ..errors import AnomalensError
from .base import flatten, with_model_defaults

# Shown by `runs list`, in this order.
KEY_METRICS = [("image_AUROC", "img AUROC"), ("pixel_AUROC", "pix AUROC"), ("pixel_AUPRO", "AUPRO"),
               ("image_F1", "F1"), ("false_reject_rate", "false rej."), ("escape_rate", "escape")]
# Lower is better for these; thresholds and other values have no "better".
LOWER_IS_BETTER = {"false_reject_rate", "escape_rate"}
NO_BETTER = {"image_threshold", "pixel_threshold"}


@dataclass
class RunRecord:
    """One finished run folder, read back."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    scores: dict[str, dict[str, str]] = field(default_factory=dict)  # '<defect>/<stem>' -> scores.csv row

    @property
    def model(self) -> str:
        return self.summary.get("model") or self.config.get("model", {}).get("name", "?")

    @property
    def dataset(self) -> str:
        return self.summary.get("dataset", "?")

    @property
    def category(self) -> str:
        return self.summary.get("category") or self.config.get("dataset", {}).get("category", "?")

    @property
    def project(self) -> str:
        """The tracker project name: logging.project, else '<dataset>-<category>'."""
        return (self.config.get("logging") or {}).get("project") or f"{self.dataset}-{self.category}"

    @property
    def metrics(self) -> dict[str, float]:
        return self.summary.get("metrics", {})

    @property
    def timings(self) -> dict[str, float]:
        return self.summary.get("timings", {})

    @property
    def finished(self) -> float:
        return (self.path / "metrics.json").stat().st_mtime

    @property
    def label(self) -> str:
        return f"{self.model}/{self.path.name}"

    def params(self) -> dict[str, Any]:
        """The flattened config, model defaults filled in (a run that left n_features alone used 100)."""
        return flatten(with_model_defaults(self.config))

    def images(self) -> dict[str, Path]:
        """'<defect_type>/<stem>' -> saved prediction image."""
        return {f"{p.parent.name}/{p.stem}": p for p in sorted((self.path / "images").glob("*/*.png"))}


def is_run(path: Path) -> bool:
    return (path / "metrics.json").is_file() and (path / "config.yaml").is_file()


def load_run(path: str | Path) -> RunRecord:
    path = Path(path)
    if not is_run(path):
        raise AnomalensError(f"'{path}' is not a finished run folder (no metrics.json and config.yaml in it); "
                             "pass a folder printed by `anomalens train` or listed by `anomalens runs list`.")
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    summary = json.loads((path / "metrics.json").read_text())
    scores: dict[str, dict[str, str]] = {}
    if (path / "scores.csv").is_file():
        with open(path / "scores.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                scores[f"{row['defect_type'] or 'unknown'}/{Path(row['path']).stem}"] = row
    return RunRecord(path, config, summary, scores)


def find_runs(root: str | Path, project: str | None = None) -> list[RunRecord]:
    """Every finished run under `root`, oldest first; `project` filters by project name (glob allowed)."""
    root = Path(root)
    runs = [load_run(p.parent) for p in root.rglob("metrics.json") if is_run(p.parent)]
    if project:
        runs = [r for r in runs if fnmatch(r.project, project)]
    return sorted(runs, key=lambda r: r.finished)


def resolve_run(name: str, root: str | Path) -> RunRecord:
    """A run given as a folder path, a path relative to the runs root, or a unique folder name."""
    for candidate in (Path(name), Path(root) / name):
        if is_run(candidate):
            return load_run(candidate)
    matches = [r for r in find_runs(root) if r.path.name == name or r.label == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise AnomalensError(f"Run name {name!r} is ambiguous under '{root}': "
                             f"{', '.join(str(r.path) for r in matches)}. Pass the folder path instead.")
    raise AnomalensError(f"No run {name!r} found (as a path or under '{root}'); see `anomalens runs list`.")


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1000 else f"{value:.5g}"
    return "-" if value is None else str(value)


def date(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


# --------------------------------------------------------------------------- comparison
def differing(runs: list[RunRecord]) -> tuple[list[tuple[str, list[Any]]], list[tuple[str, list[Any]]]]:
    """(parameters, metrics) whose values are not the same in every run, as (name, values per run)."""
    def rows(dicts: list[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
        keys = list(dict.fromkeys(k for d in dicts for k in d))
        out = []
        for key in keys:
            values = [d.get(key) for d in dicts]
            if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
                out.append((key, values))
        return out

    # Where a run lives is not a parameter worth comparing.
    params = [{k: v for k, v in r.params().items() if k not in ("project.run_name",)} for r in runs]
    return rows(params), rows([{**r.metrics, **{f"time/{k}": v for k, v in r.timings.items()}} for r in runs])


def best_index(name: str, values: list[Any]) -> int | None:
    """Which run is best on a metric (None when the metric has no direction or values are missing)."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if name in NO_BETTER or name.startswith("time/") or len(numbers) < 2 or len(set(numbers)) == 1:
        return None
    pick = min(numbers) if name in LOWER_IS_BETTER else max(numbers)
    return values.index(pick)


# --------------------------------------------------------------------------- HTML page
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px 32px;
  color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-bottom:16px}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.06)}
th,td{border:1px solid #e3e3e3;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#f2f2f4;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:700;color:#0a7a2f;background:#eefaf1}
td.key,.imgname{font-family:ui-monospace,Menlo,monospace;font-size:13px}
.muted{color:#888}
.grid{display:grid;gap:12px;align-items:start;margin-bottom:18px}
.cell{background:#fff;border:1px solid #e3e3e3;padding:6px}
.cell img{display:block;margin:0 auto;max-width:100%;max-height:380px;width:auto;height:auto}
.cap{font-size:12px;color:#444;margin-top:4px}
.defect{color:#c0392b;font-weight:600} .good{color:#0a7a2f;font-weight:600}
.wrong{color:#fff;background:#c0392b;padding:0 4px;border-radius:3px}
.imgname{margin:14px 0 6px;font-weight:600}
.head{font-weight:600;font-size:13px;padding:4px 6px;background:#f2f2f4;border:1px solid #e3e3e3}
.sticky{position:sticky;top:0;z-index:1;background:#fafafa;padding:4px 0}
"""


def _e(value: Any) -> str:
    return html.escape(fmt(value))


def _image_src(path: Path, out_dir: Path, embed: bool) -> str:
    if embed:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    import os

    return html.escape(Path(os.path.relpath(path, out_dir)).as_posix())


def compare_html(runs: list[RunRecord], out: str | Path, embed_images: bool = True) -> Path:
    """Write a self-contained page (images embedded, or linked relatively) comparing `runs`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params, metrics = differing(runs)
    n = len(runs)
    head = "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>anomalens: {n} runs compared</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Comparison of {n} runs</h1><div class='sub'>written {date(time.time())}</div>",
             "<h2>Runs</h2><table><tr><th></th>" + head + "</tr>"]
    facts = [("model", [r.model for r in runs]), ("dataset", [f"{r.dataset}/{r.category}" for r in runs]),
             ("finished", [date(r.finished) for r in runs]), ("test images", [r.summary.get("n_test") for r in runs]),
             ("folder", [str(r.path) for r in runs])]
    parts += [f"<tr><th>{k}</th>" + "".join(f"<td>{_e(v)}</td>" for v in vals) + "</tr>" for k, vals in facts]
    parts.append("</table>")

    all_metrics = list(dict.fromkeys(k for r in runs for k in r.metrics))
    parts.append("<h2>Metrics</h2><table><tr><th>metric</th>" + head + "</tr>")
    for key in all_metrics + [f"time/{k}" for k in dict.fromkeys(k for r in runs for k in r.timings)]:
        values = [r.timings.get(key[5:]) if key.startswith("time/") else r.metrics.get(key) for r in runs]
        best = best_index(key, values)
        cells = "".join(f"<td class='num{' best' if i == best else ''}'>{_e(v)}</td>" for i, v in enumerate(values))
        parts.append(f"<tr><td class='key'>{html.escape(key)}</td>{cells}</tr>")
    parts.append("</table>")

    parts.append("<h2>Parameters that differ</h2>")
    if params:
        parts.append("<table><tr><th>parameter</th>" + head + "</tr>")
        parts += [f"<tr><td class='key'>{html.escape(k)}</td>" + "".join(f"<td>{_e(v)}</td>" for v in vals) + "</tr>"
                  for k, vals in params]
        parts.append("</table>")
    else:
        parts.append("<p class='muted'>All parameters are the same.</p>")

    images = [r.images() for r in runs]
    names = sorted(set().union(*images), key=lambda k: (-sum(k in im for im in images), k))
    parts.append(f"<h2>Test images ({len(names)})</h2>")
    if not names:
        parts.append("<p class='muted'>None of these runs saved prediction images "
                     "(visualization.save_images).</p>")
    grid = f"<div class='grid' style='grid-template-columns:repeat({n},minmax(0,1fr))'>"
    parts.append(grid.replace("'grid'", "'grid sticky'")
                 + "".join(f"<div class='head'>{html.escape(r.label)}</div>" for r in runs) + "</div>")
    for name in names:
        parts.append(f"<div class='imgname'>{html.escape(name)}</div>{grid}")
        for run, imgs in zip(runs, images, strict=True):
            if name not in imgs:
                parts.append("<div class='cell muted'>not saved in this run</div>")
                continue
            row = run.scores.get(name, {})
            caption = ""
            if row:
                decision = {"1": "<span class='defect'>defect</span>", "0": "<span class='good'>good</span>"}
                pred, truth = row.get("pred_label", ""), row.get("label", "")
                wrong = " <span class='wrong'>wrong</span>" if pred in ("0", "1") and pred != truth else ""
                caption = (f"<div class='cap'>score {html.escape(row.get('score', ''))} · normalised "
                           f"{html.escape(row.get('norm_score', ''))} · {decision.get(pred, '')}"
                           f" · truth {'defect' if truth == '1' else 'good'}{wrong}</div>")
            src = _image_src(imgs[name], out.parent, embed_images)
            parts.append(f"<div class='cell'><img loading='lazy' alt='{html.escape(name)}' src='{src}'>{caption}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
