"""Local runs: a broken tracker never breaks a run; `anomalens runs list` and `runs compare` read
run folders back (terminal tables and an HTML page with the same images side by side)."""
import base64
import csv
import json
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest

from anomalens.cli import main
from anomalens.config import config_from_dict
from anomalens.engine import Engine
from anomalens.loggers import Tracker
from anomalens.loggers.runs import find_runs

RECORD = ("config.yaml", "metrics.json", "scores.csv", "model.pt")


class Broken(Tracker):
    """Raises on every call, like a tracker whose server is gone or whose disk is full."""

    def __init__(self, config):
        super().__init__(config)
        self.calls = []

    def __getattribute__(self, name):
        if name in ("start", "log_params", "log_tags", "log_metrics", "log_packages", "log_code", "log_graph",
                    "log_image", "log_table", "log_file", "finish"):
            object.__getattribute__(self, "calls").append(name)
            raise OSError(28, "No space left on device")
        return object.__getattribute__(self, name)


class FailsLate(Tracker):
    """Works until the images are sent at the end of the run."""

    def __init__(self, config):
        super().__init__(config)
        self.calls = []

    def __getattribute__(self, name):
        if name in ("start", "log_params", "log_tags", "log_metrics", "log_packages", "log_code", "log_graph",
                    "log_table", "log_file", "finish"):
            calls = object.__getattribute__(self, "calls")
            return lambda *args, **kwargs: calls.append((name, kwargs))
        if name == "log_image":
            raise ConnectionError("the server went away")
        return object.__getattribute__(self, name)


def tiny_config(root, tmp, run_name, **model):
    return config_from_dict({
        "model": {"name": "padim", "weights": "none", **model},
        "dataset": {"format": "mvtec", "root": str(root), "category": "brick", "image_size": 64, "batch_size": 8},
        "visualization": {"max_images": 3, "mode": "full" if run_name == "a" else "simple"},
        "trainer": {"progress": False},
        "project": {"root": str(tmp / "runs"), "run_name": run_name},
    })


@pytest.fixture(scope="module")
def runs(tiny_demo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local_runs")
    out = SimpleNamespace(root=tmp / "runs", warnings={})
    for name, tracker_class, model in (("a", Broken, {}), ("b", FailsLate, {"n_features": 50})):
        config = tiny_config(tiny_demo_root, tmp, name, **model)
        tracker = tracker_class(config)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_dir = Engine(config, callbacks=[tracker]).run()
        out.warnings[name] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        setattr(out, name, SimpleNamespace(dir=run_dir, tracker=tracker))
    return out


def test_a_tracker_that_raises_on_every_call_leaves_a_complete_run(runs):
    assert runs.warnings["a"] == ["Broken.on_run_start failed and is disabled for this run: "
                                  "OSError: [Errno 28] No space left on device"]
    assert runs.a.tracker.calls == ["start"]  # disabled at once: no retries, no half-open run
    for name in RECORD:
        assert (runs.a.dir / name).is_file(), name
    assert len(list((runs.a.dir / "images").rglob("*.png"))) == 3
    assert json.loads((runs.a.dir / "metrics.json").read_text())["metrics"]["image_AUROC"] >= 0


def test_a_tracker_failing_late_closes_its_run_as_failed_and_warns_once(runs):
    assert runs.warnings["b"] == ["FailsLate.on_run_end failed and is disabled for this run: "
                                  "ConnectionError: the server went away"]
    names = [name for name, _ in runs.b.tracker.calls]
    assert names[0] == "start" and names[-1] == "finish" and names.count("finish") == 1
    assert runs.b.tracker.calls[-1] == ("finish", {"failed": True})
    for name in RECORD:
        assert (runs.b.dir / name).is_file(), name


# --------------------------------------------------------------------------- runs list
def test_runs_list_shows_model_dataset_category_metrics_and_date(runs, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")
    assert main(["runs", "list", "--root", str(runs.root)]) == 0
    out = capsys.readouterr().out
    for run in (runs.a, runs.b):
        summary = json.loads((run.dir / "metrics.json").read_text())
        row = next(line for line in out.splitlines() if str(run.dir.relative_to(runs.root)) in line)
        cells = [c.strip() for c in row.strip().strip("│").split("│")]
        assert cells[1:4] == ["padim", "mvtec", "brick"]
        assert cells[4] == f"{summary['metrics']['image_AUROC']:.4f}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", cells[-1])


def test_runs_list_filters_by_project(runs, capsys):
    assert [r.path for r in find_runs(runs.root, "mvtec-brick")] == [runs.a.dir, runs.b.dir]
    assert main(["runs", "list", "--root", str(runs.root), "--project", "visa-*"]) == 0
    assert capsys.readouterr().out.strip() == f"No runs of project 'visa-*' under '{runs.root}'."


# --------------------------------------------------------------------------- runs compare
class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_runs_compare_prints_what_differs_side_by_side(runs, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["runs", "compare", "a", "b", "--root", str(runs.root), "--out", str(tmp_path / "c.html")]) == 0
    out = capsys.readouterr().out
    params_part, metrics_part = out.split("Metrics that differ")
    row = next(line for line in params_part.splitlines() if "visualization.mode" in line)
    assert row.index("full") < row.index("simple")
    assert re.search(r"model\.n_features\s+│\s+100\s+│\s+50", params_part)  # a used PaDiM's default
    assert "dataset.image_size" not in params_part and "project.run_name" not in params_part  # same / irrelevant
    assert "time/fit_seconds" in metrics_part
    assert f"Comparison page: {tmp_path / 'c.html'}" in out.replace("\n", "")


def test_compare_page_embeds_the_same_images_side_by_side(runs, tmp_path):
    assert main(["runs", "compare", str(runs.a.dir), str(runs.b.dir), "--out", str(tmp_path / "c.html")]) == 0
    page = Page()
    page.feed((tmp_path / "c.html").read_text())
    names = sorted(f"{p.parent.name}/{p.stem}" for p in (runs.a.dir / "images").glob("*/*.png"))
    assert [img["alt"] for img in page.images] == [n for n in names for _ in (0, 1)]  # a then b, per image
    for img, run in zip(page.images, [runs.a, runs.b] * len(names), strict=True):
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1]) == (run.dir / "images" / f"{img['alt']}.png").read_bytes()
    text = " ".join(page.text)
    summary = json.loads((runs.b.dir / "metrics.json").read_text())
    assert f"{summary['metrics']['image_AUROC']:.4f}" in text
    first = next(r for r in csv.DictReader(open(runs.b.dir / "scores.csv")) if Path(r["path"]).stem in names[0])
    assert f"score {first['score']}" in text


def test_compare_page_can_link_images_relatively(runs, tmp_path):
    out = tmp_path / "pages" / "c.html"
    assert main(["runs", "compare", str(runs.a.dir), str(runs.b.dir), "--out", str(out), "--link-images"]) == 0
    page = Page()
    page.feed(out.read_text())
    assert page.images and all((out.parent / img["src"]).resolve().is_file() for img in page.images)


def test_compare_errors_are_one_line(runs, capsys):
    assert main(["runs", "compare", "a", "--root", str(runs.root)]) == 2
    assert capsys.readouterr().err == ("error: runs compare needs two or more runs, e.g. "
                                       "`anomalens runs compare RUN_A RUN_B`.\n")
    assert main(["runs", "compare", "a", "zzz", "--root", str(runs.root)]) == 2
    assert capsys.readouterr().err == (f"error: No run 'zzz' found (as a path or under '{runs.root}'); "
                                       "see `anomalens runs list`.\n")
