"""The parameters a served image carries (PNG text chunks, the EXIF comment of JPEG/WebP), as A1111 and Forge
write them, so that their "PNG info", civitai and image browsers read them back.

:func:`diffsteer.guidance.images.a1111_parameters` writes the fields every family has. A guidance-distilled
model (FLUX.1-dev) also has its distilled guidance scale, which Forge writes as ``Distilled CFG Scale: 3.5``
right after ``CFG scale``; :func:`infotext` adds it (the value the model ran with: the request's, else the
family's default), and :func:`encode_output` writes images with that text.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image, PngImagePlugin

from diffsteer.guidance.families.flux import DEFAULT_DISTILLED_GUIDANCE
from diffsteer.guidance.images import FORMATS, a1111_parameters, a1111_quote, encode_image
from diffsteer.guidance.models import DiffusionModel
from diffsteer.guidance.sampler import GenerationResult

DISTILLED_KEY = "Distilled CFG Scale"  # Forge's infotext key (its API field: distilled_cfg_scale)


def distilled_guidance_used(model: DiffusionModel, requested: float | None) -> float | None:
    """The distilled guidance scale a generation ran with: None for models without that input."""
    if not model.family.takes_distilled_guidance(model):
        return None
    return DEFAULT_DISTILLED_GUIDANCE if requested is None else float(requested)


def request_metadata(
    model: DiffusionModel, result: GenerationResult, index: int, adapters: tuple[tuple[str, float], ...] = ()
) -> dict[str, Any]:
    """Image ``index``'s parameters: the library's, the LoRA adapters, and the distilled guidance scale of a
    guidance-distilled model."""
    meta = result.metadata(index)
    if adapters:
        meta["lora"] = ",".join(f"{n}:{w:g}" for n, w in adapters)
    distilled = distilled_guidance_used(model, result.params.distilled_guidance)
    if distilled is not None and meta.get("distilled_guidance") is None:
        meta["distilled_guidance"] = distilled
    return meta


def infotext(meta: dict[str, Any]) -> str:
    """A1111's ``parameters`` text of an image, with Forge's ``Distilled CFG Scale`` where the image has one
    (before ``Seed``, where Forge writes it: after ``CFG scale``)."""
    text = a1111_parameters(meta)
    distilled = meta.get("distilled_guidance")
    *head, last = text.split("\n")
    if distilled is None or f"{DISTILLED_KEY}:" in last:
        return text
    pair = f"{DISTILLED_KEY}: {a1111_quote(f'{float(distilled):g}')}"
    seed = last.find(", Seed: ")
    last = f"{last[:seed]}, {pair}{last[seed:]}" if seed >= 0 else f"{last}, {pair}"
    return "\n".join([*head, last])


def encode_output(image: Image.Image, fmt: str = "png", meta: dict[str, Any] | None = None) -> bytes:
    """:func:`diffsteer.guidance.images.encode_image` with :func:`infotext` as the ``parameters`` text."""
    if not meta or infotext(meta) == a1111_parameters(meta):
        return encode_image(image, fmt, meta)
    if fmt not in FORMATS:
        raise ValueError(f"output_format: unknown value {fmt!r}; accepted values: {', '.join(FORMATS)}")
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", infotext(meta))
        for key, value in meta.items():
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
        info.add_text("diffsteer", json.dumps(meta))
        image.save(buf, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif[0x9286] = infotext(meta)  # UserComment, where A1111 stores it for JPEG/WebP
        image.save(buf, format=FORMATS[fmt], quality=95, exif=exif)
    return buf.getvalue()
