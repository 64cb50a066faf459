"""Metrics against independent computations (sklearn, and a slow direct AUPRO)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.measure import label as sk_label
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

from anomalens.errors import ConfigError, DataError
from anomalens.metrics import (
    METRIC_KEYS,
    aupro,
    auroc,
    compute_metrics,
    escape_rate,
    f1_at,
    f1_max,
    false_reject_rate,
    pixel_auroc,
    pixel_f1_max,
)


def _data(seed: int, n: int = 300, levels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = rng.normal(size=n) + 1.2 * y
    if levels:  # quantise to force many ties, within and across classes
        s = np.round(s * levels / 4) / (levels / 4)
    return y, s.astype(np.float32)


def _sk_f1_max(y, s):
    p, r, t = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))[:-1]
    i = int(np.argmax(f1))
    return f1[i], t[i]


# --------------------------------------------------------------------------- image metrics
@pytest.mark.parametrize("seed,levels", [(0, None), (1, 8), (2, 3), (3, 40)])
def test_auroc_and_f1_match_sklearn(seed, levels):
    y, s = _data(seed, levels=levels)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    f1, t = f1_max(y, s)
    sk_f1, sk_t = _sk_f1_max(y, s)
    assert f1 == pytest.approx(sk_f1, abs=1e-12)
    assert t == sk_t
    for thr in (np.median(s), t, s.min(), s.max(), s.max() + 1):
        assert f1_at(y, s, thr) == pytest.approx(f1_score(y, s >= thr, zero_division=0), abs=1e-12)


def test_torch_inputs_are_accepted():
    y, s = _data(5)
    assert auroc(torch.from_numpy(y), torch.from_numpy(s)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert f1_max(torch.from_numpy(y).bool(), torch.from_numpy(s)) == f1_max(y, s)


def test_rates_count_decisions_at_threshold():
    y, s = _data(6, levels=8)
    t = float(np.quantile(s, 0.7))
    assert false_reject_rate(y, s, t) == np.mean(s[y == 0] >= t)
    assert escape_rate(y, s, t) == np.mean(s[y == 1] < t)
    assert 0 < false_reject_rate(y, s, t) < 1 and 0 < escape_rate(y, s, t) < 1


def test_constant_scores_and_single_class():
    y = np.array([0, 0, 1, 1, 1])
    s = np.full(5, 0.3)
    assert auroc(y, s) == roc_auc_score(y, s) == 0.5
    assert f1_max(y, s) == (pytest.approx(f1_score(y, np.ones(5))), 0.3)
    assert math.isnan(auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(auroc([1, 1], [0.1, 0.2]))
    assert all(math.isnan(v) for v in f1_max([0, 0], [0.1, 0.2]))
    assert math.isnan(f1_at([0, 0], [0.1, 0.2], 0.15))
    assert f1_max([1, 1], [0.1, 0.2]) == (1.0, 0.1)  # no good samples: still well defined
    assert math.isnan(false_reject_rate([1, 1], [0.1, 0.2], 0.15))
    assert math.isnan(escape_rate([0, 0], [0.1, 0.2], 0.15))
    assert math.isnan(auroc([0, 1], [0.1, float("nan")]))


def test_bad_inputs_raise_one_line_data_errors():
    with pytest.raises(DataError, match=r"^Labels must be 0 \(good\) or 1 \(defective\); got \[-1, 2\]"):
        auroc([0, 1, -1, 2], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(DataError, match="^labels and scores must have the same length; got 2 labels and 3 scores.$"):
        auroc([0, 1], [0.1, 0.2, 0.3])


# --------------------------------------------------------------------------- pixel metrics
def _maps(seed: int, n: int = 6, size: int = 24, levels: int | None = None):
    """Small maps with a few rectangular / diagonal regions and a noisy signal inside them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):  # image 0 is good
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, r:r + h, c:c + w] = True
    # Two single pixels touching only by a corner: one region under 8-connectivity.
    masks[1, size - 2, size - 2] = masks[1, size - 1, size - 1] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks * rng.random(masks.shape)
    if levels:
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(np.float32)


