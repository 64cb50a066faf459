"""Image-level (binary) metrics: AUROC, F1, false-reject and escape rates.

Convention everywhere: a sample is predicted defective when ``score >= threshold``.  Labels are
0 (good) / 1 (defective).  Inputs may be numpy arrays, lists or torch tensors.  A metric that
cannot be computed (a class it needs is absent, or a score is NaN) is ``nan``, never an error.

Everything is built on the two sorted score lists of the classes: AUROC is the Mann-Whitney
statistic (ties count one half, which is exactly the trapezoidal ROC area sklearn reports) and
the counts at a threshold are binary searches.  No (n, n_thresholds) arrays, so 20 M pixels fit
in a few hundred MB.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DataError

NAN = float("nan")


def as_numpy(x: Any) -> np.ndarray:
    """A numpy view of `x` (torch tensors are detached and moved to the CPU, not copied when possible)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def binary_labels(labels: Any) -> np.ndarray:
    """Labels as a flat bool array; anything but 0/1 (or bool) is a DataError."""
    y = as_numpy(labels).reshape(-1)
    if y.dtype != bool:
        if y.size and not np.isin(y, (0, 1)).all():
            bad = np.unique(y[~np.isin(y, (0, 1))])[:5].tolist()
            raise DataError(f"Labels must be 0 (good) or 1 (defective); got {bad}. Drop unknown (-1) labels first.")
        y = y.astype(bool)
    return y


def split_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Sorted (ascending) scores of the defective and of the good samples; None if a score is NaN."""
    y = binary_labels(labels)
    s = as_numpy(scores).reshape(-1)
    if s.shape != y.shape:
        raise DataError(f"labels and scores must have the same length; got {y.size} labels and {s.size} scores.")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        return None
    return np.sort(s[y]), np.sort(s[~y])


def auroc_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC from sorted class scores: P(defect scores above good) + 1/2 P(tie)."""
    if pos.size == 0 or neg.size == 0:
        return NAN
    below = np.searchsorted(neg, pos, side="left")  # good scores strictly below each defect score
    ties = np.searchsorted(neg, pos, side="right") - below
    wins = below.sum(dtype=np.int64) + 0.5 * ties.sum(dtype=np.int64)
    return float(wins / (float(pos.size) * float(neg.size)))


def f1_max_sorted(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the (lowest) threshold achieving it, from sorted class scores.

    Only defect scores need trying: moving any threshold up to the next defect score keeps every
    true positive and drops false positives, so F1 cannot get worse.
    """
    if pos.size == 0:
        return NAN, NAN
    thresholds = np.unique(pos)  # ascending; argmax picks the lowest on ties, as sklearn does
    tp = pos.size - np.searchsorted(pos, thresholds, side="left")
    fp = neg.size - np.searchsorted(neg, thresholds, side="left")
    f1 = 2.0 * tp / (tp + fp + pos.size)  # 2PR/(P+R) with P = tp/(tp+fp), R = tp/npos
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def counts_at(pos: np.ndarray, neg: np.ndarray, threshold: float) -> tuple[int, int]:
    """(true positives, false positives) at ``score >= threshold``."""
    tp = pos.size - int(np.searchsorted(pos, threshold, side="left"))
    fp = neg.size - int(np.searchsorted(neg, threshold, side="left"))
    return tp, fp


def f1_at_sorted(pos: np.ndarray, neg: np.ndarray, threshold: float) -> float:
    if pos.size == 0 or np.isnan(threshold):
        return NAN
    tp, fp = counts_at(pos, neg, threshold)
    return 2.0 * tp / (tp + fp + pos.size)


# --------------------------------------------------------------------------- public API
def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve (ties handled like sklearn's roc_auc_score); nan with one class."""
    split = split_scores(labels, scores)
    return NAN if split is None else auroc_sorted(*split)


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """(best F1 over all thresholds, the threshold achieving it); nan without defects."""
    split = split_scores(labels, scores)
    return (NAN, NAN) if split is None else f1_max_sorted(*split)


def f1_at(labels: Any, scores: Any, threshold: float) -> float:
    """F1 of the decisions ``score >= threshold``; nan without defects."""
    split = split_scores(labels, scores)
    return NAN if split is None else f1_at_sorted(*split, float(threshold))


def false_reject_rate(labels: Any, scores: Any, threshold: float) -> float:
    """Fraction of good samples (label 0) predicted defective; nan without good samples."""
    split = split_scores(labels, scores)
    if split is None or split[1].size == 0 or np.isnan(threshold):
        return NAN
    return counts_at(*split, float(threshold))[1] / split[1].size


def escape_rate(labels: Any, scores: Any, threshold: float) -> float:
    """Fraction of defective samples (label 1) predicted good; nan without defective samples."""
    split = split_scores(labels, scores)
    if split is None or split[0].size == 0 or np.isnan(threshold):
        return NAN
    pos = split[0]
    return (pos.size - counts_at(*split, float(threshold))[0]) / pos.size
