"""The built-in demo dataset: real texture photographs with synthetic defects and exact masks.

Good images are varied crops of scikit-image's CC0 texture photos (brick, grass, gravel), plus one
aligned object category ("flange": a turned metal flange with six bolt holes, lying on a belt) where
position matters. Defects are drawn on top: scratches, branching cracks, Perlin-noise stains,
holes with a rim, foreign-texture patches and colour shifts; for the flange also missing or
misplaced holes and chipped rims. Every defect's mask holds every pixel that differs from the
defect-free image (by construction: pixels outside the mask are copied back byte for byte), so
pixel metrics on this set are exact. The layout is MVTec AD's, so `mvtec_records` reads it.

Everything is seeded per image: the same arguments give byte-identical files.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_fill_holes, gaussian_filter, map_coordinates
from scipy.spatial import cKDTree

from ..errors import DataError
from ..progress import track

DEMO_CATEGORIES = ("brick", "grass", "gravel", "flange")
DEMO_VERSION = 2  # bump when the generator changes, so cached demo sets are rebuilt
MASK_TOLERANCE = 4  # grey levels; a pixel changed by more than this always lies inside the mask
_MARKER = ".anomalens-demo.json"
_NOISE = 1.5  # sensor noise (grey levels), identical in a defect image and its defect-free twin
_CROP = 0.45  # crop side as a share of the 512 px source photo
_FOOTPRINT = 0.5  # a defect's shape at half opacity or more is annotated even where it barely shows

_TEXTURE_DEFECTS = ("color", "crack", "foreign", "hole", "scratch", "stain")
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "brick": _TEXTURE_DEFECTS,
    "grass": _TEXTURE_DEFECTS,
    "gravel": _TEXTURE_DEFECTS,
    "flange": ("chip", "misplaced_hole", "missing_hole", "scratch", "stain"),
}
_TINT = {"brick": (1.18, 0.86, 0.68), "grass": (0.80, 1.08, 0.58), "gravel": (1.03, 1.0, 0.92)}
_FOREIGN = {"brick": "gravel", "grass": "gravel", "gravel": "brick"}  # what a foreign patch is made of

_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


# --------------------------------------------------------------------------- noise and shapes
def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def _lerp_weights(n: int, cell: float, offset: float, lattice: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the faded interpolation weight of its two lattice neighbours, and that weight times the
    pixel's offset from each neighbour (the gradient dot product needs it)."""
    coord = np.arange(n) / cell + offset
    i0 = coord.astype(int)
    f = coord - i0
    u = _fade(f)
    rows = np.arange(n)
    weight, weighted_offset = np.zeros((n, lattice)), np.zeros((n, lattice))
    weight[rows, i0], weight[rows, i0 + 1] = 1 - u, u
    weighted_offset[rows, i0], weighted_offset[rows, i0 + 1] = (1 - u) * f, u * (f - 1)
    return weight, weighted_offset


