"""Exact verifier of proving-ground images against a :class:`PromptSpec` (GenEval-style).

Detection (:func:`detect_objects`)
----------------------------------
1. Chroma ``C = max(R,G,B) - min(R,G,B)`` (RGB in [0, 1]) and hue per pixel. The background is
   neutral (``C = 0``) and every named colour has the same chroma (0.745), so a blend of an object
   with the background keeps the object's hue and has chroma proportional to coverage.
2. Pixels with ``C >= chroma_floor`` are foreground; each is labelled with the named colour whose
   hue is nearest (the six hues are 60 degrees apart, so a hue shift below 30 degrees is tolerated).
3. Connected components per colour (8-connectivity). Each component is re-thresholded at half its
   own peak chroma (a half-maximum contour: the true edge of a blurred or dimmed object, and a
   split between two same-coloured objects that blur into each other), then split again into
   components.
4. A component is an object when its area is at least ``min_area`` pixels and it is at least
   ``min_thickness`` pixels thick (largest inscribed disc radius), which rejects specks of noise
   and the thin rims where two different colours blend.
5. Shape from blur-invariant moments of the object's soft coverage ``C / peak`` over the object
   grown by two pixels (see :func:`shape_features`): a triangle has a large third-order
   (spin-3) moment, a square a large fourth-order (spin-4) cumulant, a circle neither. Both are
   rotation- and scale-invariant. An elongated component (two objects merged, a bar) gets shape
   ``"unknown"``. The centroid is the coverage-weighted mean position.

Semantics of the report (:func:`judge`)
---------------------------------------
The prompt's groups are expanded into one slot per requested object. Detected objects are assigned
to slots one-to-one (Hungarian algorithm), maximising first the number of slots filled by an object
with the slot's colour *and* shape, then by one with its colour only, then by one with its shape
only; objects sharing neither are never assigned. For every group ``g = (n, colour, shape)``:

* ``object_present``: at least one object is assigned to ``g`` (an object that has the requested
  colour or the requested shape is in the image);
* ``colour_correct``: at least one object is assigned to ``g`` and every object assigned to it has
  the requested colour;
* ``shape_correct``: at least one object is assigned to ``g`` and every object assigned to it has
  the requested shape;
* ``count_correct``: the image has exactly ``n`` objects of the requested colour and shape ("a red
  circle" means one; this is stricter than GenEval, which only asks for at least one outside the
  counting category);
* ``position_correct`` (prompts with a relation only, else ``None``): some object matching group 0
  exactly and some object matching group 1 exactly have centroids whose displacement along the
  relation's axis points the right way by at least ``relation_margin`` (a fraction of the image
  side; the other axis is not constrained);
* ``passed``: every applicable attribute holds for every group.

Each attribute of the report is the conjunction over groups. Objects matching no group are
reported (``n_extra``) but do not fail a prompt. The same :func:`judge` scores ground-truth
scenes (:func:`ground_truth_report`), so verifier and ground truth differ only in detection.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .world import COLOUR_NAMES, COLOURS, RELATIONS, PromptSpec, SceneSpec

ATTRIBUTES: tuple[str, ...] = (
    "object_present",
    "colour_correct",
    "shape_correct",
    "count_correct",
    "position_correct",
    "passed",
)

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class VerifierConfig:
    """Detection thresholds. Pixel quantities refer to a 64 x 64 image and scale with its area
    (areas) or side (lengths)."""

    chroma_floor: float = 0.15
    min_area: float = 12.0
    min_thickness: float = 1.5
    # Shape thresholds on the moment features of `shape_features` (values in the comments).
    triangle_min_skew3: float = 0.025  # triangle 0.068; circle, square 0
    square_min_spin4: float = 0.0075  # square 1/60; circle 0; blur and noise spread both by ~0.005
    max_elongation: float = 2.0  # all shapes ~1; two merged discs ~2.2
    relation_margin: float = 1.0 / 32.0


DEFAULT_CONFIG = VerifierConfig()


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image. Pixel coordinates: x to the right, y down, origin at the
    top-left corner of the image; ``bbox = (x0, y0, x1, y1)`` with exclusive ends."""

    colour: str
    shape: str
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    skew3: float
    spin4: float
    elongation: float
    image_size: tuple[int, int]  # (height, width)

    @property
    def centroid01(self) -> tuple[float, float]:
        """Centroid as a fraction of the image width and height."""
        h, w = self.image_size
        return (self.centroid[0] / w, self.centroid[1] / h)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "centroid01": self.centroid01}


