"""Heat maps, overlays, contours and the two layouts of anomalens.visualization."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage
from skimage.segmentation import find_boundaries

from anomalens.errors import ConfigError, DataError
from anomalens.visualization import (
    _DEFECT,
    _OK,
    GT_COLOR,
    MIN_PANEL,
    PRED_COLOR,
    draw_contour,
    heatmap,
    overlay,
    render,
    save_image,
    show_image,
)

SIZE = 64


def _texture(size: int = SIZE, seed: int = 0) -> np.ndarray:
    """A grey, gently textured picture: never pure red or green, so contour colours are unambiguous."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.normal(size=(size, size)), 2)
    grey = 110 + 40 * base / np.abs(base).max()
    return np.repeat(grey[..., None], 3, axis=-1).astype(np.uint8)


def _disk(size: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _painted(out: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.all(out == np.array(color, dtype=np.uint8), axis=-1)


def _assert_on_boundary(painted: np.ndarray, mask: np.ndarray, thickness: int) -> None:
    """Every painted pixel is within `thickness` of the mask's edge, none deep inside, and the edge is closed."""
    assert painted.any()
    edge = find_boundaries(mask, mode="thick")
    distance_to_edge = ndimage.distance_transform_edt(~edge)
    assert distance_to_edge[painted].max() <= thickness
    interior = ndimage.binary_erosion(mask, np.ones((3, 3)), iterations=thickness)
    assert not (painted & interior).any()
    assert painted[find_boundaries(mask, mode="inner")].all()


# --------------------------------------------------------------------------- heatmap / overlay
def test_heatmap_shape_dtype_and_matplotlib_colours():
    values = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    heat = heatmap(values)
    assert heat.shape == (SIZE, SIZE, 3) and heat.dtype == np.uint8
    expected = colormaps["turbo"](np.rint(values * 255).astype(int))[..., :3] * 255
    np.testing.assert_allclose(heat, expected, atol=0.5)


def test_heatmap_above_threshold_is_warmer_than_below():
    def warmth(v: float) -> int:
        r, _, b = heatmap(np.full((2, 2), v))[0, 0].astype(int)
        return r - b

    for low, high in [(0.45, 0.55), (0.3, 0.7), (0.1, 0.9), (0.49, 0.51)]:
        assert warmth(high) > warmth(low), (low, high)
    assert warmth(0.7) > 0 > warmth(0.3)  # clearly red past the threshold, clearly blue before it


def test_heatmap_is_a_fixed_scale_clipped_to_0_1():
    values = np.array([[-3.0, 0.0], [1.0, 7.0]])
    heat = heatmap(values)
    assert (heat[0, 0] == heat[0, 1]).all() and (heat[1, 0] == heat[1, 1]).all()
    np.testing.assert_array_equal(heatmap(np.full((3, 3), 0.3))[1, 1], heatmap(np.array([[0.3]]))[0, 0])


def test_overlay_is_the_alpha_blend_of_image_and_heatmap():
    img, values = _texture(), np.random.default_rng(1).random((SIZE, SIZE))
    expected = np.rint(img * 0.6 + heatmap(values).astype(np.float64) * 0.4)
    np.testing.assert_array_equal(overlay(img, values, alpha=0.4), expected)
    np.testing.assert_array_equal(overlay(img, values, alpha=0.0), img)
    np.testing.assert_array_equal(overlay(img, values, alpha=1.0), heatmap(values))


def test_overlay_resizes_a_map_of_another_size():
    small = np.zeros((16, 16))
    small[:, 8:] = 1.0
    out = overlay(_texture(), small, alpha=1.0)
    np.testing.assert_array_equal(out[:, :28], heatmap(np.zeros((SIZE, 28))))
    np.testing.assert_array_equal(out[:, 36:], heatmap(np.ones((SIZE, 28))))


def test_overlay_rejects_bad_alpha_in_the_common_message_shape():
    with pytest.raises(ConfigError) as err:
        overlay(_texture(), np.zeros((SIZE, SIZE)), alpha=1.5)
    assert str(err.value) == "The 'alpha' parameter of overlay must be a float in [0, 1]. Got 1.5 instead."


# --------------------------------------------------------------------------- contours
@pytest.mark.parametrize("thickness", [1, 2, 3])
def test_contour_is_on_the_mask_boundary_and_only_there(thickness):
    img = _texture()
    mask = _disk(SIZE, 30, 26, 12)
    mask[50:, 40:] = True  # a rectangle that runs into the bottom border
    out = draw_contour(img, mask, PRED_COLOR, thickness=thickness)
    painted = _painted(out, PRED_COLOR)
    _assert_on_boundary(painted, mask, thickness)
    np.testing.assert_array_equal(out[~painted], img[~painted])  # nothing else touched
    assert not painted[-1, 45:].any()  # the image border is not an edge of a mask touching it


def test_one_pixel_contour_is_exactly_the_inner_boundary():
    mask = _disk(SIZE, 32, 32, 15)
    painted = _painted(draw_contour(_texture(), mask, GT_COLOR, thickness=1), GT_COLOR)
    np.testing.assert_array_equal(painted, find_boundaries(mask, mode="inner", connectivity=2))


def test_empty_and_full_masks_draw_nothing():
    img = _texture()
    np.testing.assert_array_equal(draw_contour(img, np.zeros((SIZE, SIZE), bool), PRED_COLOR), img)
    np.testing.assert_array_equal(draw_contour(img, np.ones((SIZE, SIZE), bool), PRED_COLOR), img)


def test_bad_thickness_and_shapes_raise_clear_errors():
    with pytest.raises(ConfigError, match=r"^The 'thickness' parameter of draw_contour must be an int in \[1, inf\)"):
        draw_contour(_texture(), np.zeros((SIZE, SIZE), bool), PRED_COLOR, thickness=0)
    with pytest.raises(DataError, match=r"Expected an image of shape .* Got shape \(2, 5, 6, 7\) instead"):
        render(np.zeros((2, 5, 6, 7)), np.zeros((6, 7)))
    with pytest.raises(DataError, match=r"Expected norm_map of shape .* Got shape \(2, 8, 8\) instead"):
        overlay(_texture(), np.zeros((2, 8, 8)))


# --------------------------------------------------------------------------- layouts
def _example(size: int = SIZE):
    img = _texture(size)
    pred = _disk(size, size * 0.4, size * 0.35, size * 0.18)
    gt = _disk(size, size * 0.7, size * 0.7, size * 0.15)
    values = np.where(pred, 0.9, 0.2)
    return img, values, pred, gt


def test_full_mode_shape_panels_and_colours():
    img, values, pred, gt = _example()
    out = render(img, values, pred_mask=pred, gt_mask=gt, score=0.873, title="bottle/000.png")
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[1] >= 4 * MIN_PANEL and out.shape[0] > MIN_PANEL  # four enlarged panels plus text
    assert _painted(out, PRED_COLOR).sum() > 100 and _painted(out, GT_COLOR).sum() > 100
    assert _painted(out, _DEFECT).any() and not _painted(out, _OK).any()

    no_gt = render(img, values, pred_mask=pred, score=0.873)
    assert no_gt.shape == out.shape and not _painted(no_gt, GT_COLOR).any()


def test_decision_follows_label_then_score():
    img, values, pred, gt = _example()
    ok = render(img, values, score=0.2)
    assert _painted(ok, _OK).any() and not _painted(ok, _DEFECT).any()
    overruled = render(img, values, score=0.9, label=torch.tensor(0))
    assert _painted(overruled, _OK).any() and not _painted(overruled, _DEFECT).any()


def test_simple_mode_draws_both_contours_exactly_on_their_masks():
    img, values, pred, gt = _example(MIN_PANEL)  # at MIN_PANEL nothing is enlarged: pixels compare 1:1
    out = render(img, values, pred_mask=pred, gt_mask=gt, mode="simple")
    assert out.shape == (MIN_PANEL, MIN_PANEL, 3) and out.dtype == np.uint8  # no text, no caption strip
    _assert_on_boundary(_painted(out, PRED_COLOR), pred, thickness=2)
    _assert_on_boundary(_painted(out, GT_COLOR), gt, thickness=2)
    untouched = ~(_painted(out, PRED_COLOR) | _painted(out, GT_COLOR))
    np.testing.assert_array_equal(out[untouched], overlay(img, values)[untouched])


def test_simple_mode_caption_and_enlargement():
    img, values, pred, gt = _example()
    out = render(img, values, gt_mask=gt, score=0.9, mode="simple")  # pred defaults to values >= 0.5
    height, width = out.shape[:2]
    assert width == MIN_PANEL and height > MIN_PANEL
    picture = out[height - MIN_PANEL :]
    big_pred = np.kron(pred, np.ones((4, 4), bool))
    painted = _painted(picture, PRED_COLOR)
    # The mask is enlarged smoothly, so allow one source pixel (4 px) of slack around the edge.
    assert ndimage.distance_transform_edt(~find_boundaries(big_pred, mode="thick"))[painted].max() <= 2 + 4
    assert _painted(out[: height - MIN_PANEL], _DEFECT).any()


@pytest.mark.parametrize("mode", ["full", "simple"])
def test_tensors_and_arrays_render_identically(mode):
    img, values, pred, gt = _example()
    as_arrays = render(img, values, pred_mask=pred, gt_mask=gt, score=0.7, label=1, mode=mode, title="a.png")
    as_tensors = render(
        torch.from_numpy(img).permute(2, 0, 1).float() / 255,
        torch.from_numpy(values).float()[None],
        pred_mask=torch.from_numpy(pred).float()[None],
        gt_mask=torch.from_numpy(gt)[None],
        score=torch.tensor([0.7]),
        label=torch.tensor(1),
        mode=mode,
        title="a.png",
    )
    np.testing.assert_array_equal(as_arrays, as_tensors)


def test_unknown_mode_is_a_config_error():
    img, values, _, _ = _example()
    with pytest.raises(ConfigError) as err:
        render(img, values, mode="fancy")
    assert str(err.value) == "The 'mode' parameter of render must be one of 'full', 'simple'. Got 'fancy' instead."


def test_long_titles_are_shortened_not_clipped():
    img, values, _, _ = _example()
    short = render(img, values, score=0.9, title="a.png")
    long = render(img, values, score=0.9, title="x" * 500)
    assert long.shape == short.shape  # the layout does not grow with the title
    assert _painted(long, _DEFECT).any()  # and the decision is still drawn


# --------------------------------------------------------------------------- output
def test_save_image_writes_a_readable_png(tmp_path):
    img, values, pred, gt = _example()
    out = render(img, values, pred_mask=pred, gt_mask=gt, score=0.6)
    path = save_image(out, tmp_path / "nested" / "deeper" / "a.png")
    assert path.exists()
    with Image.open(path) as read:
        assert read.format == "PNG"
        np.testing.assert_array_equal(np.asarray(read.convert("RGB")), out)
    save_image(torch.from_numpy(img).permute(2, 0, 1) / 255.0, tmp_path / "t.png")
    with Image.open(tmp_path / "t.png") as read:
        np.testing.assert_array_equal(np.asarray(read), img)


def test_show_image_is_a_no_op_without_a_display():
    import matplotlib
    import matplotlib.pyplot as plt

    previous = matplotlib.get_backend()
    plt.switch_backend("Agg")
    try:
        assert show_image(_texture(), "title") is False
        assert plt.get_fignums() == []
    finally:
        plt.switch_backend(previous)
