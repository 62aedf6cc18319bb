"""LinearAG: guidance with unconditional evaluations replaced by an affine estimate from past predictions.

Castillo et al. 2023, "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
Sec. 4.3 ("LinearAG"), observe that the unconditional prediction is well approximated by an affine function of
predictions already computed along the trajectory, and fit its coefficients offline by least squares over a
set of trajectories. That fit needs a calibration dataset per model and sampler, which a serving system does
not have; our estimator is an online, calibration-free member of the same affine family:

    Δ_j = u_u(j) − u_c(j)                       at steps j with a real unconditional evaluation,
    Δ̂_i = Δ_j + (i − j)/(j − k) · (Δ_j − Δ_k)   at a skipped step i (j, k: the last two real steps),
    û_u(i) = u_c(i) + Δ̂_i,                    ũ = û_u + w·(u_c − û_u),

with u the velocity of the sampling ODE (:func:`~diffsteer.guidance.parameterisation.to_velocity`): the noise
prediction ε on VP models, the flow velocity v = ε − x0 on flow models.

Why this estimator: the guidance direction Δ varies smoothly with the step (its cosine to the previous step's
is close to 1 after the first few steps, the observation AG itself rests on), so carrying it forward, with a
first-order correction, is accurate exactly where AG would switch guidance off, yet unlike AG it keeps
applying guidance. It works in that velocity space, where Δ is the guidance direction itself and, unlike
x0 differences (x0_u − x0_c = −σ·Δ), is not scaled by the step's σ. On flow models this is not ε: there
ε = x_t + (1 − σ)·v, so ε_u − ε_c = (1 − σ)·Δ vanishes at σ = 1, the first step of every flow schedule, and ε
does not determine the model output at that step. The first ``warmup_steps`` steps, where the direction changes
fastest, are always evaluated; after that one step in ``period`` is. ``extrapolate=false`` drops the first-order
term (Δ̂_i = Δ_j).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pydantic
import torch

from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.parameterisation import from_velocity, to_velocity
from diffsteer.guidance.policies.base import GuidancePolicy, PolicyParams, PolicyState
from diffsteer.guidance.policies.cfg import cfg_combine


class LinearAGParams(PolicyParams):
    name: Literal["linear_ag"] = "linear_ag"
    scale: float = pydantic.Field(7.5, ge=0.0, le=100.0, description="CFG scale w.")
    warmup_steps: int = pydantic.Field(3, ge=0, le=10_000, description="First steps always fully evaluated.")
    period: int = pydantic.Field(
        2, ge=1, le=10_000, description="After warm-up, one step in `period` evaluates the unconditional branch."
    )
    extrapolate: bool = pydantic.Field(True, description="Add the first-order term (Δ_j − Δ_k)·(i−j)/(j−k).")


@dataclass
class LinearAGState(PolicyState):
    history: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, Δ) at real evaluations
    estimated_steps: list[int] = field(default_factory=list)


class LinearAG(GuidancePolicy):
    name = "linear_ag"
    Params = LinearAGParams
    summary = "CFG whose unconditional branch is estimated affinely from past steps on skipped steps."

    def start(self, ctx) -> LinearAGState:
        return LinearAGState()

    def step(self, state: LinearAGState, x: torch.Tensor, info: StepInfo, denoiser: Denoiser) -> torch.Tensor:
        p = self.params
        if p.scale <= 1.0:
            return denoiser(x, info, ["cond"])["cond"]
        i = info.index
        evaluate = not state.history or i < p.warmup_steps or (i - p.warmup_steps) % p.period == 0
        if evaluate:
            out = denoiser(x, info, ["uncond", "cond"])
            u_c = to_velocity(out["cond"], x, info.level, info.prediction_type)
            u_u = to_velocity(out["uncond"], x, info.level, info.prediction_type)
            state.history = [*state.history[-1:], (i, u_u - u_c)]
        else:
            cond = denoiser(x, info, ["cond"])["cond"]
            u_c = to_velocity(cond, x, info.level, info.prediction_type)
            u_u = u_c + estimate_difference(state.history, i, p.extrapolate)
            state.estimated_steps.append(i)
        state.trace["estimated_steps"] = state.estimated_steps
        return from_velocity(cfg_combine(u_c, u_u, p.scale), x, info.level, info.prediction_type)


def estimate_difference(history: list[tuple[int, torch.Tensor]], step: int, extrapolate: bool) -> torch.Tensor:
    """Δ̂ at ``step`` from the last (at most two) real differences, constant or linearly extrapolated."""
    j, delta_j = history[-1]
    if not extrapolate or len(history) < 2:
        return delta_j
    k, delta_k = history[-2]
    return delta_j + (step - j) / (j - k) * (delta_j - delta_k)
