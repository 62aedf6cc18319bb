"""Weighted sums of rewards with ReNO's loss (Eyring et al. 2024, "ReNO: Enhancing One-step Text-to-Image
Models through Reward-based Noise Optimization", NeurIPS 2024).

ReNO optimises the initial noise against ``L = sum_i w_i * (o_i - r_i(x))``: each reward ``r_i`` is shifted
by an offset ``o_i`` (an upper bound of the score, so every term is >= 0 and readable as a distance) and
weighted. The offsets do not change gradients. Defaults, from ReNO's code (``rewards/*.py``,
``arguments.py``):

=============  ==========================================  ======  ==============
reward         score                                       offset  ReNO weight
=============  ==========================================  ======  ==============
hps            cos(img, txt) (HPSv2.1)                      1.0     5.0
pickscore      logit_scale.exp() * cos                      30.0    0.05
clip           logit_scale.exp() * cos (CLIP ViT-H-14)      100.0   0.01
aesthetic      LAION aesthetic rating                       10.0    0.0 (off)
imagereward    (not implemented here)                       2.0     1.0
=============  ==========================================  ======  ==============

So ``"hps:5,pickscore:0.05,clip:0.01"`` is ReNO's default objective minus ImageReward.

Spec strings: comma-separated ``name[:weight[:offset]]`` (weight defaults to 1, offset to the reward's
default), e.g. ``"hps:5,pickscore:0.05,clip:0.01"`` or ``"saturation:1:0.8"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import EmbeddingSimilarityReward, NonDifferentiableRewardError, Reward, check_images


@dataclass(frozen=True)
class TermSpec:
    """One ``name:weight[:offset]`` entry of a composite spec."""

    name: str
    weight: float = 1.0
    offset: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"reward name: expected a non-empty string, got {self.name!r}")
        w = _as_float(self.weight)
        if w is None or not math.isfinite(w) or w == 0:
            raise ValueError(f"{self.name}: weight must be a finite non-zero number, got {self.weight!r}")
        object.__setattr__(self, "weight", w)
        if self.offset is not None:
            o = _as_float(self.offset)
            if o is None or not math.isfinite(o):
                raise ValueError(f"{self.name}: offset must be a finite number, got {self.offset!r}")
            object.__setattr__(self, "offset", o)


def _as_float(value: object) -> float | None:
    """float(value) for real numbers (numpy scalars and 0-d tensors included); None for anything else."""
    if isinstance(value, (bool, str)):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _number(text: str, what: str, token: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} in {token!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} in {token!r}: must be finite, got {text!r}")
    return value


def parse_reward_spec(spec: str) -> list[TermSpec]:
    """Parse ``"hps:5,pickscore:0.05,clip:0.01"`` into terms (names lower-cased, not yet checked against the
    registry). Raises ``ValueError`` naming the offending entry."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec: expected 'name[:weight[:offset]],...', got {spec!r}")
    terms: list[TermSpec] = []
    seen: set[str] = set()
    for raw in spec.split(","):
        token = raw.strip()
        if not token:
            raise ValueError(f"reward spec {spec!r}: empty entry (stray comma?)")
        parts = [p.strip() for p in token.split(":")]
        if len(parts) > 3:
            raise ValueError(f"reward spec entry {token!r}: expected name[:weight[:offset]]")
        name = parts[0].lower()
        if not name:
            raise ValueError(f"reward spec entry {token!r}: missing reward name")
        weight = _number(parts[1], "weight", token) if len(parts) > 1 and parts[1] != "" else 1.0
        if weight == 0:
            raise ValueError(f"weight in {token!r}: must be non-zero (drop the entry instead)")
        offset = _number(parts[2], "offset", token) if len(parts) > 2 and parts[2] != "" else None
        if name in seen:
            raise ValueError(f"reward spec {spec!r}: '{name}' appears twice")
        seen.add(name)
        terms.append(TermSpec(name, weight, offset))
    return terms


