"""Training data of the proving ground: an endless, random-access stream of (image, caption, spec).

Example ``i`` of stream ``seed`` is a pure function of ``(seed, i, category_weights, resolution)``:
its scene seed is :func:`~diffsteer.proving_ground.prompts.training_seed` (always outside the held-out seed
range) and its spec is drawn from the training specs only, so the stream never produces a held-out
instance. Random access makes sharding across data-loader workers trivial (worker ``k`` of ``K``
reads indices ``k, k + K, ...``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import count

import numpy as np

from .prompts import normalise_weights, sample_training_spec, training_seed
from .render import layout, render
from .world import PromptSpec, SceneSpec


@dataclass(frozen=True)
class Example:
    """One training example; ``image`` is ``(R, R, 3)`` uint8 RGB."""

    image: np.ndarray
    caption: str
    spec: PromptSpec
    scene: SceneSpec
    seed: int


class TrainingScenes:
    """Deterministic training stream: ``stream[i]`` for random access, ``iter(stream)`` for all.

    ``length`` (optional) makes it a finite, sized dataset of the first ``length`` examples.
    """

    def __init__(
        self,
        seed: int = 0,
        category_weights: Mapping[str, float] | None = None,
        resolution: int = 64,
        length: int | None = None,
    ) -> None:
        normalise_weights(category_weights)  # validate early
        self.seed = int(seed)
        self.category_weights = dict(category_weights) if category_weights is not None else None
        self.resolution = int(resolution)
        self.length = length

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless stream has no length; pass length=")
        return self.length

    def __getitem__(self, index: int) -> Example:
        if index < 0 or (self.length is not None and index >= self.length):
            raise IndexError(index)
        scene_seed = training_seed(self.seed, index)
        rng = np.random.default_rng(scene_seed)
        spec = sample_training_spec(rng, self.category_weights)
        scene = layout(spec, rng, self.resolution)
        return Example(render(scene), spec.caption, spec, scene, scene_seed)

    def __iter__(self) -> Iterator[Example]:
        indices = count() if self.length is None else range(self.length)
        for i in indices:
            yield self[i]

    def batch(self, start: int, size: int) -> tuple[np.ndarray, list[str]]:
        """Images ``(size, R, R, 3)`` uint8 and captions of examples ``start .. start + size - 1``."""
        examples = [self[i] for i in range(start, start + size)]
        return np.stack([e.image for e in examples]), [e.caption for e in examples]


__all__ = ["Example", "TrainingScenes"]
