"""Dataset layouts on disk -> lists of ImageRecord, and the train / val / test split of a run.

Each reader only lists files and pairs images with masks; nothing is decoded here. Every
layout problem raises one DataError line that names the path and says what was expected.
"""
from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, param_error
from .io import IMAGE_EXTENSIONS, is_image_file
from .sample import DEFECT, GOOD, ImageRecord

FORMATS = ("demo", "mvtec", "btech", "folder", "visa")
_ACCEPTED = ", ".join(IMAGE_EXTENSIONS)


@dataclass
class Split:
    """The records a dataset layout defines: training images (good only) and test images."""

    train: list[ImageRecord] = field(default_factory=list)
    test: list[ImageRecord] = field(default_factory=list)


@dataclass
class Splits:
    """What a run uses: fit on `train`, fit thresholds/normalisation on `val`, report on `test`."""

    train: list[ImageRecord] = field(default_factory=list)
    val: list[ImageRecord] = field(default_factory=list)
    test: list[ImageRecord] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers
def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise DataError(f"Dataset folder not found: '{path}'.")
    return path


def list_images(folder: str | Path, required: bool = True) -> list[Path]:
    """Sorted image files directly inside `folder` (extensions case-insensitive, hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        if required:
            raise DataError(f"Dataset folder not found: '{folder}'.")
        return []
    images = sorted(p for p in folder.iterdir() if is_image_file(p))
    if required and not images:
        raise DataError(f"No images found in '{folder}'. Accepted extensions: {_ACCEPTED}.")
    return images


def _category_dir(root: str | Path, category: str) -> Path:
    """root/category, or a DataError that lists the sub-folders that look like categories."""
    root = _require_dir(Path(root))
    cat_dir = root / category
    if cat_dir.is_dir():
        return cat_dir
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())
    listed = ", ".join(available) if available else "none (no sub-folder holds a 'train' folder)"
    hint = difflib.get_close_matches(category, available, n=1)
    suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
    raise DataError(f"Unknown category '{category}' in '{root}'. Available: {listed}.{suggestion}")


def _find_mask(image: Path, mask_dir: Path, patterns: tuple[str, ...]) -> Path | None:
    """The first existing mask named by `patterns` ('{stem}_mask', '{stem}') with any image extension."""
    for pattern in patterns:
        name = pattern.format(stem=image.stem)
        for ext in (".png", *(e for e in IMAGE_EXTENSIONS if e != ".png")):
            candidate = mask_dir / f"{name}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _defect_record(image: Path, defect_type: str, mask_dir: Path, patterns: tuple[str, ...]) -> ImageRecord:
    mask = _find_mask(image, mask_dir, patterns)
    if mask is None:
        expected = mask_dir / (patterns[0].format(stem=image.stem) + ".png")
        raise DataError(f"Missing mask for defect image '{image}': expected '{expected}'.")
    return ImageRecord(str(image), DEFECT, defect_type, str(mask))


def _good(images: list[Path]) -> list[ImageRecord]:
    return [ImageRecord(str(p), GOOD, "good") for p in images]


# --------------------------------------------------------------------------- layouts
def mvtec_records(root: str | Path, category: str) -> Split:
    """MVTec AD layout (also MPDD, MTD, the demo set): train/good, test/<type>, ground_truth/<type>/<stem>_mask.png."""
    cat_dir = _category_dir(root, category)
    train = _good(list_images(cat_dir / "train" / "good"))
    test_dir = _require_dir(cat_dir / "test")
    test: list[ImageRecord] = []
    for sub in sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = list_images(sub, required=False)
        if sub.name == "good":
            test += _good(images)
        else:
            mask_dir = cat_dir / "ground_truth" / sub.name
            test += [_defect_record(p, sub.name, mask_dir, ("{stem}_mask", "{stem}")) for p in images]
    if not test:
        raise DataError(f"No images found in '{test_dir}' or its sub-folders. Accepted extensions: {_ACCEPTED}.")
    return Split(train, test)


def btech_records(root: str | Path, category: str) -> Split:
    """BTech layout: train/ok, test/ok, test/ko, masks ground_truth/ko/<stem>.png."""
    cat_dir = _category_dir(root, category)
    train = _good(list_images(cat_dir / "train" / "ok"))
    good = _good(list_images(cat_dir / "test" / "ok", required=False))
    mask_dir = cat_dir / "ground_truth" / "ko"
    bad = [_defect_record(p, "ko", mask_dir, ("{stem}", "{stem}_mask"))
           for p in list_images(cat_dir / "test" / "ko", required=False)]
    if not good and not bad:
        raise DataError(f"No images found in '{cat_dir / 'test' / 'ok'}' or '{cat_dir / 'test' / 'ko'}'. "
                        f"Accepted extensions: {_ACCEPTED}.")
    return Split(train, good + bad)


def visa_records(root: str | Path, category: str, split_csv: str | Path | None = None) -> Split:
    """VisA: rows of split_csv/1cls.csv (object, split, label, image, mask), paths relative to root."""
    root = _require_dir(Path(root))
    csv_path = Path(split_csv) if split_csv is not None else root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataError(f"VisA split file not found: '{csv_path}'.")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"object", "split", "label", "image", "mask"}
    if not rows or not needed <= set(rows[0]):
        raise DataError(f"VisA split file '{csv_path}' must have the columns {', '.join(sorted(needed))}.")
    objects = sorted({r["object"] for r in rows})
    if category not in objects:
        hint = difflib.get_close_matches(category, objects, n=1)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        raise DataError(f"Unknown category '{category}' in '{csv_path}'. Available: {', '.join(objects)}.{suggestion}")
    split = Split()
    for row in rows:
        if row["object"] != category:
            continue
        image = root / row["image"]
        if row["label"].strip().lower() == "normal":
            record = ImageRecord(str(image), GOOD, "good")
        else:
            if not row["mask"].strip():
                raise DataError(f"Missing mask for defect image '{image}': the 'mask' column in '{csv_path}' is empty.")
            record = ImageRecord(str(image), DEFECT, "anomaly", str(root / row["mask"]))
        (split.train if row["split"].strip().lower() == "train" else split.test).append(record)
    if not split.train:
        raise DataError(f"No training images for '{category}' in '{csv_path}'.")
    return split


def _resolve(root: Path | None, folder: str | Path) -> Path:
    folder = Path(folder).expanduser()
    return folder if folder.is_absolute() or root is None else root / folder


def _check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise param_error("the data config", name, "a float in [0, 1)", value)


def folder_records(
    root: str | Path | None,
    normal_dir: str | Path,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    normal_test_dir: str | Path | None = None,
    test_ratio: float = 0.2,
    seed: int = 0,
) -> Split:
    """A plain folder of good images, optionally a folder of defects and one of masks (matched by stem).

    Folders are relative to `root` unless absolute. Without `normal_test_dir`, a seeded `test_ratio`
    share of the good images is kept for testing.
    """
    base = _require_dir(Path(root).expanduser()) if root is not None else None
    _check_ratio("test_ratio", test_ratio)
    normal = list_images(_resolve(base, normal_dir))
    if normal_test_dir is not None:
        train, test = _good(normal), _good(list_images(_resolve(base, normal_test_dir)))
    else:
        n_test = min(round(len(normal) * test_ratio), len(normal) - 1)  # always keep one to train on
        held = set(np.random.default_rng(seed).permutation(len(normal))[:n_test].tolist())
        train = _good([p for i, p in enumerate(normal) if i not in held])
        test = _good([p for i, p in enumerate(normal) if i in held])
    if abnormal_dir is not None:
        abnormal = list_images(_resolve(base, abnormal_dir))
        if mask_dir is None:
            test += [ImageRecord(str(p), DEFECT, "abnormal") for p in abnormal]
        else:
            masks = _require_dir(_resolve(base, mask_dir))
            test += [_defect_record(p, "abnormal", masks, ("{stem}", "{stem}_mask")) for p in abnormal]
    return Split(train, test)


# --------------------------------------------------------------------------- splits of a run
def _pick(n: int, ratio: float, rng: np.random.Generator) -> set[int]:
    return set(rng.permutation(n)[: round(n * ratio)].tolist())


def _hold_out(records: list[ImageRecord], ratio: float, rng: np.random.Generator, stratify: bool
              ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split `records` into (kept, held) keeping the original order; per label when `stratify`."""
    groups = sorted({r.label for r in records}) if stratify else [None]
    held: set[int] = set()
    for label in groups:
        idx = [i for i, r in enumerate(records) if label is None or r.label == label]
        held |= {idx[j] for j in _pick(len(idx), ratio, rng)}
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def layout_records(cfg: Any, seed: int = 0) -> Split:
    """The train/test records that `cfg.format` defines (builds the demo set on first use)."""
    fmt = cfg.format
    if fmt not in FORMATS:
        raise param_error("the data config", "format", "one of " + ", ".join(repr(f) for f in FORMATS), fmt)
    if fmt == "demo":
        from .demo import DEMO_VERSION, default_demo_root, ensure_demo, read_marker

        root = Path(cfg.root).expanduser() if cfg.root else default_demo_root()
        marker = read_marker(root)
        if marker is None or marker.get("version") != DEMO_VERSION:  # a current demo set of any size is used as is
            ensure_demo(root)
        return mvtec_records(root, cfg.category)
    if not cfg.root:
        raise ConfigError(f"The 'root' parameter of the data config must be a folder path for format "
                          f"'{fmt}'. Got {cfg.root!r} instead.")
    if fmt == "mvtec":
        return mvtec_records(cfg.root, cfg.category)
    if fmt == "btech":
        return btech_records(cfg.root, cfg.category)
    if fmt == "visa":
        return visa_records(cfg.root, cfg.category, getattr(cfg, "split_csv", None))
    return folder_records(cfg.root, cfg.normal_dir, cfg.abnormal_dir, cfg.mask_dir, cfg.normal_test_dir,
                          cfg.test_ratio, seed)


def build_splits(cfg: Any, seed: int) -> Splits:
    """Train / val / test records for a run.

    val_source "train": a seeded `val_ratio` share of the good training images is held out, so
    thresholds are fitted on images the model never saw. "test": a seeded, label-stratified share of
    the test images moves to validation and leaves the test set, so test metrics stay honest.
    """
    _check_ratio("val_ratio", cfg.val_ratio)
    if cfg.val_source not in ("train", "test"):
        raise param_error("the data config", "val_source", "one of 'train', 'test'", cfg.val_source)
    split = layout_records(cfg, seed)
    rng = np.random.default_rng([seed, 1])  # its own stream: changing test_ratio must not move val
    if cfg.val_source == "train":
        train, val = _hold_out(split.train, cfg.val_ratio, rng, stratify=False)
        if not train:
            raise DataError(f"val_ratio={cfg.val_ratio} leaves no training image out of {len(split.train)}.")
        return Splits(train, val, split.test)
    test, val = _hold_out(split.test, cfg.val_ratio, rng, stratify=True)
    return Splits(split.train, val, test)
