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

from guidance.denoiser import Condition
from guidance.models import DiffusionModel


def condition_texts(prompt: str, negative_prompt: str | None) -> dict[str, str | None]:
    """Condition name -> text (None: the zero embedding of SDXL's empty prompt is decided later)."""
    return {"cond": prompt, "uncond": negative_prompt or "", "empty": "", "negative": negative_prompt or ""}


def encode_conditions(
    model: DiffusionModel,
    prompt: str,
    negative_prompt: str | None,
    num_images: int,
    names: Iterable[str],
    *,
    height: int,
    width: int,
) -> tuple[dict[str, Condition], dict[str, str]]:
    """Encode the conditions in ``names`` for ``num_images`` images; returns (conditions, aliases)."""
    names = list(dict.fromkeys(names))
    texts = condition_texts(prompt, negative_prompt)
    unknown = [n for n in names if n not in texts]
    if unknown:
        raise ValueError(f"unknown condition names {unknown}; known: {sorted(texts)}")

    def key(name: str) -> tuple[str, bool]:
        """(text, zeroed): SDXL checkpoints with force_zeros_for_empty_prompt use zeros for an empty negative."""
        text = texts[name]
        zero = model.family == "sdxl" and model.force_zeros_for_empty_prompt and name != "cond" and text == ""
        return text, zero

    owners: dict[tuple[str, bool], str] = {}
    aliases: dict[str, str] = {}
    for name in names:
        k = key(name)
        if k in owners:
            aliases[name] = owners[k]
        else:
            owners[k] = name
    unique_texts = list(dict.fromkeys(text for text, _ in owners))
    encoded = _encode_texts(model, unique_texts, height=height, width=width)
    conditions = {}
    for (text, zero), name in owners.items():
        condition = encoded[text]
        if zero:
            condition = Condition(
                torch.zeros_like(condition.hidden_states),
                {"text_embeds": torch.zeros_like(condition.added["text_embeds"]), "time_ids": condition.added["time_ids"]},
            )
        conditions[name] = _repeat(condition, num_images)
    return conditions, aliases


def _repeat(condition: Condition, n: int) -> Condition:
    return Condition(
        condition.hidden_states.repeat(n, 1, 1), {k: v.repeat(n, 1) for k, v in condition.added.items()}
    )


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
