"""Run guidance arms on a list of (prompt, seed) items: a paired design, batched generation.

Each arm generates every item with the item's own seed, so the arms' images of one item share their initial
noise and differ only by the arm. Items are batched across prompts (the sampler takes one prompt per image),
and each image keeps its per-image NFE and the batch's wall time divided over its images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffsteer.guidance.events import StepCallback
from diffsteer.guidance.models import DiffusionModel
from diffsteer.guidance.request import Limits
from diffsteer.guidance.sampler import GenerationResult, generate

GenerateFn = Callable[
    ..., GenerationResult
]  # called as diffsteer.guidance.sampler.generate(model, params, limits=, callback=)


@dataclass(frozen=True)
class Item:
    prompt: str
    seed: int
    prompt_id: str  # images of one prompt form one cluster in the statistics
    meta: Any = None  # e.g. the proving ground's PromptSpec


@dataclass
class ImageRecord:
    item: Item
    image: np.ndarray  # uint8 [H, W, 3]
    nfe: int
    seconds: float
    metadata: dict[str, Any] | None = None  # the generation parameters (for PNG text chunks)


def run_arm(
    model: DiffusionModel,
    items: Sequence[Item],
    policy: Any,
    *,
    steps: int = 30,
    scheduler: str = "default",
    batch_size: int = 16,
    extra: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    callback: StepCallback | None = None,
    generate_fn: GenerateFn | None = None,
) -> list[ImageRecord]:
    """Generate every item under one guidance policy; returns one record per item, in order.

    ``progress(n)`` is called after each batch with its number of images; ``callback`` is the sampler's step
    callback (progress per denoising step; raising ``GenerationCancelled`` there stops the run).
    ``generate_fn`` replaces :func:`diffsteer.guidance.sampler.generate` (same call), e.g. with a server's generation
    through its device worker.
    """
    generate_batch = generate_fn or generate
    records: list[ImageRecord] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        t0 = time.perf_counter()
        result = generate_batch(
            model,
            {
                "prompt": [it.prompt for it in chunk],
                "seeds": [it.seed for it in chunk],
                "steps": steps,
                "scheduler": scheduler,
                "policy": policy,
                **(extra or {}),
            },
            limits=Limits(max_num_images=max(batch_size, Limits.max_num_images)),
            callback=callback,
        )
        per_image = (time.perf_counter() - t0) / len(chunk)
        pixels = (result.pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        for k, (it, img, nfe) in enumerate(zip(chunk, pixels, result.nfe)):
            records.append(ImageRecord(it, img, int(nfe), per_image, result.metadata(k)))
        if progress is not None:
            progress(len(chunk))
    return records
