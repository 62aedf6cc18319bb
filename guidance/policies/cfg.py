"""Classifier-free guidance with rescale, guidance intervals and per-step scale schedules.

- CFG: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6:
  ε̃ = ε_u + w·(ε_c − ε_u), applied here to the model output in its own prediction space (as diffusers): ε, v,
  or the flow velocity (true CFG on flow models; equal to CFG on x0 or ε, since the maps between them are
  affine with the same coefficients for both predictions). On guidance-distilled models (FLUX.1-dev) it acts
  on top of the distilled guidance input.
- Guidance rescale φ: Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
  Sec. 3.4, eqs. 15–16: x_rescaled = x_cfg · σ(x_c)/σ(x_cfg), x_final = φ·x_rescaled + (1−φ)·x_cfg, with σ the
  per-image standard deviation. Like diffusers we apply it to the model output (ε, v, or the flow velocity on
  flow models; not equivalent to rescaling x0, as a standard deviation is not affine-equivariant).
- Guidance interval: Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
  Distribution Quality in Diffusion Models", eq. 4: guidance only for σ ∈ (σ_lo, σ_hi], the conditional
  prediction alone elsewhere. We offer the interval in σ and in fractions of the sampling steps; outside it
  the unconditional evaluation is not made at all. σ is the model's own: the flow σ ∈ [0, 1] on flow models,
  after the family's shift (a shifted schedule spends more steps at high σ, so the same σ interval covers
  other step fractions), and the noise-to-signal ratio √((1−ᾱ)/ᾱ) on UNet models.
- Renorm (``renorm``): the guided model output (the flow velocity on flow models) rescaled, per latent token
  (the channels of each patch × patch block), to the conditional output's norm: CFG-Renorm (Lumina-Image 2.0,
  Qin et al. 2025, Sec. 4.2; Qwen-Image's pipeline applies it after its true CFG), which keeps high scales from
  inflating the velocity.
- Schedules of w over the steps (constant, linear, cosine, or an explicit list), as in the dynamic-CFG
  literature (e.g. Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight Schedulers").

As in diffusers, a step whose scale is ≤ 1 is unguided: one conditional evaluation, no unconditional one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import pydantic
import torch

from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.policies.base import GuidancePolicy, PolicyParams, PolicyState, SamplingContext

Scale = pydantic.confloat(ge=0.0, le=100.0)


class CFGParams(PolicyParams):
    name: Literal["cfg"] = "cfg"
    scale: float = pydantic.Field(7.5, ge=0.0, le=100.0, description="Guidance scale w; ≤ 1 disables guidance.")
    rescale: float = pydantic.Field(
        0.0, ge=0.0, le=1.0, description="Guidance rescale φ (Lin et al. 2023); 0 disables, 0.7 is typical."
    )
    schedule: Literal["constant", "linear", "cosine"] = pydantic.Field(
        "constant", description="How w moves from `scale` at the first step to `scale_end` at the last."
    )
    scale_end: float = pydantic.Field(
        1.0, ge=0.0, le=100.0, description="Scale at the last step for the linear and cosine schedules."
    )
    scales: list[Scale] | None = pydantic.Field(  # type: ignore[valid-type]
        None, description="Explicit per-step scales (one per step); overrides scale/schedule."
    )
    interval_start: float = pydantic.Field(
        0.0, ge=0.0, le=1.0, description="Guidance only for steps with index/steps ≥ this fraction."
    )
    interval_end: float = pydantic.Field(
        1.0, ge=0.0, le=1.0, description="Guidance only for steps with index/steps < this fraction."
    )
    sigma_low: float | None = pydantic.Field(
        None, ge=0.0, description="Guidance only where σ > sigma_low (Kynkäänniemi et al. 2024)."
    )
    sigma_high: float | None = pydantic.Field(
        None, ge=0.0, description="Guidance only where σ ≤ sigma_high (Kynkäänniemi et al. 2024)."
    )
    renorm: bool = pydantic.Field(
        False, description="Rescale the guided prediction per latent token to the conditional one's norm (CFG-Renorm)."
    )

    @pydantic.model_validator(mode="after")
    def _check(self) -> CFGParams:
        if self.interval_start >= self.interval_end:
            raise InvalidInput(
                "policy.interval_end", f"must be > interval_start ({self.interval_start}), got {self.interval_end}"
            )
        if self.sigma_low is not None and self.sigma_high is not None and self.sigma_low >= self.sigma_high:
            raise InvalidInput("policy.sigma_high", f"must be > sigma_low ({self.sigma_low}), got {self.sigma_high}")
        if self.scales is not None and len(self.scales) == 0:
            raise ValueError("scales must not be empty")
        return self


@dataclass
class CFGState(PolicyState):
    scales: list[float] = field(default_factory=list)


class CFG(GuidancePolicy):
    name = "cfg"
    Params = CFGParams
    summary = "Classifier-free guidance with rescale, intervals and scale schedules."

    @property
    def conditions(self) -> tuple[str, ...]:  # type: ignore[override]
        """Without a guided step (every scheduled scale ≤ 1, e.g. FLUX.1-dev's default) the unconditional branch
        is never evaluated, so it is not encoded either (a T5-XXL pass saved on FLUX)."""
        p = self.params
        highest = (
            max(p.scales) if p.scales is not None else max(p.scale, p.scale_end if p.schedule != "constant" else 0)
        )
        return ("cond", "uncond") if highest > 1.0 else ("cond",)

    def start(self, ctx: SamplingContext) -> CFGState:
        check_scales_length(self.params.scales, ctx.requested_steps or ctx.num_steps)
        return CFGState()

    def step(self, state: CFGState, x: torch.Tensor, info: StepInfo, denoiser: Denoiser) -> torch.Tensor:
        p = self.params
        w = step_scale(p, info) if in_interval(p, info) else 1.0
        state.scales.append(w)
        state.trace["scales"] = state.scales
        if w <= 1.0:
            return denoiser(x, info, ["cond"])["cond"]
        out = denoiser(x, info, ["uncond", "cond"])
        guided = cfg_combine(out["cond"], out["uncond"], w)
        if p.rescale > 0:
            guided = rescale_guidance(guided, out["cond"], p.rescale)
        if p.renorm:
            guided = renorm_per_token(guided, out["cond"], info.patch)
        return guided


def check_scales_length(scales: list[float] | None, num_steps: int) -> None:
    if scales is not None and len(scales) != num_steps:
        raise InvalidInput("policy.scales", f"has {len(scales)} values but steps is {num_steps}; give one per step")


def step_scale(p: CFGParams, info: StepInfo) -> float:
    """The scheduled w at this step (before the interval is applied)."""
    if p.scales is not None:  # one per requested step; schedulers with more timesteps (Heun) map by position
        return float(p.scales[min(int(info.fraction * len(p.scales)), len(p.scales) - 1)])
    return scheduled_scale(p.schedule, p.scale, p.scale_end, info.progress)


def scheduled_scale(schedule: str, start: float, end: float, progress: float) -> float:
    """w at ``progress`` ∈ [0, 1]: constant ``start``; linear or half-cosine from ``start`` to ``end``."""
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule: unknown value {schedule!r}")


def in_interval(p: CFGParams, info: StepInfo) -> bool:
    """Whether guidance applies at this step (step-fraction interval and σ interval both)."""
    if not (p.interval_start <= info.fraction < p.interval_end):
        return False
    if p.sigma_low is not None and not info.sigma > p.sigma_low:
        return False
    if p.sigma_high is not None and not info.sigma <= p.sigma_high:
        return False
    return True


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Ho & Salimans 2022, eq. 6: uncond + w·(cond − uncond)."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023, eqs. 15–16: match the guided output's per-image std to the conditional one's, mix by φ."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * guided


def renorm_per_token(guided: torch.Tensor, cond: torch.Tensor, patch: int) -> torch.Tensor:
    """CFG-Renorm: ``guided`` · ‖cond‖/‖guided‖, norms over the channels of each ``patch`` × ``patch`` block of
    latents (one transformer token), as Qwen-Image's pipeline computes them on its packed tokens."""
    b, c, h, w = guided.shape
    blocks = (b, c, h // patch, patch, w // patch, patch)

    def norm(t: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(t.reshape(blocks), dim=(1, 3, 5), keepdim=True)

    return (guided.reshape(blocks) * (norm(cond) / norm(guided))).reshape(b, c, h, w)
