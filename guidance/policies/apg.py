"""Adaptive Projected Guidance (APG).

Sadat, Hilliges & Weber 2024, "Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion
Models" (arXiv:2410.02416), Algorithm 1, on the denoised predictions D_c = D(x, c), D_u = D(x):

    Δ      = D_c − D_u                                   (eq. 7)
    Δ      ← Δ + β·Δ̄_prev,  Δ̄ ← Δ                      (reverse momentum, Sec. 4.3; β < 0 in the paper)
    Δ      ← Δ · min(1, r / ‖Δ‖)                         (rescaling, Sec. 4.2)
    Δ∥     = (⟨Δ, D_c⟩ / ⟨D_c, D_c⟩) · D_c,  Δ⊥ = Δ − Δ∥   (eq. 9)
    D̂      = D_c + (w − 1)·(Δ⊥ + η·Δ∥)                   (eq. 10)

Norms and inner products are per image over all latent dimensions. D̂ is converted back to the model's
prediction space for the scheduler.

How this differs from diffusers' ``AdaptiveProjectedGuidance``: diffusers applies the same projection to the
raw model output (ε or v) and returns u + w·Δ' (the unconditional output plus the projected difference). We
follow the paper and work on x0, where the projection onto D_c is meaningful (the parallel component is the
part of the update that changes the image's intensity, which is what oversaturates) and where the
threshold r is in image-latent units independent of the noise level. With η = 1, β = 0 and no threshold both
reduce to plain CFG, since conversion to x0 is affine with the same coefficients for both predictions.
``space="output"`` is diffusers' variant, kept for comparison: the same steps on the raw model output (ε, v or
flow velocity), returned as u + w·(Δ⊥ + η·Δ∥). On flow models the default works on x0 = x_t − σ·v (the paper's
space, as for UNets) and returns v̂ = (x_t − D̂)/σ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pydantic
import torch

from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.parameterisation import from_x0, to_x0
from diffsteer.guidance.policies.base import GuidancePolicy, PolicyParams, PolicyState


class APGParams(PolicyParams):
    name: Literal["apg"] = "apg"
    scale: float = pydantic.Field(7.5, ge=0.0, le=100.0, description="Guidance scale w; ≤ 1 disables guidance.")
    eta: float = pydantic.Field(
        0.0, ge=0.0, le=1.0, description="Weight η of the component parallel to D_c (0: drop it, 1: CFG)."
    )
    momentum: float = pydantic.Field(
        -0.5, ge=-1.0, le=1.0, description="Momentum β of the running difference; negative is reverse momentum."
    )
    norm_threshold: float = pydantic.Field(
        0.0, ge=0.0, description="Rescaling radius r for ‖Δ‖ in x0 units; 0 disables the rescaling."
    )
    space: Literal["x0", "output"] = pydantic.Field(
        "x0",
        description="x0: the paper's APG on denoised predictions, D_c + (w−1)·update. output: diffusers' "
        "AdaptiveProjectedGuidance on the raw model output, u + w·update.",
    )


@dataclass
class APGState(PolicyState):
    running: torch.Tensor | None = None


class APG(GuidancePolicy):
    name = "apg"
    Params = APGParams
    summary = "Adaptive projected guidance on x0: momentum, norm threshold, down-weighted parallel component."

    def start(self, ctx) -> APGState:
        return APGState()

    def step(self, state: APGState, x: torch.Tensor, info: StepInfo, denoiser: Denoiser) -> torch.Tensor:
        p = self.params
        if p.scale <= 1.0:
            return denoiser(x, info, ["cond"])["cond"]
        out = denoiser(x, info, ["uncond", "cond"])
        if p.space == "output":
            guided, state.running = apg_update(
                out["cond"], out["uncond"], state.running, p.scale, p.eta, p.momentum, p.norm_threshold, True
            )
            return guided
        d_cond = to_x0(out["cond"], x, info.level, info.prediction_type)
        d_uncond = to_x0(out["uncond"], x, info.level, info.prediction_type)
        guided, state.running = apg_update(
            d_cond, d_uncond, state.running, p.scale, p.eta, p.momentum, p.norm_threshold
        )
        return from_x0(guided, x, info.level, info.prediction_type)


def apg_update(
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    running: torch.Tensor | None,
    scale: float,
    eta: float,
    momentum: float,
    norm_threshold: float,
    from_uncond: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One APG step; returns (guided prediction, new running difference). The guided prediction is
    D_c + (w−1)·update (the paper), or u + w·update with ``from_uncond`` (diffusers' raw-output variant)."""
    diff = d_cond - d_uncond
    if running is not None:
        diff = diff + momentum * running
    running = diff
    if norm_threshold > 0:
        diff = diff * torch.clamp(norm_threshold / per_image_norm(diff), max=1.0)
    parallel, orthogonal = project(diff, d_cond)
    update = orthogonal + eta * parallel
    if from_uncond:
        return d_uncond + scale * update, running
    return d_cond + (scale - 1.0) * update, running


def per_image_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``v`` into its components parallel and orthogonal to ``onto``, per image (eq. 9)."""
    dtype = v.dtype
    v64, u64 = v.double().flatten(1), onto.double().flatten(1)
    coeff = (v64 * u64).sum(1, keepdim=True) / (u64 * u64).sum(1, keepdim=True).clamp_min(1e-30)
    parallel = (coeff * u64).view_as(v).to(dtype)
    return parallel, v - parallel