@dataclass(frozen=True)
class GroupResult:
    """Attribute values for one group of the prompt; ``assigned`` indexes the report's objects."""

    object_present: bool
    colour_correct: bool
    shape_correct: bool
    count_correct: bool
    n_matching: int
    assigned: tuple[int, ...]


@dataclass(frozen=True)
class VerifierReport:
    """The verdict on one image; attribute semantics in the module docstring."""

    spec: PromptSpec
    object_present: bool
    colour_correct: bool
    shape_correct: bool
    count_correct: bool
    position_correct: bool | None
    passed: bool
    groups: tuple[GroupResult, ...]
    objects: tuple[Any, ...] = field(default=())
    n_extra: int = 0

    @property
    def category(self) -> str:
        return self.spec.category

    def attributes(self) -> dict[str, bool | None]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.spec.caption, "category": self.category}
        out.update(self.attributes())
        out["n_extra"] = self.n_extra
        out["objects"] = [{**asdict(o), "centroid01": o.centroid01} for o in self.objects]
        return out


@dataclass(frozen=True)
class _Candidate:
    """What :func:`judge` needs to know about an object."""

    colour: str
    shape: str
    centroid01: tuple[float, float]


# ----------------------------------------------------------------------------- public entry points


def verify(image: Any, spec: PromptSpec, config: VerifierConfig = DEFAULT_CONFIG) -> VerifierReport:
    """Score one image against a prompt spec.

    ``image``: ``(H, W, 3)`` RGB as uint8, or float in [0, 1]; ``(3, H, W)`` is accepted too, as is
    a PIL image or anything ``numpy.asarray`` understands (a CPU tensor).
    """
    objects = detect_objects(image, config)
    return judge(objects, spec, config.relation_margin)


def verify_batch(
    images: Any, specs: Sequence[PromptSpec] | PromptSpec, config: VerifierConfig = DEFAULT_CONFIG
) -> list[VerifierReport]:
    """:func:`verify` over a batch ``(B, H, W, 3)`` / ``(B, 3, H, W)`` or a sequence of images.

    ``specs`` is one spec per image, or a single spec for all of them.
    """
    batch = list(images) if not isinstance(images, np.ndarray) else [images[i] for i in range(len(images))]
    if isinstance(specs, PromptSpec):
        specs = [specs] * len(batch)
    if len(specs) != len(batch):
        raise ValueError(f"{len(batch)} images but {len(specs)} specs")
    return [verify(img, s, config) for img, s in zip(batch, specs)]


def ground_truth_report(
    scene: SceneSpec, spec: PromptSpec, relation_margin: float = DEFAULT_CONFIG.relation_margin
) -> VerifierReport:
    """The report a perfect detector would give for ``scene`` (same semantics as :func:`verify`)."""
    objects = [_Candidate(o.colour, o.shape, o.centroid) for o in scene.objects]
    return judge(objects, spec, relation_margin)


def summarise(reports: Iterable[VerifierReport]) -> dict[str, dict[str, float]]:
    """Rates of each attribute, overall (``"all"``) and per category; ``n`` counts reports.

    ``position_correct`` rates only count reports where it applies.
    """
    table: dict[str, dict[str, list[bool]]] = {}
    for r in reports:
        for key in ("all", r.category):
            row = table.setdefault(key, {name: [] for name in ATTRIBUTES})
            for name, value in r.attributes().items():
                if value is not None:
                    row[name].append(bool(value))
    out: dict[str, dict[str, float]] = {}
    for key, row in table.items():
        out[key] = {name: float(np.mean(v)) for name, v in row.items() if v}
        out[key]["n"] = float(len(row["passed"]))
    return out


# ----------------------------------------------------------------------------- judging


