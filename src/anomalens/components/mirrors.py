"""Mirrored training images for the one-pass models (PaDiM, PatchCore), option `flips`.

A stochastic texture mirrored is another good image of it, so its mirror images multiply a short
training set; an aligned part mirrored puts features where, or facing where, they never are.
With `flips: auto` a model scores a few good images it has not learnt from, as they are and
mirrored, and adds every training image's three mirror images only when the mirrored copies lie
about as close to what it learnt as the originals do.  Each model measures with its own distance
and sets its own bound (FLIP_RATIO in its file).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

FLIPS = ((-1,), (-2,), (-2, -1))  # horizontal, vertical, both
# Every CHECK_EVERY-th training image of the stream, at most CHECK_IMAGES of them, is a check image;
# with fewer than CHECK_MIN there is no check (and no mirrors).
CHECK_EVERY, CHECK_IMAGES, CHECK_MIN = 5, 16, 4
CHECK_STRIDE = 7  # the check measures every 7th grid position (prime: spread over rows and columns)


def check_images(start: int, count: int, taken: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(count,) bool: which images start .. start + count - 1 of the training stream are check
    images, when `taken` were chosen before."""
    chosen = torch.arange(start, start + count, device=device) % CHECK_EVERY == CHECK_EVERY - 1
    return chosen & (chosen.cumsum(0) + taken <= CHECK_IMAGES)


def worst_mirror_ratio(median_distance: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                       plain: torch.Tensor | None = None) -> float:
    """The largest, over the three flips, of the mean over `images` of their mirror image's median
    patch distance divided by their own (`plain`, computed when not given).  `median_distance`
    maps (B, C, H, W) images to (B,) median patch distances.  About 1 where position and
    orientation carry nothing."""
    plain = median_distance(images) if plain is None else plain
    return max(float((median_distance(images.flip(dims)) / plain).mean()) for dims in FLIPS)
