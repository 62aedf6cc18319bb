"""Loading open_clip models from local files, shared by the ``clip``, ``hps`` and ``aesthetic`` rewards.

Three ways to name a model (open_clip >= 2.26 APIs: ``create_model``, ``add_model_config``,
``get_tokenizer``, ``local-dir:`` names):

* a built-in architecture (``"ViT-H-14"``) + ``checkpoint``: a local state-dict file
  (.pt/.pth/.bin/.safetensors; a ``{"state_dict": ...}`` wrapper and ``module.`` prefixes are accepted);
* ``model_config_path``: a JSON file in open_clip's model-config format (``embed_dim``, ``vision_cfg``,
  ``text_cfg``), registered with ``open_clip.add_model_config`` under its file stem, + ``checkpoint``;
* ``"local-dir:/folder"``: a folder with ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg":
  ...}``) and the weights, as written by open_clip's hub export.

Pretrained tags and ``hf-hub:`` names download through open_clip and are refused unless the reward's
``allow_download`` is set. Nothing is imported or loaded at module import.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from .base import LocalLoadConfig, freeze
from .preprocess import ClipPreprocessConfig

_REGISTER_LOCK = threading.Lock()
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class OpenClipSourceConfig(LocalLoadConfig):
    """Where an open_clip model comes from (fields shared by the open_clip-based rewards)."""

    model: str | None = Field(
        default=None,
        description=(
            "open_clip architecture name (e.g. 'ViT-H-14'), or 'local-dir:/folder' holding "
            "open_clip_config.json + weights. None = the reward's default architecture."
        ),
    )
    checkpoint: str | None = Field(
        default=None,
        description=(
            "Local weights file (.pt/.pth/.bin/.safetensors, state dict, optionally under 'state_dict'). "
            "Required unless `model` is 'local-dir:'. With allow_download, an open_clip pretrained tag."
        ),
    )
    model_config_path: str | None = Field(
        default=None,
        description=(
            "JSON file with an open_clip model config (embed_dim, vision_cfg, text_cfg); registered under "
            "its file stem, which becomes the architecture. Overrides the default architecture."
        ),
    )
    weights_only: bool = Field(
        default=True, description="torch.load(weights_only=...) for .pt/.bin files; keep True for untrusted files."
    )
    resize_mode: Literal["shortest", "longest", "squash"] | None = Field(
        default=None,
        description="Override the preprocessing resize mode; None = the reward's default / the model's own.",
    )


@dataclass
class LoadedOpenClip:
    model: nn.Module
    tokenizer: Any
    preprocess: ClipPreprocessConfig
    architecture: str
    input_dtype: torch.dtype  # what pixels are cast to (open_clip keeps some parameters in float32)

    @property
    def device(self) -> torch.device:
        return (
            self.model.visual.conv1.weight.device
            if hasattr(self.model.visual, "conv1")
            else next(self.model.parameters()).device
        )


def precision_for(dtype: torch.dtype) -> str:
    mapping = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    if dtype not in mapping:
        raise ValueError(f"dtype: {dtype} unsupported; accepted: torch.float32, torch.float16, torch.bfloat16")
    return mapping[dtype]


def register_model_config(path: str, reward: str) -> str:
    """Register an open_clip model-config JSON; returns the architecture name (the file stem).

    Refuses a file whose stem would silently replace a different, already known architecture.
    """
    import open_clip

    field = f"{reward}.model_config_path"
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{field}: file not found: {path}")
    if p.suffix != ".json":
        raise ValueError(f"{field}: expected a .json open_clip model config, got {path}")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{field}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        hint = (
            " (an open_clip_config.json with 'model_cfg' belongs in a 'local-dir:' folder)"
            if isinstance(cfg, dict) and "model_cfg" in cfg
            else ""
        )
        raise ValueError(f"{field}: {path} lacks the open_clip keys embed_dim, vision_cfg, text_cfg{hint}")
    name = p.stem
    with _REGISTER_LOCK:
        known = open_clip.get_model_config(name)
        if known is not None and known != cfg:
            raise ValueError(
                f"{field}: '{name}' is already an open_clip architecture with a different config; "
                "rename the file so it does not shadow it"
            )
        if known is None:
            open_clip.add_model_config(p)
    return name


def _find_local_dir_weights(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file())


def load_open_clip(
    cfg: OpenClipSourceConfig,
    reward: str,
    default_model: str | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> LoadedOpenClip:
    """Build, load, freeze and (optionally) checkpoint an open_clip model; see the module docstring."""
    import open_clip

    precision = precision_for(dtype)
    arch = cfg.model
    if cfg.model_config_path is not None:
        stem = register_model_config(cfg.model_config_path, reward)
        if arch is not None and arch != stem:
            raise ValueError(
                f"{reward}.model: '{arch}' conflicts with {reward}.model_config_path, whose architecture "
                f"is '{stem}' (the file stem); leave `model` unset or make them agree"
            )
        arch = stem
    if arch is None:
        arch = default_model
    if arch is None:
        raise ValueError(
            f"{reward}.model: required (an open_clip architecture, 'local-dir:/folder'), or set model_config_path"
        )

    kwargs: dict[str, Any] = dict(precision=precision, device=device, weights_only=cfg.weights_only)
    if arch.startswith("local-dir:"):
        folder = Path(arch[len("local-dir:") :])
        if not (folder / "open_clip_config.json").is_file():
            raise ValueError(f"{reward}.model: {arch!r} needs a folder with open_clip_config.json")
        if cfg.checkpoint is not None:
            raise ValueError(
                f"{reward}.checkpoint: must be unset with a 'local-dir:' model (weights come from the folder)"
            )
        if not _find_local_dir_weights(folder):
            raise ValueError(f"{reward}.model: no weights ({', '.join(_WEIGHT_SUFFIXES)}) in {folder}")
        model = open_clip.create_model(arch, require_pretrained=True, **kwargs)
    elif arch.startswith("hf-hub:"):
        if not cfg.allow_download:
            raise ValueError(
                f"{reward}.model: {arch!r} downloads from the hub; set allow_download=True or use a local path"
            )
        model = open_clip.create_model(arch, require_pretrained=True, **kwargs)
    else:
        if open_clip.get_model_config(arch) is None:
            raise ValueError(
                f"{reward}.model: '{arch}' is not an open_clip architecture (see open_clip.list_models()); "
                "give model_config_path for a custom one or 'local-dir:/folder'"
            )
        ckpt = cfg.checkpoint
        if ckpt is None:
            raise ValueError(f"{reward}.checkpoint: required: a local weights file for '{arch}'")
        if not os.path.isfile(ckpt):
            tags = open_clip.list_pretrained_tags_by_model(arch)
            if not (cfg.allow_download and ckpt in tags):
                extra = f"; with allow_download=True one of the tags {tags}" if tags else ""
                raise ValueError(
                    f"{reward}.checkpoint: file not found: {ckpt!r} (expected a local weights file{extra})"
                )
        model = open_clip.create_model(arch, pretrained=ckpt, require_pretrained=True, **kwargs)

    freeze(model)
    if cfg.gradient_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    preprocess = ClipPreprocessConfig.from_open_clip(model)
    if cfg.resize_mode is not None:
        preprocess = preprocess.replace(resize_mode=cfg.resize_mode)
    tokenizer = open_clip.get_tokenizer(arch)
    return LoadedOpenClip(model=model, tokenizer=tokenizer, preprocess=preprocess, architecture=arch, input_dtype=dtype)


def encode_text(loaded: LoadedOpenClip, prompts: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings [N, D] (call under no_grad)."""
    tokens = loaded.tokenizer(prompts).to(loaded.device)
    return loaded.model.encode_text(tokens, normalize=True)
