"""Map upsampling and Gaussian smoothing shared by every model (export-friendly torch ops only)."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian; radius 4 sigma keeps the truncation error below 1e-4."""
    return torch.from_numpy(_kernel(float(sigma))).to(dtype)


def _kernel(sigma: float) -> np.ndarray:
    # numpy, not torch: under torch.export every torch tensor is traced, and .numpy() on it fails.
    radius = max(1, math.ceil(4.0 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1, dtype=np.float64) / sigma) ** 2)
    return k / k.sum()


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
    """Bilinear upsampling of (B, 1, h, w) patch maps to the input size, then Gaussian smoothing.

    Both are linear and separable, so they are applied as two matrix products, (H, h) @ map @ (w, W),
    with the same numbers as F.interpolate + gaussian_blur: OpenVINO runs a 1-channel resize and
    convolution channels-last with one value per vector (PaDiM: ~17 of ~150 ms per batch of 8).
    The matrices come from numpy, so an exported graph holds them as constants.
    """
    rows = torch.from_numpy(_axis_operator(maps.shape[-2], size[0], float(sigma))).to(maps)
    cols = torch.from_numpy(_axis_operator(maps.shape[-1], size[1], float(sigma))).to(maps)
    return rows @ maps @ cols.T


@functools.lru_cache(maxsize=64)
def _axis_operator(n: int, size: int, sigma: float) -> np.ndarray:
    """(size, n) float64 matrix: torch's 1-D bilinear resize n -> size (align_corners=False), then
    `gaussian_blur` along that axis (reflect padding, truncated kernel renormalised)."""
    resize = np.zeros((size, n))
    scale = n / size
    for i in range(size):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(src), n - 1)
        frac = min(max(src - i0, 0.0), 1.0)
        resize[i, i0] += 1 - frac
        resize[i, min(i0 + 1, n - 1)] += frac
    if sigma <= 0:
        return resize
    k = _kernel(sigma)
    r = k.size // 2
    pad = min(r, size - 1)
    k = k[r - pad: r + pad + 1] / k[r - pad: r + pad + 1].sum()
    blur = np.zeros((size, size))
    for i in range(size):
        for t in range(-pad, pad + 1):
            j = abs(i + t)  # reflect at the first pixel ...
            j = 2 * (size - 1) - j if j >= size else j  # ... and at the last
            blur[i, j] += k[t + pad]
    return blur @ resize
