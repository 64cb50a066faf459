"""Pictures of predictions: heat maps, overlays, contours and two ready-made layouts.

The post-processor's normalisation maps the pixel threshold to 0.5, so every map is drawn on a
fixed 0..1 colour scale: a colour means the same thing on every image (blue is normal, red is
beyond the threshold).

Images may be numpy arrays (H, W, 3), uint8 or float in [0, 1], or torch tensors (3, H, W) float
in [0, 1]; maps and masks may be (H, W) arrays or (1, H, W) tensors. A map or mask whose size
differs from the image's is resized to it, so a prediction can be drawn on the original picture.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .errors import DataError, param_error

Color = tuple[int, int, int]

THRESHOLD = 0.5  # the normalised threshold, for images and pixels alike
PRED_COLOR: Color = (255, 0, 0)
GT_COLOR: Color = (0, 255, 0)
MIN_PANEL = 256  # smaller images are enlarged so that captions and contours stay readable
COLORMAP = "turbo"  # like jet, but perceptually smoother and without jet's false bands

_BACKGROUND: Color = (28, 28, 30)
_TEXT: Color = (235, 235, 235)
_MUTED: Color = (150, 150, 155)
_OK: Color = (90, 205, 120)
_DEFECT: Color = (255, 85, 70)


# --------------------------------------------------------------------------- inputs
def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; duck-typed so that this module never imports torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_image(image: Any) -> np.ndarray:
    """Any supported image as (H, W, 3) uint8."""
    channels_first = hasattr(image, "detach")  # tensors are CHW by convention
    a = _numpy(image)
    while a.ndim == 4 and a.shape[0] == 1:  # a batch of one
        a = a[0]
    if a.ndim == 3 and (channels_first or (a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4))):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise DataError(f"Expected an image of shape (H, W, 3) or (3, H, W). Got shape {tuple(a.shape)} instead.")
    a = a[..., :3]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64)) * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _as_plane(x: Any, name: str) -> np.ndarray:
    """A map or mask as a 2-D float array; leading singleton axes (1, H, W) are dropped."""
    a = _numpy(x)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise DataError(f"Expected {name} of shape (H, W) or (1, H, W). Got shape {tuple(a.shape)} instead.")
    return np.nan_to_num(a.astype(np.float32))


def _fit(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float plane to (H, W); a no-op when the size already matches."""
    if plane.shape == shape:
        return plane
    return np.asarray(Image.fromarray(plane).resize(shape[::-1], Image.Resampling.BILINEAR))


def _as_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    # Bilinear, then threshold: an enlarged mask gets smooth edges instead of a staircase.
    return _fit(_as_plane(mask, "a mask"), shape) >= 0.5


def _as_scalar(x: Any) -> float:
    return float(_numpy(x).reshape(-1)[0])


# --------------------------------------------------------------------------- primitives
@lru_cache(maxsize=1)
def _lut() -> np.ndarray:
    from matplotlib import colormaps  # the colormap module only; pyplot is never needed here

    return np.rint(colormaps[COLORMAP](np.arange(256))[:, :3] * 255).astype(np.uint8)


def heatmap(norm_map: Any) -> np.ndarray:
    """Colour a normalised (H, W) map on the fixed 0..1 scale; returns (H, W, 3) uint8."""
    values = np.clip(_as_plane(norm_map, "norm_map"), 0.0, 1.0)
    return _lut()[np.rint(values * 255).astype(np.intp)]


