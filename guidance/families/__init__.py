"""The model families the sampler steers, one adapter file each (:mod:`.base` says what an adapter is)."""

from __future__ import annotations

from typing import Any

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.families.base import Condition, ModelFamily, concat_conditions
from diffsteer.guidance.families.flux import Flux
from diffsteer.guidance.families.qwenimage import QwenImage
from diffsteer.guidance.families.sd3 import StableDiffusion3
from diffsteer.guidance.families.unet import StableDiffusion, StableDiffusionXL
from diffsteer.guidance.families.zimage import ZImage

FAMILIES: dict[str, ModelFamily] = {
    f.name: f for f in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux(), QwenImage(), ZImage())
}

__all__ = ["FAMILIES", "Condition", "ModelFamily", "concat_conditions", "family_of_pipeline", "family_of_components"]


def supported() -> str:
    return "; ".join(f"{f.title} ({', '.join(f.pipelines[:1])})" for f in FAMILIES.values())


def family_of_pipeline(class_name: str, name: str) -> ModelFamily:
    """The family of a diffusers pipeline class (``model_index.json``'s ``_class_name``), or InvalidInput naming
    the model's family and the supported ones."""
    for family in FAMILIES.values():
        if class_name in family.pipelines:
            return family
    raise InvalidInput(
        "model",
        f"{name!r} is a {class_name or 'diffusers'} checkpoint, a family diffsteer does not steer; supported: {supported()}",
    )


def family_of_components(components: dict[str, Any]) -> ModelFamily:
    """The family of a dict of diffusers pipeline components (like ``pipe.components``), by its backbone's class."""
    backbone = components.get("transformer") or components.get("unet")
    kind = type(backbone).__name__
    if kind == "UNet2DConditionModel":
        return FAMILIES["sdxl" if components.get("text_encoder_2") is not None else "sd"]
    by_backbone = {
        "SD3Transformer2DModel": "sd3",
        "FluxTransformer2DModel": "flux",
        "QwenImageTransformer2DModel": "qwenimage",
        "ZImageTransformer2DModel": "zimage",
    }
    if kind in by_backbone:
        return FAMILIES[by_backbone[kind]]
    raise InvalidInput("model", f"a {kind} backbone belongs to no supported family; supported: {supported()}")
