"""Stable Diffusion 3 / 3.5: the MMDiT rectified-flow transformer (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis").

Prompts as ``StableDiffusion3Pipeline`` encodes them: CLIP-L and CLIP-G penultimate hidden states (77 tokens)
concatenated along features and zero-padded to T5's width, followed along the sequence by T5-XXL's last hidden
states (``max_sequence_length`` 256 tokens; zeros when the checkpoint ships without T5); the pooled projection is
both CLIP encoders' pooled outputs concatenated. Guidance is true CFG (two passes). The scheduler shifts σ by the
config's ``shift`` (3.0 for SD3.5), or by resolution where the config enables dynamic shifting.
"""

from __future__ import annotations

import torch

from diffsteer.guidance.families.base import Condition, ModelFamily
from diffsteer.guidance.families.flow_shift import dynamic_shift_mu
from diffsteer.guidance.families.unet import tokenize

T5_MAX_LENGTH = 256


class StableDiffusion3(ModelFamily):
    name = "sd3"
    title = "Stable Diffusion 3/3.5"
    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
    backbone_key = "transformer"
    schedule = "flow"

    @torch.no_grad()
    def encode_prompts(self, model, texts, *, height, width):
        clip_states, pooled = [], []
        for tokenizer, encoder in zip(model.tokenizers[:2], model.text_encoders[:2]):
            ids, _ = tokenize(tokenizer, texts, encoder.device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            clip_states.append(out.hidden_states[-2].to(dtype=model.text_encoders[0].dtype))
        clip = torch.cat(clip_states, dim=-1)
        t5 = self._t5_states(model, texts, clip.device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        hidden = torch.cat([clip, t5.to(clip.device)], dim=-2)
        pooled_projections = torch.cat(pooled, dim=-1)
        return [
            Condition(hidden[i : i + 1], {"pooled_projections": pooled_projections[i : i + 1]})
            for i in range(len(texts))
        ]

    def _t5_states(self, model, texts: list[str], device: torch.device) -> torch.Tensor:
        if len(model.text_encoders) < 3:
            width = model.backbone.config.joint_attention_dim
            return torch.zeros(len(texts), T5_MAX_LENGTH, width, device=device, dtype=model.text_encoders[0].dtype)
        tokenizer, encoder = model.tokenizers[2], model.text_encoders[2]
        ids, _ = tokenize(tokenizer, texts, encoder.device, max_length=T5_MAX_LENGTH)
        return encoder(ids)[0].to(dtype=encoder.dtype)

    def forward(self, backbone, x, t, condition):
        return backbone(
            hidden_states=x,
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=condition.hidden_states,
            pooled_projections=condition.added["pooled_projections"],
            return_dict=False,
        )[0]

    def text_tokens(self, model):
        return 77 + T5_MAX_LENGTH  # CLIP 77 + T5 256

    def patch_size(self, model):
        return int(model.backbone.config.patch_size)

    def recommended(self, backbone_config):
        return {"policy": "cfg:scale=7", "steps": 28}  # StableDiffusion3Pipeline's defaults

    def timestep_options(self, scheduler_config, steps, tokens):
        if scheduler_config.get("use_dynamic_shifting"):
            return {"mu": dynamic_shift_mu(tokens, scheduler_config, default_max_shift=1.16)}
        return {}

    def pipeline_extras(self, model):
        if len(model.text_encoders) < 3:  # a checkpoint shipped without T5
            return {"text_encoder_3": None, "tokenizer_3": None}
        return {}
