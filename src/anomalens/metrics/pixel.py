"""Pixel-level metrics: pixel AUROC / F1 and the per-region overlap (AUPRO).

Masks and maps are (N, H, W), (N, 1, H, W) or (H, W), numpy or torch; a mask pixel is defective
when > 0.5.  All metrics are exact (no threshold grid) and sort-based, so 300 maps of 256 x 256
take about a second and 20 M pixels stay well under 2 GB.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import DataError, param_error
from .classification import NAN, as_numpy, auroc_sorted, f1_at_sorted, f1_max_sorted


def _images(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth as bool (N, H, W), maps (N, H, W) float), shapes checked."""
    gt, a = as_numpy(masks), as_numpy(maps)
    if gt.shape != a.shape:
        raise DataError(f"masks and maps must have the same shape; got {gt.shape} and {a.shape}.")
    if a.ndim == 2:
        gt, a = gt[None], a[None]
    elif a.ndim == 4 and a.shape[1] == 1:
        gt, a = gt[:, 0], a[:, 0]
    elif a.ndim != 3:
        raise DataError(f"masks and maps must be (N, H, W), (N, 1, H, W) or (H, W); got shape {a.shape}.")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    return (gt if gt.dtype == bool else gt > 0.5), a


def _split_pixels(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray] | None:
    gt, a = _images(masks, maps)
    if np.isnan(a).any():
        return None
    return np.sort(a[gt]), np.sort(a[~gt])


def pixel_auroc(masks: Any, maps: Any) -> float:
    """AUROC over all pixels of the given images; nan when one class is absent."""
    split = _split_pixels(masks, maps)
    return NAN if split is None else auroc_sorted(*split)


def pixel_f1_max(masks: Any, maps: Any) -> tuple[float, float]:
    """(best pixel F1 over all thresholds, its threshold); nan without defect pixels."""
    split = _split_pixels(masks, maps)
    return (NAN, NAN) if split is None else f1_max_sorted(*split)


def pixel_f1_at(masks: Any, maps: Any, threshold: float) -> float:
    """Pixel F1 of the decisions ``map >= threshold``; nan without defect pixels."""
    split = _split_pixels(masks, maps)
    return NAN if split is None else f1_at_sorted(*split, float(threshold))


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to `fpr_limit` (exact, no threshold grid).

    Each connected defect region (8-connectivity, per image) counts equally, whatever its size:
    PRO(t) is the mean over regions of the fraction of the region with ``map >= t``; FPR(t) is the
    fraction of good pixels (outside every mask) with ``map >= t``.  The (FPR, PRO) curve through
    every distinct map value is integrated with the trapezoid rule up to FPR = fpr_limit (the last
    segment interpolated there) and divided by fpr_limit, so 1.0 is perfect.  nan without regions
    or without good pixels.
    """
    if not isinstance(fpr_limit, (int, float)) or isinstance(fpr_limit, bool) or not 0 < fpr_limit <= 1:
        raise param_error("aupro", "fpr_limit", "a float in (0, 1]", fpr_limit)
    gt, a = _images(masks, maps)
    if np.isnan(a).any():
        return NAN
    # One call labels every image: the structure links neighbours within a slice, never across.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    regions, n_regions = ndimage.label(gt, structure=structure)
    n_good = gt.size - int(np.count_nonzero(gt))
    if n_regions == 0 or n_good == 0:
        return NAN
    # A pixel of region r adds 1 / (n_regions * |r|) to the mean overlap once the threshold passes it.
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)
    weight = np.zeros(n_regions + 1)
    weight[1:] = 1.0 / (n_regions * sizes[1:])

    # Scores below the one where FPR first reaches the limit never matter: sort only the rest.
    good_needed = int(np.ceil(fpr_limit * n_good))  # good pixels above threshold when FPR >= limit
    good_scores = a[~gt]
    cut = np.partition(good_scores, n_good - good_needed)[n_good - good_needed]
    del good_scores
    keep = a >= cut
    scores, ids = a[keep], regions[keep]
    order = np.argsort(scores)[::-1]  # descending; equal scores stay adjacent
    scores, ids = scores[order], ids[order]

    # Curve vertices at the last pixel of each group of equal scores (threshold = that score).
    last = np.append(scores[1:] != scores[:-1], True)
    good_count = np.concatenate(([0], np.cumsum(ids == 0)[last]))
    pro = np.concatenate(([0.0], np.cumsum(weight[ids])[last]))

    # Cut the curve at FPR = limit (in counts, to stay exact); the last vertex is beyond it by construction.
    limit = fpr_limit * n_good
    j = int(np.searchsorted(good_count, limit, side="left"))
    x0, x1 = good_count[j - 1], good_count[j]
    pro_at_limit = pro[j - 1] + (pro[j] - pro[j - 1]) * (limit - x0) / (x1 - x0)
    x = np.append(good_count[:j], limit) / n_good
    y = np.append(pro[:j], pro_at_limit)
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)
    return area / fpr_limit


def pixel_evaluation_set(labels: Any, masks: Any, maps: Any, has_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The images pixel metrics use: (ground truth bool (n, H, W), maps (n, H, W)).

    Good images count with an all-zero mask (whatever their mask or has_mask says); defective
    images count only when they have a non-empty mask; images with an unknown label (-1) never.
    """
    y = as_numpy(labels).reshape(-1)
    gt, a = _images(masks, maps)
    if len(y) != len(a):
        raise DataError(f"labels and maps must cover the same images; got {len(y)} labels and {len(a)} maps.")
    present = np.ones(len(y), dtype=bool) if has_mask is None else as_numpy(has_mask).reshape(-1).astype(bool)
    nonempty = gt.reshape(len(gt), -1).any(axis=1)
    good = y == 0
    use = good | ((y == 1) & present & nonempty)
    gt = gt[use]  # boolean indexing copies, so clearing the good masks leaves the caller's array alone
    gt[good[use]] = False
    return gt, a[use]
