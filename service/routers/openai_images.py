"""OpenAI images API: ``POST /v1/images/generations``, ``POST /v1/images/edits`` (and ``GET /v1/models``), for
the official clients.

Fields: ``prompt``, ``n``, ``size`` ("WxH" or "auto"), ``response_format`` (``b64_json`` only; ``url`` is
refused with 400, as this server keeps no image store), ``output_format`` (png, jpeg, webp), ``model`` (a
model of this server; OpenAI's own names such as ``dall-e-3`` or ``gpt-image-1`` mean the default model).
``quality``, ``style``, ``user``, ``safety_identifier``, ``moderation`` and ``output_compression`` are
accepted and ignored. Guidance options are extra fields: ``policy``, ``steps``, ``seed``, ``seeds``,
``negative_prompt``, ``scheduler``, ``eta``, ``distilled_guidance`` (guidance-distilled models: FLUX.1-dev),
``lora`` (in the official client: ``extra_body={...}``).
Errors are 400 with OpenAI's error shape (plus ``field``).

Edits (``/v1/images/edits``) are a multipart form: ``image`` (a file: PNG, JPEG or WebP; one image), optional
``mask`` (a file of the image's size whose fully transparent pixels, alpha 0, mark where to edit, as OpenAI
defines it; a mask of another size is refused, not resized, as OpenAI does, and so is one without an alpha channel
or without a transparent pixel) and the fields above. Without a mask the image's own alpha channel is the mask when it has fully
transparent pixels; with neither, the whole image is edited (img2img). The mask becomes the core's inpainting mask
(alpha 0 -> white, repaint; anything else -> black, keep). Further extensions: ``strength`` (default 1.0 with a
mask: the masked area is repainted from pure noise, as OpenAI's edits do; 0.8 without one: img2img that keeps the
image's composition), ``mask_blur`` and ``inpainting_fill`` (see ``/generate``). ``size`` absent or "auto": the
image's size, rounded down to the model's size multiple. Form fields hold text: text fields (``prompt``,
``size``, ``model``, a policy spec...) as they are, other fields their JSON value (``n=2``, ``seeds=[1,2]``, a
policy object); ``null`` is the same as leaving a field out; the official client's bracket keys
(``extra_body={"policy": {"name": "cfg", "scale": 4}}`` arrives as ``policy[name]``, ``policy[scale]``) are read
back into objects and lists (:mod:`diffsteer.service.routers.common`). The whole form is at most the service's
``max_upload_bytes``.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.image_inputs import decode_image
from diffsteer.service.deps import get_engine, require_api_key
from diffsteer.service.engine import Engine
from diffsteer.service.errors import ServiceError
from diffsteer.service.routers.common import (
    CLIENT_CLOSED,
    MULTIPART,
    form_fields,
    media_type,
    open_form,
    read_upload,
    run_translated,
)
from diffsteer.service.schemas import (
    GenerateRequest,
    LoraRef,
    OpenAIDiffsteerInfo,
    OpenAIImagesResponse,
    OpenAIModelList,
    json_body,
)

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])

OPENAI_MODEL_PREFIXES = ("dall-e", "gpt-image")


class OpenAIImageRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    prompt: str = pydantic.Field(description="The text prompt.")
    n: int | None = pydantic.Field(1, ge=1, description="Number of images.")
    size: str | None = pydantic.Field(None, description='"WxH" (multiples of 8) or "auto" (the model\'s native size).')
    response_format: Literal["b64_json", "url"] | None = pydantic.Field(None, description="Only b64_json is supported.")
    output_format: Literal["png", "jpeg", "webp"] | None = None
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    moderation: str | None = None
    background: Literal["auto", "opaque"] | None = None
    output_compression: int | None = pydantic.Field(None, ge=0, le=100)
    stream: bool | None = pydantic.Field(None, description="Streaming is not supported: false or null.")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _json(cls, data: Any) -> Any:
        return json_body(data)

    # guidance extensions
    negative_prompt: str | None = None
    policy: str | dict[str, Any] | None = None
    steps: int | None = None
    scheduler: str | None = None
    seed: int | None = None
    seeds: list[int] | None = None
    eta: float | None = None
    distilled_guidance: float | None = pydantic.Field(
        None,
        ge=0.0,
        le=100.0,
        description="The guidance scale a guidance-distilled model (FLUX.1-dev) takes as an input (default 3.5); "
        "refused by models without that input (GET /models: distilled_guidance).",
    )
    lora: list[LoraRef] | None = None


FIELD_NAMES = {"num_images": "n", "width": "size", "height": "size"}


def openai_field(field: str) -> str:
    head, dot, rest = field.partition(".")
    return FIELD_NAMES.get(head, head) + dot + rest


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    parts = [p.strip() for p in size.lower().split("x")]
    if len(parts) != 2 or not all(p.isascii() and p.isdecimal() for p in parts):  # not "²" nor "٦٤"
        raise InvalidInput("size", f'expected "WxH" like "512x512" or "auto", got {size!r}')
    return int(parts[0]), int(parts[1])


def to_generate_request(
    body: OpenAIImageRequest, engine: Engine, extra: dict[str, Any] | None = None
) -> GenerateRequest:
    """The native request for ``body``, with ``extra`` fields (an edit's init image, mask and strength)."""
    if body.stream:
        raise InvalidInput("stream", "streaming is not supported; leave it out or false")
    if body.response_format == "url":
        raise InvalidInput(
            "response_format", "'url' is not supported by this server (it keeps no image store); use 'b64_json'"
        )
    model = body.model
    if model is not None and model.lower().startswith(OPENAI_MODEL_PREFIXES):
        model = None
    width, height = parse_size(body.size)
    data: dict[str, Any] = {
        "prompt": body.prompt,
        "num_images": body.n or 1,
        "width": width,
        "height": height,
        "output_format": body.output_format or "png",
        "model": model,
    }
    for key in (
        "negative_prompt",
        "policy",
        "steps",
        "scheduler",
        "seed",
        "seeds",
        "eta",
        "distilled_guidance",
        "lora",
    ):
        value = getattr(body, key)
        if value is not None:
            data[key] = value
    if "seeds" in data:
        data.pop("num_images")
    data.update(extra or {})
    return GenerateRequest.model_validate(data)


def images_response(outcome: Any, **info: Any) -> JSONResponse:
    """OpenAI's images answer for a finished generation; ``info`` joins the ``diffsteer`` block."""
    r = outcome.result
    return JSONResponse(
        {
            "created": int(time.time()),
            "data": [
                {"b64_json": base64.b64encode(b).decode("ascii"), "revised_prompt": None} for b in outcome.encoded
            ],
            "output_format": outcome.output_format,
            "diffsteer": {
                "seeds": r.seeds,
                "nfe": r.nfe,
                "policy": r.params.policy.spec(),
                "model": r.model,
                "steps": r.params.steps,
                "scheduler": r.params.scheduler,
                "distilled_guidance": outcome.distilled_guidance,
                **info,
            },
        }
    )


@router.post("/images/generations", response_model=OpenAIImagesResponse, summary="OpenAI-compatible image generation")
async def images_generations(
    request: Request, body: OpenAIImageRequest, engine: Engine = Depends(get_engine)
) -> Response:
    outcome = await run_translated(request, engine, lambda: to_generate_request(body, engine), openai_field)
    if outcome is None:
        return Response(status_code=CLIENT_CLOSED)
    return images_response(outcome)


# --- edits ----------------------------------------------------------------------------------------------------

MASK_STRENGTH = 1.0  # an edit with a mask repaints the area from pure noise, as OpenAI's edits do
IMAGE_STRENGTH = 0.8  # an edit without one: img2img keeping the image's composition (diffusers' default)


class OpenAIImageEditRequest(OpenAIImageRequest):
    """The form fields of an edit besides its files (``image``, ``mask``): a generation's, and img2img's."""

    size: str | None = pydantic.Field(
        None,
        description='"WxH" (multiples of 8), or "auto" or absent: the image\'s size, rounded down to the model\'s '
        "size multiple.",
    )
    input_fidelity: Literal["high", "low"] | None = pydantic.Field(None, description="Accepted and ignored.")
    strength: float | None = pydantic.Field(
        None,
        ge=0.0,
        le=1.0,
        description=f"How much of the image is noised away (the native `strength`); default {MASK_STRENGTH} with a "
        f"mask (the masked area is repainted from noise, as OpenAI's edits do), {IMAGE_STRENGTH} without one.",
    )
    mask_blur: int | None = pydantic.Field(
        None, ge=0, le=64, description="Gaussian blur of the mask in pixels before it is binarised (default 0)."
    )
    inpainting_fill: Literal["original", "fill", "latent_noise", "latent_nothing"] | None = pydantic.Field(
        None, description="What the area to edit starts from below strength 1 (the native field; default original)."
    )


class OpenAIEditInfo(OpenAIDiffsteerInfo):
    strength: float = pydantic.Field(description="The strength the edit ran with.")
    mask: Literal["mask", "alpha"] | None = pydantic.Field(
        description="Where the area to edit came from: the mask file, the image's own alpha channel, or null "
        "(no transparent pixels: the whole image was edited, img2img)."
    )
    width: int
    height: int


class OpenAIImagesEditResponse(OpenAIImagesResponse):
    diffsteer: OpenAIEditInfo


EDIT_FORM = "OpenAIImageEditForm"  # the form's schema in the OpenAPI document (service/openapi.py bounds it)
FILE_FIELDS = ("image", "image[]", "mask")


def edit_form_schema() -> dict[str, Any]:
    """The multipart form of an edit as JSON schema (before :mod:`diffsteer.service.openapi` bounds it)."""
    schema = OpenAIImageEditRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    files = {
        "image": {
            "type": "string",
            "format": "binary",
            "description": "The image to edit: one PNG, JPEG or WebP file. Without a mask, its fully transparent "
            "pixels (alpha 0), if any, mark where to edit.",
        },
        "mask": {
            "type": "string",
            "format": "binary",
            "description": "A PNG of the image's size whose fully transparent pixels (alpha 0) mark where to edit "
            "(OpenAI's masks); an image without an alpha channel is refused.",
        },
    }
    schema["properties"] = {**files, **schema["properties"]}
    schema["required"] = ["image", "prompt"]
    schema["title"] = EDIT_FORM
    schema["description"] = (
        "multipart/form-data. Text fields as they are; other fields their JSON value (n=2, seeds=[1,2], a policy "
        "object); null the same as leaving a field out."
    )
    return schema


@dataclass(frozen=True)
class EditImages:
    init_image: str  # the upload, base64
    mask: str | None  # the core's mask (white = repaint) as base64 PNG
    source: Literal["mask", "alpha"] | None  # where the mask came from


def _repaint_area(image: Image.Image, field: str) -> Image.Image | None:
    """White where ``image`` is fully transparent (alpha 0), black elsewhere; None without an alpha channel."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return None
    try:
        alpha = image.convert("RGBA").getchannel("A")
    except (ValueError, OSError) as e:
        raise InvalidInput(field, f"its alpha channel cannot be read ({type(e).__name__})") from None
    return alpha.point(lambda a: 255 if a == 0 else 0)


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def read_edit_images(image: bytes, mask: bytes | None) -> EditImages:
    """The init image and the core's mask of an edit: OpenAI's mask (alpha 0 = edit), else the image's own
    transparent pixels, else none. InvalidInput names ``image`` or ``mask``."""
    picture = decode_image(image, "image")
    if mask is not None:
        mask_image = decode_image(mask, "mask")
        if mask_image.size != picture.size:
            raise InvalidInput(
                "mask",
                f"is {mask_image.width}x{mask_image.height} but the image is {picture.width}x{picture.height}; "
                "a mask must have the image's size (it is not resized)",
            )
        area = _repaint_area(mask_image, "mask")
        if area is None:
            raise InvalidInput(
                "mask",
                f"has no alpha channel (mode {mask_image.mode}); the area to edit is marked by fully transparent "
                "pixels (alpha 0), as in OpenAI's masks",
            )
        if area.getextrema()[1] == 0:
            raise InvalidInput("mask", "has no fully transparent pixel (alpha 0): nothing would be edited")
        source: Literal["mask", "alpha"] | None = "mask"
    else:
        area = _repaint_area(picture, "image")
        if area is not None and area.getextrema()[1] == 0:
            area = None  # an alpha channel without transparent pixels: the whole image is edited
        source = None if area is None else "alpha"
    return EditImages(base64.b64encode(image).decode("ascii"), None if area is None else _png_base64(area), source)


def edit_field_namer(size_given: bool):
    """Our field names in an edit's errors as OpenAI's: the size comes from the image unless ``size`` was given."""
    names = {**FIELD_NAMES, "init_image": "image"}
    if not size_given:
        names.update(width="image", height="image")

    def rename(field: str) -> str:
        head, dot, rest = field.partition(".")
        return names.get(head, head) + dot + rest

    return rename


def edit_fields(body: OpenAIImageEditRequest, images: EditImages) -> dict[str, Any]:
    """The native fields of an edit beyond a generation's."""
    strength = body.strength
    if strength is None:
        strength = MASK_STRENGTH if images.mask is not None else IMAGE_STRENGTH
    data: dict[str, Any] = {"init_image": images.init_image, "strength": strength}
    if images.mask is not None:
        data["mask"] = images.mask
    for key in ("mask_blur", "inpainting_fill"):
        value = getattr(body, key)
        if value is not None:
            data[key] = value
    return data


EDIT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{EDIT_FORM}"}}},
    }
}


