"""Read images and masks from disk into plain numpy arrays, with one clear error per bad file.

Every image comes out as uint8 RGB (H, W, 3) whatever its mode on disk (grey, 16-bit, palette,
RGBA, CMYK, ...); every mask comes out as bool (H, W) with True = defect.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

T = TypeVar("T")
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff")

# What Pillow raises on a bad file: truncated data, broken chunks, unknown formats, huge images.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def is_image_file(path: Path) -> bool:
    """True for a visible regular file with an accepted image extension (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format Pillow recognises (corrupt or unsupported file)"
    text = str(exc).strip()
    # Pillow messages may span lines; keep the first line, without a final period.
    return (text.splitlines()[0] if text else type(exc).__name__).rstrip(".")


def _check_exists(path: Path, kind: str) -> None:
    if not path.is_file():
        raise DataError(f"{kind.capitalize()} file not found: '{path}'.")


def _decode(path: str | Path, kind: str, convert: Callable[[Image.Image], T]) -> T:
    """Open and fully decode a file, then `convert` it; any Pillow failure becomes one DataError line."""
    p = Path(path)
    _check_exists(p, kind)
    try:
        with Image.open(p) as img:
            img.load()
            return convert(img)
    except _PIL_ERRORS as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"Cannot read {kind} '{p}': {_reason(exc)}.") from None


def probe_image(path: str | Path, kind: str = "image") -> tuple[int, int]:
    """Cheaply check that a file is a readable image (header + Pillow's verify); return (width, height)."""
    p = Path(path)
    _check_exists(p, kind)
    try:
        with Image.open(p) as img:
            size = img.size
            img.verify()  # walks chunk CRCs for PNG; catches truncation without decoding pixels
    except _PIL_ERRORS as exc:
        raise DataError(f"Cannot read {kind} '{p}': {_reason(exc)}.") from None
    return size


def _integer_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale integer pixels by the container's bit depth (never by the image's own max)."""
    if arr.dtype == np.uint16 or (arr.min(initial=0) >= 0 and arr.max(initial=0) <= 65535):
        # 16-bit containers (incl. Pillow's 32-bit "I" mode holding 16-bit PNG/TIFF data).
        return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    return np.round(np.clip(arr, 0, None).astype(np.float64) / (2**31 - 1) * 255.0).astype(np.uint8)


def _to_channels(img: Image.Image) -> np.ndarray:
    """The image as a uint8 array, (H, W) for single-channel modes, (H, W, C>=3) otherwise."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        return _integer_to_uint8(np.asarray(img))
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0  # floats in [0, 1] by convention
        return np.round(np.clip(arr * scale, 0, 255)).astype(np.uint8)
    if mode in ("L", "LA", "La"):
        arr = np.asarray(img)
        return arr if arr.ndim == 2 else arr[..., 0]  # drop alpha
    if mode in ("RGB", "RGBA", "RGBa", "RGBX"):
        return np.asarray(img)
    if mode in ("P", "PA"):
        return np.asarray(img.convert("RGBA"))
    return np.asarray(img.convert("RGB"))  # "1", CMYK, YCbCr, LAB, HSV


def read_image(path: str | Path) -> np.ndarray:
    """Read any supported image as uint8 RGB (H, W, 3); raise DataError naming the file if it can't be read."""
    arr = _decode(path, "image", _to_channels)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    return np.array(arr[..., :3], dtype=np.uint8, order="C")  # a writable copy, never Pillow's buffer


def _mask_values(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return np.asarray(img) != 0  # raw values: a 16-bit 0/1 mask must not round to 0
    arr = _to_channels(img)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    # JPEG masks carry compression ringing around edges; only there does a threshold beat "nonzero".
    return arr >= 128 if img.format == "JPEG" else arr > 0


def read_mask(path: str | Path) -> np.ndarray:
    """Read a defect mask as bool (H, W): nonzero = defect (0/255, 0/1, grey or RGB masks alike)."""
    return _decode(path, "mask", _mask_values)
