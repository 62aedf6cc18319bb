"""UNet latent-diffusion models: Stable Diffusion 1.x/2.x (ε or v-prediction) and SDXL, with their Turbo variants.

Prompts as diffusers encodes them: SD takes the text encoder's last hidden states; SDXL the penultimate hidden
states of both text encoders concatenated, the second encoder's pooled projection, and time ids (original
size, crop, target size), with all-zero embeddings for the empty prompt when the checkpoint sets
``force_zeros_for_empty_prompt``. The schedule is variance preserving; the prediction type is the scheduler
config's.
"""

from __future__ import annotations

import torch

from diffsteer.guidance.families.base import Condition, ModelFamily


def tokenize(tokenizer, texts: list[str], device: torch.device, max_length: int | None = None):
    """Token ids and attention mask, padded to ``max_length`` (default: the tokenizer's own) and truncated."""
    batch = tokenizer(
        texts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return batch.input_ids.to(device), batch.attention_mask.to(device)


class StableDiffusion(ModelFamily):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipelines = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    backbone_key = "unet"
    schedule = "vp"

    @torch.no_grad()
    def encode_prompts(self, model, texts, *, height, width):
        tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
        ids, mask = tokenize(tokenizer, texts, encoder.device)
        use_mask = getattr(encoder.config, "use_attention_mask", False)
        hidden = encoder(ids, attention_mask=mask if use_mask else None)[0].to(dtype=encoder.dtype)
        return [Condition(hidden[i : i + 1]) for i in range(len(texts))]

    def forward(self, backbone, x, t, condition):
        added = dict(condition.added)
        inpaint = added.pop("inpaint", None)  # an inpainting UNet's latent mask and masked-image latents
        if inpaint is not None:
            x = torch.cat([x, inpaint.to(x.dtype)], dim=1)
        return backbone(
            x, t, encoder_hidden_states=condition.hidden_states, added_cond_kwargs=added or None, return_dict=False
        )[0]

    def latent_channels(self, model):
        return int(model.vae.config.latent_channels)

    def inpainting_inputs(self, model):
        return int(model.backbone.config.in_channels) > self.latent_channels(model)

    def pipeline_class(self, model):
        return "StableDiffusionInpaintPipeline" if self.inpainting_inputs(model) else "StableDiffusionPipeline"

    def pipeline_extras(self, model):
        return {
            "safety_checker": None,
            "feature_extractor": None,
            "image_encoder": None,
            "requires_safety_checker": False,
        }


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipelines = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")

    @torch.no_grad()
    def encode_prompts(self, model, texts, *, height, width):
        states, pooled = [], None
        for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
            ids, _ = tokenize(tokenizer, texts, encoder.device)
            out = encoder(ids, output_hidden_states=True)
            if getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds
            states.append(out.hidden_states[-2])
        hidden = torch.cat(states, dim=-1).to(dtype=model.text_encoders[-1].dtype)
        if pooled is None:
            raise ValueError("SDXL checkpoint's last text encoder gives no pooled projection (text_embeds)")
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=hidden.dtype, device=hidden.device)
        return [
            Condition(hidden[i : i + 1], {"text_embeds": pooled[i : i + 1].to(hidden.dtype), "time_ids": time_ids})
            for i in range(len(texts))
        ]

    def empty_condition(self, model, encoded):
        if not model.force_zeros_for_empty_prompt:
            return None
        return Condition(
            torch.zeros_like(encoded.hidden_states),
            {"text_embeds": torch.zeros_like(encoded.added["text_embeds"]), "time_ids": encoded.added["time_ids"]},
        )

    def pipeline_class(self, model):
        return self.pipelines[0]

    def text_modules(self, model):
        if len(model.text_encoders) == 2:
            return super().text_modules(model)
        # a refiner: only the second (projection) encoder
        return {
            "text_encoder": None,
            "tokenizer": None,
            "text_encoder_2": model.text_encoders[0],
            "tokenizer_2": model.tokenizers[0],
        }

    def pipeline_extras(self, model):
        return {
            "image_encoder": None,
            "feature_extractor": None,
            "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt,
        }
