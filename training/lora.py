"""LoRA adapters on the UNet (peft), with their trainable state and diffusers-format export.

LoRA (Hu et al. 2021): a frozen linear map W gets a trainable low-rank update, W + (α/r)·B·A, with A
Gaussian-initialised (std 1/r, peft's "gaussian" init) and B zero, so training starts exactly at the base
model. The adapter is attached with diffusers' ``unet.add_adapter`` (peft ``LoraConfig``); A is then drawn
again from a generator seeded by the caller (peft draws from torch's global generator, which a run's seed
would otherwise not control). Its parameters are kept in float32 even when the base weights are fp16/bf16,
so small updates are not rounded away.

The export writes the adapter's ``LoraConfig`` (rank, ``lora_alpha``, targets) into the safetensors metadata
(diffusers' ``lora_adapter_metadata``), so ``load_lora_weights`` applies it at α/r; without it diffusers
assumes α = r.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from diffsteer.guidance.models import DiffusionModel

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(
    unet: torch.nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0
) -> list[torch.nn.Parameter]:
    """Freeze ``unet``, attach a LoRA adapter to the ``targets`` modules, return its (fp32) parameters.

    Every A matrix is drawn from one CPU generator seeded by ``seed`` (in the order of the parameter names), so
    the same seed gives the same adapter on any device and in any process."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    try:
        unet.add_adapter(config)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora_targets: {e}") from None
    named = sorted((n, p) for n, p in unet.named_parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named:
            p.data = p.data.float()
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=generator) / rank)
            elif ".lora_B." in name:
                p.zero_()
    return [p for _, p in named]


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
    pipeline_cls = StableDiffusionXLPipeline if model.family.name == "sdxl" else StableDiffusionPipeline
    directory = Path(directory)
    metadata = model.unet.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set: sorted, so the file repeats byte for byte
    pipeline_cls.save_lora_weights(
        directory, unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata
    )
    return directory / WEIGHTS_NAME


def merged_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``unet`` with its LoRA folded into the base weights (W + (α/r)·B·A) and the adapter removed;
    ``unet`` itself is left as it is. A UNet without an adapter is copied unchanged."""
    merged = copy.deepcopy(unet)
    if getattr(merged, "peft_config", None):
        merged.fuse_lora(lora_scale=1.0)
        merged.unload_lora()
    return merged
