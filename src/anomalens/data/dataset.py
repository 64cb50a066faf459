"""A torch Dataset over ImageRecords: every file checked up front, every image out at one size."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import DataError, param_error
from .io import probe_image, read_image, read_mask
from .sample import ImageRecord, Sample


class DataWarning(UserWarning):
    """A bad file was skipped (skip_bad_images=True)."""


def _size_pair(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
        return image_size, image_size
    if (isinstance(image_size, (tuple, list)) and len(image_size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)):
        return int(image_size[0]), int(image_size[1])
    raise param_error("AnomalyDataset", "image_size", "an int > 0 or a (height, width) pair of ints > 0", image_size)


def _size_mismatch(mask: str, mask_wh: tuple[int, int], image: str, image_wh: tuple[int, int]) -> DataError:
    return DataError(f"Mask '{mask}' is {mask_wh[0]}x{mask_wh[1]} but image '{image}' is {image_wh[0]}x{image_wh[1]}.")


def check_record(record: ImageRecord) -> None:
    """Cheap sanity check of one record from file headers: readable image, readable mask of the same size."""
    image_wh = probe_image(record.path, "image")
    if record.mask_path is not None:
        mask_wh = probe_image(record.mask_path, "mask")
        if mask_wh != image_wh:
            raise _size_mismatch(record.mask_path, mask_wh, record.path, image_wh)


def image_to_tensor(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, *size) in [0, 1], resized with antialiased bilinear."""
    t = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
    if tuple(t.shape[1:]) != size:
        t = F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        t = t.clamp_(0.0, 1.0)
    return t.contiguous()


def mask_to_tensor(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """bool (H, W) -> float32 (1, *size) in {0, 1}, resized with nearest neighbour (pixel-centre aligned)."""
    t = torch.from_numpy(mask.astype(np.float32))[None]
    if tuple(t.shape[1:]) != size:
        t = F.interpolate(t[None], size=size, mode="nearest-exact")[0]
    return t.contiguous()


class AnomalyDataset(Dataset):
    """Samples of `records` at `image_size` ((H, W) or one int for square).

    Every file is checked at construction (headers only); a bad one raises DataError, or with
    `skip_bad_images=True` is dropped with one DataWarning naming it.
    """

    def __init__(self, records: Sequence[ImageRecord], image_size: int | tuple[int, int],
                 skip_bad_images: bool = False):
        self.image_size = _size_pair(image_size)
        if not records:
            raise DataError("No images to load: the list of image records is empty.")
        kept: list[ImageRecord] = []
        for record in records:
            try:
                check_record(record)
            except DataError as err:
                if not skip_bad_images:
                    raise
                warnings.warn(f"{err} Skipping it.", DataWarning, stacklevel=2)
                continue
            kept.append(record)
        if not kept:
            raise DataError(f"No readable images left: all {len(records)} were skipped as bad files.")
        self.records = kept

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        image = read_image(record.path)
        mask = None
        if record.mask_path is not None:
            raw = read_mask(record.mask_path)
            if raw.shape != image.shape[:2]:  # files may have changed since construction
                raise _size_mismatch(record.mask_path, raw.shape[::-1], record.path, image.shape[1::-1])
            mask = mask_to_tensor(raw, self.image_size)
        return Sample(image_to_tensor(image, self.image_size), record.label, record.path, record.defect_type, mask)
