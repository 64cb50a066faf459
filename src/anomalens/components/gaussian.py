"""Multivariate Gaussians per position: an online mean/covariance accumulator and Mahalanobis distances.

Shapes: P positions (e.g. the cells of a feature grid), D dimensions, N or B samples.
"""
from __future__ import annotations

import torch

from ..errors import DataError


class GaussianAccumulator:
    """Online per-position mean and covariance of (N, P, D) batches.

    Sums are kept in float64 around a fixed shift (the first batch's mean), so memory does not
    grow with the number of samples and the `E[xx^T] - mu mu^T` subtraction does not cancel badly.
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None  # (P, D)
        self.sum: torch.Tensor | None = None  # (P, D) sum of (x - shift)
        self.outer: torch.Tensor | None = None  # (P, D, D) sum of (x - shift)(x - shift)^T
        self._pooled: torch.Tensor | None = None  # (D, D) cache of pooled_covariance()

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of N samples, x: (N, P, D)."""
        # Position-major (P, N, D) contiguous memory makes the outer products one fast bmm; with
        # strided input the same product is ~20x slower on CPU.
        x = x.detach().transpose(0, 1).to(torch.float64).contiguous()
        if self.shift is None:
            self.shift = x.mean(dim=1)
            self.sum = torch.zeros_like(self.shift)
            self.outer = x.new_zeros(*self.shift.shape, self.shift.shape[-1])
        elif (x.shape[0], x.shape[2]) != tuple(self.shift.shape):
            raise DataError(f"Feature shape changed between batches: {tuple(self.shift.shape)} then "
                            f"{(x.shape[0], x.shape[2])}; give every training image the same size.")
        centred = x - self.shift[:, None]
        self.sum += centred.sum(dim=1)
        self.outer += torch.bmm(centred.transpose(1, 2), centred)
        self.count += x.shape[1]
        self._pooled = None

    def mean(self) -> torch.Tensor:
        """Per-position mean (P, D), float64."""
        self._check()
        return self.sum / self.count + self.shift

    def covariance(self, eps: float = 0.01, rows: slice = slice(None), shrinkage: str = "none",
                   pooled_weight: float = 0.5) -> torch.Tensor:
        """Covariance + eps * I (P, D, D) of the positions in `rows`, float64.

        shrinkage "none": the unbiased sample covariance.  "oas": the Oracle Approximating Shrinkage
        estimate (Chen, Wiesel, Eldar, Hero 2010), the maximum-likelihood covariance pulled towards
        a scaled identity by an amount computed from the data; with about as few samples as
        dimensions (PaDiM: ~100 images, 100 channels per position) the sample covariance's small
        eigenvalues are mostly noise, and the Mahalanobis distance weights them most.  "pooled":
        (1 - pooled_weight) * the sample covariance + pooled_weight * `pooled_covariance()`, which
        fills those directions with the spread every position shares instead of a constant.
        """
        if shrinkage not in ("none", "oas", "pooled"):
            raise ValueError(f"shrinkage must be 'none', 'oas' or 'pooled', got {shrinkage!r}")
        cov = self._scatter(rows)
        n = self.count
        if shrinkage == "oas":
            cov.div_(n)
            d = cov.shape[-1]
            mu = cov.diagonal(dim1=-2, dim2=-1).sum(-1) / d  # (P,) trace / D
            alpha = cov.pow(2).mean(dim=(-2, -1))
            den = (n + 1) * (alpha - mu.pow(2) / d)
            rho = torch.where(den > 0, (alpha + mu.pow(2)) / den.clamp_min(1e-300), torch.ones_like(den)).clamp_max(1)
            cov.mul_((1 - rho)[:, None, None]).diagonal(dim1=-2, dim2=-1).add_((rho * mu)[:, None])
        else:
            cov.div_(n - 1)
            if shrinkage == "pooled":
                cov.mul_(1 - pooled_weight).add_(self.pooled_covariance(), alpha=pooled_weight)
        cov.diagonal(dim1=-2, dim2=-1).add_(eps)
        return cov

    def pooled_covariance(self, chunk: int = 512) -> torch.Tensor:
        """(D, D): the unbiased sample covariance averaged over all positions, float64 (cached)."""
        if self._pooled is None:
            positions = self.sum.shape[0]
            total = sum(self._scatter(slice(s, s + chunk)).sum(0) for s in range(0, positions, chunk))
            self._pooled = total / (positions * (self.count - 1))
        return self._pooled

    def _scatter(self, rows: slice) -> torch.Tensor:
        """Sum of (x - mean)(x - mean)^T (P, D, D) of the positions in `rows`, float64, a new tensor."""
        self._check()
        mean_c = self.sum[rows] / self.count
        # outer - n * mean mean^T in one fused op, without another (P, D, D) temporary.
        return torch.baddbmm(self.outer[rows], mean_c.unsqueeze(2), mean_c.unsqueeze(1), alpha=-self.count)

    def precision(self, eps: float = 0.01, dtype: torch.dtype = torch.float32, chunk: int = 512,
                  shrinkage: str = "none", pooled_weight: float = 0.5) -> torch.Tensor:
        """Inverse of `covariance(eps, ..., shrinkage, pooled_weight)` (P, D, D) in `dtype`.

        Inverted in float64, `chunk` positions at a time, so the peak memory stays near the size of
        the running sums instead of several float64 (P, D, D) copies.
        """
        positions, d = self.mean().shape
        inv_cov = torch.empty(positions, d, d, dtype=dtype, device=self.sum.device)
        for start in range(0, positions, chunk):
            rows = slice(start, start + chunk)
            inv_cov[rows] = torch.linalg.inv(self.covariance(eps, rows, shrinkage, pooled_weight)).to(dtype)
        return inv_cov

    def _check(self) -> None:
        if self.count < 2:
            raise DataError(f"A covariance needs at least 2 training images; got {self.count}.")


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance sqrt((x - mu)^T S^-1 (x - mu)) per sample and position.

    x: (B, P, D), mean: (P, D), inv_cov: (P, D, D) -> (B, P).  Plain bmm and sums, so it exports.
    """
    # Position-major (P, B, D) contiguous memory: the P small products become one fast batched matmul.
    delta = x.transpose(0, 1).contiguous() - mean.unsqueeze(1)
    squared = (torch.bmm(delta, inv_cov) * delta).sum(dim=-1)  # (P, B)
    return squared.clamp_min(0).sqrt().transpose(0, 1)
