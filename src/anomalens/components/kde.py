"""Gaussian kernel density estimation with a full bandwidth matrix (scipy.stats.gaussian_kde's model).

The kernel covariance is the data covariance times factor^2, with Scott's factor n^(-1 / (d + 4)).
Fitting whitens the data once (Cholesky of the kernel covariance), so evaluating the log density is
squared Euclidean distances plus a logsumexp: plain torch ops that export to ONNX.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DataError


def scott_factor(n: int, d: int) -> float:
    """Scott's rule of thumb for the bandwidth factor."""
    return n ** (-1.0 / (d + 4))


@dataclass
class GaussianKDE:
    """A fitted KDE: `whiten` (d, d) maps a point into kernel units; `points` (N, d) are the whitened
    training points; `log_norm` is log(1 / (N sqrt(det(2 pi Sigma_kernel))))."""

    whiten: torch.Tensor
    points: torch.Tensor
    log_norm: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, bandwidth_factor: float | None = None) -> GaussianKDE:
        """Fit on (N, d) points; `bandwidth_factor` None = Scott's rule."""
        n, d = x.shape
        if n < 2:
            raise DataError(f"A kernel density estimate needs at least 2 training samples; got {n}.")
        x64 = x.detach().to(torch.float64)
        factor = scott_factor(n, d) if bandwidth_factor is None else bandwidth_factor
        cov = torch.cov(x64.T).reshape(d, d) * factor**2
        try:
            chol = torch.linalg.cholesky(cov)
        except RuntimeError as err:  # singular: fewer (distinct) samples than dimensions
            raise DataError(f"The kernel density estimate got a singular covariance ({n} samples in {d} "
                            "dimensions); use more training images or fewer components.") from err
        whiten = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=torch.float64), upper=False)
        # log det(2 pi Sigma) = d log(2 pi) + 2 sum log diag(L)
        log_det = d * math.log(2 * math.pi) + 2 * torch.log(torch.diagonal(chol)).sum()
        log_norm = -math.log(n) - 0.5 * log_det
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        return cls(whiten.to(dtype), (x64 @ whiten.T).to(dtype), log_norm.to(dtype))

    def log_density(self, q: torch.Tensor) -> torch.Tensor:
        """log p(q) for (..., d) queries -> (...)."""
        return kde_log_density(q, self.whiten, self.points, self.log_norm)


def kde_log_density(q: torch.Tensor, whiten: torch.Tensor, points: torch.Tensor,
                    log_norm: torch.Tensor) -> torch.Tensor:
    """log sum_i N(q; x_i, Sigma) / N with whitened training points; q (..., d) -> (...)."""
    w = q @ whiten.T
    # ||a||^2 - 2ab + ||b||^2: one matmul, memory (..., N) instead of (..., N, d).  Its rounding error
    # (~1e-6 of the squared norms) changes a density by a relative ~1e-6 at most.
    d2 = (w.square().sum(-1, keepdim=True) - 2 * w @ points.T + points.square().sum(-1)).clamp_min(0)
    return torch.logsumexp(-0.5 * d2, dim=-1) + log_norm
