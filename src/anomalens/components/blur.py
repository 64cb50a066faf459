"""Map upsampling and Gaussian smoothing shared by every model (export-friendly torch ops only)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian; radius 4 sigma keeps the truncation error below 1e-4."""
    radius = max(1, math.ceil(4.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps with reflect padding; sigma <= 0 is a no-op."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.dtype).to(maps.device)
    r = k.numel() // 2
    # Reflect padding needs the pad to be smaller than the side; clamp for tiny maps.
    pad_h, pad_w = min(r, maps.shape[-2] - 1), min(r, maps.shape[-1] - 1)
    out = F.pad(maps, (0, 0, pad_h, pad_h), mode="reflect") if pad_h > 0 else maps
    kh = k[r - pad_h : r + pad_h + 1]
    out = F.conv2d(out, (kh / kh.sum()).view(1, 1, -1, 1))
    out = F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w > 0 else out
    kw = k[r - pad_w : r + pad_w + 1]
    return F.conv2d(out, (kw / kw.sum()).view(1, 1, 1, -1))


def upsample_and_blur(maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Bilinear upsampling of (B, 1, h, w) patch maps to the input size, then Gaussian smoothing."""
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(maps, sigma)
