"""LoRA adapters on a model's backbone (a UNet or a flow transformer; peft), with their trainable state and
diffusers-format export.

LoRA (Hu et al. 2021): a frozen linear map W gets a trainable low-rank update, W + (α/r)·B·A, with A
Gaussian-initialised (std 1/r, peft's "gaussian" init) and B zero, so training starts exactly at the base
model. The adapter is attached with diffusers' ``add_adapter`` (peft ``LoraConfig``); A is then drawn
again from a generator seeded by the caller (peft draws from torch's global generator, which a run's seed
would otherwise not control). Its parameters are kept in float32 even when the base weights are fp16/bf16,
so small updates are not rounded away.

Targets are module names (peft matches them as suffixes of the backbone's module paths). The keyword
``attention`` stands for the attention projections under diffusers' names, as diffusers' LoRA training scripts
pick them: ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` on every attention, and on the joint-attention transformers
(SD3, FLUX, Qwen-Image) also the text stream's ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``
where the backbone has them (SD3's last block has no ``to_add_out``).

The export writes the adapter through the family's diffusers pipeline class (``unet_lora_layers`` for UNets,
``transformer_lora_layers`` for transformers) with its ``LoraConfig`` (rank, ``lora_alpha``, targets) in the
safetensors metadata (diffusers' ``lora_adapter_metadata``), so ``pipe.load_lora_weights`` applies it at α/r;
without it diffusers assumes α = r.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from diffsteer.guidance.models import DiffusionModel

ATTENTION = "attention"  # the keyword for the family's attention projections
ATTENTION_PROJECTIONS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
JOINT_ATTENTION_PROJECTIONS: tuple[str, ...] = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DEFAULT_TARGETS: tuple[str, ...] = (ATTENTION,)
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def resolve_targets(backbone: torch.nn.Module, targets: Sequence[str]) -> tuple[str, ...]:
    """``targets`` with ``attention`` replaced by the projections the backbone has (see the module docstring),
    in a fixed order without repeats."""
    names = [n for n, _ in backbone.named_modules()]
    present = [t for t in (*ATTENTION_PROJECTIONS, *JOINT_ATTENTION_PROJECTIONS) if any(_matches(n, t) for n in names)]
    out: list[str] = []
    for target in targets:
        for name in present if target == ATTENTION else (target,):
            if name not in out:
                out.append(name)
    return tuple(out)


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith(f".{target}")


def add_lora(
    backbone: torch.nn.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
) -> list[torch.nn.Parameter]:
    """Freeze ``backbone``, attach a LoRA adapter to the ``targets`` modules (:func:`resolve_targets`), return its
    (fp32) parameters.

    Every A matrix is drawn from one CPU generator seeded by ``seed`` (in the order of the parameter names), so
    the same seed gives the same adapter on any device and in any process."""
    from peft import LoraConfig

    backbone.requires_grad_(False)
    resolved = resolve_targets(backbone, targets)
    if not resolved:
        raise ValueError(f"lora_targets: {list(targets)} names no module of the {type(backbone).__name__}")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(resolved))
    try:
        backbone.add_adapter(config)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora_targets: {e}") from None
    named = sorted((n, p) for n, p in backbone.named_parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named:
            p.data = p.data.float()
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=generator) / rank)
            elif ".lora_B." in name:
                p.zero_()
    return [p for _, p in named]


def has_lora(backbone: torch.nn.Module) -> bool:
    return bool(getattr(backbone, "peft_config", None))


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
    """Write the adapter of ``model.backbone`` as ``<directory>/pytorch_lora_weights.safetensors`` in diffusers
    format through the family's pipeline class, loadable by its ``pipe.load_lora_weights(directory)`` and by the
    service's LoRA loader."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    backbone, key = model.backbone, model.family.backbone_key
    layers = get_peft_model_state_dict(backbone)
    if key == "unet":  # diffusers' UNet LoRA scripts save the converted names; its transformer scripts peft's own
        layers = convert_state_dict_to_diffusers(layers)
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    pipeline_cls = getattr(diffusers, model.family.pipeline_class(model))
    directory = Path(directory)
    metadata = backbone.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set: sorted, so the file repeats byte for byte
    pipeline_cls.save_lora_weights(
        directory, safe_serialization=True, **{f"{key}_lora_layers": layers, f"{key}_lora_adapter_metadata": metadata}
    )
    return directory / WEIGHTS_NAME


def merged_backbone(backbone: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``backbone`` with its LoRA folded into the base weights (W + (α/r)·B·A) and the adapter removed;
    ``backbone`` itself is left as it is. A backbone without an adapter is copied unchanged."""
    merged = copy.deepcopy(backbone)
    if has_lora(merged):
        merged.fuse_lora(lora_scale=1.0)
        merged.unload_lora()
    return merged
