"""Image and pixel metrics, computed on raw scores (a monotonic normalisation cannot change them).

Convention: predicted defective when ``score >= threshold``.  Pure numpy/scipy; torch tensors
are accepted.  A metric that cannot be computed (one class absent) is ``nan``, never an error.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .classification import as_numpy, auroc, escape_rate, f1_at, f1_max, false_reject_rate
from .pixel import aupro, pixel_auroc, pixel_evaluation_set, pixel_f1_at, pixel_f1_max

__all__ = [
    "auroc", "f1_max", "f1_at", "false_reject_rate", "escape_rate",
    "aupro", "pixel_auroc", "pixel_f1_max", "pixel_f1_at", "pixel_evaluation_set",
    "compute_metrics", "METRIC_KEYS",
]

METRIC_KEYS = (
    "image_AUROC", "image_F1max", "image_F1",
    "pixel_AUROC", "pixel_F1max", "pixel_AUPRO", "pixel_F1",
    "false_reject_rate", "escape_rate", "image_threshold", "pixel_threshold",
)


def compute_metrics(
    labels: Any,
    scores: Any,
    maps: Any,
    masks: Any,
    has_mask: Any,
    image_threshold: float,
    pixel_threshold: float,
) -> dict[str, float]:
    """Every test-time metric in one dict with the keys of METRIC_KEYS.

    Image metrics use every image with a known label (0 or 1; -1 is skipped).  Pixel metrics use
    good images plus defective images with a non-empty mask (see `pixel_evaluation_set`), so a
    defective image without a mask lowers no pixel metric.  `maps`/`masks` may be None (pixel
    metrics are then nan).
    """
    y = as_numpy(labels).reshape(-1)
    s = as_numpy(scores).reshape(-1)
    known = y >= 0
    y, s = y[known], s[known]
    out = {
        "image_AUROC": auroc(y, s),
        "image_F1max": f1_max(y, s)[0],
        "image_F1": f1_at(y, s, image_threshold),
    }
    if maps is None or masks is None:
        out.update(pixel_AUROC=np.nan, pixel_F1max=np.nan, pixel_AUPRO=np.nan, pixel_F1=np.nan)
    else:
        all_labels = as_numpy(labels).reshape(-1)
        gt, a = pixel_evaluation_set(all_labels, masks, maps, has_mask)
        out.update(
            pixel_AUROC=pixel_auroc(gt, a),
            pixel_F1max=pixel_f1_max(gt, a)[0],
            pixel_AUPRO=aupro(gt, a),
            pixel_F1=pixel_f1_at(gt, a, pixel_threshold),
        )
    out.update(
        false_reject_rate=false_reject_rate(y, s, image_threshold),
        escape_rate=escape_rate(y, s, image_threshold),
        image_threshold=float(image_threshold),
        pixel_threshold=float(pixel_threshold),
    )
    return {key: float(out[key]) for key in METRIC_KEYS}
