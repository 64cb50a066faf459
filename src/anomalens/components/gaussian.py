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

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of N samples, x: (N, P, D)."""
        x = x.detach().to(torch.float64)
        if self.shift is None:
            self.shift = x.mean(dim=0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = x.new_zeros(*self.shift.shape, self.shift.shape[-1])
        elif x.shape[1:] != self.shift.shape:
            raise DataError(f"Feature shape changed between batches: {tuple(self.shift.shape)} then "
                            f"{tuple(x.shape[1:])}; give every training image the same size.")
        centred = x - self.shift
        self.sum += centred.sum(dim=0)
        self.outer += torch.einsum("npd,npe->pde", centred, centred)
        self.count += x.shape[0]

    def finalize(self, eps: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (P, D) and unbiased covariance + eps * I (P, D, D), both float64."""
        if self.count < 2:
            raise DataError(f"A covariance needs at least 2 training images; got {self.count}.")
        n = self.count
        mean_c = self.sum / n
        cov = (self.outer - n * torch.einsum("pd,pe->pde", mean_c, mean_c)) / (n - 1)
        cov = 0.5 * (cov + cov.transpose(-1, -2))  # exact symmetry for the inverse
        cov += eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        return mean_c + self.shift, cov


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance sqrt((x - mu)^T S^-1 (x - mu)) per sample and position.

    x: (B, P, D), mean: (P, D), inv_cov: (P, D, D) -> (B, P).  Plain einsum/matmul, so it exports.
    """
    delta = x - mean
    # (P, B, D) @ (P, D, D) batches the P small products in one matmul.
    projected = torch.matmul(delta.transpose(0, 1), inv_cov).transpose(0, 1)
    squared = (projected * delta).sum(dim=-1)
    return squared.clamp_min(0).sqrt()
