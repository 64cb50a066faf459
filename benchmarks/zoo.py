"""Accuracy and speed of the model zoo, side by side with the peer (anomalib 2.7), per model and data set.

Each model trains from its `configs/<name>.yaml` (its documented CPU defaults) with the epochs
and layers given here, and the peer runs the same model with the same backbone, layers, image
size, epochs and training images through ../shared/peer/anomalib_run.py.  Jobs run one per
process (peak RSS is their own); timings are comparable only within one run.

    .venv/bin/python benchmarks/zoo.py --categories brick flange --mtd ../shared/data/mtd --peer \\
        --max-train 60 --image-size 128                      # the README's zoo table
    .venv/bin/python benchmarks/zoo.py --models stfpm dfm --categories brick    # ours only, two models
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import core  # noqa: E402 - the shared harness (subsets, job runner, peer paths)

CONFIGS = HERE.parent / "configs"
# Both libraries train for the epochs of configs/<name>.yaml, except where the peer's model is far
# heavier than our CPU default (its DRAEM is the paper's full width): then both get these epochs.
# tests/test_quality_zoo.py trains with the same settings, so its floors come from this table.
EPOCHS = {"draem": 5}
# Models the peer cannot run offline with our backbone, and what it runs instead (said in the table).
PEER_ARGS = {
    "fastflow": (["--no-pretrained"], "peer: random-init resnet18 (its backbone check refuses lite0)"),
    "reverse_distillation": (["--no-pretrained"], "peer: random-init resnet18 (its decoder exists for resnets only)"),
}
NO_PEER = {"efficient_ad": "peer needs its released teacher weights and ImageNette (downloads)",
           "autoencoder": "not in anomalib"}
TRAIN_BATCH = {"draem": 8}  # what fits in memory for the peer at 256 px; the same for ours


def model_settings(model: str) -> tuple[dict, dict]:
    """(model section, trainer section) of configs/<model>.yaml with this benchmark's epoch budget."""
    from anomalens.config import load_yaml

    data = load_yaml(CONFIGS / f"{model}.yaml")
    trainer = {k: v for k, v in data.get("trainer", {}).items()
               if k in ("max_epochs", "batch_size", "optimizer", "scheduler", "gradient_clip")}
    if model in EPOCHS:
        trainer["max_epochs"] = EPOCHS[model]
    return data["model"], trainer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs=3, metavar=("MODEL", "ROOT", "CATEGORY"))
    p.add_argument("--models", nargs="+", default=["cflow", "stfpm", "dfm", "dfkde", "fastflow",
                                                   "reverse_distillation", "draem", "ganomaly", "efficient_ad"])
    p.add_argument("--categories", nargs="*", default=["brick", "flange"], help="demo categories (none: only --mtd)")
    p.add_argument("--mtd", default=None, help="magnetic-tile root (MVTec layout, category magnetic_tile)")
    p.add_argument("--max-train", type=int, default=None, help="evenly spread subset of training images")
    p.add_argument("--peer", action="store_true", help="also run anomalib 2.7 through ../shared/peer")
    p.add_argument("--reuse-peer", metavar="JSONL", help="take the peer's rows from an earlier run's output")
    p.add_argument("--skip-peer", nargs="+", default=[], metavar="MODEL",
                   help="models not to run the peer for (its DRAEM takes ~25 min per data set on one core)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=[42],
                   help="one run per seed on both sides; the table shows the mean and the range (trained "
                        "models move with the seed)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=str(HERE / "results" / "zoo.jsonl"))
    a = p.parse_args()

    if a.one:
        model, root, category = a.one
        model_cfg, trainer_cfg = model_settings(model)
        print(json.dumps(core.run_config(model_cfg, trainer_cfg, root, category, a.image_size, a.seeds[0],
                                         batch_size=TRAIN_BATCH.get(model, 32))))
        return 0

    jobs = core.datasets(a.categories, a.mtd, a.max_train)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    peer_rows = core.load_peer_rows(a.reuse_peer)
    rows = []
    for root, category, kind in jobs:
        for model in a.models:
            model_cfg, trainer_cfg = model_settings(model)
            for seed in a.seeds:
                peer = None
                if a.peer and model not in NO_PEER and model not in a.skip_peer:
                    extra, _ = PEER_ARGS.get(model, ([], ""))
                    peer = [str(core.PEER_PYTHON), str(core.PEER), "--model", model, "--root", str(root), "--category",
                            category, "--image-size", str(a.image_size), "--seed", str(seed), *extra]
                    if "layers" in model_cfg and not extra:
                        peer += ["--layers", *model_cfg["layers"]]
                    if "max_epochs" in trainer_cfg:
                        peer += ["--max-epochs", str(trainer_cfg["max_epochs"])]
                    if model in TRAIN_BATCH:
                        peer += ["--train-batch-size", str(TRAIN_BATCH[model])]
                ours = [sys.executable, __file__, "--one", model, str(root), category, "--image-size",
                        str(a.image_size), "--seeds", str(seed)]
                tags = dict(model=model, category=category, dataset=kind, seed=seed)
                pair = core.run_pair(ours, peer, tags, peer_rows, a.timeout)
                rows += pair
                with open(a.out, "a") as fh:  # as we go: a long run that dies keeps what it measured
                    for r in pair:
                        fh.write(json.dumps(r) + "\n")
    core.print_table(rows)
    for model in a.models:
        note = NO_PEER.get(model) or PEER_ARGS.get(model, (None, ""))[1]
        if note:
            print(f"- {model}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
