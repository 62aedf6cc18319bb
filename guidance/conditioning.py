"""Encode a generation's prompts into the named conditions policies ask for.

Names: ``cond`` (the prompt), ``uncond`` (the negative prompt, or the empty prompt without one: diffusers'
convention for CFG), ``empty`` (the empty prompt) and ``negative`` (the negative prompt; the same as
``empty`` without one). Conditions that are the same are encoded once and reported as aliases, so the
denoiser never evaluates a condition twice. How a text becomes a condition is the model family's
(:meth:`diffsteer.guidance.families.base.ModelFamily.encode_prompts`), including SDXL's all-zero empty prompt;
per-request backbone inputs (FLUX.1-dev's distilled guidance) are added to every condition here.
"""

from __future__ import annotations

from collections.abc import Iterable

from diffsteer.guidance.families.base import Condition, concat_conditions
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
    distilled_guidance: float | None = None,
) -> tuple[dict[str, Condition], dict[str, str]]:
    """Encode the conditions in ``names`` for one image per entry of ``prompts``; returns (conditions, aliases)."""
    names = list(dict.fromkeys(names))
    texts = shared_texts(negative_prompt)
    unknown = [n for n in names if n != "cond" and n not in texts]
    if unknown:
        raise ValueError(f"unknown condition names {unknown}; known: cond, {', '.join(SHARED_CONDITIONS)}")

    owners: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for name in names:
        if name == "cond":
            continue
        if texts[name] in owners:
            aliases[name] = owners[texts[name]]
        else:
            owners[texts[name]] = name
    unique = list(dict.fromkeys([*prompts, *owners]))
    encoded = dict(zip(unique, model.family.encode_prompts(model, unique, height=height, width=width)))

    conditions: dict[str, Condition] = {}
    if "cond" in names:
        conditions["cond"] = concat_conditions([encoded[p] for p in prompts])
    for text, name in owners.items():
        shared = encoded[text]
        if text == "":  # an empty negative: SDXL checkpoints with force_zeros_for_empty_prompt use zeros
            shared = model.family.empty_condition(model, shared) or shared
        conditions[name] = concat_conditions([shared] * len(prompts))
    conditions = {
        name: model.family.with_request_inputs(model, c, distilled_guidance) for name, c in conditions.items()
    }
    return conditions, aliases
