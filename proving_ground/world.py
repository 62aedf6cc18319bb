"""Vocabulary, scene and prompt specifications, captions of the proving-ground world.

The world is a dark, neutral canvas holding a few flat-coloured shapes. Everything a prompt can ask
for is structured data (:class:`PromptSpec`); captions are produced from it by fixed templates and
parsed back by :func:`parse_caption`, so ``parse_caption(caption(spec)) == spec`` for every valid spec.

Vocabulary
----------
* shapes: ``circle``, ``square``, ``triangle`` (axis-aligned; triangles point up);
* colours: six hues 60 degrees apart (red, yellow, green, cyan, blue, magenta), all with the same
  chroma, so a hue classifier has +-30 degrees of tolerance and blurred edges (a mix with the
  neutral background) keep their hue;
* sizes: ``small`` and ``large`` (a radius, as a fraction of the canvas side). Sizes are scene
  attributes only: captions do not mention them;
* positions: object centres in normalised canvas coordinates, ``x`` to the right, ``y`` downwards,
  both in ``[0, 1]``.

Prompt categories (GenEval-like; the category is derived from the structure, never stored):

=================  ==================================================  =========================================
category           structure                                           example
=================  ==================================================  =========================================
``single``         one group, count 1                                  "a red circle"
``counting``       one group, count 2..4                               "three blue squares"
``two_objects``    two count-1 groups, different shapes, same colour   "a green circle and a green triangle"
``colour_binding`` two count-1 groups, different shapes and colours    "a red circle and a blue square"
``position``       two distinct count-1 groups and a relation          "a yellow triangle to the left of a green circle"
=================  ==================================================  =========================================

A relation ``r`` in a spec always reads ``groups[0] r groups[1]``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Same chroma (max - min = 190) for every colour; hues at 0, 60, ..., 300 degrees.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "yellow": (230, 230, 40),
    "green": (40, 230, 40),
    "cyan": (40, 230, 230),
    "blue": (40, 40, 230),
    "magenta": (230, 40, 230),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_RGB: tuple[int, int, int] = (30, 30, 30)

# Radius of the shape's bounding square (half its side), as a fraction of the canvas side.
SIZES: dict[str, float] = {"small": 0.08, "large": 0.13}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
# A square's half-side relative to the size radius (keeps its area close to the circle's).
SQUARE_HALF_SIDE = 0.85

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}

CATEGORIES: tuple[str, ...] = ("single", "two_objects", "counting", "position", "colour_binding")
MAX_COUNT = 4
_COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
_WORD_COUNTS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}


@dataclass(frozen=True)
class ObjectSpec:
    """One rendered object.

    ``x``, ``y`` are the centre of the object's bounding square in normalised coordinates
    (``y`` grows downwards); ``size`` names its radius in :data:`SIZES`.
    """

    shape: str
    colour: str
    size: str
    x: float
    y: float

    def __post_init__(self) -> None:
        _check_member("shape", self.shape, SHAPES)
        _check_member("colour", self.colour, COLOUR_NAMES)
        _check_member("size", self.size, SIZE_NAMES)

    @property
    def radius(self) -> float:
        """Half-side of the bounding square, normalised to the canvas side."""
        return SIZES[self.size]

    @property
    def centroid(self) -> tuple[float, float]:
        """Area centroid of the drawn shape (normalised). Differs from (x, y) for triangles only."""
        if self.shape == "triangle":
            # Apex at y - r, base at y + r: the centroid lies a third of the height above the base.
            return (self.x, self.y + self.radius / 3.0)
        return (self.x, self.y)


@dataclass(frozen=True)
class Group:
    """``count`` objects of one colour and shape that a prompt asks for."""

    count: int
    colour: str
    shape: str

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be an int in 1..{MAX_COUNT}, got {self.count!r}")
        _check_member("colour", self.colour, COLOUR_NAMES)
        _check_member("shape", self.shape, SHAPES)

    @property
    def kind(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class PromptSpec:
    """What an image must show: groups of objects and optionally a relation between two of them.

    Valid structures are exactly the five categories of the module docstring; anything else raises
    ``ValueError`` at construction.
    """

    groups: tuple[Group, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        _category_of(self.groups, self.relation)  # raises for structures outside the categories

    @property
    def category(self) -> str:
        return _category_of(self.groups, self.relation)

    @property
    def caption(self) -> str:
        return caption(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [{"count": g.count, "colour": g.colour, "shape": g.shape} for g in self.groups],
            "relation": self.relation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptSpec:
        groups = tuple(Group(int(g["count"]), str(g["colour"]), str(g["shape"])) for g in data["groups"])
        return cls(groups, data.get("relation"))


@dataclass(frozen=True)
class SceneSpec:
    """A complete scene: the objects to draw on a ``resolution`` x ``resolution`` canvas."""

    objects: tuple[ObjectSpec, ...]
    resolution: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if self.resolution < 16:
            raise ValueError("resolution must be at least 16")


def _check_member(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


def _category_of(groups: tuple[Group, ...], relation: str | None) -> str:
    if len(groups) == 1:
        if relation is not None:
            raise ValueError("a relation needs two groups")
        return "single" if groups[0].count == 1 else "counting"
    if len(groups) != 2:
        raise ValueError(f"a prompt has one or two groups, got {len(groups)}")
    a, b = groups
    if a.count != 1 or b.count != 1:
        raise ValueError("two-group prompts ask for one object per group")
    if relation is not None:
        _check_member("relation", relation, RELATIONS)
        if a.kind == b.kind:
            raise ValueError("a relation needs two distinguishable objects (colour or shape differ)")
        return "position"
    if a.shape == b.shape:
        raise ValueError("two-object prompts name two different shapes")
    return "two_objects" if a.colour == b.colour else "colour_binding"


# ----------------------------------------------------------------------------- captions


def group_phrase(group: Group) -> str:
    """``"a red circle"``, ``"three blue squares"``."""
    noun = group.shape if group.count == 1 else group.shape + "s"
    return f"{_COUNT_WORDS[group.count]} {group.colour} {noun}"


def caption(spec: PromptSpec) -> str:
    """The canonical caption of a prompt spec (lower case, no final period)."""
    if spec.relation is not None:
        a, b = spec.groups
        return f"{group_phrase(a)} {_RELATION_PHRASES[spec.relation]} {group_phrase(b)}"
    return " and ".join(group_phrase(g) for g in spec.groups)


_GROUP_RE = re.compile(r"^(?P<count>a|an|one|two|three|four) (?P<colour>[a-z]+) (?P<shape>[a-z]+?)(?P<plural>s?)$")
_PREFIXES = ("a photo of ", "an image of ", "a picture of ")


def parse_group(text: str) -> Group:
    """Parse ``"<count> <colour> <shape>[s]"``; the plural must agree with the count."""
    m = _GROUP_RE.match(text.strip())
    if m is None:
        raise ValueError(f"cannot parse object phrase {text!r}")
    count = _WORD_COUNTS[m["count"]]
    if (count > 1) != bool(m["plural"]):
        raise ValueError(f"count and plural disagree in {text!r}")
    return Group(count, m["colour"], m["shape"])


def parse_caption(text: str) -> PromptSpec:
    """Map a caption back to its spec.

    Accepts the canonical captions of :func:`caption` plus harmless variations: any letter case,
    surrounding whitespace, a final period, an ``"a photo of "`` style prefix, and ``"one"`` /
    ``"an"`` for a count of one. Raises ``ValueError`` for anything outside the grammar.
    """
    s = " ".join(text.strip().lower().rstrip(".").split())
    # Prefixes are only stripped when what follows is still a full caption ("a photo of a ...").
    for prefix in _PREFIXES:
        if s.startswith(prefix) and s[len(prefix) :].split(" ", 1)[0] in _WORD_COUNTS:
            s = s[len(prefix) :]
            break
    for relation, phrase in _RELATION_PHRASES.items():
        parts = s.split(f" {phrase} ")
        if len(parts) == 2:
            return PromptSpec((parse_group(parts[0]), parse_group(parts[1])), relation)
        if len(parts) > 2:
            raise ValueError(f"more than one relation in {text!r}")
    parts = s.split(" and ")
    if len(parts) > 2:
        raise ValueError(f"at most two object phrases are supported: {text!r}")
    return PromptSpec(tuple(parse_group(p) for p in parts))


# ----------------------------------------------------------------------------- enumeration


def _kinds() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOUR_NAMES for s in SHAPES]


def all_prompt_specs(category: str) -> Iterator[PromptSpec]:
    """Every valid spec of a category, in a fixed order (each caption surface form once).

    Sizes: single 18, counting 54, two_objects 36, colour_binding 180, position 1224.
    Training code must not sample from this directly: use :mod:`diffsteer.proving_ground.prompts`, which
    removes the held-out instances.
    """
    _check_member("category", category, CATEGORIES)
    if category == "single":
        for c, s in _kinds():
            yield PromptSpec((Group(1, c, s),))
    elif category == "counting":
        for n in range(2, MAX_COUNT + 1):
            for c, s in _kinds():
                yield PromptSpec((Group(n, c, s),))
    elif category in ("two_objects", "colour_binding"):
        for (c1, s1), (c2, s2) in itertools.permutations(_kinds(), 2):
            if s1 == s2:
                continue
            spec = PromptSpec((Group(1, c1, s1), Group(1, c2, s2)))
            if spec.category == category:
                yield spec
    else:
        for (c1, s1), (c2, s2) in itertools.permutations(_kinds(), 2):
            for relation in RELATIONS:
                yield PromptSpec((Group(1, c1, s1), Group(1, c2, s2)), relation)


_CANONICAL_RELATION = {"left of": "left of", "right of": "left of", "above": "above", "below": "above"}


def canonical_key(spec: PromptSpec) -> str:
    """A string equal for specs that mean the same thing.

    ``"A and B"`` equals ``"B and A"``; ``"A right of B"`` equals ``"B left of A"`` and
    ``"A below B"`` equals ``"B above A"``. Used by the held-out split so that a caption and its
    paraphrase always fall on the same side.
    """
    groups = list(spec.groups)
    relation = spec.relation
    if relation is None:
        groups.sort(key=lambda g: (g.shape, g.colour, g.count))
    elif _CANONICAL_RELATION[relation] != relation:
        groups.reverse()
        relation = _CANONICAL_RELATION[relation]
    body = " | ".join(f"{g.count} {g.colour} {g.shape}" for g in groups)
    return f"{spec.category}: {body}" + (f" [{relation}]" if relation else "")