@dataclass
class CompositeResult:
    """Everything a reward-driven optimiser logs or backpropagates."""

    scores: dict[str, Tensor]  # name -> raw score [B]
    losses: dict[str, Tensor]  # name -> weight * (offset - score) [B]
    loss_per_sample: Tensor  # [B], sum over terms
    loss: Tensor  # scalar: mean over the batch of loss_per_sample (what to call backward on)
    total_score: Tensor  # [B], sum of weight * score
    weights: dict[str, float] = field(default_factory=dict)
    offsets: dict[str, float] = field(default_factory=dict)


class CompositeReward(Reward):
    """``score = sum_i w_i r_i``; :meth:`evaluate` gives ReNO's per-term scores and losses.

    ``differentiable`` is True only if every term is; a composite with a metric term (e.g.
    ``jpeg_compressibility``) is for evaluation under ``torch.no_grad()`` (best-of-N selection, logging).
    """

    name = "composite"

    def __init__(self, terms: Sequence[tuple[str, Reward, float, float | None]]) -> None:
        super().__init__(None)
        if not terms:
            raise ValueError("composite: at least one reward term is required")
        self.rewards = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.offsets: dict[str, float] = {}
        for name, reward, weight, offset in terms:
            if name in self.rewards:
                raise ValueError(f"composite: '{name}' appears twice")
            spec = TermSpec(name, weight, offset)  # validates weight/offset
            self.rewards[name] = reward
            self.weights[name] = float(spec.weight)
            self.offsets[name] = float(reward.default_offset if offset is None else offset)
        self.differentiable = all(r.differentiable for r in self.rewards.values())  # type: ignore[misc]
        self.uses_prompts = any(r.uses_prompts for r in self.rewards.values())  # type: ignore[misc]

    @property
    def default_offset(self) -> float:
        return sum(self.weights[n] * self.offsets[n] for n in self.rewards)

    def evaluate(self, images: Tensor, prompts: str | Sequence[str] | None = None) -> CompositeResult:
        """Per-term scores and ReNO losses; ``result.loss.backward()`` reaches ``images``."""
        check_images(images, self.name)
        if torch.is_grad_enabled() and images.requires_grad:
            bad = [n for n, r in self.rewards.items() if not r.differentiable]
            if bad:
                raise NonDifferentiableRewardError(
                    f"composite: {bad} cannot give gradients (differentiable=False); evaluate under "
                    "torch.no_grad() or on images.detach(), or drop them from the objective"
                )
        scores: dict[str, Tensor] = {}
        losses: dict[str, Tensor] = {}
        for n, r in self.rewards.items():
            s = r.score(images, prompts if r.uses_prompts else None)
            scores[n] = s
            losses[n] = self.weights[n] * (self.offsets[n] - s)
        per_sample = torch.stack(list(losses.values())).sum(dim=0)
        total = torch.stack([self.weights[n] * scores[n] for n in scores]).sum(dim=0)
        return CompositeResult(
            scores=scores,
            losses=losses,
            loss_per_sample=per_sample,
            loss=per_sample.mean(),
            total_score=total,
            weights=dict(self.weights),
            offsets=dict(self.offsets),
        )

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return self.evaluate(images, prompts).total_score

    def score(self, images: Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        return self.evaluate(images, prompts).total_score

    def similarity_term(self) -> tuple[EmbeddingSimilarityReward, float] | None:
        """``(reward, factor)`` when this composite is one embedding-similarity term (``clip:1``, ``hps:5``): its
        total score is then ``factor · cos(f_img, f_txt)`` with ``factor = weight · similarity_scale``; else None."""
        if len(self.rewards) != 1:
            return None
        ((name, reward),) = self.rewards.items()
        if not isinstance(reward, EmbeddingSimilarityReward):
            return None
        return reward, self.weights[name] * reward.similarity_scale

    @property
    def spec(self) -> str:
        """The spec string that rebuilds these weights and offsets (inverse of :func:`parse_reward_spec`)."""
        return ",".join(f"{n}:{self.weights[n]!r}:{self.offsets[n]!r}" for n in self.rewards)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: w={self.weights[n]:g}, offset={self.offsets[n]:g}" for n in self.rewards)
