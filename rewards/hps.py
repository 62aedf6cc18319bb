"""Human Preference Score v2 / v2.1 (Wu et al. 2023, "Human Preference Score v2: A Solid Benchmark for
Evaluating Human Preferences of Text-to-Image Synthesis").

HPSv2 is open_clip ``ViT-H-14`` fine-tuned on human preference pairs (HPD v2); the released checkpoints
(``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) hold the full CLIP state dict under ``'state_dict'``.
The score is the cosine similarity of the L2-normalised image and text embeddings (HPSv2's ``score()``
takes ``diag(image_features @ text_features.T)`` of the normalised features) — typically 0.2-0.35.

Preprocessing: HPSv2's official evaluation transform resizes the *longest* side to 224 and pads with
black (``ResizeMaxSize``), which is ``resize_mode="longest"`` here and the default; for square images it
is identical to the usual shortest-side resize + centre crop (ReNO's choice, ``resize_mode="shortest"``).

ReNO's loss is ``1 - score`` (offset 1.0) with weight 5.0 (spec ``hps:5``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from .base import Reward, TextEmbeddingCache
from .clip import open_clip_similarity
from .open_clip_loader import OpenClipSourceConfig, load_open_clip

HPS_ARCHITECTURE = "ViT-H-14"


class HpsRewardConfig(OpenClipSourceConfig):
    """HPSv2/v2.1: open_clip ViT-H-14 with the HPS checkpoint (`checkpoint` = HPS_v2.1_compressed.pt)."""

    name: Literal["hps"] = "hps"
    resize_mode: Literal["shortest", "longest", "squash"] | None = Field(
        default="longest",
        description="'longest' = HPSv2's official ResizeMaxSize (fit + black pad); 'shortest' = crop as ReNO does.",
    )


class HpsReward(Reward):
    """HPSv2 score; see the module docstring."""

    name = "hps"
    differentiable = True
    uses_prompts = True

    def __init__(self, config: HpsRewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(config)
        self.config: HpsRewardConfig = config
        loaded = load_open_clip(config, self.name, HPS_ARCHITECTURE, device, dtype)
        self.model = loaded.model
        self._loaded = loaded
        self.preprocess_cfg = loaded.preprocess
        self.text_cache = TextEmbeddingCache(config.text_cache_size)

    @property
    def default_offset(self) -> float:
        return 1.0

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return open_clip_similarity(self._loaded, self.text_cache, images, prompts, scale=False)

    def _apply(self, fn, *args, **kwargs):
        self.text_cache.clear()
        return super()._apply(fn, *args, **kwargs)
