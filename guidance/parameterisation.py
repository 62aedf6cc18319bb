"""Conversions between a diffusion model's prediction spaces: ε (noise), v, x0 (the denoised image).

All use the variance-preserving parametrisation x_t = √ᾱ·x0 + √(1−ᾱ)·ε, with x_t the scheduler-scaled model
input and ᾱ the step's cumulative signal level (for σ-schedulers ᾱ = 1/(1+σ²)); v = √ᾱ·ε − √(1−ᾱ)·x0
(Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", Sec. 4). The sampler,
the policies and the trainers convert through these functions and nowhere else.
"""

from __future__ import annotations

import torch

PredictionType = str  # "epsilon" | "v_prediction" | "sample"


def _coefficients(alpha_bar: float) -> tuple[float, float]:
    return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5


def to_x0(output: torch.Tensor, x: torch.Tensor, alpha_bar: float, prediction_type: PredictionType) -> torch.Tensor:
    """Denoised prediction x0 from a model output."""
    a, s = _coefficients(alpha_bar)
    if prediction_type == "epsilon":
        return (x - s * output) / a
    if prediction_type == "v_prediction":
        return a * x - s * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type: unknown value {prediction_type!r}")


def to_eps(output: torch.Tensor, x: torch.Tensor, alpha_bar: float, prediction_type: PredictionType) -> torch.Tensor:
    """Noise prediction ε from a model output."""
    a, s = _coefficients(alpha_bar)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return s * x + a * output
    if prediction_type == "sample":
        return (x - a * output) / s
    raise ValueError(f"prediction_type: unknown value {prediction_type!r}")


def from_x0(x0: torch.Tensor, x: torch.Tensor, alpha_bar: float, prediction_type: PredictionType) -> torch.Tensor:
    """The model output that corresponds to the denoised prediction ``x0`` at ``x``."""
    a, s = _coefficients(alpha_bar)
    if prediction_type == "sample":
        return x0
    eps = (x - a * x0) / s
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    raise ValueError(f"prediction_type: unknown value {prediction_type!r}")


def from_eps(eps: torch.Tensor, x: torch.Tensor, alpha_bar: float, prediction_type: PredictionType) -> torch.Tensor:
    """The model output that corresponds to the noise prediction ``eps`` at ``x``."""
    a, s = _coefficients(alpha_bar)
    return from_x0((x - s * eps) / a, x, alpha_bar, prediction_type)
