"""Reward models for reward-driven policies (ReNO, dynamic CFG): a library of built rewards, passed down.

Requests name rewards by spec (``"clip:1"``, ``"hps:5,pickscore:0.05"``); where each reward's weights live
is the caller's configuration (the service's ``rewards`` setting, a trainer's config), given to a
:class:`RewardModels` that the caller passes down to :func:`diffsteer.guidance.sampler.generate` (and through it to the
policies), never set process-wide. Built composites are cached per (spec, device, dtype) in the library and
shared: reward models are frozen and only read during scoring, so concurrent requests can use one instance.
:data:`DEFAULT_REWARDS` needs no configuration: the built-in rewards, the proving ground's CLIP and its exact verifier
(``verifier``, registered here since ``rewards/`` imports nothing of ours).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

from diffsteer.guidance.errors import InvalidInput
from diffsteer.proving_ground import shipped
from diffsteer.proving_ground.reward import VerifierReward, VerifierRewardConfig
from diffsteer.rewards import CompositeReward, build_composite
from diffsteer.rewards.registry import register_reward

register_reward("verifier", VerifierReward, VerifierRewardConfig)


def default_reward_configs() -> dict[str, dict[str, Any]]:
    """Configurations that need no setup: ``clip`` is the proving ground's own open_clip model when shipped."""
    configs: dict[str, dict[str, Any]] = {}
    if (shipped.CLIP / "open_clip_config.json").is_file():
        configs["clip"] = {"model": f"local-dir:{shipped.CLIP}"}
    return configs


class RewardModels:
    """Rewards by spec, built from ``configs`` (name -> reward config fields, over the defaults) once, then shared."""

    def __init__(self, configs: Mapping[str, Mapping[str, Any]] | None = None):
        self.configs = {**default_reward_configs(), **{k: dict(v) for k, v in (configs or {}).items()}}
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str], CompositeReward] = {}

    def get(
        self, spec: str, device: torch.device | str, dtype: torch.dtype = torch.float32, field: str = "policy.reward"
    ) -> CompositeReward:
        """The CompositeReward for ``spec`` on ``device``; InvalidInput naming ``field`` for a bad spec."""
        key = (spec, str(device), str(dtype))
        with self._lock:
            reward = self._cache.get(key)
            if reward is None:
                try:
                    reward = build_composite(spec, device, dtype, configs=self.configs)
                except ValueError as e:
                    raise InvalidInput(field, str(e)) from None
                self._cache[key] = reward
        return reward


DEFAULT_REWARDS = RewardModels()


def get_reward(
    spec: str, device: torch.device | str, dtype: torch.dtype = torch.float32, field: str = "policy.reward"
) -> CompositeReward:
    """The default library's reward for ``spec`` (:data:`DEFAULT_REWARDS`)."""
    return DEFAULT_REWARDS.get(spec, device, dtype, field)
