"""LoRA adapters on the UNet (peft), with their trainable state and diffusers-format export.

LoRA (Hu et al. 2021): a frozen linear map W gets a trainable low-rank update, W + (α/r)·B·A, with A
Gaussian-initialised and B zero, so training starts exactly at the base model. The adapter is attached with
diffusers' ``unet.add_adapter`` (peft ``LoraConfig``); its parameters are kept in float32 even when the base
weights are fp16/bf16, so small updates are not rounded away.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from guidance.models import DiffusionModel

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS) -> list[torch.nn.Parameter]:
    """Freeze ``unet``, attach a LoRA adapter to the ``targets`` modules, return its (fp32) parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    try:
        unet.add_adapter(config)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora_targets: {e}") from None
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (a checkpoint's model part; exact, in their training dtype)."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"checkpoint does not match the adapter: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def save_lora_weights(model: DiffusionModel, directory: str | Path) -> Path:
    """Write the UNet adapter as ``<directory>/pytorch_lora_weights.safetensors`` in diffusers format, loadable by
    ``pipe.load_lora_weights(directory)`` and by the service's LoRA loader."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    pipeline_cls = StableDiffusionXLPipeline if model.family == "sdxl" else StableDiffusionPipeline
    directory = Path(directory)
    pipeline_cls.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
    return directory / WEIGHTS_NAME
