"""The prompt suite of the proving ground and its held-out split.

Split
-----
An *instance* is a pair (prompt spec, integer seed); the seed fixes the rendered layout of a
reference scene and is the seed an evaluation passes to the sampler.

* **Seeds.** Training instances use seeds in ``[0, 2**31)`` (:func:`training_seed`); held-out
  instances use seeds in ``[2**31, 2**32)`` (:data:`HELDOUT_SEED_BASE`). The ranges are disjoint, so
  no held-out instance is ever a training instance, whatever the prompt.
* **Captions.** For the combinatorial categories (``counting``, ``two_objects``,
  ``colour_binding``, ``position``) a fixed fraction :data:`HELDOUT_FRACTION` of the *meanings* is
  held out entirely: specs are grouped by :func:`~diffsteer.proving_ground.world.canonical_key` (so
  "A and B" goes with "B and A", and "A left of B" with "B right of A"), the keys of each category
  are ordered by ``sha256(HELDOUT_SALT + key)`` and the first ``round(fraction * n_keys)`` are
  held out. Training never sees those captions, only their words in other combinations.
* **Single objects** (18 captions: colours x shapes) are all shared with training; held out there
  means held-out seeds only.

The split is a pure function of the constants below and of the world's vocabulary; changing either
changes the split, which ``tests/test_proving_ground_world.py`` detects through the shipped
``assets/heldout_suite.jsonl``. No training code should read the held-out suite:
:func:`training_prompt_specs`, :func:`sample_training_spec` and :func:`training_seed` are what
training uses (see :mod:`diffsteer.proving_ground.dataset`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .shipped import HELDOUT_SUITE
from .world import CATEGORIES, PromptSpec, all_prompt_specs, canonical_key, parse_caption

HELDOUT_FRACTION = 0.25
HELDOUT_SALT = "diffsteer-proving-ground-heldout-v1"
HELDOUT_SEED_BASE = 2**31
SEED_LIMIT = 2**32
COMBINATORIAL: tuple[str, ...] = ("counting", "two_objects", "colour_binding", "position")
HELDOUT_SUITE_N = 100  # items per category in the shipped suite (seed 0)

_TRAIN_STREAM_TAG = 0x7472  # SeedSequence entropy tags keep training and held-out draws apart
_HELDOUT_STREAM_TAG = 0x686F


class SuiteItem(NamedTuple):
    """One evaluation instance: the caption, its spec and the seed to generate it with."""

    prompt: str
    spec: PromptSpec
    seed: int

    @property
    def category(self) -> str:
        return self.spec.category

    def to_json(self) -> str:
        return json.dumps(
            {"prompt": self.prompt, "category": self.category, "spec": self.spec.to_dict(), "seed": self.seed}
        )


# ----------------------------------------------------------------------------- the split


@cache
def heldout_keys(category: str) -> frozenset[str]:
    """Canonical keys of the held-out meanings of a category (empty for ``single``)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}")
    if category not in COMBINATORIAL:
        return frozenset()
    keys = sorted({canonical_key(s) for s in all_prompt_specs(category)})
    keys.sort(key=lambda k: hashlib.sha256((HELDOUT_SALT + k).encode()).hexdigest())
    return frozenset(keys[: round(HELDOUT_FRACTION * len(keys))])


def is_heldout_spec(spec: PromptSpec) -> bool:
    """Whether the spec's meaning is held out (never used for training)."""
    return canonical_key(spec) in heldout_keys(spec.category)


def is_heldout_seed(seed: int) -> bool:
    return HELDOUT_SEED_BASE <= seed < SEED_LIMIT


@cache
def _specs(category: str, heldout: bool) -> tuple[PromptSpec, ...]:
    return tuple(s for s in all_prompt_specs(category) if is_heldout_spec(s) == heldout)


def training_prompt_specs(category: str | None = None) -> list[PromptSpec]:
    """Every spec training may use (all caption surface forms), of one category or of all."""
    cats = CATEGORIES if category is None else (category,)
    return [s for c in cats for s in _specs(c, False)]


def heldout_prompt_specs(category: str) -> list[PromptSpec]:
    """The held-out specs of a category; for ``single``, all 18 (held out by seed only)."""
    return list(_specs(category, True) if category in COMBINATORIAL else _specs(category, False))


