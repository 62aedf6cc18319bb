"""PickScore (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
Generation").

A transformers ``CLIPModel`` (CLIP-ViT-H-14 fine-tuned on Pick-a-Pic preferences,
``yuvalkirstain/PickScore_v1``) scored as in the paper's reference code::

    score = logit_scale.exp() * cos(image_embeds, text_embeds)        # ~18-24 for real images

The model folder holds no tokenizer; the authors pair it with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (``processor_path``). Tokenisation as in the reference: padding,
truncation to 77 tokens. Pixels go through :mod:`diffsteer.rewards.preprocess` configured from the processor's
``preprocessor_config.json`` (transformers' floor centre-crop convention).

ReNO's loss is ``30 - score`` (offset 30.0) with weight 0.05 (spec ``pickscore:0.05``).

Gradient checkpointing: transformers only checkpoints layers in training mode. CLIP's vision tower has no
dropout except attention dropout (0.0 in CLIP configs), so when checkpointing is requested and the tower
has no active dropout, the vision tower is put in train mode (numerically identical to eval) so that
checkpointing takes effect; otherwise it stays in eval mode without checkpointing.
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import EmbeddingSimilarityReward, LocalLoadConfig, TextEmbeddingCache, freeze
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipPreprocessConfig, clip_preprocess


class PickScoreRewardConfig(LocalLoadConfig):
    """PickScore with a transformers CLIPModel and tokenizer from local folders."""

    name: Literal["pickscore"] = "pickscore"
    model_path: str | None = Field(
        default=None,
        description="Folder with the CLIPModel (config.json + weights, save_pretrained layout), e.g. PickScore_v1.",
    )
    processor_path: str | None = Field(
        default=None,
        description=(
            "Folder with the tokenizer (and preprocessor_config.json), e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K. "
            "None = model_path."
        ),
    )
    max_length: int = Field(default=77, ge=2, description="Prompt truncation length in tokens.")


def _from_pretrained_dtype_kwarg(dtype: torch.dtype) -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _features(output) -> Tensor:
    """transformers < 5 returns a tensor from get_*_features, >= 5 a ModelOutput; accept both."""
    return output if isinstance(output, Tensor) else output.pooler_output


class PickScoreReward(EmbeddingSimilarityReward):
    """PickScore; see the module docstring."""

    name = "pickscore"
    differentiable = True

    def __init__(
        self, config: PickScoreRewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ):
        super().__init__(config)
        self.config: PickScoreRewardConfig = config
        from transformers import AutoTokenizer, CLIPModel

        model_path = config.model_path
        if model_path is None:
            raise ValueError("pickscore.model_path: required (a local folder with the CLIPModel)")
        local_only = not config.allow_download
        if not os.path.isdir(model_path):
            if local_only:
                raise ValueError(
                    f"pickscore.model_path: folder not found: {model_path!r} (hub ids need allow_download=True)"
                )
        elif not os.path.isfile(os.path.join(model_path, "config.json")):
            raise ValueError(
                f"pickscore.model_path: {model_path!r} has no config.json (expected save_pretrained layout)"
            )
        processor_path = config.processor_path or model_path
        if local_only:
            if not os.path.isdir(processor_path):
                raise ValueError(f"pickscore.processor_path: folder not found: {processor_path!r}")
            # transformers would otherwise build a CLIPTokenizer with an empty 3-token vocabulary.
            has_files = os.path.isfile(os.path.join(processor_path, "tokenizer.json")) or all(
                os.path.isfile(os.path.join(processor_path, f)) for f in ("vocab.json", "merges.txt")
            )
            if not has_files:
                raise ValueError(
                    f"pickscore.processor_path: no tokenizer files (tokenizer.json or vocab.json + merges.txt) in "
                    f"{processor_path!r}; PickScore_v1 ships none: use the CLIP-ViT-H-14-laion2B-s32B-b79K processor"
                )

        model = CLIPModel.from_pretrained(
            model_path, local_files_only=local_only, **_from_pretrained_dtype_kwarg(dtype)
        )
        self.model = freeze(model.to(device))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(processor_path, local_files_only=local_only)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"pickscore.processor_path: no usable tokenizer in {processor_path!r} ({e})") from e
        pp_file = os.path.join(processor_path, "preprocessor_config.json")
        if os.path.isfile(pp_file):
            self.preprocess_cfg = ClipPreprocessConfig.from_hf_image_processor(pp_file)
        else:
            size = int(model.config.vision_config.image_size)
            self.preprocess_cfg = ClipPreprocessConfig(
                size=(size, size), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_rounding="floor"
            )
        self._checkpoint_vision = False
        if config.gradient_checkpointing:
            self._checkpoint_vision = self._enable_vision_checkpointing()
        self._after_mode_change()
        self.text_cache = TextEmbeddingCache(config.text_cache_size)

    def _enable_vision_checkpointing(self) -> bool:
        vision = self.model.vision_model
        active_dropout = float(getattr(self.model.config.vision_config, "attention_dropout", 0.0) or 0.0) > 0 or any(
            isinstance(m, nn.Dropout) and m.p > 0 for m in vision.modules()
        )
        if active_dropout:
            warnings.warn("pickscore: vision tower has active dropout; gradient checkpointing left off", stacklevel=3)
            return False
        kwargs = {"use_reentrant": False}
        if hasattr(vision, "activation_checkpointing_enable"):  # transformers >= 5.x
            vision.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(vision, "gradient_checkpointing_enable"):
            vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:  # transformers 4.x: vision_model is a plain module; enable on the whole model
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return True

    def _after_mode_change(self) -> None:
        # transformers checkpoints only in training mode; the dropout-free vision tower is unaffected by it.
        if getattr(self, "_checkpoint_vision", False):
            self.model.vision_model.train(True)

    @property
    def default_offset(self) -> float:
        return 30.0

    @property
    def similarity_scale(self) -> float:
        return float(self.model.logit_scale.exp().float())

    def _encode_text(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        ).to(self.model.device)
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        feats = self.model.text_projection(_features(out))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        return self.text_cache.get(prompts, self._encode_text).float()

    def image_embeddings(self, images: Tensor) -> Tensor:
        param = next(self.model.parameters())
        pixels = clip_preprocess(images.to(param.device), self.preprocess_cfg).to(param.dtype)
        img = self.model.visual_projection(_features(self.model.vision_model(pixel_values=pixels)))
        return torch.nn.functional.normalize(img.float(), dim=-1)

    def _apply(self, fn, *args, **kwargs):
        self.text_cache.clear()
        return super()._apply(fn, *args, **kwargs)
