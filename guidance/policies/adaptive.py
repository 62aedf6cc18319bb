"""Adaptive Guidance (AG).

Castillo et al. 2023, "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models"
(arXiv:2312.12487), Sec. 4.1: guidance matters early and becomes redundant once the conditional and
unconditional predictions agree. AG runs full CFG while the cosine similarity

    γ_t = ⟨D_c, D_u⟩ / (‖D_c‖·‖D_u‖)

stays below a threshold γ̄, and from the first step where γ_t ≥ γ̄ on uses the conditional prediction alone:
one backbone evaluation per step instead of two. The decision is per image, so a batch member's schedule never
depends on its neighbours. Guidance itself is CFG on the model output (ε, v or the flow velocity: the same as
on x0, the maps between them being affine and equal for both predictions).

Space of the cosine: the denoised predictions x0 by default, on VP and flow models alike (x0 = x_t − σ·v on flow
models). ``space="eps"`` takes it on the noise predictions, the quantity plotted in the paper's Fig. 2; VP models
only: on a flow model ε = x_t + (1 − σ)·v, so ε_c = ε_u = x_t at σ = 1, the first step of every flow schedule,
γ = 1 there whatever the prompt, and AG would stop guiding after its first step. It is refused on flow models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pydantic
import torch

from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.parameterisation import to_eps, to_x0
from diffsteer.guidance.policies.base import GuidancePolicy, PolicyParams, PolicyState, SamplingContext
from diffsteer.guidance.policies.cfg import cfg_combine


class AGParams(PolicyParams):
    name: Literal["ag"] = "ag"
    scale: float = pydantic.Field(7.5, ge=0.0, le=100.0, description="CFG scale w while guidance is on.")
    gamma_bar: float = pydantic.Field(
        0.99, ge=-1.0, le=1.0, description="Cosine-similarity threshold γ̄ from which on guidance stops."
    )
    space: Literal["x0", "eps"] = pydantic.Field(
        "x0", description="Predictions compared by the cosine: denoised (x0) or noise (eps; VP models only)."
    )


@dataclass
class AGState(PolicyState):
    switched: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    switch_step: list[int | None] = field(default_factory=list)
    cosines: list[list[float | None]] = field(default_factory=list)


class AdaptiveGuidance(GuidancePolicy):
    name = "ag"
    Params = AGParams
    summary = "Adaptive Guidance: CFG until cond/uncond cosine ≥ γ̄, then conditional-only steps."

    def start(self, ctx: SamplingContext) -> AGState:
        if self.params.space == "eps" and ctx.schedule == "flow":
            raise InvalidInput(
                "policy.space",
                "eps is not usable on flow-matching models: there ε = x_t + (1 − σ)·v, so the conditional and "
                "unconditional ε agree at σ = 1 (the first step) whatever the prompt; use x0",
            )
        return AGState(switched=torch.zeros(ctx.batch_size, dtype=torch.bool), switch_step=[None] * ctx.batch_size)

    def step(self, state: AGState, x: torch.Tensor, info: StepInfo, denoiser: Denoiser) -> torch.Tensor:
        p = self.params
        if p.scale <= 1.0 or bool(state.switched.all()):
            state.cosines.append([None] * len(state.switch_step))
            self._publish(state)
            return denoiser(x, info, ["cond"])["cond"]
        active = (~state.switched).nonzero().flatten()
        everyone = len(active) == len(state.switched)
        out = denoiser(x, info, {"uncond": None if everyone else active, "cond": None})
        cond, uncond = out["cond"], out["uncond"]
        guided = cond.clone()
        guided[active] = cfg_combine(cond[active], uncond, p.scale)

        convert = to_x0 if p.space == "x0" else to_eps
        xa = x[active]
        gamma = cosine_similarity(
            convert(cond[active], xa, info.level, info.prediction_type),
            convert(uncond, xa, info.level, info.prediction_type),
        )
        step_cos: list[float | None] = [None] * len(state.switch_step)
        for i, g in zip(active.tolist(), gamma.tolist()):
            step_cos[i] = g
            if g >= p.gamma_bar:
                state.switched[i] = True
                state.switch_step[i] = info.index
        state.cosines.append(step_cos)
        self._publish(state)
        return guided

    @staticmethod
    def _publish(state: AGState) -> None:
        state.trace["switch_step"] = state.switch_step
        state.trace["cosine"] = state.cosines


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """γ per image: ⟨a, b⟩ / (‖a‖‖b‖) over all non-batch dimensions, in float64."""
    a64, b64 = a.double().flatten(1), b.double().flatten(1)
    return (a64 * b64).sum(1) / (a64.norm(dim=1) * b64.norm(dim=1)).clamp_min(1e-30)
