"""Reward models for reward-driven policies (ReNO, dynamic CFG): process-wide configuration and a cache.

Requests name rewards by spec (``"clip:1"``, ``"hps:5,pickscore:0.05"``); where each reward's weights live
is server configuration (:func:`configure_rewards`, e.g. from the CLI's ``--reward-config`` or the service
config), not request data. Built composites are cached per (spec, device, dtype) and shared: reward models
are frozen and only read during scoring, so concurrent requests can use one instance.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from guidance.errors import InvalidInput

PROVING_GROUND_CLIP = Path(__file__).resolve().parents[1] / "proving_ground" / "assets" / "clip"

_lock = threading.Lock()
_configs: dict[str, dict[str, Any]] = {}
_cache: dict[tuple[str, str, str], Any] = {}


def default_reward_configs() -> dict[str, dict[str, Any]]:
    """Configurations that need no setup: ``clip`` is the proving ground's own open_clip model when shipped."""
    configs: dict[str, dict[str, Any]] = {}
    if (PROVING_GROUND_CLIP / "open_clip_config.json").is_file():
        configs["clip"] = {"model": f"local-dir:{PROVING_GROUND_CLIP}"}
    return configs


def configure_rewards(configs: Mapping[str, Mapping[str, Any]]) -> None:
    """Set where each reward's weights come from (name -> reward config fields); clears the cache."""
    with _lock:
        _configs.clear()
        _configs.update({k: dict(v) for k, v in configs.items()})
        _cache.clear()


def reward_configs() -> dict[str, dict[str, Any]]:
    return {**default_reward_configs(), **_configs}


def get_reward(spec: str, device: torch.device | str, dtype: torch.dtype = torch.float32, field: str = "policy.reward"):
    """The CompositeReward for ``spec`` on ``device`` (built once, then shared)."""
    from rewards import build_composite

    key = (spec, str(device), str(dtype))
    with _lock:
        reward = _cache.get(key)
        if reward is None:
            try:
                reward = build_composite(spec, device, dtype, configs=reward_configs())
            except ValueError as e:
                raise InvalidInput(field, str(e)) from None
            _cache[key] = reward
    return reward
