"""Timestep shifting of rectified-flow schedules, as the flow families' diffusers pipelines compute it.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", Sec. 5.3.2: a
shift s maps σ to s·σ / (1 + (s − 1)·σ), spending more steps at high noise for larger images. FLUX.1 and
Qwen-Image choose it per resolution ("dynamic shifting"): μ = log s grows linearly with the image's token
count between (base_seq_len, base_shift) and (max_seq_len, max_shift), and the scheduler applies
exp(μ) / (exp(μ) + (1/σ − 1)), which is the same map with s = exp(μ).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def dynamic_shift_mu(tokens: int, scheduler_config: dict[str, Any], default_max_shift: float = 1.15) -> float:
    """μ for an image of ``tokens`` tokens: linear through (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift) of the scheduler config (diffusers' defaults 256, 0.5, 4096, 1.15)."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", default_max_shift)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return tokens * slope + (base_shift - slope * base_len)


def linear_sigmas(steps: int) -> np.ndarray:
    """σ = 1, …, 1/steps evenly spaced: the unshifted grid FLUX.1 and Qwen-Image pass to their scheduler."""
    return np.linspace(1.0, 1.0 / steps, steps)


def static_shift(scheduler_config: dict[str, Any], mu: float | None) -> float:
    """The shift s a scheduler without dynamic shifting needs to give the same σ grid: exp(μ) where the family
    shifts by resolution, else the config's own ``shift``."""
    if mu is not None and scheduler_config.get("use_dynamic_shifting"):
        return math.exp(mu)
    return float(scheduler_config.get("shift", 1.0))
