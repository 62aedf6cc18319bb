"""Z-Image (Tongyi-MAI 2025, "Z-Image: An Efficient Image Generation Foundation Model with Single-Stream
Diffusion Transformer"): a single-stream rectified-flow transformer over the FLUX.1 VAE's latents, conditioned on
a Qwen3 language model; Z-Image-Turbo is its few-step distilled form.

Prompts as ``ZImagePipeline`` encodes them: the prompt as one user message through the tokenizer's chat template
(with the generation prompt, thinking enabled), tokenized to ``max_sequence_length`` 512, the language model's
penultimate hidden states kept for the real tokens only, so a condition is as long as its templated prompt
(batched conditions are zero-padded and masked here, and unpadded again per image in :meth:`ZImage.forward`).

The transformer takes lists: one latent [C, 1, h, w] and one caption [L, D] per image, and the timestep as the
clean fraction (1000 − t)/1000; it predicts x0 − ε, which the pipeline negates before the scheduler's step, so
:meth:`ZImage.forward` returns the negated output, the flow velocity every flow family returns. The pipeline's
guidance, ``c + w·(c − u)`` on that output with ``guidance_scale`` w (default 5; 0 turns CFG off), is the
sampler's ``cfg:scale=w+1`` (negation commutes with the linear combination); its ``cfg_normalization`` (clamp
the guided norm) and ``cfg_truncation`` (drop guidance late) are off at their defaults and have no policy here.
The empty negative prompt is encoded, not zeros. σ runs from 1 to 1/steps (the pipeline's float32 grid); the
scheduler's shift applies (Z-Image-Turbo: static 3.0), or μ from the image's token count where it shifts by
resolution. Sizes are multiples of the VAE factor × the patch 2.
"""

from __future__ import annotations

import torch

from diffsteer.guidance.families.base import Condition, ModelFamily
from diffsteer.guidance.families.flow_shift import dynamic_shift_mu

MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's max_sequence_length (template included)
PATCH_SIZE = 2  # the patch size ZImagePipeline runs the transformer at
DEFAULT_GUIDANCE_SCALE = 5.0  # ZImagePipeline's guidance_scale, in its c + w·(c − u) form
TYPICAL_PROMPT_TOKENS = 64  # for the cost estimate only (the caption is padded to a multiple of 32)


def z_image_sigmas(steps: int) -> list[float]:
    """σ = 1, …, 1/steps evenly spaced in float32, as ``get_default_z_image_sigmas`` (torch's grid, which differs
    from NumPy's float64 one in the last bit)."""
    return torch.linspace(1.0, 1 / steps, steps).tolist()


class ZImage(ModelFamily):
    name = "zimage"
    title = "Z-Image"
    pipelines = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline")
    backbone_key = "transformer"
    schedule = "flow"
    variable_text = True

    @torch.no_grad()
    def encode_prompts(self, model, texts, *, height, width):
        tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
        templated = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for text in texts
        ]
        batch = tokenizer(
            templated, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
        )
        ids = batch.input_ids.to(encoder.device)
        mask = batch.attention_mask.to(encoder.device).bool()
        states = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [Condition(states[i][mask[i]][None]) for i in range(len(texts))]

    def forward(self, backbone, x, t, condition):
        rows = x.shape[0]
        text, mask = condition.hidden_states, condition.mask
        captions = [text[i] if mask is None else text[i][mask[i].bool()] for i in range(rows)]
        out = backbone(
            list(x.unsqueeze(2).unbind(0)),
            (1000 - t.expand(rows)) / 1000,
            captions,
            patch_size=PATCH_SIZE,
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2)

    def text_tokens(self, model):
        return TYPICAL_PROMPT_TOKENS

    def patch_size(self, model):
        return PATCH_SIZE

    def native_size(self, model):
        return 1024  # ZImagePipeline's default height and width

    def model_width(self, model):
        return int(model.backbone.config.dim)

    def recommended(self, backbone_config):
        # ZImagePipeline's guidance_scale 5 (c + 5(c − u) = u + 6(c − u)) and 50 steps; Z-Image-Turbo's model
        # card runs guidance_scale 0 (cfg:scale=1) and 9 steps: its diffsteer.json should say so.
        return {"policy": f"cfg:scale={DEFAULT_GUIDANCE_SCALE + 1:g}", "steps": 50}

    def timestep_options(self, scheduler_config, steps, tokens):
        return {"sigmas": z_image_sigmas(steps), "mu": dynamic_shift_mu(tokens, scheduler_config)}
