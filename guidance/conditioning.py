"""Encode a generation's prompts into the named conditions policies ask for.

Names: ``cond`` (the prompt), ``uncond`` (the negative prompt, or the empty prompt without one: diffusers'
convention for CFG), ``empty`` (the empty prompt) and ``negative`` (the negative prompt; the same as
``empty`` without one). Conditions that are the same are encoded once and reported as aliases, so the
denoiser never evaluates a condition twice. SDXL follows diffusers: penultimate hidden states of both text
encoders concatenated, the second encoder's pooled projection, time ids (original size, crop, target size),
and all-zero embeddings for the empty prompt when the checkpoint sets ``force_zeros_for_empty_prompt``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from diffsteer.guidance.denoiser import Condition, concat_conditions
from diffsteer.guidance.models import DiffusionModel

SHARED_CONDITIONS = ("uncond", "empty", "negative")


def shared_texts(negative_prompt: str | None) -> dict[str, str]:
    """Text of each condition shared by all images: the negative prompt, or the empty prompt without one."""
    return {"uncond": negative_prompt or "", "empty": "", "negative": negative_prompt or ""}


def encode_conditions(
    model: DiffusionModel,
    prompts: list[str],
    negative_prompt: str | None,
    names: Iterable[str],
    *,
    height: int,
    width: int,
) -> tuple[dict[str, Condition], dict[str, str]]:
    """Encode the conditions in ``names`` for one image per entry of ``prompts``; returns (conditions, aliases)."""
    names = list(dict.fromkeys(names))
    texts = shared_texts(negative_prompt)
    unknown = [n for n in names if n != "cond" and n not in texts]
    if unknown:
        raise ValueError(f"unknown condition names {unknown}; known: cond, {', '.join(SHARED_CONDITIONS)}")
    # SDXL checkpoints with force_zeros_for_empty_prompt use all-zero embeddings for an empty negative.
    zero_empty = model.family == "sdxl" and model.force_zeros_for_empty_prompt

    owners: dict[tuple[str, bool], str] = {}
    aliases: dict[str, str] = {}
    for name in names:
        if name == "cond":
            continue
        key = (texts[name], zero_empty and texts[name] == "")
        if key in owners:
            aliases[name] = owners[key]
        else:
            owners[key] = name
    encoded = _encode_texts(model, list(dict.fromkeys([*prompts, *(t for t, _ in owners)])), height=height, width=width)

    conditions: dict[str, Condition] = {}
    if "cond" in names:
        conditions["cond"] = concat_conditions([encoded[p] for p in prompts])
    for (text, zero), name in owners.items():
        condition = encoded[text]
        if zero:
            condition = Condition(
                torch.zeros_like(condition.hidden_states),
                {
                    "text_embeds": torch.zeros_like(condition.added["text_embeds"]),
                    "time_ids": condition.added["time_ids"],
                },
            )
        conditions[name] = concat_conditions([condition] * len(prompts))
    return conditions, aliases


@torch.no_grad()
def _encode_texts(model: DiffusionModel, texts: list[str], *, height: int, width: int) -> dict[str, Condition]:
    if model.family == "sdxl":
        return _encode_sdxl(model, texts, height=height, width=width)
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    ids, mask = _tokenize(tokenizer, texts, encoder.device)
    use_mask = getattr(encoder.config, "use_attention_mask", False)
    hidden = encoder(ids, attention_mask=mask if use_mask else None)[0]
    hidden = hidden.to(dtype=encoder.dtype)
    return {t: Condition(hidden[i : i + 1]) for i, t in enumerate(texts)}


def _encode_sdxl(model: DiffusionModel, texts: list[str], *, height: int, width: int) -> dict[str, Condition]:
    states, pooled = [], None
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        ids, _ = _tokenize(tokenizer, texts, encoder.device)
        out = encoder(ids, output_hidden_states=True)
        if getattr(out, "text_embeds", None) is not None:
            pooled = out.text_embeds
        states.append(out.hidden_states[-2])
    last = model.text_encoders[-1]
    hidden = torch.cat(states, dim=-1).to(dtype=last.dtype)
    if pooled is None:
        raise ValueError("SDXL checkpoint's last text encoder gives no pooled projection (text_embeds)")
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=hidden.dtype, device=hidden.device)
    return {
        t: Condition(hidden[i : i + 1], {"text_embeds": pooled[i : i + 1].to(hidden.dtype), "time_ids": time_ids})
        for i, t in enumerate(texts)
    }


def _tokenize(tokenizer, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return batch.input_ids.to(device), batch.attention_mask.to(device)
