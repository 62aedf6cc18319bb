"""The exact verifier as a reward (``verifier``): GenEval-style rule-based scoring of proving-ground images.

Flow-GRPO's compositional-generation runs (Liu et al. 2025, arXiv 2505.05470, Sec. 5.1) train on GenEval's own
detector-based rule reward for the training prompts and evaluate on held-out ones; this is that setup on the
proving ground. Each image is judged against its caption (:func:`diffsteer.proving_ground.world.parse_caption`) by
:func:`diffsteer.proving_ground.verifier.verify`, and scored

* ``partial`` (default): the fraction of the report's applicable attributes that hold (object present, colour,
  shape, count, and position where the prompt has a relation), so an image with the right object in the wrong
  number still earns some reward, a denser signal for group-normalised advantages;
* ``passed``: 1 when every attribute holds, else 0 (the pass rate the evaluations report).

It is a metric, not a function of the pixels that autograd can follow (``differentiable = False``): it serves the
online-RL methods (Flow-GRPO, DiffusionNFT) and evaluations, and AlignProp and ReNO refuse it. A prompt that is
not a proving-ground caption is an ``InvalidInput`` (a ``ValueError``) of field ``prompt`` naming it. Registered as ``verifier`` by
:mod:`diffsteer.guidance.reward_models`, beside the proving ground's CLIP.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from diffsteer.guidance.errors import InvalidInput
from diffsteer.rewards.base import Reward, RewardConfig

from .verifier import ATTRIBUTES, VerifierReport, verify
from .world import parse_caption

CHECKS = tuple(a for a in ATTRIBUTES if a != "passed")


class VerifierRewardConfig(RewardConfig):
    """The proving ground's exact verifier as a reward (prompts must be proving-ground captions)."""

    name: Literal["verifier"] = "verifier"
    score: Literal["partial", "passed"] = Field(
        default="partial",
        description="partial: the fraction of the applicable attributes (present, colour, shape, count, position) "
        "that hold; passed: 1 when all hold, else 0.",
    )


def report_score(report: VerifierReport, score: str) -> float:
    """``passed`` as 0/1, or the fraction of the applicable attribute checks that hold."""
    if score == "passed":
        return float(report.passed)
    held = [bool(v) for k, v in report.attributes().items() if k in CHECKS and v is not None]
    return float(np.mean(held))


class VerifierReward(Reward):
    """Rule-based score of the proving-ground verifier, in [0, 1]; not differentiable."""

    name = "verifier"
    differentiable = False
    uses_prompts = True

    def __init__(self, config: VerifierRewardConfig | None = None, device=None, dtype=None):
        super().__init__(config or VerifierRewardConfig())
        self.config: VerifierRewardConfig

    @property
    def default_offset(self) -> float:
        return 1.0

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        assert prompts is not None
        specs = []
        for prompt in prompts:
            try:
                specs.append(parse_caption(prompt))
            except ValueError as e:
                raise InvalidInput(
                    "prompt", f"the verifier reward scores proving-ground captions only; {prompt!r}: {e}"
                ) from None
        pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        scores = [report_score(verify(image, spec), self.config.score) for image, spec in zip(pixels, specs)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
