"""Local colour contrast: the one cue that pretrained CNN features hardly carry.

Deep features respond to shape and texture and are nearly blind to a stain or a discoloured patch
that keeps the texture underneath: on the demo's grass, PatchCore's Lite0 features ranked dark and
pale stains at chance (0.51 image AUROC).  A patch's mean colour, next to its features, sees them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def local_colour(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, *size): each grid cell's mean colour minus the image's mean colour.

    Relative to the image, so that a part photographed a little brighter is not an anomaly, while a
    stain or discoloured patch on it is (absolute colour cost 0.02 image AUROC on the magnetic tiles,
    whose photos vary in brightness)."""
    # Pool first, then subtract: the same numbers (a cell mean's weights sum to 1) without a
    # full-resolution copy of the image.
    return F.adaptive_avg_pool2d(images, size) - images.mean(dim=(2, 3), keepdim=True)
