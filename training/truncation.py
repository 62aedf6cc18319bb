"""Truncated backpropagation through sampling: how many of the last denoising steps each trajectory differentiates.

AlignProp (Prabhudesai et al. 2023, Sec. 4.2 "Randomized truncated backpropagation") backpropagates the
reward only through the last K of the T sampling steps, K ~ Uniform{min, ..., max}, because full
backpropagation over-optimises and costs memory linear in K. Strategies here:

* ``fixed``: K = ``k`` for every trajectory (K ≥ T is full backpropagation);
* ``uniform``: K ~ Uniform{``k_min``, ..., ``k_max``};
* ``gaussian``: K = round(N(``k_mean``, ``k_std``²)).

K is clamped to [1, T] and drawn **once per trajectory** (per image), so each image differentiates a
contiguous window of its last K steps. The reference implementation instead drew a fresh random cut-off at
every step of its loop and detached that step's UNet output when the step came before the cut-off, so inside
the cut-off's range the differentiated steps of one trajectory were a random, not necessarily contiguous,
subset whose length is not distributed as configured. Here the configured distribution is exactly that of the
window lengths, which is what the memory benchmark and the paper's analysis assume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from diffsteer.guidance.errors import InvalidInput

TruncationStrategy = Literal["fixed", "uniform", "gaussian"]
STRATEGIES: tuple[str, ...] = ("fixed", "uniform", "gaussian")


def draw_truncation(
    strategy: str,
    rng: np.random.Generator,
    n: int,
    num_steps: int,
    *,
    k: int = 1,
    k_min: int = 1,
    k_max: int = 1,
    k_mean: float = 1.0,
    k_std: float = 0.0,
) -> np.ndarray:
    """K for each of ``n`` trajectories of ``num_steps`` steps (int array, values in [1, num_steps])."""
    if strategy == "fixed":
        ks = np.full(n, k)
    elif strategy == "uniform":
        if k_min > k_max:
            raise InvalidInput("truncation_k_min", f"{k_min} is larger than truncation_k_max={k_max}")
        ks = rng.integers(k_min, k_max + 1, size=n)
    elif strategy == "gaussian":
        ks = np.rint(rng.normal(k_mean, k_std, size=n))
    else:
        raise InvalidInput("truncation", f"unknown value {strategy!r}; accepted values: {', '.join(STRATEGIES)}")
    return np.clip(ks, 1, num_steps).astype(np.int64)


def window_mask(ks: np.ndarray | torch.Tensor, num_steps: int) -> Callable[[int], torch.Tensor]:
    """``grad_at_step`` for the sampler: at step i, image b is differentiated iff i ≥ num_steps − K_b."""
    starts = num_steps - torch.as_tensor(np.asarray(ks), dtype=torch.long)
    return lambda i: i >= starts
