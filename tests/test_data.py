"""Reading images and masks, dataset layouts, splits, and the error every bad input raises."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from anomalens.data import (
    DEFECT,
    GOOD,
    AnomalyDataset,
    Batch,
    DataWarning,
    ImageRecord,
    btech_records,
    build_splits,
    folder_records,
    mvtec_records,
    read_image,
    read_mask,
    visa_records,
)
from anomalens.errors import ConfigError, DataError


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def rgb(h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def square_mask(h: int = 8, w: int = 8) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[2:5, 3:6] = 255
    return m


def cfg(**kw) -> SimpleNamespace:
    base = dict(format="folder", root=None, category="", normal_dir="good", abnormal_dir=None, mask_dir=None,
                normal_test_dir=None, test_ratio=0.2, val_source="train", val_ratio=0.2)
    base.update(kw)
    return SimpleNamespace(**base)


# --------------------------------------------------------------------------- read_image conversions
def test_greyscale_becomes_three_equal_channels(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = read_image(save(tmp_path / "g.png", grey))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_rgba_drops_alpha_without_compositing(tmp_path):
    pixels = rgb()
    rgba = np.dstack([pixels, np.zeros((8, 8), np.uint8)])  # fully transparent: colour must survive
    np.testing.assert_array_equal(read_image(save(tmp_path / "a.png", rgba)), pixels)
    la = np.dstack([pixels[..., 0], np.full((8, 8), 7, np.uint8)])
    np.testing.assert_array_equal(read_image(save(tmp_path / "la.png", la, "LA"))[..., 2], pixels[..., 0])


def test_palette_image_maps_through_its_palette(tmp_path):
    colours = np.array([[10, 20, 30], [200, 0, 0], [0, 255, 0], [1, 2, 3]], np.uint8)
    index = np.random.default_rng(1).integers(0, 4, (8, 8), dtype=np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette(colours.ravel().tolist() + [0] * (768 - 12))
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), colours[index])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_scales_by_bit_depth_not_by_image_max(tmp_path, suffix):
    values = np.array([[0, 257, 32896, 65535], [4096, 4096, 4096, 4096]], np.uint16)
    out = read_image(save(tmp_path / f"d16{suffix}", values))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    # a dim 16-bit image stays dim: 4096 / 257 = 15.9 -> 16, not stretched to 255
    np.testing.assert_array_equal(out[1, :, 1], [16, 16, 16, 16])


def test_cmyk_and_bilevel_images(tmp_path):
    cmyk = np.zeros((4, 4, 4), np.uint8)
    cmyk[..., 0] = 255  # pure cyan
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif")[0, 0], [0, 255, 255])
    Image.fromarray(np.eye(4, dtype=bool)).save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[..., 0], np.eye(4) * 255)


def test_missing_and_corrupt_images_raise_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(DataError, match=f"^Image file not found: '{re.escape(str(missing))}'\\.$"):
        read_image(missing)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=f"^Cannot read image '{re.escape(str(junk))}': .+\\.$") as info:
        read_image(junk)
    assert "\n" not in str(info.value)
    truncated = save(tmp_path / "cut.png", rgb(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:400])
    with pytest.raises(DataError, match=f"^Cannot read image '{re.escape(str(truncated))}': "):
        read_image(truncated)


# --------------------------------------------------------------------------- read_mask
def test_masks_nonzero_is_defect_for_255_01_rgb_and_16_bit(tmp_path):
    expected = square_mask() > 0
    np.testing.assert_array_equal(read_mask(save(tmp_path / "m255.png", square_mask())), expected)
    np.testing.assert_array_equal(read_mask(save(tmp_path / "m01.png", (square_mask() > 0).astype(np.uint8))),
                                  expected)
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[expected] = [0, 0, 180]  # only the blue channel set
    np.testing.assert_array_equal(read_mask(save(tmp_path / "mrgb.png", colour)), expected)
    np.testing.assert_array_equal(read_mask(save(tmp_path / "m16.png", expected.astype(np.uint16))), expected)
    assert read_mask(tmp_path / "m255.png").dtype == bool
    with pytest.raises(DataError, match="^Mask file not found: '"):
        read_mask(tmp_path / "absent.png")


# --------------------------------------------------------------------------- AnomalyDataset
def test_mixed_sizes_all_come_out_at_image_size_with_correct_values(tmp_path):
    flat = save(tmp_path / "flat.png", np.full((30, 40, 3), [255, 128, 0], np.uint8))
    big = save(tmp_path / "big.png", rgb(100, 80, seed=3))
    ds = AnomalyDataset([ImageRecord(str(flat), GOOD, "good"), ImageRecord(str(big), GOOD, "good")], 32)
    for sample in ds:
        assert sample.image.shape == (3, 32, 32) and sample.image.dtype == torch.float32
        assert sample.mask is None and sample.label == GOOD
    torch.testing.assert_close(ds[0].image[:, 5, 7], torch.tensor([1.0, 128 / 255, 0.0]))
    # antialiased bilinear: agrees with Pillow's own antialiased bilinear resize
    reference = np.asarray(Image.open(big).resize((32, 32), Image.BILINEAR), np.float32) / 255
    assert np.abs(ds[1].image.permute(1, 2, 0).numpy() - reference).max() < 3 / 255
    assert AnomalyDataset(ds.records, (24, 40))[1].image.shape == (3, 24, 40)


def test_masks_are_resized_with_nearest_neighbour(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 21:50] = 255
    mask[40, 40] = 255
    image = save(tmp_path / "i.png", rgb(64, 64))
    m = save(tmp_path / "m.png", mask)
    sample = AnomalyDataset([ImageRecord(str(image), DEFECT, "x", str(m))], 32)[0]
    assert sample.mask.shape == (1, 32, 32)
    assert set(sample.mask.unique().tolist()) == {0.0, 1.0}
    # halving picks the pixel at 2i+1 (the centre-aligned nearest neighbour)
    np.testing.assert_array_equal(sample.mask[0].numpy(), (mask[1::2, 1::2] > 0).astype(np.float32))
    batch = Batch.collate([sample, sample])
    assert batch.has_mask.tolist() == [True, True] and batch.label.tolist() == [DEFECT, DEFECT]


def test_mask_of_a_different_size_is_named_with_both_sizes(tmp_path):
    image = save(tmp_path / "img.png", rgb(24, 32))
    mask = save(tmp_path / "img_mask.png", np.zeros((20, 30), np.uint8))
    expected = f"Mask '{mask}' is 30x20 but image '{image}' is 32x24."
    with pytest.raises(DataError, match=f"^{re.escape(expected)}$"):
        AnomalyDataset([ImageRecord(str(image), DEFECT, "x", str(mask))], 16)


def test_bad_images_fail_or_are_skipped_with_a_warning(tmp_path):
    good = [ImageRecord(str(save(tmp_path / f"{i}.png", rgb(seed=i))), GOOD, "good") for i in range(3)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    records = good[:1] + [ImageRecord(str(bad), GOOD, "good")] + good[1:]
    with pytest.raises(DataError, match=f"^Cannot read image '{re.escape(str(bad))}': "):
        AnomalyDataset(records, 16)
    with pytest.warns(DataWarning, match=f"^Cannot read image '{re.escape(str(bad))}': .*Skipping it\\.$"):
        ds = AnomalyDataset(records, 16, skip_bad_images=True)
    assert [r.path for r in ds.records] == [r.path for r in good]
    with pytest.warns(DataWarning):
        with pytest.raises(DataError, match="^No readable images left"):
            AnomalyDataset([ImageRecord(str(bad), GOOD, "good")], 16, skip_bad_images=True)
    with pytest.raises(DataError, match="^No images to load"):
        AnomalyDataset([], 16)


def test_image_size_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="^The 'image_size' parameter of AnomalyDataset must be"):
        AnomalyDataset([ImageRecord(str(save(tmp_path / "a.png", rgb())))], 0)


# --------------------------------------------------------------------------- MVTec layout
def make_mvtec(root: Path, category: str = "bottle", masks: bool = True) -> Path:
    cat = root / category
    for i in range(3):
        save(cat / "train" / "good" / f"{i:03d}.png", rgb(seed=i))
    save(cat / "train" / "good" / "003.JPG", rgb(seed=9))  # upper-case extension counts
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    (cat / "train" / "good" / "._000.png").write_bytes(b"macOS resource fork")  # hidden: skipped
    for i in range(2):
        save(cat / "test" / "good" / f"{i:03d}.png", rgb(seed=10 + i))
        save(cat / "test" / "scratch" / f"{i:03d}.png", rgb(seed=20 + i))
        if masks:
            save(cat / "ground_truth" / "scratch" / f"{i:03d}_mask.png", square_mask())
    return root


def test_mvtec_layout(tmp_path):
    split = mvtec_records(make_mvtec(tmp_path), "bottle")
    assert [Path(r.path).name for r in split.train] == ["000.png", "001.png", "002.png", "003.JPG"]
    assert all(r.label == GOOD and r.defect_type == "good" and r.mask_path is None for r in split.train)
    assert [(r.label, r.defect_type) for r in split.test] == [(GOOD, "good")] * 2 + [(DEFECT, "scratch")] * 2
    assert split.test[2].mask_path == str(tmp_path / "bottle" / "ground_truth" / "scratch" / "000_mask.png")


def test_missing_root_and_empty_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"^Dataset folder not found: '{re.escape(str(missing))}'\\.$"):
        mvtec_records(missing, "bottle")
    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True)
    empty = tmp_path / "bottle" / "train" / "good"
    with pytest.raises(DataError, match=f"^No images found in '{re.escape(str(empty))}'\\. Accepted extensions: "
                                        r"\.bmp, \.jpeg, \.jpg, \.png, \.tif, \.tiff\.$"):
        mvtec_records(tmp_path, "bottle")


def test_unknown_category_lists_the_available_ones(tmp_path):
    make_mvtec(tmp_path, "bottle")
    make_mvtec(tmp_path, "cable")
    (tmp_path / "not_a_category").mkdir()
    msg = f"Unknown category 'botle' in '{tmp_path}'. Available: bottle, cable. Did you mean 'bottle'?"
    with pytest.raises(DataError, match=f"^{re.escape(msg)}$"):
        mvtec_records(tmp_path, "botle")


def test_defect_image_without_mask_names_the_expected_mask(tmp_path):
    make_mvtec(tmp_path, masks=False)
    image = tmp_path / "bottle" / "test" / "scratch" / "000.png"
    expected = tmp_path / "bottle" / "ground_truth" / "scratch" / "000_mask.png"
    msg = f"Missing mask for defect image '{image}': expected '{expected}'."
    with pytest.raises(DataError, match=f"^{re.escape(msg)}$"):
        mvtec_records(tmp_path, "bottle")


def test_btech_layout(tmp_path):
    cat = tmp_path / "01"
    for i in range(2):
        save(cat / "train" / "ok" / f"{i:04d}.bmp", rgb(seed=i))
        save(cat / "test" / "ok" / f"{i:04d}.bmp", rgb(seed=5 + i))
        save(cat / "test" / "ko" / f"{i:04d}.bmp", rgb(seed=9 + i))
        save(cat / "ground_truth" / "ko" / f"{i:04d}.png", square_mask())
    split = btech_records(tmp_path, "01")
    assert len(split.train) == 2 and [r.label for r in split.test] == [GOOD, GOOD, DEFECT, DEFECT]
    assert split.test[3].mask_path == str(cat / "ground_truth" / "ko" / "0001.png")
    with pytest.raises(DataError, match="^Unknown category '04' in .*Available: 01\\."):
        btech_records(tmp_path, "04")


def test_visa_split_csv(tmp_path):
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        save(tmp_path / "candle" / "Data" / "Images" / "Normal" / f"{i}.JPG", rgb(seed=i))
        rows.append(f"candle,{'train' if i < 2 else 'test'},normal,candle/Data/Images/Normal/{i}.JPG,")
    save(tmp_path / "candle" / "Data" / "Images" / "Anomaly" / "9.JPG", rgb(seed=9))
    save(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "9.png", square_mask())
    rows.append("candle,test,anomaly,candle/Data/Images/Anomaly/9.JPG,candle/Data/Masks/Anomaly/9.png")
    rows.append("pcb1,train,normal,pcb1/x.JPG,")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    split = visa_records(tmp_path, "candle")
    assert len(split.train) == 2 and [r.label for r in split.test] == [GOOD, DEFECT]
    assert split.test[1].mask_path == str(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "9.png")
    with pytest.raises(DataError, match="Available: candle, pcb1\\."):
        visa_records(tmp_path, "capsule")


# --------------------------------------------------------------------------- folder layout
def make_folder(root: Path, n: int = 20) -> Path:
    for i in range(n):
        save(root / "good" / f"g{i:02d}.png", rgb(seed=i))
    for i in range(3):
        save(root / "bad" / f"b{i}.png", rgb(seed=100 + i))
    save(root / "masks" / "b0.png", square_mask())
    save(root / "masks" / "b1_mask.png", square_mask())
    save(root / "masks" / "b2.png", square_mask())
    return root


def test_folder_split_is_seeded(tmp_path):
    make_folder(tmp_path)
    a = folder_records(tmp_path, "good", test_ratio=0.25, seed=0)
    b = folder_records(tmp_path, "good", test_ratio=0.25, seed=0)
    c = folder_records(tmp_path, "good", test_ratio=0.25, seed=1)
    assert a == b and a.test != c.test
    assert len(a.test) == 5 and len(a.train) == 15
    assert {r.path for r in a.train} | {r.path for r in a.test} == {str(p) for p in (tmp_path / "good").iterdir()}
    assert not {r.path for r in a.train} & {r.path for r in a.test}


def test_folder_abnormal_masks_by_stem_and_absolute_dirs(tmp_path):
    make_folder(tmp_path)
    split = folder_records(tmp_path, "good", "bad", "masks", normal_test_dir=str(tmp_path / "good"))
    defects = [r for r in split.test if r.label == DEFECT]
    assert len(split.train) == 20 and len(split.test) == 23
    assert [Path(r.mask_path).name for r in defects] == ["b0.png", "b1_mask.png", "b2.png"]
    assert {r.defect_type for r in defects} == {"abnormal"}
    (tmp_path / "masks" / "b2.png").unlink()
    with pytest.raises(DataError, match=f"^Missing mask for defect image '{re.escape(str(tmp_path / 'bad' / 'b2.png'))}'"):
        folder_records(tmp_path, "good", "bad", "masks")
    with pytest.raises(ConfigError, match="^The 'test_ratio' parameter of the data config must be a float in"):
        folder_records(tmp_path, "good", test_ratio=1.0)


# --------------------------------------------------------------------------- build_splits
def test_validation_held_out_from_train(tmp_path):
    make_folder(tmp_path)
    config = cfg(root=str(tmp_path), val_ratio=0.25, test_ratio=0.2)
    layout = folder_records(tmp_path, "good", test_ratio=0.2, seed=3)
    splits = build_splits(config, seed=3)
    assert len(splits.val) == round(16 * 0.25) and len(splits.train) == 12
    assert sorted(r.path for r in splits.train + splits.val) == sorted(r.path for r in layout.train)
    assert not {r.path for r in splits.train} & {r.path for r in splits.val}
    assert splits.test == layout.test
    assert build_splits(config, seed=3) == splits and build_splits(config, seed=4).val != splits.val


def test_validation_from_test_is_stratified_and_removed_from_test(tmp_path):
    make_folder(tmp_path)
    config = cfg(root=str(tmp_path), abnormal_dir="bad", mask_dir="masks", normal_test_dir="good",
                 val_source="test", val_ratio=0.5)
    splits = build_splits(config, seed=0)
    layout = folder_records(tmp_path, "good", "bad", "masks", normal_test_dir="good")
    assert sum(r.label == GOOD for r in splits.val) == 10 and sum(r.label == DEFECT for r in splits.val) == 2
    assert sorted(r.path for r in splits.val + splits.test) == sorted(r.path for r in layout.test)
    assert not {r.path for r in splits.val} & {r.path for r in splits.test}
    assert splits.train == layout.train


def test_build_splits_reads_the_demo_set_and_rejects_bad_config(tiny_demo_root, tmp_path):
    splits = build_splits(cfg(format="demo", root=str(tiny_demo_root), category="brick", val_ratio=0.2), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 10)
    with pytest.raises(DataError, match="^Unknown category 'bottle' in .*Available: brick\\.$"):
        build_splits(cfg(format="demo", root=str(tiny_demo_root), category="bottle"), seed=0)
    with pytest.raises(ConfigError, match="^The 'format' parameter of the data config must be one of"):
        build_splits(cfg(format="coco"), seed=0)
    with pytest.raises(ConfigError, match="^The 'root' parameter of the data config must be a folder path"):
        build_splits(cfg(format="mvtec", root=None), seed=0)
