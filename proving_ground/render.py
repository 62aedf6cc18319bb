"""Layout and rasterisation of proving-ground scenes.

* :func:`layout` draws object sizes and positions that satisfy a :class:`PromptSpec`: objects lie
  fully inside the canvas, their bounding squares are separated by a gap, and a relation holds
  unambiguously (the displacement along the relation's axis is in the right direction and at least
  as large as the displacement along the other axis).
* :func:`render` rasterises a :class:`SceneSpec` with ``SUPERSAMPLE`` x ``SUPERSAMPLE`` samples per
  pixel, so edges are antialiased like a downscaled photograph.
* :func:`render_prompt` does both from an integer seed; everything is a pure function of its
  arguments (numpy ``Generator`` seeded from the integer).
"""

from __future__ import annotations

import numpy as np

from .world import (
    BACKGROUND_RGB,
    COLOURS,
    SIZE_NAMES,
    SIZES,
    SQUARE_HALF_SIDE,
    ObjectSpec,
    PromptSpec,
    SceneSpec,
)

SUPERSAMPLE = 4
# Margins in pixels of a 64-pixel canvas; scaled with the resolution.
EDGE_MARGIN_PX = 1.0
GAP_PX = 3.0
_REFERENCE_RESOLUTION = 64
_CANDIDATES = 128
_MAX_BATCHES = 128
_BACKGROUND = np.asarray(BACKGROUND_RGB, dtype=np.float32)
_COLOUR_ARRAYS = {name: np.asarray(rgb, dtype=np.float32) for name, rgb in COLOURS.items()}


def layout(spec: PromptSpec, rng: np.random.Generator, resolution: int = 64) -> SceneSpec:
    """Sample a scene that satisfies ``spec``: one object per requested instance.

    Objects are listed group by group. Sizes are uniform over :data:`SIZES`; positions are drawn by
    vectorised rejection sampling (``_CANDIDATES`` configurations at a time). If no valid
    configuration turns up, sizes are redrawn; ``RuntimeError`` after ``_MAX_BATCHES`` attempts.
    """
    kinds = [(g.colour, g.shape) for g in spec.groups for _ in range(g.count)]
    scale = resolution / _REFERENCE_RESOLUTION
    edge = EDGE_MARGIN_PX * scale / resolution
    gap = GAP_PX * scale / resolution
    for _ in range(_MAX_BATCHES):
        sizes = [SIZE_NAMES[i] for i in rng.integers(len(SIZE_NAMES), size=len(kinds))]
        radii = np.array([SIZES[s] for s in sizes])
        lo = radii + edge
        lo3 = lo[None, :, None]
        centres = lo3 + rng.random((_CANDIDATES, len(kinds), 2)) * (1.0 - 2.0 * lo3)
        ok = _separated(centres, radii, gap)
        if spec.relation is not None:
            ok &= _relation_holds(centres[:, 0], centres[:, 1], spec.relation)
        hits = np.flatnonzero(ok)
        if hits.size:
            chosen = centres[hits[0]]
            objects = tuple(
                ObjectSpec(shape, colour, size, float(x), float(y))
                for (colour, shape), size, (x, y) in zip(kinds, sizes, chosen)
            )
            return SceneSpec(objects, resolution)
    raise RuntimeError(f"could not lay out {spec.caption!r}")


def _separated(centres: np.ndarray, radii: np.ndarray, gap: float) -> np.ndarray:
    """For candidate centres (K, N, 2): whether all bounding squares are ``gap`` apart."""
    n = centres.shape[1]
    ok = np.ones(centres.shape[0], dtype=bool)
    for i in range(n):
        for j in range(i + 1, n):
            d = np.abs(centres[:, i] - centres[:, j])
            need = radii[i] + radii[j] + gap
            ok &= (d[:, 0] >= need) | (d[:, 1] >= need)
    return ok


def _relation_holds(a: np.ndarray, b: np.ndarray, relation: str) -> np.ndarray:
    """Unambiguous relation between centres ``a`` and ``b`` (..., 2): dominant axis, right sign."""
    dx = b[..., 0] - a[..., 0]
    dy = b[..., 1] - a[..., 1]
    if relation == "left of":
        return dx >= np.abs(dy)
    if relation == "right of":
        return -dx >= np.abs(dy)
    if relation == "above":
        return dy >= np.abs(dx)
    if relation == "below":
        return -dy >= np.abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def coverage(obj: ObjectSpec, resolution: int) -> tuple[slice, slice, np.ndarray]:
    """Fraction of each pixel covered by ``obj``, over the pixel window that contains it.

    Returns ``(rows, cols, alpha)`` with ``alpha`` of shape ``(len(rows), len(cols))`` in [0, 1].
    Pixel ``(i, j)`` spans ``[j, j+1) x [i, i+1)`` in canvas pixel units.
    """
    cx, cy, r = obj.x * resolution, obj.y * resolution, obj.radius * resolution
    x0, x1 = max(int(np.floor(cx - r)) - 1, 0), min(int(np.ceil(cx + r)) + 1, resolution)
    y0, y1 = max(int(np.floor(cy - r)) - 1, 0), min(int(np.ceil(cy + r)) + 1, resolution)
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1) - cx
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1) - cy
    inside = _shape_mask(obj.shape, xs[None, :], ys[:, None], r)
    hits = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).sum(axis=(1, 3), dtype=np.float32)
    return slice(y0, y1), slice(x0, x1), hits * np.float32(1.0 / SUPERSAMPLE**2)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside test for offsets from the bounding-square centre (broadcast arrays)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = SQUARE_HALF_SIDE * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # Apex (0, -r), base from (-r, r) to (r, r): half-width at height dy is (dy + r) / 2.
        return (dy <= r) & (np.abs(dx) <= (dy + r) * 0.5)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: SceneSpec) -> np.ndarray:
    """Rasterise a scene to an ``(R, R, 3)`` uint8 RGB array on the background colour."""
    res = scene.resolution
    img = np.empty((res, res, 3), dtype=np.float32)
    img[...] = _BACKGROUND
    for obj in scene.objects:
        rows, cols, alpha = coverage(obj, res)
        patch = img[rows, cols]
        patch += alpha[..., None] * (_COLOUR_ARRAYS[obj.colour] - patch)
    # Values are convex combinations of uint8 colours, so rounding stays in range.
    return (img + np.float32(0.5)).astype(np.uint8)


def render_prompt(spec: PromptSpec, seed: int, resolution: int = 64) -> tuple[np.ndarray, SceneSpec]:
    """The scene for ``(spec, seed)`` and its image; identical for identical arguments."""
    scene = layout(spec, np.random.default_rng(seed), resolution)
    return render(scene), scene