def judge(
    objects: Sequence[Any], spec: PromptSpec, relation_margin: float = DEFAULT_CONFIG.relation_margin
) -> VerifierReport:
    """Apply the attribute semantics of the module docstring to already-detected objects.

    ``objects``: anything with ``colour``, ``shape`` and ``centroid01`` (normalised ``(x, y)``).
    """
    slots = [gi for gi, g in enumerate(spec.groups) for _ in range(g.count)]
    assignment = _assign(objects, spec, slots)
    groups = []
    for gi, g in enumerate(spec.groups):
        assigned = tuple(oi for slot, oi in assignment.items() if slots[slot] == gi)
        n_matching = sum(1 for o in objects if (o.colour, o.shape) == g.kind)
        present = len(assigned) > 0
        groups.append(
            GroupResult(
                object_present=present,
                colour_correct=present and all(objects[i].colour == g.colour for i in assigned),
                shape_correct=present and all(objects[i].shape == g.shape for i in assigned),
                count_correct=n_matching == g.count,
                n_matching=n_matching,
                assigned=tuple(sorted(assigned)),
            )
        )
    position = None
    if spec.relation is not None:
        a = [o.centroid01 for o in objects if (o.colour, o.shape) == spec.groups[0].kind]
        b = [o.centroid01 for o in objects if (o.colour, o.shape) == spec.groups[1].kind]
        position = any(relation_satisfied(pa, pb, spec.relation, relation_margin) for pa in a for pb in b)
    wanted = {g.kind for g in spec.groups}
    n_extra = sum(1 for o in objects if (o.colour, o.shape) not in wanted)
    attrs = {
        name: all(getattr(r, name) for r in groups)
        for name in ("object_present", "colour_correct", "shape_correct", "count_correct")
    }
    passed = all(attrs.values()) and position is not False
    return VerifierReport(
        spec=spec,
        position_correct=position,
        passed=passed,
        groups=tuple(groups),
        objects=tuple(objects),
        n_extra=n_extra,
        **attrs,
    )


def relation_satisfied(a: tuple[float, float], b: tuple[float, float], relation: str, margin: float) -> bool:
    """Whether centroid ``a`` is ``relation`` centroid ``b`` (image coordinates, y down)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    offsets = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}")
    return offsets[relation] >= margin


def _assign(objects: Sequence[Any], spec: PromptSpec, slots: list[int]) -> dict[int, int]:
    """Slot index -> object index, maximising exact, then colour-only, then shape-only matches.

    Benefits are chosen so the priorities are strict: with ``S`` slots, a shape-only match is worth
    1, a colour-only match ``S + 1`` (more than all shape-only ones together) and an exact match
    ``(S + 1) ** 2`` (more than all partial ones together).
    """
    if not objects:
        return {}
    s = len(slots)
    benefit = np.zeros((s, len(objects)), dtype=np.int64)
    for si, gi in enumerate(slots):
        g = spec.groups[gi]
        for oi, o in enumerate(objects):
            same_colour, same_shape = o.colour == g.colour, o.shape == g.shape
            if same_colour and same_shape:
                benefit[si, oi] = (s + 1) ** 2
            elif same_colour:
                benefit[si, oi] = s + 1
            elif same_shape:
                benefit[si, oi] = 1
    rows, cols = linear_sum_assignment(benefit, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols) if benefit[r, c] > 0}


# ----------------------------------------------------------------------------- detection


def as_rgb01(image: Any) -> np.ndarray:
    """``(H, W, 3)`` float64 RGB in [0, 1] from the accepted image types (see :func:`verify`)."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if arr.min() < -0.01 or arr.max() > 1.01:
        raise ValueError("float images must lie in [0, 1]")
    return np.clip(arr, 0.0, 1.0)


def _hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) from the opponent-colour axes (equal to HSV hue at the primaries
    and secondaries)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)) % 360.0


def _nearest_colour_table() -> np.ndarray:
    """Colour index for each whole-degree hue bin (nearest named hue on the circle)."""
    named = _hue_degrees(np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float64) / 255.0)
    bins = np.arange(360) + 0.5
    dist = np.abs((bins[:, None] - named[None, :] + 180.0) % 360.0 - 180.0)
    return dist.argmin(axis=1).astype(np.int8)


_HUE_TABLE = _nearest_colour_table()


