"""Prediction spaces and noise schedules: the one place where ε, v, x0 and flow velocity are converted.

Both schedules write a noisy sample as x_t = a·x0 + s·ε (a :class:`NoiseLevel`):

- variance preserving (``vp``, the UNet models): a = √ᾱ, s = √(1−ᾱ), with ᾱ the step's cumulative signal level
  (for σ-schedulers ᾱ = 1/(1+σ²)); the model input x_t is the scheduler-scaled sample;
- rectified flow (``flow``, SD3, FLUX, Qwen-Image): a = 1 − σ, s = σ with σ ∈ [0, 1] (Liu et al. 2022, "Flow
  Straight and Fast"; Esser et al. 2024, "Scaling Rectified Flow Transformers", eq. 1).

The prediction types a model may output, and their inverses at x_t:

- ``epsilon``: ε;                       x0 = (x_t − s·ε)/a
- ``v_prediction``: v = a·ε − s·x0 (Salimans & Ho 2022, "Progressive Distillation", Sec. 4; VP only):
  x0 = a·x_t − s·v, ε = s·x_t + a·v
- ``sample``: x0 itself
- ``flow``: the flow velocity u = ε − x0 = dx_t/dσ (Lipman et al. 2023, "Flow Matching"): x0 = x_t − σ·u,
  ε = x_t + (1 − σ)·u; no division, so it holds at σ = 1 too.

The sampler, the policies and the trainers convert through these functions and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PredictionType = str  # "epsilon" | "v_prediction" | "sample" | "flow"
Schedule = Literal["vp", "flow"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

Level = float | torch.Tensor  # a scalar, or a tensor broadcasting over the batch ([B, 1, 1, 1])


@dataclass(frozen=True)
class NoiseLevel:
    """x_t = signal·x0 + noise·ε at one step of one schedule."""

    signal: Level
    noise: Level
    schedule: Schedule

    @classmethod
    def vp(cls, alpha_bar: Level) -> NoiseLevel:
        """The variance-preserving level of cumulative signal ᾱ."""
        return cls(alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5, "vp")

    @classmethod
    def flow(cls, sigma: Level) -> NoiseLevel:
        """The rectified-flow level at σ (x_t = (1 − σ)·x0 + σ·ε)."""
        return cls(1.0 - sigma, sigma, "flow")

    @property
    def sigma(self) -> Level:
        """The schedule's own σ: the flow σ = s for flow models, the noise-to-signal ratio s/a (k-diffusion's
        and diffusers' Euler σ) for VP models. Guidance intervals by σ are in these units."""
        return self.noise if self.schedule == "flow" else self.noise / self.signal

    @property
    def alpha_bar(self) -> Level:
        """ᾱ of the VP level with the same signal-to-noise ratio: a²/(a² + s²) (= ᾱ for VP levels)."""
        a2, s2 = self.signal**2, self.noise**2
        return a2 / (a2 + s2)


def check_prediction_type(prediction_type: PredictionType, schedule: Schedule) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: unknown value {prediction_type!r}; accepted: {', '.join(PREDICTION_TYPES)}")
    if (prediction_type == "flow") != (schedule == "flow") and prediction_type != "sample":
        raise ValueError(f"prediction_type {prediction_type!r} does not belong to the {schedule!r} schedule")


def add_noise(x0: torch.Tensor, eps: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
    """Forward noising: x_t = a·x0 + s·ε (√ᾱ·x0 + √(1−ᾱ)·ε, or (1−σ)·x0 + σ·ε)."""
    return level.signal * x0 + level.noise * eps


def x0_and_eps(
    output: torch.Tensor, x: torch.Tensor, level: NoiseLevel, prediction_type: PredictionType
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, ε) from a model output at x_t = ``x``."""
    a, s = level.signal, level.noise
    if prediction_type == "epsilon":
        return (x - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x - s * output, s * x + a * output
    if prediction_type == "flow":
        return x - s * output, x + a * output
    if prediction_type == "sample":
        return output, (x - a * output) / s
    raise ValueError(f"prediction_type: unknown value {prediction_type!r}; accepted: {', '.join(PREDICTION_TYPES)}")


def from_x0_and_eps(
    x0: torch.Tensor, eps: torch.Tensor, level: NoiseLevel, prediction_type: PredictionType
) -> torch.Tensor:
    """The model output in ``prediction_type`` for a clean image ``x0`` and noise ``eps`` (the training target)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return level.signal * eps - level.noise * x0
    if prediction_type == "flow":
        return eps - x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type: unknown value {prediction_type!r}; accepted: {', '.join(PREDICTION_TYPES)}")


def to_x0(output: torch.Tensor, x: torch.Tensor, level: NoiseLevel, prediction_type: PredictionType) -> torch.Tensor:
    """Denoised prediction x0 from a model output."""
    if prediction_type == "sample":
        return output
    return x0_and_eps(output, x, level, prediction_type)[0]


def to_eps(output: torch.Tensor, x: torch.Tensor, level: NoiseLevel, prediction_type: PredictionType) -> torch.Tensor:
    """Noise prediction ε from a model output."""
    if prediction_type == "epsilon":
        return output
    return x0_and_eps(output, x, level, prediction_type)[1]


def from_x0(x0: torch.Tensor, x: torch.Tensor, level: NoiseLevel, prediction_type: PredictionType) -> torch.Tensor:
    """The model output that corresponds to the denoised prediction ``x0`` at ``x``."""
    if prediction_type == "sample":
        return x0
    return from_x0_and_eps(x0, (x - level.signal * x0) / level.noise, level, prediction_type)


def from_eps(eps: torch.Tensor, x: torch.Tensor, level: NoiseLevel, prediction_type: PredictionType) -> torch.Tensor:
    """The model output that corresponds to the noise prediction ``eps`` at ``x``."""
    if prediction_type == "epsilon":
        return eps
    return from_x0_and_eps((x - level.noise * eps) / level.signal, eps, level, prediction_type)


def to_velocity(
    output: torch.Tensor, x: torch.Tensor, level: NoiseLevel, prediction_type: PredictionType
) -> torch.Tensor:
    """The velocity of the sampling ODE in the schedule's own time: the flow velocity u = ε − x0 (dx_t/dσ) for
    flow models, ε for VP models (dx/dσ = ε for the VE-scaled sample x = x_t/a = x0 + σ·ε)."""
    if level.schedule == "flow":
        x0, eps = x0_and_eps(output, x, level, prediction_type)
        return eps - x0
    return to_eps(output, x, level, prediction_type)


def from_velocity(
    velocity: torch.Tensor, x: torch.Tensor, level: NoiseLevel, prediction_type: PredictionType
) -> torch.Tensor:
    """The model output whose :func:`to_velocity` is ``velocity``."""
    if level.schedule == "flow":
        if prediction_type == "flow":
            return velocity
        # x_t = x0 + σ·u  =>  x0 = x_t − σ·u,  ε = x_t + (1 − σ)·u
        return from_x0_and_eps(x - level.noise * velocity, x + level.signal * velocity, level, prediction_type)
    return from_eps(velocity, x, level, prediction_type)
