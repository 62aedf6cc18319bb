"""What a model family is to the sampler: the small adapter every checkpoint family implements.

A family says how to encode prompts into :class:`Condition` rows, how to call its denoising network (the
*backbone*: a UNet or a transformer) on latents in the sampler's layout, which noise schedule and prediction
type it uses, how its scheduler's timesteps are set for a size (shift, dynamic shifting), which sizes it takes
and what it recommends. Above this layer nothing knows a family's internals: the sampler, the policies and the
service see latents [B, C, h, w] in the VAE's layout, conditions and model outputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.parameterisation import Schedule


class DiffusionModel(Protocol):
    """What an adapter reads of a loaded model (:class:`diffsteer.guidance.models.DiffusionModel`, which is
    defined above this layer)."""

    name: str
    backbone: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    force_zeros_for_empty_prompt: bool

    @property
    def vae_scale_factor(self) -> int: ...

    def fresh_scheduler(self) -> Any: ...


@dataclass
class Condition:
    """One encoded condition for every image of the batch: the text states a backbone attends to, its added
    inputs (SDXL's pooled text and time ids, SD3/FLUX's pooled projections, FLUX's distilled guidance, an
    inpainting UNet's latent mask and masked-image latents) and, for families with variable-length text
    (Qwen-Image, Z-Image), the mask of real tokens."""

    hidden_states: torch.Tensor  # [B, L, D]
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # every value has the batch's rows first
    mask: torch.Tensor | None = None  # [B, L] of 0/1, None: every token is real

    def rows(self, index: torch.Tensor | None) -> Condition:
        if index is None:
            return self
        mask = None if self.mask is None else self.mask[index]
        return Condition(self.hidden_states[index], {k: v[index] for k, v in self.added.items()}, mask)


def concat_conditions(parts: Sequence[Condition]) -> Condition:
    """The rows of ``parts`` as one condition; text of different lengths is zero-padded and masked."""
    if len(parts) == 1:
        return parts[0]
    length = max(p.hidden_states.shape[1] for p in parts)
    masked = any(p.mask is not None for p in parts) or any(p.hidden_states.shape[1] != length for p in parts)
    hidden, masks = [], []
    for p in parts:
        pad = length - p.hidden_states.shape[1]
        hidden.append(torch.nn.functional.pad(p.hidden_states, (0, 0, 0, pad)))
        if masked:
            mask = (
                p.mask if p.mask is not None else p.hidden_states.new_ones(p.hidden_states.shape[:2], dtype=torch.long)
            )
            masks.append(torch.nn.functional.pad(mask, (0, pad)))
    added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
    return Condition(torch.cat(hidden), added, torch.cat(masks) if masked else None)


class ModelFamily(ABC):
    """One family of checkpoints (SD 1.x/2.x, SDXL, SD3, FLUX.1, Qwen-Image...). Stateless: one instance
    serves every model of its family."""

    name: ClassVar[str]
    title: ClassVar[str]  # for people: "Stable Diffusion 3 / 3.5"
    pipelines: ClassVar[tuple[str, ...]]  # diffusers pipeline classes (model_index.json) of this family
    backbone_key: ClassVar[str]  # "unet" or "transformer"
    schedule: ClassVar[Schedule]

    # -- prompts -------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, model: DiffusionModel, texts: list[str], *, height: int, width: int) -> list[Condition]:
        """One single-row condition per text."""

    def empty_condition(self, model: DiffusionModel, encoded: Condition) -> Condition | None:
        """The condition to use for the empty prompt instead of encoding it (SDXL's zeros), or None."""
        return None

    variable_text: ClassVar[bool] = False  # conditions are as long as their prompt (padded and masked in batches)

    def takes_distilled_guidance(self, backbone_config: Mapping[str, Any]) -> bool:
        """Whether a backbone of this config takes a distilled guidance scale as an input (FLUX.1-dev)."""
        return False

    def distilled_guidance_used(self, model: DiffusionModel, requested: float | None) -> float | None:
        """The distilled guidance scale a generation runs with: the request's, else the family's default; None
        for models without that input."""
        return None

    def with_request_inputs(
        self, model: DiffusionModel, condition: Condition, distilled_guidance: float | None
    ) -> Condition:
        """``condition`` with the per-request inputs the backbone takes besides text (FLUX.1-dev's distilled
        guidance; ``None``: the family's default)."""
        return condition

    # -- the backbone ----------------------------------------------------------------------------------------
    @abstractmethod
    def forward(
        self, backbone: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, condition: Condition
    ) -> torch.Tensor:
        """One backbone call on latents [B, C, h, w] at scheduler timestep ``t``; the output in the same layout."""

    def prediction_type(self, model: DiffusionModel) -> str:
        return "flow" if self.schedule == "flow" else model.scheduler_config.get("prediction_type", "epsilon")

    def latent_channels(self, model: DiffusionModel) -> int:
        return int(model.backbone.config.in_channels)

    def inpainting_inputs(self, model: DiffusionModel) -> bool:
        """Whether the backbone takes a latent mask and masked-image latents beside the sample (a 9-channel
        inpainting UNet); other models inpaint by keeping the unmasked part after every step."""
        return False

    def patch_size(self, model: DiffusionModel) -> int:
        """Latent pixels per token side (1 for UNets)."""
        return 1

    def size_multiple(self, model: DiffusionModel) -> int:
        """Image sizes must be multiples of this: the VAE factor times the patch size."""
        return model.vae_scale_factor * self.patch_size(model)

    def check_size(self, model: DiffusionModel, height: int, width: int) -> None:
        multiple = self.size_multiple(model)
        for field_name, value in (("width", width), ("height", height)):
            if value % multiple:
                raise InvalidInput(
                    field_name,
                    f"{value} is not a multiple of {multiple}; {self.title} models take sizes in multiples of "
                    f"{multiple} (the VAE's factor {model.vae_scale_factor} × patch size {self.patch_size(model)})",
                )

    def tokens(self, model: DiffusionModel, height: int, width: int) -> int:
        """Image tokens (transformers) or latent pixels (UNets) at a size: what attention cost grows with."""
        patch = self.patch_size(model) * model.vae_scale_factor
        return (height // patch) * (width // patch)

    def model_width(self, model: DiffusionModel) -> int:
        """A transformer's hidden width d (heads × head size in the diffusers configs)."""
        config = model.backbone.config
        return int(config.num_attention_heads) * int(config.attention_head_dim)

    def text_tokens(self, model: DiffusionModel) -> int:
        """Text tokens a transformer attends to jointly with the image's (0 for UNets' cross-attention)."""
        return 0

    def relative_cost(self, model: DiffusionModel, height: int, width: int, native: int) -> float:
        """One backbone evaluation at ``height`` × ``width`` over one at ``native`` × ``native``. UNets: the area
        ratio (convolutions dominate). Transformers: a block's matmuls cost ≈ 24·L·d² (projections and MLP)
        plus 4·L²·d (attention) for a sequence of L = image + text tokens of width d, so cost ∝ L·(1 + L/(6d))."""
        if self.backbone_key == "unet":
            return height * width / (native * native)
        width_d = self.model_width(model)
        text = self.text_tokens(model)

        def cost(h: int, w: int) -> float:
            length = self.tokens(model, h, w) + text
            return length * (1.0 + length / (6.0 * width_d))

        return cost(height, width) / cost(native, native)

    def native_size(self, model: DiffusionModel) -> int:
        return int(getattr(model.backbone.config, "sample_size", 128)) * model.vae_scale_factor

    def recommended(self, backbone_config: dict[str, Any]) -> dict[str, Any]:
        """The family's recommended ``policy`` and ``steps`` for a backbone of this config (a model's
        ``diffsteer.json`` overrides them)."""
        return {}

    # -- the scheduler ---------------------------------------------------------------------------------------
    def timestep_options(self, scheduler_config: dict[str, Any], steps: int, tokens: int) -> dict[str, Any]:
        """Extra arguments of ``scheduler.set_timesteps`` for ``steps`` at an image of ``tokens`` tokens, as the
        family's diffusers pipeline passes them (custom σ, the dynamic shift μ)."""
        return {}

    def pipeline(self, model: DiffusionModel) -> Any:
        """The family's diffusers pipeline over this model's modules (shares weights; for references, LoRA
        loading and export): the backbone, VAE, a fresh scheduler and the text encoders and tokenizers under the
        pipeline's names, with :meth:`pipeline_extras`."""
        import diffusers

        parts = {self.backbone_key: model.backbone, "vae": model.vae, "scheduler": model.fresh_scheduler()}
        parts.update(self.text_modules(model))
        parts.update(self.pipeline_extras(model))
        return getattr(diffusers, self.pipeline_class(model))(**parts)

    def pipeline_class(self, model: DiffusionModel) -> str:
        return self.pipelines[0]

    def text_modules(self, model: DiffusionModel) -> dict[str, Any]:
        """``text_encoder``, ``text_encoder_2``, ... and their tokenizers, in the model's (the pipeline's) order."""
        parts: dict[str, Any] = {}
        for i, (encoder, tokenizer) in enumerate(zip(model.text_encoders, model.tokenizers)):
            suffix = f"_{i + 1}" if i else ""
            parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = encoder, tokenizer
        return parts

    def pipeline_extras(self, model: DiffusionModel) -> dict[str, Any]:
        """Further constructor arguments of the family's pipeline (components it may lack, flags)."""
        return {}