def _reference_aupro(masks, maps, fpr_limit, thresholds=None):
    """Direct computation: one threshold at a time, per-region overlap and FPR counted directly."""
    regions = []  # (image index, region mask)
    for i, m in enumerate(masks):
        lab = sk_label(m, connectivity=2)
        regions += [(i, lab == k) for k in range(1, lab.max() + 1)]
    if thresholds is None:
        thresholds = np.unique(maps)[::-1]
    fpr, pro = [0.0], [0.0]
    for t in thresholds:
        pred = maps >= t
        fpr.append(pred[~masks].mean())
        pro.append(np.mean([pred[i][r].mean() for i, r in regions]))
    fpr, pro = np.array(fpr), np.array(pro)
    past = np.flatnonzero(fpr > fpr_limit)
    if past.size == 0:  # the curve ends at FPR = 1 = fpr_limit
        return np.trapezoid(pro, fpr) / fpr_limit
    i = past[0]
    y_cut = pro[i - 1] + (pro[i] - pro[i - 1]) * (fpr_limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
    x = np.append(fpr[:i], fpr_limit)
    y = np.append(pro[:i], y_cut)
    return np.trapezoid(y, x) / fpr_limit


@pytest.mark.parametrize("seed,levels,limit", [(0, None, 0.3), (1, 4, 0.3), (2, 2, 0.05), (3, None, 1.0), (4, 3, 0.5)])
def test_aupro_matches_direct_computation(seed, levels, limit):
    masks, maps = _maps(seed, levels=levels)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(_reference_aupro(masks, maps, limit), abs=1e-9)


def test_aupro_close_to_a_fine_threshold_grid_and_accepts_torch_nchw():
    masks, maps = _maps(7, n=5, size=32)
    grid = np.linspace(maps.max(), maps.min(), 3000)
    ref = _reference_aupro(masks, maps, 0.3, thresholds=grid)
    got = aupro(torch.from_numpy(masks[:, None].astype(np.float32)), torch.from_numpy(maps[:, None]))
    assert got == pytest.approx(ref, abs=2e-3)
    assert 0.3 < got < 1.0


def test_aupro_counts_every_region_equally():
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[0, :8, :8] = True  # a large region, entirely found
    masks[1, 0, 0] = True  # a one-pixel region, missed
    maps = masks.astype(np.float32) * 2
    maps[0][~masks[0]] = np.linspace(0, 1, 192)
    maps[1][~masks[1]] = np.linspace(0, 1, 255)
    maps[1, 0, 0] = -1.0
    # PRO is 0.5 until every good pixel is above threshold: half the regions at every FPR < 1.
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.5)
    assert aupro(masks, masks.astype(np.float32)) == 1.0


def test_aupro_edge_cases():
    assert math.isnan(aupro(np.zeros((2, 8, 8)), np.random.rand(2, 8, 8)))  # no regions
    assert math.isnan(aupro(np.ones((1, 8, 8)), np.random.rand(1, 8, 8)))  # no good pixels
    masks, maps = _maps(8)
    assert aupro(masks, np.zeros_like(maps)) == pytest.approx(0.15)  # all tied: the diagonal, 0.3**2/2/0.3
    with pytest.raises(ConfigError, match=r"^The 'fpr_limit' parameter of aupro must be a float in \(0, 1\]. Got 0 instead.$"):
        aupro(masks, maps, fpr_limit=0)
    with pytest.raises(DataError, match="^masks and maps must have the same shape"):
        aupro(masks[:2], maps)


