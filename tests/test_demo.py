"""The built-in demo dataset: deterministic, MVTec layout, exact masks, safe caching."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import anomalens.data.demo as demo
from anomalens.data import DEFECT, GOOD, mvtec_records, read_image, read_mask
from anomalens.data.demo import (
    DEFECT_TYPES,
    DEMO_CATEGORIES,
    MASK_TOLERANCE,
    default_demo_root,
    ensure_demo,
    make_demo_dataset,
    perlin,
    read_marker,
    render_defect,
)
from anomalens.errors import DataError

TINY = dict(image_size=32, categories=["brick"], n_train=1, n_test_good=0, n_test_defect=1)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_give_byte_identical_files(tmp_path):
    args = dict(categories=["gravel", "flange"], image_size=48, n_train=2, n_test_good=1, n_test_defect=6)
    a = digest(make_demo_dataset(tmp_path / "a", seed=0, **args))
    b = digest(make_demo_dataset(tmp_path / "b", seed=0, **args))
    c = digest(make_demo_dataset(tmp_path / "c", seed=1, **args))
    assert a == b
    assert a.keys() == c.keys() and a != c
    # 6 flange defects over its 5 types: the first type gets the extra one
    assert sum(k.startswith("flange/test/chip/") for k in a) == 2
    assert sum(k.startswith("flange/test/stain/") for k in a) == 1


def test_tiny_demo_layout_counts_and_masks(tiny_demo_root):
    cat = tiny_demo_root / "brick"
    assert len(list((cat / "train" / "good").glob("*.png"))) == 10
    assert len(list((cat / "test" / "good").glob("*.png"))) == 4
    assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(("good", *DEFECT_TYPES["brick"]))
    split = mvtec_records(tiny_demo_root, "brick")
    defects = [r for r in split.test if r.label == DEFECT]
    assert len(split.train) == 10 and len(split.test) == 10 and len(defects) == 6
    assert all(r.label == GOOD for r in split.train)
    for record in defects:
        image, mask = read_image(record.path), read_mask(record.mask_path)
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert mask.any(), f"empty mask {record.mask_path}"
        assert mask.mean() < 0.3
        assert set(np.unique(np.asarray(read_image(record.mask_path)))) <= {0, 255}
    assert read_marker(tiny_demo_root)["image_size"] == 64


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_masks_hold_exactly_the_changed_pixels(category):
    for defect_type in DEFECT_TYPES[category]:
        for i in range(2):
            good, bad, mask = render_defect(category, defect_type, 64, np.random.default_rng([7, i]))
            assert good.shape == bad.shape == (64, 64, 3) and mask.shape == (64, 64) and mask.dtype == bool
            diff = np.abs(bad.astype(int) - good).max(axis=2)
            np.testing.assert_array_equal(bad[~mask], good[~mask])  # nothing changed outside the mask
            assert (diff > MASK_TOLERANCE).sum() >= 4, f"{category}/{defect_type} is invisible"
            assert 0 < mask.mean() < 0.3


def test_defects_change_pixels_the_way_their_name_says():
    rng = np.random.default_rng(0)
    for _ in range(3):
        good, bad, mask = render_defect("flange", "missing_hole", 96, rng)
        assert bad[mask].mean() > good[mask].mean() + 40  # a dark opening became bright metal
        good, bad, mask = render_defect("gravel", "hole", 96, rng)
        assert bad[mask].mean() < good[mask].mean() - 20  # a pit is darker than the surface it replaced
        good, bad, mask = render_defect("grass", "color", 96, rng)
        luma = np.array([0.299, 0.587, 0.114])
        assert abs(float((bad[mask] @ luma).mean() - (good[mask] @ luma).mean())) < 6  # hue moves, not brightness


def test_perlin_matches_a_per_pixel_reference():
    shape, cell = (12, 17), 4.5
    fast = perlin(shape, cell, np.random.default_rng(3))
    rng = np.random.default_rng(3)  # same draws, same order: lattice angles, then the y and x offsets
    angles = rng.uniform(0, 2 * np.pi, (int(shape[0] / cell) + 3, int(shape[1] / cell) + 3))
    oy, ox = rng.uniform(0, 1), rng.uniform(0, 1)

    def fade(t: float) -> float:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    for i in range(shape[0]):
        for j in range(shape[1]):
            y, x = i / cell + oy, j / cell + ox
            y0, x0 = int(y), int(x)
            fy, fx = y - y0, x - x0
            dots = {(dy, dx): np.sin(angles[y0 + dy, x0 + dx]) * (fy - dy) + np.cos(angles[y0 + dy, x0 + dx]) * (fx - dx)
                    for dy in (0, 1) for dx in (0, 1)}
            top = dots[0, 0] + fade(fx) * (dots[0, 1] - dots[0, 0])
            bottom = dots[1, 0] + fade(fx) * (dots[1, 1] - dots[1, 0])
            assert fast[i, j] == pytest.approx((top + fade(fy) * (bottom - top)) * np.sqrt(2), abs=1e-12)
    assert np.abs(fast).max() <= 1.0


def test_ensure_demo_builds_once_then_is_a_no_op(tmp_path, monkeypatch):
    root = ensure_demo(tmp_path / "demo", **TINY)
    assert read_marker(root)["n_train"] == 1 and (root / "brick" / "train" / "good" / "000.png").is_file()
    monkeypatch.setattr(demo, "make_demo_dataset", lambda *a, **k: pytest.fail("rebuilt an existing demo set"))
    assert ensure_demo(tmp_path / "demo", **TINY) == root


def test_ensure_demo_rebuilds_when_parameters_change(tmp_path):
    ensure_demo(tmp_path / "demo", **TINY)
    ensure_demo(tmp_path / "demo", **{**TINY, "n_train": 2})
    assert len(list((tmp_path / "demo" / "brick" / "train" / "good").iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary or stale folder left


def test_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(out_dir, *args, **kwargs):
        (Path(out_dir) / "brick").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "make_demo_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo(tmp_path / "demo", **TINY)
    assert list(tmp_path.iterdir()) == []


def test_ensure_demo_refuses_a_folder_that_is_not_a_demo_set(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("user data")
    with pytest.raises(DataError, match=f"^Folder '{tmp_path / 'mine'}' is not empty and holds no demo dataset"):
        ensure_demo(tmp_path / "mine", **TINY)


def test_default_root_follows_the_cache_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "cache"))
    assert default_demo_root() == tmp_path / "cache" / "demo"
    monkeypatch.delenv("ANOMALENS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_demo_root() == tmp_path / ".cache" / "anomalens" / "demo"


def test_bad_demo_arguments(tmp_path):
    with pytest.raises(DataError, match="^Unknown demo category 'bottle'. Available: brick, grass, gravel, flange\\.$"):
        make_demo_dataset(tmp_path, categories=["bottle"])
    with pytest.raises(DataError, match="at least 32 px"):
        make_demo_dataset(tmp_path, image_size=16)


def test_marker_records_the_build_parameters(tmp_path):
    make_demo_dataset(tmp_path, **TINY)
    marker = json.loads((tmp_path / ".anomalens-demo.json").read_text())
    assert marker == {"version": demo.DEMO_VERSION, "categories": ["brick"], "image_size": 32, "n_train": 1,
                      "n_test_good": 0, "n_test_defect": 1, "seed": 0}
