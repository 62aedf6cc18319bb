"""Group-relative advantages (GRPO): each sample's reward against the other samples of its prompt.

Shao et al. 2024, "DeepSeekMath" (GRPO), eq. 3 as Flow-GRPO uses it (Liu et al. 2025, arXiv 2505.05470, eq. 4):
G images are sampled per prompt and image i's advantage is

    Â_i = (R_i − mean(R_1..G)) / (std(R_1..G) + ε)

with the population standard deviation (the paper's code: ``np.std``, ε = 1e-4), so no value network is needed.
DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) normalises its rewards the same way before turning them into
optimality weights. Here a group is G consecutive positions of a step's global batch, whichever processes hold
them: the rewards are gathered from every process first, so a group split over processes is normalised over all
of it and N processes compute what one process with the whole batch does.
"""

from __future__ import annotations

import numpy as np
import torch

from diffsteer.training.distributed import Processes

STD_EPSILON = 1e-4


def group_advantages(rewards: np.ndarray, group_size: int, epsilon: float = STD_EPSILON) -> np.ndarray:
    """(R − group mean)/(group std + ε) for ``rewards`` laid out group by group (len divisible by ``group_size``)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    groups = rewards.reshape(-1, group_size)
    normalised = (groups - groups.mean(axis=1, keepdims=True)) / (groups.std(axis=1, keepdims=True) + epsilon)
    return normalised.reshape(-1)


def gather_global(processes: Processes, local: dict[int, np.ndarray], size: int) -> np.ndarray:
    """The step's global array of ``size`` values from every process's ``{start position: values}`` pieces
    (all-gathered over the default group; one process: its own pieces). Every position must be filled."""
    pieces = [local]
    if processes.distributed:
        pieces = [None] * processes.world_size
        torch.distributed.all_gather_object(pieces, {k: np.asarray(v) for k, v in local.items()})
    out = np.full(size, np.nan)
    for part in pieces:
        for start, values in part.items():
            out[start : start + len(values)] = values
    if np.isnan(out).any():
        raise RuntimeError(f"positions {np.flatnonzero(np.isnan(out))[:5].tolist()} of the global batch are missing")
    return out
