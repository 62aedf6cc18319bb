"""Qwen-Image (Qwen team 2025, "Qwen-Image Technical Report"): an MMDiT rectified-flow transformer over
2×2-packed latents of a causal video VAE (one frame), conditioned on a Qwen2.5-VL language model.

Prompts as ``QwenImagePipeline`` encodes them: the prompt inside the pipeline's chat template, the language
model's last hidden states, the template's first 34 tokens dropped and the padding removed, so a condition's
length is its prompt's (batched conditions are zero-padded and masked). Guidance is true CFG; the pipeline
also rescales the guided prediction to the conditional one's norm per token (``cfg:renorm=true``). σ runs
from 1 to 1/steps with resolution-dependent shifting and the config's ``shift_terminal`` stretch.
"""

from __future__ import annotations

import torch

from diffsteer.guidance.families.base import Condition, ModelFamily
from diffsteer.guidance.families.flow_shift import dynamic_shift_mu, linear_sigmas
from diffsteer.guidance.families.flux import pack, unpack

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34  # tokens of the template before the prompt, dropped from the states
MAX_TOKENS = 1024  # the pipeline's tokenizer_max_length
MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline's max_sequence_length
TYPICAL_PROMPT_TOKENS = 64  # for the cost estimate only


class QwenImage(ModelFamily):
    name = "qwenimage"
    title = "Qwen-Image"
    pipelines = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")
    backbone_key = "transformer"
    schedule = "flow"
    variable_text = True

    @torch.no_grad()
    def encode_prompts(self, model, texts, *, height, width):
        tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
        batch = tokenizer(
            [PROMPT_TEMPLATE.format(t) for t in texts],
            max_length=MAX_TOKENS + TEMPLATE_TOKENS,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(encoder.device)
        out = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        states = out.hidden_states[-1]
        conditions = []
        for i in range(len(texts)):
            real = states[i][batch.attention_mask[i].bool()][TEMPLATE_TOKENS:][:MAX_SEQUENCE_LENGTH]
            conditions.append(Condition(real[None].to(dtype=encoder.dtype)))
        return conditions

    def forward(self, backbone, x, t, condition):
        b, _, h, w = x.shape
        out = backbone(
            hidden_states=pack(x),
            timestep=t.expand(b).to(x.dtype) / 1000,
            guidance=condition.added.get("guidance"),
            encoder_hidden_states_mask=condition.mask,
            encoder_hidden_states=condition.hidden_states,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def latent_channels(self, model):
        return int(model.backbone.config.in_channels) // 4

    def text_tokens(self, model):
        return TYPICAL_PROMPT_TOKENS  # a typical prompt; the states are as long as the prompt

    def patch_size(self, model):
        return 2

    def native_size(self, model):
        return 1024  # QwenImagePipeline's default_sample_size 128 × 8

    def recommended(self, backbone_config):
        return {"policy": "cfg:scale=4,renorm=true", "steps": 50}  # the pipeline's true_cfg_scale and steps

    def timestep_options(self, scheduler_config, steps, tokens):
        return {"sigmas": linear_sigmas(steps), "mu": dynamic_shift_mu(tokens, scheduler_config)}