# ----------------------------------------------------------------------------- training side


def normalise_weights(category_weights: Mapping[str, float] | None) -> np.ndarray:
    """Category probabilities in :data:`CATEGORIES` order (uniform when ``None``)."""
    if category_weights is None:
        return np.full(len(CATEGORIES), 1.0 / len(CATEGORIES))
    unknown = set(category_weights) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}")
    w = np.array([float(category_weights.get(c, 0.0)) for c in CATEGORIES])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("category weights must be non-negative with a positive sum")
    return w / w.sum()


def sample_training_spec(rng: np.random.Generator, category_weights: Mapping[str, float] | None = None) -> PromptSpec:
    """Draw a category by weight, then a training spec of it uniformly."""
    cumulative = np.cumsum(normalise_weights(category_weights))
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    specs = _specs(CATEGORIES[min(index, len(CATEGORIES) - 1)], False)
    return specs[int(rng.integers(len(specs)))]


def training_seed(stream_seed: int, index: int) -> int:
    """The scene seed of example ``index`` of training stream ``stream_seed``; always below
    :data:`HELDOUT_SEED_BASE`."""
    state = np.random.SeedSequence([_TRAIN_STREAM_TAG, int(stream_seed), int(index)]).generate_state(1)[0]
    return int(state) % HELDOUT_SEED_BASE


# ----------------------------------------------------------------------------- held-out suite


def heldout_suite(category: str, n: int, seed: int = 0) -> list[SuiteItem]:
    """``n`` held-out instances of a category, identical for identical arguments.

    Specs cycle through a seeded permutation of :func:`heldout_prompt_specs` (balanced coverage);
    instance seeds are distinct and lie in the held-out range.
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    specs = heldout_prompt_specs(category)
    rng = np.random.default_rng(np.random.SeedSequence([_HELDOUT_STREAM_TAG, CATEGORIES.index(category), int(seed)]))
    order = rng.permutation(len(specs))
    seeds: list[int] = []
    seen: set[int] = set()
    while len(seeds) < n:
        s = HELDOUT_SEED_BASE + int(rng.integers(SEED_LIMIT - HELDOUT_SEED_BASE))
        if s not in seen:
            seen.add(s)
            seeds.append(s)
    return [SuiteItem(specs[order[i % len(specs)]].caption, specs[order[i % len(specs)]], seeds[i]) for i in range(n)]


def full_heldout_suite(n_per_category: int = HELDOUT_SUITE_N, seed: int = 0) -> list[SuiteItem]:
    """:func:`heldout_suite` for every category, in :data:`CATEGORIES` order."""
    return [item for c in CATEGORIES for item in heldout_suite(c, n_per_category, seed)]


def write_suite_jsonl(items: Iterable[SuiteItem], path: str | Path) -> None:
    """One JSON object per line: ``prompt``, ``category``, ``spec``, ``seed``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(item.to_json() + "\n")


def read_suite_jsonl(path: str | Path) -> list[SuiteItem]:
    """Load a suite, checking that each line's prompt, spec and category agree."""
    items = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            spec = PromptSpec.from_dict(row["spec"])
            if parse_caption(row["prompt"]) != spec or row.get("category", spec.category) != spec.category:
                raise ValueError(f"{path}:{lineno}: prompt, spec and category disagree")
            items.append(SuiteItem(row["prompt"], spec, int(row["seed"])))
    return items


def load_default_suite(categories: Sequence[str] | None = None) -> list[SuiteItem]:
    """The shipped held-out suite (``assets/heldout_suite.jsonl``), optionally filtered."""
    items = read_suite_jsonl(HELDOUT_SUITE)
    return [i for i in items if categories is None or i.category in categories]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the proving-ground held-out suite as JSONL.")
    parser.add_argument("path", nargs="?", default=str(HELDOUT_SUITE), help="output file")
    parser.add_argument("--n", type=int, default=HELDOUT_SUITE_N, help="items per category")
    parser.add_argument("--seed", type=int, default=0, help="suite seed")
    args = parser.parse_args(argv)
    write_suite_jsonl(full_heldout_suite(args.n, args.seed), args.path)


if __name__ == "__main__":
    main()
