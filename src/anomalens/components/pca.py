"""Principal component analysis in torch: fit once, then project / reconstruct with plain matmuls (exportable).

Shapes: N samples, D features, K kept components.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError


@dataclass
class PCA:
    """A fitted PCA: `mean` (D,), `components` (K, D) orthonormal rows, `variance` (K,) per component."""

    mean: torch.Tensor
    components: torch.Tensor
    variance: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, n_components: int | float) -> PCA:
        """Fit on (N, D) rows.

        `n_components`: an int keeps that many components (at most min(N - 1, D)); a float in (0, 1)
        keeps the fewest components whose explained variance ratio reaches it (scikit-learn's rule).
        """
        n, d = x.shape
        if n < 2:
            raise DataError(f"PCA needs at least 2 training samples; got {n}.")
        # float64: the feature vectors are long and the small trailing singular values matter for the ratio.
        x64 = x.detach().to(torch.float64)
        mean = x64.mean(0)
        _, singular, vh = torch.linalg.svd(x64 - mean, full_matrices=False)
        variance = singular.square() / (n - 1)
        rank = min(n - 1, d)  # centring removes one degree of freedom
        if isinstance(n_components, float):
            ratio = torch.cumsum(variance, 0) / variance.sum().clamp_min(1e-300)
            k = int(torch.searchsorted(ratio, torch.tensor(n_components, dtype=ratio.dtype))) + 1
        else:
            k = n_components
        k = max(1, min(k, rank))
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        return cls(mean.to(dtype), vh[:k].to(dtype).contiguous(), variance[:k].to(dtype))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., K) coordinates along the components."""
        return (x - self.mean) @ self.components.T

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """(..., K) coordinates -> (..., D) points in the principal subspace."""
        return z @ self.components + self.mean
