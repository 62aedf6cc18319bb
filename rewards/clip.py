"""CLIP score (Radford et al. 2021; Hessel et al. 2021, "CLIPScore") with any open_clip model.

score = cos(f_img(x), f_txt(prompt)), optionally multiplied by the model's ``logit_scale.exp()`` (100 for
trained CLIP models). ReNO (Eyring et al. 2024) uses the scaled form with loss ``0.01 * (100 - score)``,
so ``scale_by_logit_scale`` defaults to True and the default offset is 100 (1 when unscaled): the spec
``clip:0.01`` then reproduces ReNO's CLIP term.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from .base import EmbeddingSimilarityReward, TextEmbeddingCache
from .open_clip_loader import OpenClipSourceConfig, encode_text, load_open_clip
from .preprocess import clip_preprocess


class ClipRewardConfig(OpenClipSourceConfig):
    """CLIP image-text similarity with an open_clip model loaded from local files."""

    name: Literal["clip"] = "clip"
    scale_by_logit_scale: bool = Field(
        default=True,
        description="Multiply the cosine by logit_scale.exp() (~100), as ReNO's CLIP loss does; offset 100 then, else 1.",
    )


class OpenClipSimilarityReward(EmbeddingSimilarityReward):
    """Cosine similarity of an open_clip model's image and text embeddings (CLIP, HPS): subclasses set the
    architecture they require (None: any) and whether the cosine is scaled by ``logit_scale``."""

    differentiable = True
    architecture: str | None = None

    def __init__(
        self, config: OpenClipSourceConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ):
        super().__init__(config)
        self.config = config
        self._loaded = load_open_clip(config, self.name, self.architecture, device, dtype)
        self.model = self._loaded.model
        self.preprocess_cfg = self._loaded.preprocess
        self.text_cache = TextEmbeddingCache(config.text_cache_size)

    @property
    def scaled(self) -> bool:
        return False

    @property
    def default_offset(self) -> float:
        return 100.0 if self.scaled else 1.0

    @property
    def similarity_scale(self) -> float:
        return float(self.model.logit_scale.exp().float()) if self.scaled else 1.0

    def image_embeddings(self, images: Tensor) -> Tensor:
        pixels = clip_preprocess(images.to(self._loaded.device), self._loaded.preprocess).to(self._loaded.input_dtype)
        return self.model.encode_image(pixels, normalize=True).float()

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        return self.text_cache.get(prompts, lambda p: encode_text(self._loaded, p)).float()

    def _apply(self, fn, *args, **kwargs):
        self.text_cache.clear()
        return super()._apply(fn, *args, **kwargs)


class ClipReward(OpenClipSimilarityReward):
    """open_clip CLIP score; see the module docstring."""

    name = "clip"
    config: ClipRewardConfig

    @property
    def scaled(self) -> bool:
        return self.config.scale_by_logit_scale