@router.post(
    "/images/edits",
    response_model=OpenAIImagesEditResponse,
    summary="OpenAI-compatible image edit (img2img and inpainting)",
    openapi_extra=EDIT_OPENAPI,
)
async def images_edits(request: Request, engine: Engine = Depends(get_engine)) -> Response:
    if media_type(request) != MULTIPART:
        raise ServiceError(
            400,
            f"expected a {MULTIPART} body: the image (and mask) as file parts, prompt and the other fields "
            "as form fields",
            field="body",
        )
    async with open_form(request, engine.settings.max_upload_bytes) as form:
        body = OpenAIImageEditRequest.model_validate(form_fields(form, skip=FILE_FIELDS, files=("image", "mask")))
        image = await read_upload(form, "image", required=True, aliases=("image[]",))
        mask = await read_upload(form, "mask", required=False)
    assert image is not None
    images = await run_in_threadpool(read_edit_images, image, mask)
    size_given = body.size not in (None, "auto")
    outcome = await run_translated(
        request,
        engine,
        lambda: to_generate_request(body, engine, edit_fields(body, images)),
        edit_field_namer(size_given),
    )
    if outcome is None:
        return Response(status_code=CLIENT_CLOSED)
    first = outcome.result.images[0]
    return images_response(
        outcome,
        strength=outcome.result.params.strength,
        mask=images.source,
        width=first.width,
        height=first.height,
    )


@router.get("/models", response_model=OpenAIModelList, summary="OpenAI-compatible model list")
async def list_models(engine: Engine = Depends(get_engine)) -> JSONResponse:
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"id": m["name"], "object": "model", "created": 0, "owned_by": "diffsteer"}
                for m in engine.describe_models()
            ],
        }
    )
