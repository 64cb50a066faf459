"""Post-processing: thresholds and score normalisation, fitted once and carried in the checkpoint.

`PostProcessor.fit` sees the validation split once (raw scores, raw maps, labels, masks) and
stores everything it learns in buffers, so `state_dict()` is the whole post-processor.  `forward`
is plain torch (no numpy, no branching on data): the engine, every exported graph and every
inferencer run the same code and reach the same decisions.

Normalisation maps a raw value x to (0, 1) with the threshold at exactly 0.5 and the median of the
good validation values at 0.1.  It is strictly increasing, so AUROC on normalised scores equals
AUROC on raw scores.  We use a rational sigmoid, ``1 - 0.5 / (1 + z)`` above the threshold and
``0.5 / (1 - z)`` below, with ``z = (x - t) / s``, rather than the logistic: in float32 the
logistic rounds to exactly 1.0 from z ~ 17 on, so a good outlier and a clear defect far above the
threshold would tie and the ranking (hence AUROC) would change; the rational tail keeps distinct
float32 values for scores hundreds of scales above the threshold.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from scipy.stats import t as student_t
from torch import nn

from .errors import AnyOf, ConfigError, DataError, Interval, IsType, OneOf, validate_params
from .metrics import as_numpy, f1_max, pixel_evaluation_set, pixel_f1_max
from .models.base import AnomalyOutput

METHODS = ("unfitted", "f1", "false_alarm_rate", "manual")
# z at which the median good value lands on 0.1: 0.5 / (1 + 4) = 0.1.
_Z_MEDIAN = 4.0
# Largest float32 below 0.5: values under the threshold never round up to the decision boundary.
_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0.0)))

_OPTIONAL_FLOAT = AnyOf(Interval(float), IsType(type(None), "None"))
FIT_CONSTRAINTS = {
    "method": OneOf("auto", "f1", "false_alarm_rate", "manual"),
    "false_alarm_rate": Interval(float, 0.0, 1.0, closed="neither"),
    "manual_threshold": _OPTIONAL_FLOAT,
    "manual_pixel_threshold": _OPTIONAL_FLOAT,
}


class PostProcessor(nn.Module):
    """Thresholds (image and pixel) and normalisation statistics, fitted on a validation split.

    Buffers: image_threshold, pixel_threshold (raw units; defective when value >= threshold),
    image_scale, pixel_scale (normalisation scales) and methods (codes into METHODS for the image
    and the pixel threshold).
    """

    def __init__(self) -> None:
        super().__init__()
        nan = torch.tensor(float("nan"))
        self.register_buffer("image_threshold", nan.clone())
        self.register_buffer("pixel_threshold", nan.clone())
        self.register_buffer("image_scale", nan.clone())
        self.register_buffer("pixel_scale", nan.clone())
        self.register_buffer("methods", torch.zeros(2, dtype=torch.long))

    # -- what was fitted ---------------------------------------------------------------------
    @property
    def image_method(self) -> str:
        """How the image threshold was chosen: 'f1', 'false_alarm_rate', 'manual' (or 'unfitted')."""
        return METHODS[int(self.methods[0])]

    @property
    def pixel_method(self) -> str:
        """How the pixel threshold was chosen (same vocabulary as `image_method`)."""
        return METHODS[int(self.methods[1])]

    @property
    def method(self) -> str:
        """The image threshold's method: the one a run summary reports."""
        return self.image_method

    @property
    def is_fitted(self) -> bool:
        return self.image_method != "unfitted"

    # -- fitting -----------------------------------------------------------------------------
    def fit(
        self,
        scores: Any,
        labels: Any,
        maps: Any,
        masks: Any = None,
        has_mask: Any = None,
        method: str = "auto",
        false_alarm_rate: float = 0.01,
        manual_threshold: float | None = None,
        manual_pixel_threshold: float | None = None,
    ) -> PostProcessor:
        """Fit thresholds and normalisation on a validation split; return self.

        method: "f1" maximises F1 on validation (needs defective images); "false_alarm_rate" uses
        good images only so that about `false_alarm_rate` of good parts are rejected; "manual" takes
        `manual_threshold` (raw units); "auto" is "f1" when validation holds defective images, else
        "false_alarm_rate".  The pixel threshold is `manual_pixel_threshold` when given, else
        F1-optimal over validation pixels when the method is "f1" (or "manual") and validation has
        defect masks, else chosen so that about `false_alarm_rate` of good parts show any
        predicted-defect pixel.
        """
        validate_params("PostProcessor", {
            "method": method, "false_alarm_rate": false_alarm_rate,
            "manual_threshold": manual_threshold, "manual_pixel_threshold": manual_pixel_threshold,
        }, FIT_CONSTRAINTS)
        s = as_numpy(scores).reshape(-1).astype(np.float64)
        y = as_numpy(labels).reshape(-1)
        a = as_numpy(maps)
        if not (len(s) == len(y) == len(a)):
            raise DataError(f"scores, labels and maps must cover the same images; got {len(s)}, {len(y)} and {len(a)}.")
        if np.isnan(s).any() or np.isnan(a).any():
            raise DataError("The validation scores or maps contain NaN; the model produced invalid output.")
        good = y == 0
        if not good.any():
            raise DataError("The validation split has no good images; the post-processor needs some to set its thresholds "
                            "and normalisation.")
        defective = y == 1
        if method == "auto":
            method = "f1" if defective.any() else "false_alarm_rate"

        # Image threshold.
        if method == "manual":
            if manual_threshold is None:
                raise ConfigError("method='manual' needs manual_threshold (a raw score); set it or use method='auto'.")
            image_t = _to_float32(manual_threshold)
        elif method == "f1":
            if not defective.any():
                raise ConfigError("method='f1' needs defective images in the validation split; "
                                  "use method='false_alarm_rate' or 'auto'.")
            image_t = _floor_float32(f1_max(defective[good | defective], s[good | defective])[1])
        else:
            image_t = false_alarm_threshold(s[good], false_alarm_rate)

        # Pixel threshold.
        empty_masks = np.zeros_like(a, dtype=bool) if masks is None else masks
        gt, pixel_maps = pixel_evaluation_set(y, empty_masks, a, has_mask)
        good_maps = a[good].reshape(int(good.sum()), -1)
        if manual_pixel_threshold is not None:
            pixel_t, pixel_method = _to_float32(manual_pixel_threshold), "manual"
        elif method in ("f1", "manual") and gt.any():
            pixel_t, pixel_method = _floor_float32(pixel_f1_max(gt, pixel_maps)[1]), "f1"
        else:
            maxima = good_maps.max(axis=1).astype(np.float64)
            pixel_t, pixel_method = false_alarm_threshold(maxima, false_alarm_rate), "false_alarm_rate"

        self.image_threshold.fill_(image_t)
        self.pixel_threshold.fill_(pixel_t)
        self.image_scale.fill_(normalisation_scale(s[good], image_t))
        self.pixel_scale.fill_(normalisation_scale(good_maps.ravel(), pixel_t))
        self.methods.copy_(torch.tensor([METHODS.index(method), METHODS.index(pixel_method)]))
        return self

    # -- applying ----------------------------------------------------------------------------
    def forward(self, output: AnomalyOutput) -> AnomalyOutput:
        """A new AnomalyOutput: raw score/map unchanged, norm_score, norm_map, pred_label, pred_mask filled."""
        norm_score, norm_map, pred_label, pred_mask = self.apply(output.score, output.anomaly_map)
        return dataclasses.replace(output, norm_score=norm_score, norm_map=norm_map,
                                   pred_label=pred_label, pred_mask=pred_mask)

    def apply(self, score: torch.Tensor, anomaly_map: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(norm_score, norm_map, pred_label, pred_mask) from raw tensors; the traceable core of forward."""
        norm_score = _normalise(score, self.image_threshold, self.image_scale)
        norm_map = _normalise(anomaly_map, self.pixel_threshold, self.pixel_scale)
        pred_label = score >= self.image_threshold.to(score.dtype)
        pred_mask = anomaly_map >= self.pixel_threshold.to(anomaly_map.dtype)
        return norm_score, norm_map, pred_label, pred_mask


def _normalise(x: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rational sigmoid: threshold -> 0.5 and ``norm >= 0.5`` exactly when ``x >= threshold``.

    Each branch is a chain of monotone float ops on one variable, so float32 rounding can merge
    neighbours but never swap them.
    """
    t = threshold.to(x.dtype)
    r = 0.5 / (1.0 + ((x - t) / scale.to(x.dtype)).abs())
    # Just below the threshold, r can round to 0.5; keep it under the decision boundary.
    return torch.where(x >= t, 1.0 - r, r.clamp(max=_BELOW_HALF))


# --------------------------------------------------------------------------- fitting helpers
def false_alarm_threshold(good_scores: Any, rate: float) -> float:
    """A float32 threshold rejecting about `rate` of good parts, estimated from good scores only.

    The empirical (1 - rate) quantile with plotting position p (n + 1) ("weibull"): the threshold
    at the k-th largest of n good scores rejects a new good part with probability k / (n + 1) on
    average, so this estimate is unbiased for the false-alarm rate instead of ~1/n too high.
    With fewer than about 1/rate good scores the data cannot resolve that quantile (it would be
    clamped to the maximum); we then also take the Gaussian prediction bound
    mean + t_(n-1) * std * sqrt(1 + 1/n) (exactly `rate` for Gaussian scores, accounting for the
    noise in mean and std) and keep the larger, so a small validation set does not undershoot.
    Ties at the threshold (quantised scores) would reject all tied parts; we step just above them.
    """
    g = np.sort(as_numpy(good_scores).reshape(-1).astype(np.float64))
    n = g.size
    t = float(np.quantile(g, 1.0 - rate, method="weibull"))
    if (n + 1) * (1.0 - rate) > n and n > 1:
        bound = g.mean() + student_t.ppf(1.0 - rate, n - 1) * g.std(ddof=1) * np.sqrt(1.0 + 1.0 / n)
        t = max(t, float(bound))
    t32 = np.float32(t)
    g32 = g.astype(np.float32)
    if np.count_nonzero(g32 >= t32) > max(rate * n, np.count_nonzero(g32 > t32)):
        t32 = np.nextafter(t32, np.float32(np.inf))
    return float(t32)


def normalisation_scale(good_values: Any, threshold: float) -> float:
    """Scale s putting the median good value at 0.1, floored at a small fraction of the spread."""
    v = as_numpy(good_values).reshape(-1)
    median = float(np.median(v))
    spread = float(np.std(v, dtype=np.float64))
    # A threshold at or below the median good value (e.g. manual) would give s <= 0; fall back to
    # a scale tied to the values' spread (or to their magnitude when they are all equal).
    floor = 1e-3 * spread if spread > 0 else 1e-3 * max(abs(threshold), abs(median), 1e-6)
    return float(np.float32(max((threshold - median) / _Z_MEDIAN, floor)))


def _to_float32(value: float) -> float:
    return float(np.float32(value))


def _floor_float32(value: float) -> float:
    """The largest float32 <= value: a score equal to the float64 threshold stays on the defect side."""
    v = np.float32(value)
    if float(v) > value:
        v = np.nextafter(v, np.float32(-np.inf))
    return float(v)


__all__ = ["PostProcessor", "false_alarm_threshold", "normalisation_scale", "METHODS"]
