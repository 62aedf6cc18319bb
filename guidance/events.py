"""What a generation reports while it runs, and how a caller stops it.

A step callback receives a :class:`StepEvent` after every denoising step (and after every iteration of an
outer loop such as ReNO's); raising :class:`GenerationCancelled` from it stops the generation, raising
:class:`GenerationInterrupted` after a denoising step ends the denoising there and still decodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class GenerationCancelled(Exception):
    """Raised by a step callback to stop a generation; the sampler lets it propagate."""


class GenerationInterrupted(GenerationCancelled):
    """Raised by a step callback after a denoising step to end the denoising there: the images are decoded as they
    stand, from each one's clean-image estimate at that step (what A1111's interrupt answers). Anywhere else (an
    outer loop such as ReNO's) it stops the generation as :class:`GenerationCancelled` does."""


@dataclass
class StepEvent:
    """Progress after a denoising step (``step`` of ``total``, 1-based)."""

    step: int
    total: int
    nfe: int  # UNet evaluations so far, summed over the batch's images
    elapsed: float
    latents: torch.Tensor | None
    phase: str = "denoise"  # or a policy's own outer loop, e.g. "reno"


StepCallback = Callable[[StepEvent], None]
