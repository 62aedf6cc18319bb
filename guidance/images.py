"""Encode generated images with their generation parameters embedded (PNG text chunks, A1111 style)."""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import piexif
import piexif.helper
from PIL import Image, PngImagePlugin

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def a1111_quote(value: Any) -> str:
    """A value as A1111's infotext writes it: JSON-quoted when it holds a comma, colon or newline (which would
    end or split the ``key: value`` pair), as is otherwise (A1111's ``infotext_utils.quote``)."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


# our inpainting_fill -> A1111's "Masked content" label
MASKED_CONTENT = {
    "fill": "fill",
    "original": "original",
    "latent_noise": "latent noise",
    "latent_nothing": "latent nothing",
}


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The ``parameters`` text A1111 writes, which many tools (civitai, image browsers, A1111's own "PNG info")
    read back: the prompt, ``Negative prompt: ...``, then one line of ``key: value`` pairs with A1111's sampler
    names (``Sampler: DPM++ 2M, Schedule type: Karras``; Forge's ``Distilled CFG Scale`` for guidance-distilled
    models) and values quoted where needed."""
    lines = [str(meta.get("prompt", ""))]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    fields = [
        ("Steps", meta.get("steps")),
        ("Sampler", meta.get("sampler") or meta.get("scheduler")),
        ("Schedule type", meta.get("schedule_type")),
        ("CFG scale", meta.get("cfg_scale")),
        ("Distilled CFG Scale", meta.get("distilled_guidance")),  # Forge's key (guidance-distilled models)
        ("Seed", meta.get("seed")),
        ("Size", f"{meta['width']}x{meta['height']}" if "width" in meta else None),
        ("Model", meta.get("model")),
        ("Denoising strength", meta.get("denoising_strength")),  # img2img and inpainting, as A1111
        ("Mask blur", meta.get("mask_blur")),
        ("Inpaint area", meta.get("inpaint_area")),
        ("Masked area padding", meta.get("masked_area_padding")),
        ("Mask mode", meta.get("mask_mode")),
        ("Masked content", MASKED_CONTENT.get(meta.get("masked_content"), meta.get("masked_content"))),
        ("Policy", meta.get("policy")),
        ("Lora", meta.get("lora")),
        ("Eta", meta.get("eta") or None),
        ("NFE", meta.get("nfe")),
    ]
    lines.append(", ".join(f"{k}: {a1111_quote(v)}" for k, v in fields if v is not None))
    return "\n".join(lines)


def png_info(meta: dict[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(meta))
    for key, value in meta.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("diffsteer", json.dumps(meta))
    return info


def encode_image(image: Image.Image, fmt: str = "png", meta: dict[str, Any] | None = None, quality: int = 95) -> bytes:
    """Image bytes in ``fmt`` (png, jpeg, webp); PNG carries ``meta`` as text chunks, JPEG/WebP as EXIF comment."""
    if fmt not in FORMATS:
        raise ValueError(f"output_format: unknown value {fmt!r}; accepted values: {', '.join(FORMATS)}")
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", pnginfo=png_info(meta) if meta else None)
    else:
        image.save(
            buf, format=FORMATS[fmt], quality=quality, exif=exif_parameters(a1111_parameters(meta)) if meta else b""
        )
    return buf.getvalue()


def exif_parameters(text: str) -> bytes:
    """EXIF bytes holding ``text`` where A1111 reads a JPEG's or WebP's infotext: the Exif sub-IFD's UserComment,
    with its 8-byte charset header (``UNICODE``, UTF-16 big-endian), as ``piexif.helper.UserComment`` writes it."""
    comment = piexif.helper.UserComment.dump(text, encoding="unicode")
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})


def read_exif_parameters(image: Image.Image) -> str | None:
    """The infotext of a JPEG/WebP written as :func:`exif_parameters` writes it (None: there is none)."""
    raw = image.info.get("exif")
    if not raw:
        return None
    try:
        comment = piexif.load(raw).get("Exif", {}).get(piexif.ExifIFD.UserComment)
        return piexif.helper.UserComment.load(comment) if comment else None
    except (ValueError, struct.error, piexif.InvalidImageDataError):
        return None


def read_png_metadata(data: bytes | str) -> dict[str, Any]:
    """The ``diffsteer`` metadata of a PNG written by :func:`encode_image` (bytes or a path)."""
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    return json.loads(image.text["diffsteer"])
