"""The one interface every reward implements.

A reward maps a batch of images (float, [B, 3, H, W], values in [0, 1]) and their prompts to one score per
image, ``Tensor[B]`` in float32, higher = better. Differentiable rewards keep the autograd graph to the
images, so ``score.sum().backward()`` fills ``images.grad``; their own parameters are frozen
(``requires_grad=False``) and stay in eval mode whatever ``.train()`` is called with.

The loss that optimisers minimise is ReNO's (Eyring et al. 2024, "ReNO: Enhancing One-step Text-to-Image
Models through Reward-based Noise Optimization"): ``loss = weight * (offset - score)``, where ``offset`` is
a per-reward constant (an upper bound of the score) that only shifts the loss for logging;
:mod:`diffsteer.rewards.composite` sums such terms.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn


class NonDifferentiableRewardError(RuntimeError):
    """Raised when gradients are requested from a reward whose ``differentiable`` is False."""


class RewardConfig(BaseModel):
    """Base of every reward's typed configuration: field descriptions are the documentation.

    Subclasses add a ``name: Literal[...]`` field (the registry key) and their own options; unknown fields
    are rejected.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class LocalLoadConfig(RewardConfig):
    """Options shared by rewards that load weights."""

    allow_download: bool = Field(
        default=False,
        description=(
            "Allow hub ids / pretrained tags (downloaded through the library's own cache) where a local "
            "path is expected. Off by default: weights load from local paths only."
        ),
    )
    gradient_checkpointing: bool = Field(
        default=True,
        description="Recompute tower activations in backward to save memory (open_clip / transformers).",
    )
    text_cache_size: int = Field(
        default=256,
        ge=0,
        description="How many prompts' text embeddings to keep (they never need gradients); 0 disables.",
    )


def as_prompt_list(prompts: str | Sequence[str] | None, batch: int, required: bool, reward: str) -> list[str] | None:
    """Normalise ``prompts`` to a list of ``batch`` strings (a single string is broadcast)."""
    if prompts is None:
        if required:
            raise ValueError(f"{reward}: prompts are required (one per image, or a single string)")
        return None
    if isinstance(prompts, str):
        return [prompts] * batch
    prompts = list(prompts)
    if len(prompts) == 1 and batch > 1:
        return prompts * batch
    if len(prompts) != batch:
        raise ValueError(f"{reward}: got {len(prompts)} prompts for {batch} images")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{reward}: prompts must be strings")
    return prompts


def check_images(images: Tensor, reward: str) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"{reward}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{reward}: images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{reward}: images must be floating point in [0, 1], got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{reward}: empty batch")
    return images


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Reward(nn.Module):
    """Base class: implement :meth:`_score`; call :meth:`score` (or the module itself).

    Class attributes:
        name: registry key.
        differentiable: False for metrics (e.g. JPEG size): their score never carries gradients, and asking
            for them (images that require grad while grad mode is on) raises
            :class:`NonDifferentiableRewardError`.
        uses_prompts: whether :meth:`score` needs prompts.
    """

    name: ClassVar[str] = "reward"
    differentiable: ClassVar[bool] = True
    uses_prompts: ClassVar[bool] = False

    def __init__(self, config: RewardConfig | None = None) -> None:
        super().__init__()
        self.config = config

    # --- interface -------------------------------------------------------------------------------------
    @property
    def default_offset(self) -> float:
        """ReNO-style offset for ``loss = w * (offset - score)``; subclasses document their value."""
        return 0.0

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        raise NotImplementedError

    def score(self, images: Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        """Scores ``Tensor[B]`` (float32) for ``images`` [B, 3, H, W] in [0, 1] and their prompts."""
        check_images(images, self.name)
        if not self.differentiable and torch.is_grad_enabled() and images.requires_grad:
            raise NonDifferentiableRewardError(
                f"reward '{self.name}' is a non-differentiable metric (differentiable=False): it cannot give "
                "gradients w.r.t. the images. Call it under torch.no_grad() or on images.detach()."
            )
        plist = as_prompt_list(prompts, images.shape[0], self.uses_prompts, self.name)
        out = self._score(images, plist)
        if out.shape != (images.shape[0],):
            raise RuntimeError(f"{self.name}: _score returned shape {tuple(out.shape)}, expected ({images.shape[0]},)")
        return out.float()

    def forward(self, images: Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        return self.score(images, prompts)

    def loss(
        self,
        images: Tensor,
        prompts: str | Sequence[str] | None = None,
        weight: float = 1.0,
        offset: float | None = None,
    ) -> Tensor:
        """Per-image ReNO loss ``weight * (offset - score)``, ``Tensor[B]``."""
        off = self.default_offset if offset is None else offset
        return weight * (off - self.score(images, prompts))

    # --- housekeeping ----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Reward:
        """Rewards are frozen: they stay in eval mode whatever the caller asks."""
        super().train(False)
        self._after_mode_change()
        return self

    def _after_mode_change(self) -> None:
        """Hook for subclasses that need some submodule in a particular mode (see PickScore)."""

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"


class EmbeddingSimilarityReward(Reward):
    """A reward of the form ``s · cos(f_img(image), f_txt(prompt))`` (CLIP score, HPS, PickScore): it exposes its
    two towers, so that a model can learn the image tower alone (the latent evaluators' ``embedding`` target) and
    pair it with the exact text embedding. Subclasses implement the two embeddings and ``similarity_scale``."""

    uses_prompts = True

    @property
    def similarity_scale(self) -> float:
        """``s``: the factor on the cosine (``logit_scale.exp()`` where the score is scaled, else 1)."""
        raise NotImplementedError

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[B, D]`` (float32) of images [B, 3, H, W] in [0, 1]; differentiable."""
        raise NotImplementedError

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """Unit-norm text embeddings ``[B, D]`` (float32), without gradients (cached per prompt)."""
        raise NotImplementedError

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        assert prompts is not None
        img = self.image_embeddings(images)
        return self.similarity_scale * (img * self.text_embeddings(prompts).to(img.device)).sum(dim=-1)


class TextEmbeddingCache:
    """Thread-safe LRU of per-prompt text embeddings (computed without gradients).

    The text tower is frozen and prompts carry no gradient, so ReNO's 50 optimisation steps over one prompt
    need the text encoded once.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._items: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, prompts: list[str], encode: Callable[[list[str]], Tensor]) -> Tensor:
        """Embeddings [B, D] for ``prompts``, calling ``encode`` on the missing unique ones only."""
        with self._lock:
            found = {p: self._items[p] for p in prompts if p in self._items}
            for p in found:
                self._items.move_to_end(p)
        missing = list(dict.fromkeys(p for p in prompts if p not in found))
        if missing:
            with torch.no_grad():
                encoded = encode(missing).detach()
            for p, e in zip(missing, encoded):
                found[p] = e
            if self.max_size > 0:
                with self._lock:
                    for p, e in zip(missing, encoded):
                        self._items[p] = e
                        self._items.move_to_end(p)
                    while len(self._items) > self.max_size:
                        self._items.popitem(last=False)
        return torch.stack([found[p] for p in prompts])

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
