"""OpenAI images API: ``POST /v1/images/generations`` (and ``GET /v1/models``), for the official clients.

Fields: ``prompt``, ``n``, ``size`` ("WxH" or "auto"), ``response_format`` (``b64_json`` only; ``url`` is
refused with 400, as this server keeps no image store), ``output_format`` (png, jpeg, webp), ``model`` (a
model of this server; OpenAI's own names such as ``dall-e-3`` or ``gpt-image-1`` mean the default model).
``quality``, ``style``, ``user``, ``safety_identifier``, ``moderation`` and ``output_compression`` are
accepted and ignored. Guidance options are extra fields: ``policy``, ``steps``, ``seed``, ``seeds``,
``negative_prompt``, ``scheduler``, ``eta``, ``distilled_guidance`` (guidance-distilled models: FLUX.1-dev),
``lora`` (in the official client: ``extra_body={...}``).
Errors are 400 with OpenAI's error shape (plus ``field``).
"""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

import pydantic
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from diffsteer.guidance.errors import InvalidInput
from diffsteer.service.deps import get_engine, require_api_key
from diffsteer.service.engine import Engine
from diffsteer.service.routers.common import CLIENT_CLOSED, run_translated
from diffsteer.service.schemas import GenerateRequest, LoraRef, OpenAIImagesResponse, OpenAIModelList, json_body

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


def to_generate_request(body: OpenAIImageRequest, engine: Engine) -> GenerateRequest:
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
    return GenerateRequest.model_validate(data)


@router.post("/images/generations", response_model=OpenAIImagesResponse, summary="OpenAI-compatible image generation")
async def images_generations(
    request: Request, body: OpenAIImageRequest, engine: Engine = Depends(get_engine)
) -> Response:
    outcome = await run_translated(request, engine, lambda: to_generate_request(body, engine), openai_field)
    if outcome is None:
        return Response(status_code=CLIENT_CLOSED)
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
            },
        }
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