@pytest.mark.parametrize("levels", [None, 3])
def test_pixel_auroc_and_f1_match_sklearn(levels):
    masks, maps = _maps(9, levels=levels)
    y, s = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    f1, t = pixel_f1_max(torch.from_numpy(masks[:, None]), torch.from_numpy(maps[:, None]))
    sk_f1, sk_t = _sk_f1_max(y, s)
    assert (f1, t) == (pytest.approx(sk_f1, abs=1e-12), sk_t)


# --------------------------------------------------------------------------- compute_metrics
def _test_set(seed: int = 10):
    masks, maps = _maps(seed, n=8, size=16)
    labels = np.array([0, 1, 1, 1, 1, 1, 1, 1])
    labels[[3, 6]] = 0  # good images
    masks[[3, 6]] = False
    masks[6, 2:4, 2:4] = True  # a stray mask on a good image: must be ignored
    has_mask = np.ones(8, dtype=bool)
    has_mask[3] = False  # a good image without a mask file: counts, all-zero
    has_mask[4] = False  # a defective image without a mask: left out of pixel metrics
    masks[4] = False
    masks[5] = False  # a defective image with an empty mask: left out of pixel metrics
    scores = maps.reshape(8, -1).max(axis=1) + 0.1 * labels
    return labels, scores, maps, masks, has_mask


def test_compute_metrics_keys_and_pixel_subset():
    labels, scores, maps, masks, has_mask = _test_set()
    out = compute_metrics(torch.from_numpy(labels), torch.from_numpy(scores), torch.from_numpy(maps[:, None]),
                          torch.from_numpy(masks[:, None]), torch.from_numpy(has_mask), 1.5, 1.0)
    assert tuple(out) == METRIC_KEYS and all(isinstance(v, float) for v in out.values())
    keep = [0, 1, 2, 3, 6, 7]
    gt = masks[keep].copy()
    gt[4] = False  # image 6 is good
    y, s = gt.ravel(), maps[keep].ravel()
    assert out["pixel_AUROC"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert out["pixel_F1max"] == pytest.approx(_sk_f1_max(y, s)[0], abs=1e-12)
    assert out["pixel_F1"] == pytest.approx(f1_score(y, s >= 1.0), abs=1e-12)
    assert out["pixel_AUPRO"] == pytest.approx(_reference_aupro(gt, maps[keep], 0.3), abs=1e-9)
    assert out["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["image_F1max"] == pytest.approx(_sk_f1_max(labels, scores)[0], abs=1e-12)
    assert out["image_F1"] == pytest.approx(f1_score(labels, scores >= 1.5), abs=1e-12)
    assert out["false_reject_rate"] == np.mean(scores[labels == 0] >= 1.5)
    assert out["escape_rate"] == np.mean(scores[labels == 1] < 1.5)
    assert (out["image_threshold"], out["pixel_threshold"]) == (1.5, 1.0)


def test_compute_metrics_skips_unknown_labels_and_never_raises_on_one_class():
    labels, scores, maps, masks, has_mask = _test_set()
    ref = compute_metrics(labels, scores, maps, masks, has_mask, 1.5, 1.0)
    with_unknown = compute_metrics(np.append(labels, -1), np.append(scores, 99.0), np.concatenate([maps, maps[:1]]),
                                   np.concatenate([masks, masks[1:2]]), np.append(has_mask, True), 1.5, 1.0)
    assert with_unknown == ref
    good = labels == 0
    only_good = compute_metrics(labels[good], scores[good], maps[good], masks[good], has_mask[good], 1.5, 1.0)
    for key in ("image_AUROC", "image_F1max", "image_F1", "pixel_AUROC", "pixel_F1max", "pixel_AUPRO", "pixel_F1",
                "escape_rate"):
        assert math.isnan(only_good[key]), key
    assert only_good["false_reject_rate"] == np.mean(scores[good] >= 1.5)
    no_maps = compute_metrics(labels, scores, None, None, None, 1.5, 1.0)
    assert math.isnan(no_maps["pixel_AUROC"]) and no_maps["image_AUROC"] == ref["image_AUROC"]