def classify_pixels(rgb: np.ndarray, config: VerifierConfig = DEFAULT_CONFIG) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: colour index into :data:`COLOUR_NAMES` (-1 for background) and chroma."""
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    labels = np.full(chroma.shape, -1, dtype=np.int8)
    fg = chroma >= config.chroma_floor
    hue_bins = _hue_degrees(rgb[fg]).astype(np.int64) % 360
    labels[fg] = _HUE_TABLE[hue_bins]
    return labels, chroma


def detect_objects(image: Any, config: VerifierConfig = DEFAULT_CONFIG) -> list[DetectedObject]:
    """All objects in an image, in reading order of their bounding boxes (top, then left)."""
    rgb = as_rgb01(image)
    h, w = rgb.shape[:2]
    labels, chroma = classify_pixels(rgb, config)
    # Noise gives the background a positive chroma (max - min of noisy channels); coverage is
    # measured above that level so that the noise floor does not add a ring of mass.
    background = chroma[labels < 0]
    floor = float(np.median(background)) if background.size else 0.0
    scale = h * w / 64.0**2
    min_area = config.min_area * scale
    min_thickness = config.min_thickness * np.sqrt(scale)
    owner = np.zeros((h, w), dtype=np.int32)  # 1 + index into `parts` of the pixel's object
    parts: list[tuple[str, float, tuple[slice, slice]]] = []
    for ci in np.unique(labels[labels >= 0]):
        colour = COLOUR_NAMES[ci]
        coarse, _ = ndimage.label(labels == ci, structure=_EIGHT)
        sizes = np.bincount(coarse.ravel())
        for k, sl in enumerate(ndimage.find_objects(coarse), start=1):
            if sl is None or sizes[k] < min_area:
                continue
            comp = coarse[sl] == k
            # Half-maximum cut relative to this component's own peak chroma.
            peak = float(np.percentile(chroma[sl][comp], 95))
            fine, _ = ndimage.label(comp & (chroma[sl] >= 0.5 * peak), structure=_EIGHT)
            for j, psl in enumerate(ndimage.find_objects(fine), start=1):
                part = fine[psl] == j
                if part.sum() < min_area:
                    continue
                if ndimage.distance_transform_edt(np.pad(part, 1)).max() < min_thickness:
                    continue
                full = (
                    slice(sl[0].start + psl[0].start, sl[0].start + psl[0].stop),
                    slice(sl[1].start + psl[1].start, sl[1].start + psl[1].stop),
                )
                owner[full][part] = len(parts) + 1
                parts.append((colour, peak, full))
    objects = [
        _describe(i + 1, colour, peak, floor, full, owner, chroma, config)
        for i, (colour, peak, full) in enumerate(parts)
    ]
    objects.sort(key=lambda o: (o.bbox[1], o.bbox[0]))
    return objects


def _describe(
    ident: int,
    colour: str,
    peak: float,
    floor: float,
    sl: tuple[slice, slice],
    owner: np.ndarray,
    chroma: np.ndarray,
    config: VerifierConfig,
) -> DetectedObject:
    h, w = owner.shape
    pad = _WINDOW_GROWTH + 1
    y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
    x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
    own = owner[y0:y1, x0:x1]
    part = own == ident
    # Soft coverage over the object grown by a couple of pixels (its antialiased or blurred rim),
    # excluding pixels that belong to other objects.
    window = ndimage.binary_dilation(part, structure=_EIGHT, iterations=_WINDOW_GROWTH) & ((own == 0) | part)
    coverage = (chroma[y0:y1, x0:x1] - floor) / max(peak - floor, 1e-6)
    alpha = np.where(window, np.clip(coverage, 0.0, 1.0), 0.0)
    feats = shape_features(alpha)
    ys, xs = np.nonzero(part)
    return DetectedObject(
        colour=colour,
        shape=classify_shape(feats, config),
        bbox=(int(x0 + xs.min()), int(y0 + ys.min()), int(x0 + xs.max() + 1), int(y0 + ys.max() + 1)),
        centroid=(feats.cx + x0, feats.cy + y0),
        area=int(part.sum()),
        skew3=feats.skew3,
        spin4=feats.spin4,
        elongation=feats.elongation,
        image_size=(h, w),
    )


_WINDOW_GROWTH = 2


@dataclass(frozen=True)
class ShapeFeatures:
    """Moment features of a soft mask (see :func:`shape_features`)."""

    mass: float
    cx: float
    cy: float
    skew3: float
    spin4: float
    elongation: float


def shape_features(alpha: np.ndarray) -> ShapeFeatures:
    """Rotation- and scale-invariant moment features of a coverage map ``alpha`` (H, W) in [0, 1].

    With ``m`` the mass, ``mu_pq`` the central moments and ``k_pq`` the cumulants of the
    mass-normalised distribution:

    * ``skew3 = sqrt((e30 - 3 e12)^2 + (3 e21 - e03)^2)``, ``e_pq = mu_pq / m^(1 + (p+q)/2)``: the
      spin-3 part of the third-order moments (Hu's third invariant, square-rooted). Zero for any
      centrally symmetric shape (circle, square); 0.068 for the world's triangles.
    * ``spin4 = |k40 - 6 k22 + k04 + 4i (k31 - k13)| / m^2``: the spin-4 part of the fourth-order
      cumulants. Zero for a disc (isotropic); 1/60 for a square in any orientation.
    * ``elongation``: square root of the ratio of the covariance eigenvalues (1 for all three
      shapes, about 2.2 for two discs merged side by side).

    Convolving with a symmetric kernel adds nothing to third and fourth cumulants and keeps the
    mass, so ``skew3`` and ``spin4`` are unchanged by Gaussian blur as long as ``alpha`` holds the
    blurred rim; this is why they are preferred to outline features (corner angles, bounding-box
    fill), which blur rounds away on 10-pixel shapes. Centroid ``(cx, cy)`` in pixel units of the
    array (pixel ``(i, j)`` centred at ``(j + 0.5, i + 0.5)``).
    """
    m = float(alpha.sum())
    if m <= 0:
        return ShapeFeatures(0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    ys = np.arange(alpha.shape[0]) + 0.5
    xs = np.arange(alpha.shape[1]) + 0.5
    cx = float(alpha.sum(axis=0) @ xs) / m
    cy = float(alpha.sum(axis=1) @ ys) / m
    dx_pow = (xs - cx)[None, :] ** np.arange(5)[:, None]  # (5, W): dx^0 .. dx^4
    dy_pow = (ys - cy)[None, :] ** np.arange(5)[:, None]  # (5, H)
    raw = dy_pow @ alpha @ dx_pow.T / m  # raw[q, p] = mean of dx^p dy^q

    def mom(p: int, q: int) -> float:
        return float(raw[q, p])

    c20, c02, c11 = mom(2, 0), mom(0, 2), mom(1, 1)
    e30, e21, e12, e03 = (mom(p, 3 - p) / np.sqrt(m) ** 3 for p in (3, 2, 1, 0))
    skew3 = float(np.hypot(e30 - 3 * e12, 3 * e21 - e03))
    k40 = mom(4, 0) - 3 * c20**2
    k04 = mom(0, 4) - 3 * c02**2
    k22 = mom(2, 2) - c20 * c02 - 2 * c11**2
    k31 = mom(3, 1) - 3 * c20 * c11
    k13 = mom(1, 3) - 3 * c02 * c11
    spin4 = float(np.hypot(k40 - 6 * k22 + k04, 4 * (k31 - k13))) / m**2
    half_trace, det = (c20 + c02) / 2, c20 * c02 - c11**2
    root = np.sqrt(max(half_trace**2 - det, 0.0))
    lo, hi = half_trace - root, half_trace + root
    elongation = float(np.sqrt(hi / lo)) if lo > 1e-12 else float("inf")
    return ShapeFeatures(m, cx, cy, skew3, spin4, elongation)


def classify_shape(feats: ShapeFeatures, config: VerifierConfig = DEFAULT_CONFIG) -> str:
    """``triangle`` if clearly skewed, else ``square`` if clearly four-fold, else ``circle``;
    ``unknown`` for elongated blobs (merged objects, bars)."""
    if feats.elongation > config.max_elongation:
        return "unknown"
    if feats.skew3 >= config.triangle_min_skew3:
        return "triangle"
    if feats.spin4 >= config.square_min_spin4:
        return "square"
    return "circle"
