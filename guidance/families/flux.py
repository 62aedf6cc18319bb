"""FLUX.1 (Black Forest Labs 2024): a rectified-flow transformer over 2×2-packed latents, in two forms.

- guidance-distilled (FLUX.1-dev; ``guidance_embeds`` in the transformer config): the distilled guidance scale
  is a model input (``distilled_guidance``, default 3.5 as in diffusers' ``FluxPipeline``); a policy's guidance
  is true CFG on top of it, two passes, as ``FluxPipeline``'s ``true_cfg_scale``.
- plain (FLUX.1-schnell): no guidance input; timestep-distilled to a few steps.

Prompts as ``FluxPipeline`` encodes them: T5 last hidden states (``max_sequence_length`` 512, the
pipeline's default for both forms) and CLIP-L's pooled output; text positions are zeros, image positions are the
packed latent's (row, column). σ runs from 1 to 1/steps and is shifted by resolution (dynamic shifting, μ from
the packed token count). The sampler keeps latents unpacked [B, C, h, w]; :meth:`Flux.forward` packs them for
the transformer and unpacks its output.
"""

from __future__ import annotations

import torch

from diffsteer.guidance.families.base import Condition, ModelFamily
from diffsteer.guidance.families.flow_shift import dynamic_shift_mu, linear_sigmas
from diffsteer.guidance.families.unet import tokenize

DEFAULT_DISTILLED_GUIDANCE = 3.5  # FluxPipeline's guidance_scale
T5_MAX_LENGTH = 512  # FluxPipeline's max_sequence_length


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)·(w/2), 4C]: each 2×2 patch one token, channels major."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``height`` × ``width``."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def image_positions(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[(h/2)·(w/2), 3] position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class Flux(ModelFamily):
    name = "flux"
    title = "FLUX.1"
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    backbone_key = "transformer"
    schedule = "flow"

    def takes_distilled_guidance(self, backbone_config):
        return bool(backbone_config.get("guidance_embeds", False))

    @torch.no_grad()
    def encode_prompts(self, model, texts, *, height, width):
        clip_tokenizer, clip = model.tokenizers[0], model.text_encoders[0]
        ids, _ = tokenize(clip_tokenizer, texts, clip.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output.to(dtype=clip.dtype)
        t5_tokenizer, t5 = model.tokenizers[1], model.text_encoders[1]
        ids, _ = tokenize(t5_tokenizer, texts, t5.device, max_length=T5_MAX_LENGTH)
        hidden = t5(ids, output_hidden_states=False)[0].to(dtype=t5.dtype)
        return [
            Condition(hidden[i : i + 1], {"pooled_projections": pooled[i : i + 1].to(hidden.device)})
            for i in range(len(texts))
        ]

    def distilled_guidance_used(self, model, requested):
        if not self.takes_distilled_guidance(model.backbone.config):
            return None
        return DEFAULT_DISTILLED_GUIDANCE if requested is None else float(requested)

    def with_request_inputs(self, model, condition, distilled_guidance):
        scale = self.distilled_guidance_used(model, distilled_guidance)
        if scale is None:
            return condition
        rows = condition.hidden_states.shape[0]
        guidance = torch.full((rows,), float(scale), dtype=torch.float32, device=condition.hidden_states.device)
        return Condition(condition.hidden_states, {**condition.added, "guidance": guidance}, condition.mask)

    def forward(self, backbone, x, t, condition):
        _, _, h, w = x.shape
        text_positions = torch.zeros(condition.hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
        out = backbone(
            hidden_states=pack(x),
            timestep=t.expand(x.shape[0]).to(x.dtype) / 1000,
            guidance=condition.added.get("guidance"),
            pooled_projections=condition.added["pooled_projections"],
            encoder_hidden_states=condition.hidden_states,
            txt_ids=text_positions,
            img_ids=image_positions(h, w, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def latent_channels(self, model):
        return int(model.backbone.config.in_channels) // 4

    def text_tokens(self, model):
        return T5_MAX_LENGTH  # T5 512

    def patch_size(self, model):
        return 2

    def native_size(self, model):
        return 1024  # FluxPipeline's default_sample_size 128 × 8

    def recommended(self, backbone_config):
        if backbone_config.get("guidance_embeds"):
            return {"policy": "cfg:scale=1", "steps": 28}  # FluxPipeline: true_cfg_scale 1, 28 steps
        return {"policy": "cfg:scale=1", "steps": 4}  # schnell: 4 steps, no guidance

    def timestep_options(self, scheduler_config, steps, tokens):
        return {"sigmas": linear_sigmas(steps), "mu": dynamic_shift_mu(tokens, scheduler_config)}
