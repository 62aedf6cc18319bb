"""Weight-free image statistics used as rewards: cheap targets for tests, demos and the proving ground.

* ``saturation``: mean HSV saturation ``(max - min) / max`` over pixels, in [0, 1]; differentiable
  (sub-gradients at ties, as for ``max``).
* ``brightness``: ``-|mean luma - target|`` (or squared), luma = ITU-R BT.601 ``0.299 R + 0.587 G + 0.114 B``
  as in PIL's ``convert("L")``; 0 is best.
* ``contrast``: ``-|RMS contrast - target|`` (or squared), RMS contrast = standard deviation of the luma.
* ``jpeg_compressibility``: ``-(JPEG size in kB)`` at a fixed quality, as the compressibility reward of DDPO
  (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning"). A metric, not a
  differentiable function: ``differentiable = False``; its scores carry no gradient and asking for one
  raises :class:`~diffsteer.rewards.base.NonDifferentiableRewardError`.

Offsets for ReNO-style losses: saturation 1 (its maximum), brightness/contrast 0 (their maximum),
jpeg_compressibility 0 (an upper bound).
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torch import Tensor

from .base import Reward, RewardConfig

_LUMA = (0.299, 0.587, 0.114)


def luma(images: Tensor) -> Tensor:
    """BT.601 luma [B, H, W] of [B, 3, H, W] RGB images."""
    w = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * w).sum(dim=1)


def hsv_saturation(images: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-pixel HSV saturation [B, H, W]; 0 for black (where max = 0)."""
    cmax = images.amax(dim=1)
    cmin = images.amin(dim=1)
    return (cmax - cmin) / (cmax + eps)


def _distance(x: Tensor, target: float, kind: str) -> Tensor:
    d = x - target
    return d.abs() if kind == "abs" else d * d


class SaturationRewardConfig(RewardConfig):
    """Mean HSV saturation of the image (no weights)."""

    name: Literal["saturation"] = "saturation"


class SaturationReward(Reward):
    """Mean HSV saturation in [0, 1]."""

    name = "saturation"
    uses_prompts = False

    def __init__(self, config: SaturationRewardConfig | None = None, device=None, dtype=None):
        super().__init__(config or SaturationRewardConfig())

    @property
    def default_offset(self) -> float:
        return 1.0

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return hsv_saturation(images.float()).flatten(1).mean(dim=1)


class TargetStatisticConfig(RewardConfig):
    target: float = Field(default=0.5, ge=0.0, le=1.0, description="Target value of the statistic, in [0, 1].")
    distance: Literal["abs", "squared"] = Field(
        default="abs", description="Negative absolute ('abs') or squared ('squared') distance to the target."
    )


class BrightnessRewardConfig(TargetStatisticConfig):
    """Negative distance of the mean BT.601 luma to `target`."""

    name: Literal["brightness"] = "brightness"


class ContrastRewardConfig(TargetStatisticConfig):
    """Negative distance of the RMS contrast (luma std) to `target`."""

    name: Literal["contrast"] = "contrast"
    target: float = Field(default=0.25, ge=0.0, le=0.5, description="Target luma standard deviation, in [0, 0.5].")


class BrightnessReward(Reward):
    """``-dist(mean luma, target)``; 0 is best."""

    name = "brightness"
    uses_prompts = False

    def __init__(self, config: BrightnessRewardConfig | None = None, device=None, dtype=None):
        super().__init__(config or BrightnessRewardConfig())
        self.config: BrightnessRewardConfig

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        mean = luma(images.float()).flatten(1).mean(dim=1)
        return -_distance(mean, self.config.target, self.config.distance)


class ContrastReward(Reward):
    """``-dist(std of luma, target)``; 0 is best."""

    name = "contrast"
    uses_prompts = False

    def __init__(self, config: ContrastRewardConfig | None = None, device=None, dtype=None):
        super().__init__(config or ContrastRewardConfig())
        self.config: ContrastRewardConfig

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        std = luma(images.float()).flatten(1).std(dim=1, unbiased=False)
        return -_distance(std, self.config.target, self.config.distance)


class JpegCompressibilityConfig(RewardConfig):
    """Negative JPEG file size in kB (DDPO's compressibility reward); a non-differentiable metric."""

    name: Literal["jpeg_compressibility"] = "jpeg_compressibility"
    quality: int = Field(default=95, ge=1, le=95, description="JPEG quality passed to PIL (DDPO uses 95).")


class JpegCompressibilityReward(Reward):
    """``-(bytes of the PIL JPEG encoding) / 1000``: higher = more compressible. Not differentiable."""

    name = "jpeg_compressibility"
    differentiable = False
    uses_prompts = False

    def __init__(self, config: JpegCompressibilityConfig | None = None, device=None, dtype=None):
        super().__init__(config or JpegCompressibilityConfig())
        self.config: JpegCompressibilityConfig

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        with torch.no_grad():
            pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
            arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for arr in arrays:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=self.config.quality)
            sizes.append(buf.tell() / 1000.0)
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device)
