"""LAION "improved aesthetic predictor" (Schuhmann et al., LAION-Aesthetics V2,
github.com/christophschuhmann/improved-aesthetic-predictor).

A small MLP trained with MSE on human 1-10 aesthetic ratings (SAC + LAION-Logos + AVA) on top of
L2-normalised CLIP ViT-L/14 (OpenAI weights) image embeddings. The public weights
``sac+logos+ava1-l14-linearMSE.pth`` are a plain state dict of::

    layers.0: Linear(768, 1024)  layers.1: Dropout(0.2)
    layers.2: Linear(1024, 128)  layers.3: Dropout(0.2)
    layers.4: Linear(128, 64)    layers.5: Dropout(0.1)
    layers.6: Linear(64, 16)
    layers.7: Linear(16, 1)

(no activations: the published model is affine in the embedding). The layer widths are read from the
checkpoint, so the same loader serves smaller test models. The CLIP part is open_clip
``ViT-L-14-quickgelu`` (OpenAI's ViT-L/14 uses QuickGELU; the plain ``ViT-L-14`` config would silently give
wrong features) loaded from a local open_clip-format state dict, e.g. ``open_clip_pytorch_model.bin`` of
``timm/vit_large_patch14_clip_224.openai``. Prompts are ignored.

Score: the predicted rating (~1-10). ReNO's aesthetic loss is ``10 - score`` (offset 10.0).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file
from torch import Tensor, nn

from .base import Reward, freeze
from .open_clip_loader import OpenClipSourceConfig, load_open_clip
from .preprocess import clip_preprocess

AESTHETIC_CLIP_ARCHITECTURE = "ViT-L-14-quickgelu"
_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}
_LINEAR_INDICES = (0, 2, 4, 6, 7)


class AestheticRewardConfig(OpenClipSourceConfig):
    """LAION aesthetic MLP on open_clip ViT-L/14 image embeddings."""

    name: Literal["aesthetic"] = "aesthetic"
    head_checkpoint: str | None = Field(
        default=None,
        description="The MLP weights, e.g. sac+logos+ava1-l14-linearMSE.pth (state dict, keys layers.{0,2,4,6,7}.*).",
    )


class AestheticMLP(nn.Module):
    """The predictor head with the public file's module layout (``layers.N`` indices match its keys)."""

    def __init__(self, widths: tuple[int, int, int, int, int] = (768, 1024, 128, 64, 16)) -> None:
        super().__init__()
        d_in, h1, h2, h3, h4 = widths
        self.layers = nn.Sequential(
            nn.Linear(d_in, h1),
            nn.Dropout(_DROPOUTS[1]),
            nn.Linear(h1, h2),
            nn.Dropout(_DROPOUTS[3]),
            nn.Linear(h2, h3),
            nn.Dropout(_DROPOUTS[5]),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1),
        )

    @property
    def input_dim(self) -> int:
        return self.layers[0].in_features

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], source: str = "state dict") -> AestheticMLP:
        missing = [f"layers.{i}.weight" for i in _LINEAR_INDICES if f"layers.{i}.weight" not in state]
        if missing:
            raise ValueError(f"aesthetic.head_checkpoint: {source} lacks {missing}; expected the LAION MLP layout")
        widths = tuple(int(state[f"layers.{i}.weight"].shape[1]) for i in _LINEAR_INDICES)
        mlp = cls(widths)  # type: ignore[arg-type]
        mlp.load_state_dict(state, strict=True)
        return mlp


def load_head_state_dict(path: str, weights_only: bool = True) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"aesthetic.head_checkpoint: {path} does not hold a state dict")
    # Lightning checkpoints prefix the module name; the public file has none.
    return {k[len("model.") :] if k.startswith("model.layers.") else k: v for k, v in state.items()}


class AestheticReward(Reward):
    """LAION aesthetic score; see the module docstring."""

    name = "aesthetic"
    differentiable = True
    uses_prompts = False

    def __init__(
        self, config: AestheticRewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ):
        super().__init__(config)
        self.config: AestheticRewardConfig = config
        if config.head_checkpoint is None:
            raise ValueError("aesthetic.head_checkpoint: required (e.g. sac+logos+ava1-l14-linearMSE.pth)")
        if not os.path.isfile(config.head_checkpoint):
            raise ValueError(f"aesthetic.head_checkpoint: file not found: {config.head_checkpoint!r}")
        loaded = load_open_clip(config, self.name, AESTHETIC_CLIP_ARCHITECTURE, device, dtype)
        self.clip = loaded.model
        self._loaded = loaded
        self.preprocess_cfg = loaded.preprocess
        head = AestheticMLP.from_state_dict(
            load_head_state_dict(config.head_checkpoint, config.weights_only), config.head_checkpoint
        )
        embed_dim = self._embed_dim()
        if embed_dim is not None and embed_dim != head.input_dim:
            raise ValueError(
                f"aesthetic.head_checkpoint: the MLP takes {head.input_dim}-d embeddings but the CLIP model "
                f"'{loaded.architecture}' gives {embed_dim}-d ones"
            )
        # The head runs in float32: it is tiny and the score is a regression output.
        self.head = freeze(head.to(device=device, dtype=torch.float32))

    def _embed_dim(self) -> int | None:
        proj = getattr(getattr(self.clip, "visual", None), "proj", None)
        if isinstance(proj, Tensor):
            return int(proj.shape[1])
        out = getattr(getattr(self.clip, "visual", None), "output_dim", None)
        return int(out) if out is not None else None

    @property
    def default_offset(self) -> float:
        return 10.0

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        pixels = clip_preprocess(images.to(self._loaded.device), self.preprocess_cfg).to(self._loaded.input_dtype)
        emb = self.clip.encode_image(pixels, normalize=True).float()
        return self.head(emb).squeeze(-1)
