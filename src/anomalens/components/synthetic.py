"""Offline natural photographs and synthetic anomalies (Perlin-noise masks filled with foreign images).

Models that need "other" images have no ImageNet or DTD here.  `natural_photos()` returns the
photographs that ship inside scikit-image (CC0 / public-domain textures, scenes, objects,
microscopy), which stand in for both: EfficientAD's ImageNet penalty images and teacher
distillation data, DRAEM's DTD anomaly source.

`perlin_anomalies` follows DRAEM (Zavrtanik et al. 2021, sec. 3.3): a Perlin noise field with a
random lattice scale is thresholded into a blob mask M; a random crop of a foreign image A, with
a few random colour augmentations, is pasted into M with opacity 1 - beta:
I_a = (1 - M) * I + (1 - beta) * M * A + beta * M * I.  The noise is the demo dataset's `perlin`.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..data.demo import perlin

# Photographs bundled with scikit-image (no download): textures first, then varied scenes/objects.
PHOTO_NAMES = ("brick", "grass", "gravel", "astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field",
               "immunohistochemistry", "moon", "retina", "rocket", "page", "text", "clock", "cell", "colorwheel")


@lru_cache(maxsize=1)
def _photos() -> tuple[torch.Tensor, ...]:
    from skimage import data  # lazy: only models that synthesise data need scikit-image here

    out = []
    for name in PHOTO_NAMES:
        img = np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append(torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1).contiguous())
    return tuple(out)


def natural_photos() -> list[torch.Tensor]:
    """The bundled photographs as float (3, h, w) tensors in [0, 1] (various sizes, read once)."""
    return list(_photos())


def random_crops(photos: list[torch.Tensor], n: int, size: tuple[int, int], rng: np.random.Generator,
                 min_share: float = 0.25) -> torch.Tensor:
    """n random square-ish crops (side >= min_share of the photo's short side), flipped at random, resized."""
    out = []
    for _ in range(n):
        img = photos[int(rng.integers(len(photos)))]
        h, w = img.shape[-2:]
        side = int(min(h, w) * rng.uniform(min_share, 1.0))
        y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = img[:, y:y + side, x:x + side]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        if rng.random() < 0.5:
            crop = crop.flip(-2)
        # antialias: a 500 px crop squeezed to 64 px must not alias into noise
        out.append(F.interpolate(crop[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0])
    return torch.stack(out)


def _augment(img: torch.Tensor, rng: np.random.Generator, k: int = 3) -> torch.Tensor:
    """k random colour / geometry changes (a small subset of DRAEM's imgaug list), img (3, H, W) in [0, 1]."""
    ops = rng.choice(8, size=k, replace=False)
    for op in ops:
        if op == 0:  # gamma contrast
            img = img.clamp_min(1e-6) ** float(rng.uniform(0.5, 2.0))
        elif op == 1:  # brightness multiply, per channel
            img = img * torch.from_numpy(rng.uniform(0.8, 1.2, (3, 1, 1)).astype(np.float32))
        elif op == 2:  # additive brightness
            img = img + float(rng.uniform(-0.2, 0.2))
        elif op == 3:  # channel permutation (a hue change)
            img = img[torch.from_numpy(rng.permutation(3))]
        elif op == 4:  # solarize
            img = torch.where(img > 0.5, 1 - img, img)
        elif op == 5:  # posterize to 3 bits
            img = torch.floor(img * 8) / 8
        elif op == 6:  # invert
            img = 1 - img
        else:  # rotate by a multiple of 90 degrees (square crops keep their size)
            img = torch.rot90(img, int(rng.integers(1, 4)), dims=(-2, -1)) if img.shape[-1] == img.shape[-2] else img
    return img.clamp(0, 1)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5,
                max_log_scale: int = 6) -> np.ndarray:
    """A binary blob mask: Perlin noise with a random lattice (2^0..2^(max_log_scale-1) cells a side), thresholded."""
    h, w = shape
    cells = 2 ** int(rng.integers(0, max_log_scale))
    # The noise is isotropic; a random stretch along one axis gives DRAEM's elongated blobs.
    stretch = 2 ** float(rng.uniform(-1, 1))
    cell = max(min(h, w) / cells, 2.0)
    ny, nx = max(2, int(round(h / stretch))), max(2, int(round(w * stretch)))
    noise = perlin((ny, nx), cell, rng)
    noise = F.interpolate(torch.from_numpy(noise)[None, None].float(), size=(h, w), mode="bilinear",
                          align_corners=False)[0, 0].numpy()
    return (noise > threshold).astype(np.float32)


def perlin_anomalies(images: torch.Tensor, rng: np.random.Generator, photos: list[torch.Tensor] | None = None,
                     p_anomaly: float = 0.5, beta: tuple[float, float] = (0.0, 0.8)) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM's simulator: (augmented images (B, 3, H, W), masks (B, 1, H, W) in {0, 1}) from good images in [0, 1].

    Each image gets a foreign-photo blob with probability p_anomaly (its mask is empty otherwise, and
    also when the thresholded noise happens to be empty).
    """
    photos = natural_photos() if photos is None else photos
    b, _, h, w = images.shape
    out, masks = images.clone(), torch.zeros(b, 1, h, w, dtype=images.dtype, device=images.device)
    for i in range(b):
        if rng.random() >= p_anomaly:
            continue
        mask = torch.from_numpy(perlin_mask((h, w), rng)).to(images.device, images.dtype)
        source = _augment(random_crops(photos, 1, (h, w), rng)[0], rng).to(images.device, images.dtype)
        opacity = 1 - float(rng.uniform(*beta))
        out[i] = images[i] * (1 - mask) + mask * (opacity * source + (1 - opacity) * images[i])
        masks[i, 0] = mask
    return out, masks