def overlay(image: Any, norm_map: Any, alpha: float = 0.4) -> np.ndarray:
    """Blend the heat map of `norm_map` over `image` with weight `alpha`; returns (H, W, 3) uint8."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise param_error("overlay", "alpha", "a float in [0, 1]", alpha)
    img = _as_image(image)
    heat = heatmap(_fit(_as_plane(norm_map, "norm_map"), img.shape[:2]))
    return np.rint(img * (1.0 - alpha) + heat * alpha).astype(np.uint8)


def contour_band(mask: np.ndarray, thickness: int = 2) -> np.ndarray:
    """Pixels within `thickness` of a mask's edge: ceil(t/2) inside it, floor(t/2) outside.

    The image border is not an edge: a defect touching it is left open there.
    """
    mask = np.asarray(mask, dtype=bool)
    square = np.ones((3, 3), dtype=bool)  # 8-connected: diagonal edges get the same width
    inner, outer = (thickness + 1) // 2, thickness // 2
    band = mask & ~ndimage.binary_erosion(mask, square, iterations=inner, border_value=1)
    if outer:
        band |= ndimage.binary_dilation(mask, square, iterations=outer) & ~mask
    return band


def draw_contour(image: Any, mask: Any, color: Color, thickness: int = 2) -> np.ndarray:
    """Draw the outline of a binary mask onto a copy of `image`; returns (H, W, 3) uint8."""
    if isinstance(thickness, bool) or not isinstance(thickness, int) or thickness < 1:
        raise param_error("draw_contour", "thickness", "an int in [1, inf)", thickness)
    out = _as_image(image).copy()
    out[contour_band(_as_mask(mask, out.shape[:2]), thickness)] = color
    return out


# --------------------------------------------------------------------------- text
@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable since Pillow 10.1 (needs FreeType)
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


def _fit_text(font: Any, text: str, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits in `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..." if text else ""


class _Canvas:
    """A PIL canvas with the few drawing moves the layouts need."""

    def __init__(self, width: int, height: int, font_size: int):
        self.image = Image.new("RGB", (width, height), _BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.font = _font(font_size)
        left, top, right, bottom = self.font.getbbox("Hg")  # fixed reference: lines don't jump
        self._text_mid = (top + bottom) / 2

    def paste(self, array: np.ndarray, x: int, y: int) -> None:
        self.image.paste(Image.fromarray(array), (x, y))

    def text(self, x: float, y_mid: float, text: str, color: Color, align: str = "left", boxed: bool = False) -> float:
        """Draw one line vertically centred on y_mid; returns its width. `boxed` puts it on a dark pill."""
        width = self.font.getlength(text)
        x0 = {"left": x, "center": x - width / 2, "right": x - width}[align]
        if boxed:  # keeps the words readable over a busy picture
            r = self.font.size / 2 if hasattr(self.font, "size") else 6
            box = (x0 - r, y_mid - 1.2 * r, x0 + width + r, y_mid + 1.2 * r)
            self.draw.rounded_rectangle(box, radius=r, fill=_BACKGROUND)
        self.draw.text((round(x0), round(y_mid - self._text_mid)), text, fill=color, font=self.font)
        return width

    def verdict(self, x_right: float, y_mid: float, score: float | None, decision: bool | None) -> float:
        """Right-aligned 'score 0.734  DEFECT'; returns the width used."""
        used = 0.0
        if decision is not None:
            word = "DEFECT" if decision else "OK"
            used += self.text(x_right, y_mid, word, _DEFECT if decision else _OK, align="right")
        if score is not None:
            gap = self.font.getlength("  ") if used else 0.0
            used += gap + self.text(x_right - used - gap, y_mid, f"score {score:.3f}", _TEXT, align="right")
        return used

    def array(self) -> np.ndarray:
        return np.asarray(self.image)


# --------------------------------------------------------------------------- layouts
def render(
    image: Any,
    norm_map: Any,
    pred_mask: Any = None,
    gt_mask: Any = None,
    score: Any = None,
    label: Any = None,
    mode: Literal["full", "simple"] = "full",
    title: str | None = None,
) -> np.ndarray:
    """Draw one prediction as a picture; returns (H', W', 3) uint8.

    norm_map is the normalised anomaly map (threshold at 0.5); pred_mask defaults to norm_map >= 0.5.
    score is the normalised image score; label the predicted decision (true = defect), which
    defaults to score >= 0.5. "full" is one row of panels: Image | Ground truth | Heat map |
    Prediction, under a header with the title, score and decision. "simple" is the overlay with the
    predicted (red) and ground-truth (green) contours under a one-line caption. Images smaller than
    MIN_PANEL pixels are enlarged so that the text stays readable.
    """
    if mode not in ("full", "simple"):
        raise param_error("render", "mode", "one of 'full', 'simple'", mode)
    img = _enlarge(_as_image(image))
    shape = img.shape[:2]
    values = _fit(_as_plane(norm_map, "norm_map"), shape)
    pred = values >= THRESHOLD if pred_mask is None else _as_mask(pred_mask, shape)
    gt = None if gt_mask is None else _as_mask(gt_mask, shape)
    score = None if score is None else _as_scalar(score)
    if label is not None:
        decision: bool | None = bool(_as_scalar(label))
    else:
        decision = None if score is None else score >= THRESHOLD

    h, w = shape
    font_size = int(np.clip(round(w / 16), 12, 28))
    thickness = max(2, w // 128)
    blend = overlay(img, values)
    if mode == "simple":
        picture = blend if gt is None else draw_contour(blend, gt, GT_COLOR, thickness)
        return _simple(draw_contour(picture, pred, PRED_COLOR, thickness), title, score, decision, font_size)

    if gt is not None:
        truth = draw_contour(img, gt, GT_COLOR, thickness)
    else:
        truth = (img * 0.3 + np.array(_BACKGROUND) * 0.7).astype(np.uint8)  # dimmed: nothing to show
    panels = {
        "Image": img,
        "Ground truth": truth,
        "Heat map": heatmap(values),
        "Prediction": draw_contour(blend, pred, PRED_COLOR, thickness),
    }
    return _full(panels, gt is None, title, score, decision, font_size)


def _enlarge(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    if max(h, w) >= MIN_PANEL:
        return img
    scale = MIN_PANEL / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))


def _simple(picture: np.ndarray, title: str | None, score: float | None, decision: bool | None, fs: int) -> np.ndarray:
    if title is None and score is None and decision is None:
        return picture
    h, w = picture.shape[:2]
    pad = fs // 2
    strip = fs + 2 * pad
    canvas = _Canvas(w, strip + h, fs)
    used = canvas.verdict(w - pad, strip / 2, score, decision)
    if title:
        room = w - 2 * pad - used - (fs if used else 0)
        canvas.text(pad, strip / 2, _fit_text(canvas.font, title, int(room)), _TEXT)
    canvas.paste(picture, 0, strip)
    return canvas.array()


def _full(
    panels: dict[str, np.ndarray],
    no_gt: bool,
    title: str | None,
    score: float | None,
    decision: bool | None,
    fs: int,
) -> np.ndarray:
    h, w = next(iter(panels.values())).shape[:2]
    pad, gap = fs // 2, max(4, fs // 2)
    header = fs + 2 * pad
    caption = fs + pad
    bar = max(6, fs // 2)
    footer = pad + bar + pad + fs + pad  # colour bar, then its tick labels
    width = len(panels) * (w + gap) + gap
    canvas = _Canvas(width, header + caption + h + footer, fs)

    used = canvas.verdict(width - gap, header / 2, score, decision)
    if title:
        room = width - 2 * gap - used - (fs if used else 0)
        canvas.text(gap, header / 2, _fit_text(canvas.font, title, int(room)), _TEXT)

    top = header + caption
    for i, (name, panel) in enumerate(panels.items()):
        x = gap + i * (w + gap)
        canvas.text(x + w / 2, header + caption / 2, _fit_text(canvas.font, name, w), _MUTED, align="center")
        canvas.paste(panel, x, top)
        if name == "Ground truth" and no_gt:
            canvas.text(x + w / 2, top + h / 2, "no mask", _TEXT, align="center", boxed=True)
        if name == "Heat map":
            _colour_bar(canvas, x, top + h + pad, w, bar, fs)
    return canvas.array()


def _colour_bar(canvas: _Canvas, x: int, y: int, w: int, height: int, fs: int) -> None:
    """The fixed 0..1 scale under the heat map, with the threshold marked at 0.5."""
    canvas.paste(heatmap(np.tile(np.linspace(0.0, 1.0, w, dtype=np.float32), (height, 1))), x, y)
    mid = x + w // 2
    canvas.draw.line([(mid, y - 2), (mid, y + height + 1)], fill=_TEXT, width=1)
    label_y = y + height + fs // 2 + fs / 2
    canvas.text(x, label_y, "0", _MUTED)
    canvas.text(mid, label_y, "0.5 threshold", _MUTED, align="center")
    canvas.text(x + w, label_y, "1", _MUTED, align="right")


# --------------------------------------------------------------------------- output
def save_image(array: Any, path: str | Path) -> Path:
    """Write an image (array or tensor) to `path`, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_as_image(array)).save(path)
    return path


def _interactive_backend(backend: str) -> bool:
    try:  # matplotlib >= 3.9 keeps one registry of backends
        from matplotlib.backends import BackendFilter, backend_registry

        return backend.lower() in backend_registry.list_builtin(BackendFilter.INTERACTIVE) or backend.startswith(
            "module://"
        )
    except ImportError:
        from matplotlib import rcsetup

        return backend in rcsetup.interactive_bk or backend.startswith("module://")


def show_image(array: Any, title: str | None = None) -> bool:
    """Show an image in a matplotlib window; returns False (and shows nothing) without a display."""
    import matplotlib.pyplot as plt  # lazy: only users who ask for a window pay for pyplot

    if not _interactive_backend(plt.get_backend()):  # headless (Agg etc.): show() would only warn
        return False
    img = _as_image(array)
    h, w = img.shape[:2]
    fig = plt.figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(img)
    ax.set_axis_off()
    if title and fig.canvas.manager is not None:
        fig.canvas.manager.set_window_title(title)
    plt.show()
    plt.close(fig)
    return True
