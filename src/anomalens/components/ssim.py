"""Structural similarity (SSIM; Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004), in torch.

SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
with local statistics from an 11 x 11 Gaussian window (sigma 1.5), C1 = (0.01 L)^2, C2 = (0.03 L)^2.
The map keeps the input size (reflect padding), so it can serve as a per-pixel anomaly map; away from
the borders it equals scikit-image's `structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False)`.  Only torch ops: differentiable and exportable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(like).expand(channels, 1, size, size).contiguous()


def ssim_map(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
             data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel SSIM of (B, C, H, W) images, averaged over channels: (B, 1, H, W), 1 = identical."""
    c = x.shape[1]
    pad = min(window_size // 2, min(x.shape[-2:]) - 1)  # reflect padding must stay inside tiny images
    w = _window(2 * pad + 1, sigma, c, x)

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        # Reflect padding keeps the map at the input size without the dark rim zero padding adds.
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), w, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x * mu_x
    var_y = local_mean(y * y) - mu_y * mu_y
    cov = local_mean(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return s.mean(dim=1, keepdim=True)


def ssim_loss(x: torch.Tensor, y: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """1 - mean SSIM: 0 for identical images."""
    return 1 - ssim_map(x, y, window_size).mean()
