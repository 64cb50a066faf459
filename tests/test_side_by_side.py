"""The side-by-side harness (benchmarks/core.py, zoo.py): peer rows reused per seed, seeds averaged."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import core  # noqa: E402 - benchmarks/core.py, not a package


def row(library, seed, image, pixel=None, **extra):
    return {"library": library, "dataset": "demo", "category": "flange", "model": "rd", "seed": seed,
            "image_AUROC": image, "pixel_AUROC": pixel, "fit_seconds": 10.0, "test_images_per_second": 20.0,
            "peak_rss_mb": 1000.0, **extra}


def test_peer_rows_are_reused_per_seed_and_errors_are_not(tmp_path):
    path = tmp_path / "old.jsonl"
    old = [row("anomalib", 42, 0.8), row("anomalib", 1, 0.7), row("anomalens", 42, 0.9),
           row("anomalib", 2, None, error="boom")]
    path.write_text("\n".join(json.dumps(r) for r in old))
    legacy = {k: v for k, v in row("anomalib", 0, 0.6).items() if k != "seed"}  # rows from before seeds were kept
    path.write_text(path.read_text() + "\n" + json.dumps({**legacy, "category": "brick"}))
    rows = core.load_peer_rows(str(path))
    assert set(rows) == {("demo", "flange", "rd", 42), ("demo", "flange", "rd", 1), ("demo", "brick", "rd", 42)}
    assert rows[("demo", "flange", "rd", 1)]["image_AUROC"] == 0.7


def test_table_shows_the_mean_and_range_over_seeds(capsys):
    rows = [row("anomalens", 42, 0.84, 0.93), row("anomalens", 1, 0.90, 0.95), row("anomalens", 3, 0.86, 0.94),
            row("anomalib", 42, 0.87, 0.945), row("anomalens", 4, None, error="timed out")]
    core.print_table(rows)
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("| demo/flange"))
    assert "0.867 (0.840-0.900, 3 seeds) / 0.870" in line
    assert "0.940 (0.930-0.950, 3 seeds) / 0.945" in line
    assert "(1.00x)" in line  # the throughput ratio of the means
    assert "error (anomalens): timed out" in out  # a failed seed is said, not averaged in
