"""CFG-Zero*: optimised scale and zero-init.

Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models" (arXiv:2503.18886):

    s* = ⟨v_c, v_u⟩ / ‖v_u‖²                      (eq. 9, per image: the least-squares scale of v_u onto v_c)
    v̂  = (1 − w)·s*·v_u + w·v_c = s*·v_u + w·(v_c − s*·v_u)   (eq. 10)
    zero-init: the first K steps output a zero velocity (Sec. 3.3), i.e. the sample does not move.

On flow-matching models (SD3, FLUX, Qwen-Image) it acts on the flow velocity v, as in the paper. UNet models
are not flow-matching models, so there we apply the method to their ε prediction, the velocity of the
probability-flow ODE in σ space (dx/dσ = ε for x = x0 + σ·ε): "zero velocity" is then ε = 0, under which DDIM
and Euler leave x/√ᾱ unchanged — the sample does not move, as in the paper. Both are
:func:`~diffsteer.guidance.parameterisation.to_velocity`. Zero-init is off by default (the paper uses it on
flow models, with K ≈ 4% of the steps).
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch

from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.parameterisation import from_velocity, to_velocity
from diffsteer.guidance.policies.base import GuidancePolicy, PolicyParams, PolicyState


class CFGZeroStarParams(PolicyParams):
    name: Literal["cfg_zero_star"] = "cfg_zero_star"
    scale: float = pydantic.Field(7.5, ge=0.0, le=100.0, description="Guidance scale w; ≤ 1 disables guidance.")
    zero_init_steps: int = pydantic.Field(
        0, ge=0, le=10_000, description="Number of first steps that output zero velocity (v = 0; ε = 0 on UNet models)."
    )


class CFGZeroStar(GuidancePolicy):
    name = "cfg_zero_star"
    Params = CFGZeroStarParams
    summary = "CFG with the optimised scale s* of the unconditional prediction, and optional zero-init."

    def step(self, state: PolicyState, x: torch.Tensor, info: StepInfo, denoiser: Denoiser) -> torch.Tensor:
        p = self.params
        if info.index < p.zero_init_steps:
            state.trace["zero_init_steps"] = info.index + 1
            return from_velocity(torch.zeros_like(x), x, info.level, info.prediction_type)
        if p.scale <= 1.0:
            return denoiser(x, info, ["cond"])["cond"]
        out = denoiser(x, info, ["uncond", "cond"])
        v_c = to_velocity(out["cond"], x, info.level, info.prediction_type)
        v_u = to_velocity(out["uncond"], x, info.level, info.prediction_type)
        s_star = optimised_scale(v_c, v_u)
        state.trace.setdefault("s_star", []).append(s_star.flatten().tolist())
        guided = cfg_zero_star_combine(v_c, v_u, s_star, p.scale)
        return from_velocity(guided, x, info.level, info.prediction_type)


def optimised_scale(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """s* = ⟨cond, uncond⟩ / ‖uncond‖² per image (eq. 9), shaped to broadcast over the image."""
    c, u = cond.double().flatten(1), uncond.double().flatten(1)
    s = (c * u).sum(1) / (u * u).sum(1).clamp_min(1e-30)
    return s.to(cond.dtype).view(-1, *([1] * (cond.ndim - 1)))


def cfg_zero_star_combine(cond: torch.Tensor, uncond: torch.Tensor, s_star: torch.Tensor, scale: float) -> torch.Tensor:
    """Eq. 10: (1 − w)·s*·uncond + w·cond."""
    return (1.0 - scale) * s_star * uncond + scale * cond