def perlin(shape: tuple[int, int], cell: float, rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise of `shape` with lattice spacing `cell` px; values roughly in [-1, 1].

    Bilinear blending of the four corner dot products factorises into rows times columns, so the
    whole field is two chains of small matrix products instead of per-pixel gathers.
    """
    h, w = shape
    ny, nx = int(h / cell) + 3, int(w / cell) + 3  # +1 for the random offset, +1 for the far corner
    angles = rng.uniform(0, 2 * np.pi, (ny, nx))
    wy, oy = _lerp_weights(h, cell, rng.uniform(0, 1), ny)
    wx, ox = _lerp_weights(w, cell, rng.uniform(0, 1), nx)
    # sum over corners of wy * wx * (grad_y * offset_y + grad_x * offset_x). einsum rather than `@`:
    # these products are tiny, and threaded BLAS on a busy machine makes them 100x slower.
    rows = np.einsum("ik,lk->il", np.einsum("ij,jk->ik", oy, np.sin(angles)), wx)
    cols = np.einsum("ik,lk->il", np.einsum("ij,jk->ik", wy, np.cos(angles)), ox)
    return (rows + cols) * np.sqrt(2)


def fractal_noise(shape: tuple[int, int], cell: float, rng: np.random.Generator, octaves: int = 3) -> np.ndarray:
    """Sum of Perlin octaves (each half the cell size and amplitude), normalised to about [-1, 1]."""
    total, norm = np.zeros(shape), 0.0
    for k in range(octaves):
        total += 0.5**k * perlin(shape, max(cell / 2**k, 1.5), rng)
        norm += 0.5**k
    return total / norm


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    return yy.astype(np.float64), xx.astype(np.float64)


def _disc(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Antialiased disc coverage (1 px soft edge)."""
    return np.clip(r - np.hypot(yy - cy, xx - cx) + 0.5, 0.0, 1.0)


def _window(shape: tuple[int, ...], cy: float, cx: float, reach: float) -> tuple[slice, slice]:
    """The part of an image within `reach` px of a point: small features only touch their window."""
    return (slice(max(int(cy - reach), 0), max(min(int(cy + reach) + 2, shape[0]), 0)),
            slice(max(int(cx - reach), 0), max(min(int(cx + reach) + 2, shape[1]), 0)))


def _area_share(rng: np.random.Generator, lo: float = 0.008, hi: float = 0.1) -> float:
    """Defect area as a share of the image, log-uniform: many small defects, some large."""
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _blob(size: int, centre: tuple[float, float], area: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular Perlin-shaped blob of about `area` (share of the image), soft-edged alpha in [0, 1]."""
    r = np.sqrt(area * size * size / np.pi)
    aspect, theta = rng.uniform(0.6, 1.6), rng.uniform(0, np.pi)
    alpha = np.zeros((size, size))
    # |noise| <= 1 keeps the blob within 1.4 radii of its (at most 1.27x stretched) ellipse
    win = _window(alpha.shape, centre[0], centre[1], 1.8 * r + 2)
    yy, xx = np.mgrid[win]
    dy, dx = yy - centre[0], xx - centre[1]
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / (r * np.sqrt(aspect))
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) * np.sqrt(aspect) / r
    field = 1 - np.hypot(u, v) + 0.4 * fractal_noise(yy.shape, max(r * 0.9, 2.0), rng)
    alpha[win] = _smoothstep(field, 0.0, 0.2)
    return alpha


def _stroke(size: int, points: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    """Antialiased alpha of a thick polyline given as dense (y, x) points with a half-width each."""
    alpha = np.zeros((size, size))
    reach = float(half_width.max()) + 1.5
    lo = np.maximum(np.floor(points.min(axis=0) - reach), 0).astype(int)
    hi = np.minimum(np.ceil(points.max(axis=0) + reach) + 1, size).astype(int)
    if np.any(hi <= lo):
        return alpha
    yy, xx = np.mgrid[lo[0]:hi[0], lo[1]:hi[1]]
    dist, idx = cKDTree(points).query(np.stack([yy.ravel(), xx.ravel()], axis=1), distance_upper_bound=reach)
    near = np.isfinite(dist)
    values = np.zeros(dist.shape)
    values[near] = np.clip(half_width[idx[near]] + 0.5 - dist[near], 0.0, 1.0)
    alpha[lo[0]:hi[0], lo[1]:hi[1]] = values.reshape(yy.shape)
    return alpha


def _densify(vertices: np.ndarray, step: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Points every `step` px along a polyline, and each point's position along it in [0, 1]."""
    seg = np.linalg.norm(np.diff(vertices, axis=0), axis=1)
    along = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, along[-1], max(int(along[-1] / step), 2))
    pts = np.stack([np.interp(t, along, vertices[:, 0]), np.interp(t, along, vertices[:, 1])], axis=1)
    return pts, t / max(along[-1], 1e-9)


# --------------------------------------------------------------------------- good images
@lru_cache(maxsize=16)
def _source(name: str, size: int) -> np.ndarray:
    """The grey source photo, pre-blurred so that squeezing a crop to `size` px does not alias."""
    from skimage import data  # lazy: only the demo builder needs scikit-image

    img = getattr(data, name)().astype(np.float64)
    factor = _CROP * img.shape[0] / size
    if factor > 1:
        img = gaussian_filter(img, 0.5 * np.sqrt(factor**2 - 1))
    img.setflags(write=False)
    return img


def _texture(name: str, size: int, rng: np.random.Generator, max_angle: float = 6.0) -> np.ndarray:
    """A tinted crop of a texture photo at a random place, scale, small rotation and flip; float RGB."""
    src = _source(name, size)
    n = src.shape[0]
    crop = _CROP * n * rng.uniform(0.9, 1.1)
    angle = np.deg2rad(rng.uniform(-max_angle, max_angle))
    c, s = np.cos(angle), np.sin(angle)
    half = crop / 2 * (abs(c) + abs(s))
    cy, cx = rng.uniform(half, n - 1 - half, size=2)
    t = (np.arange(size) + 0.5) / size - 0.5
    v, u = np.meshgrid(t, t, indexing="ij")
    u = -u if rng.random() < 0.5 else u
    v = -v if rng.random() < 0.5 else v
    grey = map_coordinates(src, [cy + crop * (c * v + s * u), cx + crop * (c * u - s * v)], order=1, mode="nearest")
    mean = grey.mean()
    grey = (grey - mean) * rng.uniform(0.9, 1.1) + mean * rng.uniform(0.93, 1.07)  # contrast, brightness
    tint = np.array(_TINT[name]) * rng.uniform(0.98, 1.02, 3)  # white balance drifts a little
    return grey[..., None] * tint


@dataclass(frozen=True)
class _Flange:
    """Geometry of one flange in pixels; the defect-free and defective renders differ only here."""

    cy: float
    cx: float
    radius: float
    bore: float
    hole: float
    holes: tuple[tuple[float, float], ...]
    notches: tuple[tuple[float, float, float], ...] = ()
    chamfer: float = 2.0


@dataclass
class _Scene:
    """A defect-free image (float RGB) and what a defect generator needs to know about it."""

    category: str
    image: np.ndarray
    region: np.ndarray  # where defects may go (alpha): everywhere for textures, the metal for the flange
    flange: _Flange | None = None
    render: Callable[[_Flange], np.ndarray] | None = None


def _flange_scene(size: int, rng: np.random.Generator) -> _Scene:
    s = float(size)
    cy, cx = s / 2 + rng.uniform(-0.015, 0.015, 2) * s
    theta = np.deg2rad(rng.uniform(-4, 4))
    pitch = 0.29 * s
    holes = tuple((cy + pitch * np.sin(theta + k * np.pi / 3), cx + pitch * np.cos(theta + k * np.pi / 3))
                  for k in range(6))
    geometry = _Flange(cy, cx, 0.42 * s, 0.14 * s, 0.045 * s, holes, chamfer=max(0.022 * s, 1.2))

    belt = _texture("gravel", size, rng) * np.array([0.36, 0.38, 0.42])  # dark, bluish conveyor belt
    yy, xx = _grid(size)
    r = np.hypot(yy - cy, xx - cx)
    # Turned finish: fine concentric rings that differ from part to part, plus soft mottling.
    n_rings = max(int(s / 1.5), 8)
    rings = np.interp(r, np.linspace(0, s, n_rings), rng.normal(0, 1, n_rings))
    light = np.array([-0.6, -0.8])  # (y, x): light from the top left
    gradient = ((yy - cy) * light[0] + (xx - cx) * light[1]) / geometry.radius  # brighter towards the light
    metal_grey = (rng.uniform(150, 170) + 5 * rings + 6 * fractal_noise((size, size), s / 4, rng) + 14 * gradient)
    # A soft shadow of the outer disc only, so that chips and holes never change pixels beyond themselves.
    shade = 1 - 0.55 * (1 - _smoothstep(np.hypot(yy - cy - 0.02 * s, xx - cx - 0.02 * s),
                                       geometry.radius - 0.03 * s, geometry.radius + 0.03 * s))
    floor = belt * shade[..., None]
    tint = np.array([1.0, 0.99, 0.96])

    def render(g: _Flange) -> np.ndarray:
        return _render_flange(g, yy, xx, metal_grey, floor, tint, light)

    return _Scene("flange", render(geometry), _flange_alpha(geometry, yy, xx), geometry, render)


def _flange_alpha(g: _Flange, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    alpha = _disc(yy, xx, g.cy, g.cx, g.radius) * (1 - _disc(yy, xx, g.cy, g.cx, g.bore))
    for hy, hx, hr in [(hy, hx, g.hole) for hy, hx in g.holes] + list(g.notches):
        win = _window(alpha.shape, hy, hx, hr + 2)
        alpha[win] *= 1 - _disc(yy[win], xx[win], hy, hx, hr)
    return alpha


def _render_flange(g: _Flange, yy: np.ndarray, xx: np.ndarray, metal_grey: np.ndarray, floor: np.ndarray,
                   tint: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Composite the metal part over the belt; chamfers on every edge catch the light by their slope."""
    metal = metal_grey.copy()

    def chamfer(cy: float, cx: float, radius: float, outward: float, strength: float = 45.0) -> None:
        # outward=+1 for the part's outer edge, -1 for edges of openings (their material faces inward)
        win = _window(metal.shape, cy, cx, radius + g.chamfer + 2)
        dy, dx = yy[win] - cy, xx[win] - cx
        r = np.maximum(np.hypot(dy, dx), 1e-6)
        band = np.clip(1 - outward * (radius - r) / g.chamfer, 0, 1) * (outward * (radius - r) > -0.5)
        slope = outward * (dy * light[0] + dx * light[1]) / r
        metal[win] += strength * band * slope

    chamfer(g.cy, g.cx, g.radius, +1)
    chamfer(g.cy, g.cx, g.bore, -1)
    for hy, hx in g.holes:
        chamfer(hy, hx, g.hole, -1)
    for ny, nx, nr in g.notches:
        chamfer(ny, nx, nr, -1, strength=60.0)  # a fresh break is rougher and brighter than a chamfer
    alpha = _flange_alpha(g, yy, xx)[..., None]
    return floor * (1 - alpha) + metal[..., None] * tint * alpha


def _good_scene(category: str, size: int, rng: np.random.Generator) -> _Scene:
    if category == "flange":
        return _flange_scene(size, rng)
    return _Scene(category, _texture(category, size, rng), np.ones((size, size)))


# --------------------------------------------------------------------------- defects
# Each generator returns (defective float RGB image, footprint alpha). The footprint is the defect's
# designed shape; the mask is its >= 0.5 part plus every pixel that changed by more than the tolerance.
DefectResult = tuple[np.ndarray, np.ndarray]


def _point_in(scene: _Scene, rng: np.random.Generator, margin: float = 0.12) -> tuple[float, float]:
    """A random pixel well inside the image where the scene allows defects."""
    size = scene.region.shape[0]
    m = int(margin * size)
    inner = np.zeros_like(scene.region, dtype=bool)
    inner[m:size - m, m:size - m] = scene.region[m:size - m, m:size - m] > 0.99
    ys, xs = np.nonzero(inner)
    k = rng.integers(len(ys))
    return float(ys[k]), float(xs[k])


def _blend(image: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return image * (1 - alpha[..., None]) + target * alpha[..., None]


def _line_width(size: int, rng: np.random.Generator, lo: float, hi: float) -> float:
    return max(rng.uniform(lo, hi) * size / 256, 0.7)


def _scratch(scene: _Scene, rng: np.random.Generator) -> DefectResult:
    """A thin, gently curved line that tapers at both ends; usually brighter (bare material)."""
    size = scene.region.shape[0]
    length = rng.uniform(0.15, 0.5) * size
    t = np.linspace(0, 1, 64)
    heading = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.8, 0.8) * (t - 0.5) + 0.05 * np.sin(9 * t)
    steps = np.stack([np.sin(heading), np.cos(heading)], axis=1) * length / len(t)
    vertices = np.array(_point_in(scene, rng)) + np.cumsum(steps, axis=0) - steps.sum(axis=0) / 2
    pts, along = _densify(vertices)
    # >= ~1.5 px wide at 256 px: thinner lines vanish into fine textures (grass) and become label noise.
    half = _line_width(size, rng, 1.6, 3.2) / 2 * np.sin(np.pi * np.clip(along, 0.02, 0.98)) ** 0.4
    alpha = _stroke(size, pts, half) * (scene.region > 0.99)
    img = scene.image
    target = img * 0.45 + rng.uniform(120, 140) if rng.random() < 0.75 else img * rng.uniform(0.3, 0.5)
    return _blend(img, target, alpha * rng.uniform(0.85, 1.0)), alpha


def _crack(scene: _Scene, rng: np.random.Generator) -> DefectResult:
    """A dark branching random walk, widest at its origin and thinning out along every branch."""
    size = scene.region.shape[0]
    width = _line_width(size, rng, 1.6, 3.0)
    total = rng.uniform(0.25, 0.5) * size
    todo = [(np.array(_point_in(scene, rng, 0.2)), rng.uniform(0, 2 * np.pi), total, width)]
    alpha = np.zeros((size, size))
    while todo:
        start, heading, length, w = todo.pop()
        pos, turn, vertices = start.copy(), 0.0, [start.copy()]
        for _ in range(max(int(length), 2)):
            turn = 0.6 * turn + rng.normal(0, 0.25)  # some persistence: cracks wander, they don't jitter
            heading += turn
            pos = pos + np.array([np.sin(heading), np.cos(heading)])
            vertices.append(pos.copy())
            if length > 0.15 * total and rng.random() < 2.5 / total:
                side = rng.choice([-1.0, 1.0])
                todo.append((pos.copy(), heading + side * rng.uniform(0.4, 1.0), length * rng.uniform(0.3, 0.6),
                             w * 0.7))
        pts, along = _densify(np.array(vertices))
        alpha = np.maximum(alpha, _stroke(size, pts, np.maximum(w / 2 * (1 - 0.6 * along), 0.35)))
    alpha *= scene.region > 0.99
    return _blend(scene.image, scene.image * rng.uniform(0.18, 0.35), alpha), alpha


def _stain(scene: _Scene, rng: np.random.Generator) -> DefectResult:
    """A Perlin-shaped stain of uneven density: dark oil/rust most often, sometimes a pale deposit."""
    size = scene.region.shape[0]
    # At least ~1.5 % of the image: smaller, faint stains are invisible on busy textures.
    shape = _blob(size, _point_in(scene, rng), _area_share(rng, 0.015, 0.1), rng) * scene.region
    density = rng.uniform(0.75, 0.95) * (0.75 + 0.25 * fractal_noise((size, size), size / 12, rng))
    img = scene.image
    if rng.random() < 0.7:
        target = img * rng.uniform(0.35, 0.55) * np.array([1.0, 0.86, 0.66])
    else:
        target = img * 0.5 + np.array([215.0, 210.0, 195.0]) * 0.5
    return _blend(img, target, shape * density), shape


def _hole(scene: _Scene, rng: np.random.Generator) -> DefectResult:
    """A dark, slightly irregular elliptical pit with a raised, lighter rim."""
    size = scene.region.shape[0]
    area = _area_share(rng, 0.003, 0.03)
    r = np.sqrt(area * size * size / np.pi)
    aspect, theta = rng.uniform(0.7, 1.4), rng.uniform(0, np.pi)
    cy, cx = _point_in(scene, rng)
    rim_w = max(0.2 * r, 1.0)
    win = _window(scene.region.shape, cy, cx, 1.4 * r + rim_w + 3)
    yy, xx = np.mgrid[win]
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / np.sqrt(aspect)
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) * np.sqrt(aspect)
    edge = np.hypot(u, v) - r * (1 + 0.12 * fractal_noise(yy.shape, max(r / 2, 2.0), rng))  # px outside the pit
    inside, rim = np.zeros((size, size)), np.zeros((size, size))
    inside[win] = np.clip(0.5 - edge, 0, 1)
    rim[win] = np.clip(1 - np.abs(edge - rim_w / 2) / (rim_w / 2 + 0.5), 0, 1) * (1 - inside[win])
    depth = np.full((size, size, 1), 0.1)
    depth[win] += 0.08 * np.clip((dy * 0.6 + dx * 0.8) / r, -1, 1)[..., None]  # the wall facing the light
    img = scene.image
    out = _blend(img, img * 1.2 + 25, rim * 0.8)
    out = _blend(out, img * depth + 6, inside)
    return out, np.maximum(inside, rim)


def _foreign(scene: _Scene, rng: np.random.Generator) -> DefectResult:
    """A patch of another material (another texture photo), blended in through a Perlin-shaped mask."""
    size = scene.region.shape[0]
    img = scene.image
    patch = _texture(_FOREIGN[scene.category], size, rng)
    patch *= img.mean() / max(patch.mean(), 1.0) * rng.uniform(0.8, 1.2)  # not glaringly brighter/darker
    shape = _blob(size, _point_in(scene, rng), _area_share(rng), rng)
    return _blend(img, patch, shape), shape


def _color(scene: _Scene, rng: np.random.Generator) -> DefectResult:
    """A region whose hue drifts (discolouration) while its brightness and texture stay."""
    size = scene.region.shape[0]
    img = scene.image
    shape = _blob(size, _point_in(scene, rng), _area_share(rng), rng)
    yiq = img @ _RGB2YIQ.T
    angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(14, 26)
    scale = np.clip(yiq[..., 0] / 128, 0.4, 1.5)  # shift chroma in proportion to brightness
    yiq[..., 1] += strength * np.cos(angle) * scale
    yiq[..., 2] += strength * np.sin(angle) * scale
    return _blend(img, yiq @ _YIQ2RGB.T, shape), shape


def _missing_hole(scene: _Scene, rng: np.random.Generator) -> DefectResult:
    g = scene.flange
    k = int(rng.integers(len(g.holes)))
    broken = replace(g, holes=g.holes[:k] + g.holes[k + 1:])
    yy, xx = _grid(scene.region.shape[0])
    return scene.render(broken), _disc(yy, xx, *g.holes[k], g.hole + g.chamfer)


def _misplaced_hole(scene: _Scene, rng: np.random.Generator) -> DefectResult:
    g = scene.flange
    k = int(rng.integers(len(g.holes)))
    hy, hx = g.holes[k]
    keep_clear = g.hole + g.chamfer + 2
    for _ in range(100):  # stay on the metal ring, away from the bore and the outer edge
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.9, 1.6) * g.hole
        ny, nx = hy + dist * np.sin(angle), hx + dist * np.cos(angle)
        if g.bore + keep_clear <= np.hypot(ny - g.cy, nx - g.cx) <= g.radius - keep_clear:
            break
    holes = list(g.holes)
    holes[k] = (ny, nx)
    yy, xx = _grid(scene.region.shape[0])
    footprint = np.maximum(_disc(yy, xx, hy, hx, g.hole + g.chamfer), _disc(yy, xx, ny, nx, g.hole + g.chamfer))
    return scene.render(replace(g, holes=tuple(holes))), footprint


def _chip(scene: _Scene, rng: np.random.Generator) -> DefectResult:
    g = scene.flange
    nr = rng.uniform(0.025, 0.06) * scene.region.shape[0]
    angle = rng.uniform(0, 2 * np.pi)
    dist = g.radius + rng.uniform(-0.1, 0.45) * nr
    notch = (g.cy + dist * np.sin(angle), g.cx + dist * np.cos(angle), nr)
    yy, xx = _grid(scene.region.shape[0])
    footprint = _disc(yy, xx, notch[0], notch[1], nr + g.chamfer) * _disc(yy, xx, g.cy, g.cx, g.radius)
    return scene.render(replace(g, notches=(notch,))), footprint


_DEFECTS: dict[str, Callable[[_Scene, np.random.Generator], DefectResult]] = {
    "chip": _chip, "color": _color, "crack": _crack, "foreign": _foreign, "hole": _hole,
    "misplaced_hole": _misplaced_hole, "missing_hole": _missing_hole, "scratch": _scratch, "stain": _stain,
}


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_defect(category: str, defect_type: str, size: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(defect-free uint8 RGB, defective uint8 RGB, bool mask) for one defect image.

    Pixels outside the mask are identical in both images; the defect is redrawn until it is visible.
    """
    min_changed = max(4, int(0.0008 * size * size))
    for _ in range(50):
        scene = _good_scene(category, size, rng)
        broken, footprint = _DEFECTS[defect_type](scene, rng)
        noise = _NOISE * rng.standard_normal(scene.image.shape, dtype=np.float32)
        good, bad = _to_uint8(scene.image + noise), _to_uint8(broken + noise)
        changed = np.abs(bad.astype(np.int16) - good).max(axis=2) > MASK_TOLERANCE
        mask = (footprint >= _FOOTPRINT) | changed
        ys, xs = np.nonzero(mask)
        if len(ys):  # fill enclosed gaps (an annotator would), working on the defect's bounding box only
            box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
            mask[box] = binary_fill_holes(mask[box])
        bad[~mask] = good[~mask]
        if changed.sum() >= min_changed and mask.mean() < 0.3:
            return good, bad, mask
    raise RuntimeError(f"could not draw a visible {defect_type!r} defect on {category!r}")  # pragma: no cover


def render_good(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One defect-free uint8 RGB image of `category`."""
    scene = _good_scene(category, size, rng)
    return _to_uint8(scene.image + _NOISE * rng.standard_normal(scene.image.shape, dtype=np.float32))


# --------------------------------------------------------------------------- writing the dataset
def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """An independent stream per image, so changing one count never changes other images."""
    words = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng([seed, *words])


def _spread(total: int, kinds: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(total, len(kinds))
    return {kind: base + (i < extra) for i, kind in enumerate(kinds)}


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)  # 5x faster than 6, files 15% larger


def _params(categories: Sequence[str], image_size: int, n_train: int, n_test_good: int, n_test_defect: int,
            seed: int) -> dict:
    return {"version": DEMO_VERSION, "categories": list(categories), "image_size": image_size, "n_train": n_train,
            "n_test_good": n_test_good, "n_test_defect": n_test_defect, "seed": seed}


def make_demo_dataset(
    out_dir: str | Path,
    categories: Sequence[str] | None = None,
    image_size: int = 256,
    n_train: int = 100,
    n_test_good: int = 30,
    n_test_defect: int = 60,
    seed: int = 0,
) -> Path:
    """Write the demo dataset in MVTec AD layout under out_dir/<category>/ and return out_dir."""
    categories = list(DEMO_CATEGORIES if categories is None else categories)
    unknown = [c for c in categories if c not in DEMO_CATEGORIES]
    if unknown:
        raise DataError(f"Unknown demo category '{unknown[0]}'. Available: {', '.join(DEMO_CATEGORIES)}.")
    if image_size < 32:
        raise DataError(f"The demo image_size must be at least 32 px. Got {image_size} instead.")
    out = Path(out_dir)
    digits = max(3, len(str(max(n_train, n_test_good, n_test_defect))))
    for category in categories:
        jobs = [("train", "good", i) for i in range(n_train)] + [("test", "good", i) for i in range(n_test_good)]
        for kind, count in _spread(n_test_defect, DEFECT_TYPES[category]).items():
            jobs += [("test", kind, i) for i in range(count)]
        for split, kind, i in track(jobs, f"Demo data: {category}"):
            rng = _rng(seed, category, split, kind, i)
            name = f"{i:0{digits}d}"
            if kind == "good":
                _save(render_good(category, image_size, rng), out / category / split / "good" / f"{name}.png")
                continue
            _, image, mask = render_defect(category, kind, image_size, rng)
            _save(image, out / category / "test" / kind / f"{name}.png")
            _save(mask.astype(np.uint8) * 255, out / category / "ground_truth" / kind / f"{name}_mask.png")
    params = _params(categories, image_size, n_train, n_test_good, n_test_defect, seed)
    (out / _MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
    return out


def default_demo_root() -> Path:
    """$ANOMALENS_CACHE/demo, or ~/.cache/anomalens/demo."""
    cache = os.environ.get("ANOMALENS_CACHE")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache" / "anomalens") / "demo"


def read_marker(root: str | Path) -> dict | None:
    """The build parameters of a complete demo set at `root`, or None when there is none."""
    try:
        return json.loads((Path(root) / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure_demo(
    root: str | Path | None = None,
    image_size: int = 256,
    categories: Sequence[str] | None = None,
    n_train: int = 100,
    n_test_good: int = 30,
    n_test_defect: int = 60,
    seed: int = 0,
) -> Path:
    """Build the demo set at `root` (default: `default_demo_root()`) unless it is already there.

    The build goes to a temporary folder that is renamed into place at the end, so an interrupted
    build never leaves half a dataset behind.
    """
    root = Path(root).expanduser() if root is not None else default_demo_root()
    wanted = _params(list(DEMO_CATEGORIES if categories is None else categories), image_size, n_train,
                     n_test_good, n_test_defect, seed)
    found = read_marker(root)
    if found == wanted:
        return root
    if found is None and root.is_dir() and any(root.iterdir()):
        raise DataError(f"Folder '{root}' is not empty and holds no demo dataset; point the demo root at an empty "
                        f"or new folder.")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        make_demo_dataset(tmp, wanted["categories"], image_size, n_train, n_test_good, n_test_defect, seed)
        if found is not None:  # a demo set built with other parameters: move it aside, then replace it
            stale = tmp.with_name(tmp.name + "-stale")
            root.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(root)  # atomic on one filesystem; an empty root folder is replaced
        except OSError:
            if read_marker(root) != wanted:  # someone else finished the same build first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
