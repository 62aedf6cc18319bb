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

from pydantic import Field

from .clip import OpenClipSimilarityReward
from .open_clip_loader import OpenClipSourceConfig

HPS_ARCHITECTURE = "ViT-H-14"


class HpsRewardConfig(OpenClipSourceConfig):
    """HPSv2/v2.1: open_clip ViT-H-14 with the HPS checkpoint (`checkpoint` = HPS_v2.1_compressed.pt)."""

    name: Literal["hps"] = "hps"
    resize_mode: Literal["shortest", "longest", "squash"] | None = Field(
        default="longest",
        description="'longest' = HPSv2's official ResizeMaxSize (fit + black pad); 'shortest' = crop as ReNO does.",
    )


class HpsReward(OpenClipSimilarityReward):
    """HPSv2 score (unscaled cosine, offset 1); see the module docstring."""

    name = "hps"
    architecture = HPS_ARCHITECTURE
    config: HpsRewardConfig
