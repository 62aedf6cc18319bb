"""Differentiable rewards for text-to-image diffusion behind one interface.

``Reward.score(images, prompts) -> Tensor[B]`` with images float [B, 3, H, W] in [0, 1], differentiable in
the images for every reward whose ``differentiable`` is True; composite objectives use ReNO's loss
``sum_i w_i (o_i - r_i)``. Build everything through :func:`build_reward`. Importing this package loads no
model weights and no open_clip / transformers code.
"""

from .aesthetic import AestheticReward, AestheticRewardConfig
from .base import EmbeddingSimilarityReward, NonDifferentiableRewardError, Reward, RewardConfig, TextEmbeddingCache
from .clip import ClipReward, ClipRewardConfig
from .composite import CompositeResult, CompositeReward, TermSpec, parse_reward_spec
from .hps import HpsReward, HpsRewardConfig
from .pickscore import PickScoreReward, PickScoreRewardConfig
from .preprocess import ClipPreprocess, ClipPreprocessConfig, clip_preprocess
from .registry import (
    available_rewards,
    build_composite,
    build_reward,
    make_reward_config,
    register_reward,
    reward_config_help,
    reward_config_schema,
    reward_entry,
)
from .simple import (
    BrightnessReward,
    BrightnessRewardConfig,
    ContrastReward,
    ContrastRewardConfig,
    JpegCompressibilityConfig,
    JpegCompressibilityReward,
    SaturationReward,
    SaturationRewardConfig,
)

__all__ = [
    "EmbeddingSimilarityReward",
    "AestheticReward",
    "AestheticRewardConfig",
    "BrightnessReward",
    "BrightnessRewardConfig",
    "ClipPreprocess",
    "ClipPreprocessConfig",
    "ClipReward",
    "ClipRewardConfig",
    "CompositeResult",
    "CompositeReward",
    "ContrastReward",
    "ContrastRewardConfig",
    "HpsReward",
    "HpsRewardConfig",
    "JpegCompressibilityConfig",
    "JpegCompressibilityReward",
    "NonDifferentiableRewardError",
    "PickScoreReward",
    "PickScoreRewardConfig",
    "Reward",
    "RewardConfig",
    "SaturationReward",
    "SaturationRewardConfig",
    "TermSpec",
    "TextEmbeddingCache",
    "available_rewards",
    "build_composite",
    "build_reward",
    "clip_preprocess",
    "make_reward_config",
    "parse_reward_spec",
    "register_reward",
    "reward_config_help",
    "reward_config_schema",
    "reward_entry",
]
