"""Perp-Neg: negative prompts applied orthogonally to the positive direction.

Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm: Transform 2D Diffusion into 3D, alleviate
Janus problem and Beyond" (arXiv:2304.04968), eq. 10, with ∅ the empty prompt:

    Δ_pos = ε_pos − ε_∅,   Δ_neg = ε_neg − ε_∅
    Δ_neg⊥ = Δ_neg − (⟨Δ_neg, Δ_pos⟩ / ‖Δ_pos‖²)·Δ_pos
    ε̃ = ε_∅ + w·Δ_pos − w_neg·Δ_neg⊥

Unlike CFG with a negative prompt, which pushes away from everything the negative prompt shares with the
positive one, only the part of the negative direction orthogonal to the positive one is removed. Without a
negative prompt ε_neg = ε_∅ and this is plain CFG against the empty prompt (the "negative" evaluation is then
not made: it is the same condition as the empty one).

Space: the velocity of the sampling ODE (:func:`~diffsteer.guidance.parameterisation.to_velocity`): the paper's
ε on VP models, the flow velocity v on flow models. There ε = x_t + (1 − σ)·v, an affine map with one
coefficient for every condition, under which the ratio ⟨Δ_neg, Δ_pos⟩/‖Δ_pos‖² is unchanged and the weights of
ε_∅, ε_pos, ε_neg (summing to 1) carry over: on v it equals Perp-Neg on ε wherever ε determines the output
(σ < 1), and it is defined at σ = 1, the first flow step, where ε = x_t for every condition.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch

from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.parameterisation import from_velocity, to_velocity
from diffsteer.guidance.policies.apg import project
from diffsteer.guidance.policies.base import GuidancePolicy, PolicyParams, PolicyState


class PerpNegParams(PolicyParams):
    name: Literal["perp_neg"] = "perp_neg"
    scale: float = pydantic.Field(7.5, ge=0.0, le=100.0, description="Positive guidance scale w.")
    negative_scale: float | None = pydantic.Field(
        None, ge=0.0, le=100.0, description="Weight w_neg of the orthogonal negative direction; default: w."
    )


class PerpNeg(GuidancePolicy):
    name = "perp_neg"
    Params = PerpNegParams
    conditions = ("cond", "empty", "negative")
    summary = "Perp-Neg: only the part of the negative prompt orthogonal to the positive direction is removed."

    def step(self, state: PolicyState, x: torch.Tensor, info: StepInfo, denoiser: Denoiser) -> torch.Tensor:
        p = self.params
        if p.scale <= 1.0:
            return denoiser(x, info, ["cond"])["cond"]
        out = denoiser(x, info, ["empty", "negative", "cond"])
        u = {k: to_velocity(v, x, info.level, info.prediction_type) for k, v in out.items()}
        w_neg = p.scale if p.negative_scale is None else p.negative_scale
        guided = perp_neg_combine(u["cond"], u["empty"], u["negative"], p.scale, w_neg)
        return from_velocity(guided, x, info.level, info.prediction_type)


def perp_neg_combine(
    cond: torch.Tensor, empty: torch.Tensor, negative: torch.Tensor, scale: float, negative_scale: float
) -> torch.Tensor:
    """Eq. 10: ε_∅ + w·Δ_pos − w_neg·Δ_neg⊥."""
    delta_pos = cond - empty
    _, delta_neg_perp = project(negative - empty, delta_pos)
    return empty + scale * delta_pos - negative_scale * delta_neg_perp
