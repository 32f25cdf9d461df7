"""Pixels: shape masks, background textures and the drawing of a scene. Exact numpy masks, no anti-aliasing,
so that a drawing is a pure function of (scene, config, random draws) and identical on every machine."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Callable

import numpy as np

from world import vocab

if TYPE_CHECKING:
    from world.config import WorldConfig
    from world.scene import Scene

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (u, v) in units of the object's radius -> bool


def _polygon(vertices: list[tuple[float, float]]) -> Mask:
    """Even-odd point-in-polygon test, vectorised over pixels (works for the non-convex star too)."""
    vs = np.asarray(vertices, dtype=np.float64)

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        for (x1, y1), (x2, y2) in zip(vs, np.roll(vs, -1, axis=0)):
            if y1 == y2:
                continue
            crosses = (y1 > v) != (y2 > v)
            out ^= crosses & (u < (x2 - x1) * (v - y1) / (y2 - y1) + x1)
        return out

    return inside


def _regular(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return [(radius * np.cos(a), radius * np.sin(a)) for a in angles]


def _star() -> list[tuple[float, float]]:
    outer = _regular(5, 1.0, -np.pi / 2)
    inner = _regular(5, 0.45, -np.pi / 2 + np.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


# Every shape fits the box [-1, 1]^2 (the drawing window) and the areas stay within a factor of ~1.7 of each
# other (triangle 1.9 r^2 .. circle 3.1 r^2), so that size, not shape, decides how big a thing looks.
SHAPE_MASKS: dict[str, Mask] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: (np.abs(u) <= 0.82) & (np.abs(v) <= 0.82),
    "triangle": _polygon([(0.0, -1.0), (1.0, 0.9), (-1.0, 0.9)]),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    "cross": lambda u, v: ((np.abs(u) <= 0.35) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.35) & (np.abs(u) <= 1.0)),
    "star": _polygon(_star()),
    "hexagon": _polygon(_regular(6, 1.0, 0.0)),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.3),
}
assert set(SHAPE_MASKS) == set(vocab.SHAPES), "every vocabulary shape needs a mask"


@lru_cache(maxsize=32)
def background(name: str, size: int) -> np.ndarray:
    """The (size, size, 3) int16 texture of a background; cached because every scene reuses it."""
    y, x = np.mgrid[0:size, 0:size]
    step = max(2, size // 16)
    if name == "grey":
        grey = np.full((size, size), 120)
    elif name == "dark":
        return np.broadcast_to(np.array([28, 28, 36], dtype=np.int16), (size, size, 3)).copy()
    elif name == "striped":
        grey = np.where(((x + y) // step) % 2 == 0, 55, 105)
    elif name == "checkered":
        grey = np.where(((x // (2 * step)) + (y // (2 * step))) % 2 == 0, 70, 115)
    elif name == "dotted":
        grey = np.where((x % (2 * step) < 2) & (y % (2 * step) < 2), 135, 85)
    elif name == "gradient":
        grey = 30 + (120 * y) // max(1, size - 1)
    else:
        raise ValueError(f"unknown background {name!r}; choose from {vocab.BACKGROUNDS}")
    return np.repeat(grey[:, :, None], 3, axis=2).astype(np.int16)


def draw(scene: Scene, cfg: WorldConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render `scene` as uint8 (S, S, 3). With `rng`, all jitter is drawn up front in one fixed order."""
    S, n = cfg.image_size, len(scene.objects)
    cell = S / 3.0
    img = background(scene.background, S).copy()
    scale = np.ones(n)
    offset = np.zeros((n, 2))  # in units of the free room of the cell, in [-1, 1]
    shift = np.zeros((n, 3), dtype=np.int16)
    if rng is not None:
        half = cfg.colour_jitter // 2
        img += np.int16(rng.integers(-half, half + 1))  # brightness of the whole background
        scale += rng.uniform(-cfg.size_jitter, cfg.size_jitter, size=n)
        offset = rng.uniform(-1.0, 1.0, size=(n, 2)) * cfg.position_jitter
        shift = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, size=(n, 3)).astype(np.int16)
    for k, obj in enumerate(scene.objects):
        row, col = vocab.CELL[obj.position]
        diameter = cell * (cfg.large_scale if obj.size == "large" else cfg.small_scale) * scale[k]
        # Keep a 1 px margin inside the cell so that neighbouring objects never touch.
        room = max(0.0, (cell - diameter) / 2 - 1.0)
        cx = (col + 0.5) * cell + room * offset[k, 0]
        cy = (row + 0.5) * cell + room * offset[k, 1]
        r = diameter / 2
        x0, x1 = max(0, int(cx - r) - 1), min(S, int(np.ceil(cx + r)) + 1)
        y0, y1 = max(0, int(cy - r) - 1), min(S, int(np.ceil(cy + r)) + 1)
        u = ((np.arange(x0, x1) + 0.5 - cx) / r)[None, :]  # (1, w): masks broadcast to (h, w)
        v = ((np.arange(y0, y1) + 0.5 - cy) / r)[:, None]  # (h, 1)
        mask = SHAPE_MASKS[obj.shape](u, v)  # (h, w): every mask combines u and v
        img[y0:y1, x0:x1][mask] = np.array(vocab.PIXEL_COLOURS[obj.colour], dtype=np.int16) + shift[k]
    if rng is not None and cfg.pixel_noise > 0:
        img += np.rint(rng.normal(0.0, cfg.pixel_noise, size=img.shape)).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)
