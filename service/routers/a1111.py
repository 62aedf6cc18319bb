"""AUTOMATIC1111 web UI API: ``POST /sdapi/v1/txt2img``, ``POST /sdapi/v1/img2img``, progress, interrupt and skip,
PNG info, the checkpoint option, and the listings its clients read.

Request fields used: ``prompt``, ``negative_prompt``, ``steps``, ``cfg_scale``, ``seed`` (-1: random),
``width``, ``height`` (default: the model's native size), ``batch_size`` x ``n_iter`` images, ``sampler_name``
(or ``sampler_index``) and ``scheduler`` (A1111 1.9+: ``automatic`` or ``karras``), ``eta``,
``override_settings.sd_model_checkpoint`` (a model of this server), ``send_images``. Extensions: ``policy`` (when
its ``scale`` is not given, ``cfg_scale`` fills it), ``lora``. Without ``policy`` and ``cfg_scale`` the model's
recommended policy is used, without ``steps`` its recommended steps (``diffsteer.guidance.models.ModelDefaults``).
Fields A1111 clients send with defaults are accepted and ignored; features this server does not have (hires fix,
face restoration, tiling, variation seeds, styles, scripts) are refused with 422 when asked for. Response:
``{"images": [base64 PNG...], "parameters": {...}, "info": "<JSON string>"}`` with ``seed``/``all_seeds``/
``infotexts`` like A1111; ``sampler_name``, ``scheduler`` (schedule type) and ``cfg_scale`` in ``info`` are
those the PNGs' infotexts carry (A1111's names: ``DPM++ 2M`` + ``Karras``).

img2img (``/img2img``): ``init_images`` (one image, base64 or a data URL), ``denoising_strength`` (the core's
``strength``), ``resize_mode``, and for inpainting ``mask`` (white repaints), ``mask_blur``, ``inpainting_fill``
(0 fill, 1 original, 2 latent noise, 3 latent nothing), ``inpainting_mask_invert``, ``inpaint_full_res`` ("only
masked") with ``inpaint_full_res_padding``; the images are prepared and the results composited as A1111 does
(:mod:`diffsteer.service.routers.a1111_img2img`): pixels outside the blurred mask are the init image's own, and
"only masked" answers at the init image's size. ``width``/``height`` absent: the init image's size, rounded down
to the model's size multiple. ``include_init_images`` puts the images back into ``parameters``. Refused with 422
naming the field, as they would change the image: ``initial_noise_multiplier`` ≠ 1, ``s_churn`` ≠ 0,
``seed_resize_from_h``/``_w`` > 0, ``refiner_checkpoint``, more than one init image. Accepted and ignored:
``image_cfg_scale`` (instruct-pix2pix models only), ``s_tmin``/``s_tmax``/``s_noise`` (only with ``s_churn``),
``save_images``, ``do_not_save_*``, ``override_settings_restore_afterwards``, ``script_args`` without a script.
Bad images (not base64, not an image, truncated) are 422 naming ``init_images.0`` or ``mask``.

Progress (``GET /progress``) covers the caller's own txt2img/img2img requests, queued or running (the caller: its
API key; every caller is one without keys): ``progress`` 0.01 + the mean fraction of their steps done (A1111's
formula), ``state.job_count`` their number, ``state.sampling_step``/``sampling_steps`` the running one's,
``current_image`` a latent preview of its first image (:mod:`diffsteer.service.preview`), ``eta_relative``; with
nothing in flight ``progress`` and ``job_count`` are 0. ``POST /interrupt`` stops every one of the caller's
requests, running or queued; ``POST /skip`` the running ones only, letting queued ones run (A1111's skip moves on
to the next batch; here a request's images are one batch). A running request stops at the end of its current
step and answers 200 with its images as they stand, as A1111 does: each decoded from its clean-image estimate at
that step (A1111's last "denoised" latent), with the request's infotext; a queued one interrupted answers 503
(code ``cancelled``, "interrupted"). ``POST /options`` sets ``sd_model_checkpoint`` for the caller's A1111 requests that name no
model (422 for a model this server does not offer; other options are accepted and ignored) and ``GET /options``
returns it. ``POST /png-info`` reads the ``parameters`` text of a PNG (or the EXIF comment of a JPEG/WebP) with
A1111's infotext rules; ``GET /loras`` lists the LoRA folder (names relative to it, never server paths) with each
file's safetensors metadata; ``POST /refresh-loras`` has nothing to do (the folder is read on every listing).

Flow-matching models (SD3, FLUX.1, Qwen-Image) as Forge serves them: samplers ``Euler``, ``Heun``,
``DPM++ 2M``, ``UniPC`` with schedule type ``Simple`` (or ``Automatic``), the flow forms of those samplers on the
model's own σ grid; other samplers are refused naming ``sampler_name`` and the accepted ones. Forge's
``distilled_cfg_scale`` (sent on every request) is the ``distilled_guidance`` of models that take it (FLUX.1-dev)
and ignored by the others; infotexts carry it as Forge writes it (``Distilled CFG Scale: 3.5``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image
from safetensors import safe_open
from starlette.concurrency import run_in_threadpool

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.image_inputs import decode_image
from diffsteer.guidance.images import a1111_parameters, encode_image
from diffsteer.guidance.registry import parse_json_object, parse_spec_string, policy_class
from diffsteer.guidance.schedulers import A1111_FLOW_SAMPLERS
from diffsteer.service.deps import get_engine, job_owner, require_api_key
from diffsteer.service.engine import Attach, Engine, ModelTraits, Outcome
from diffsteer.service.queue import Ticket
from diffsteer.service.routers.a1111_img2img import INPAINTING_FILLS, Img2ImgImages, png_base64, prepare_images
from diffsteer.service.routers.common import CLIENT_CLOSED, ClientFieldError, run_translated
from diffsteer.service.schemas import (
    A1111Model,
    A1111Options,
    A1111Sampler,
    A1111Scheduler,
    A1111Scripts,
    GenerateRequest,
    LoraRef,
    Txt2ImgResponse,
    json_body,
)

log = logging.getLogger("diffsteer.service.a1111")

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], dependencies=[Depends(require_api_key)])

# A1111 sampler name (lower case) -> our scheduler
SAMPLERS = {
    "euler a": "euler_a",
    "euler": "euler",
    "ddim": "ddim",
    "ddpm": "ddpm",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ 2m karras": "dpmpp_2m_karras",
    "heun": "heun",
    "lms": "lms",
    "plms": "pndm",
    "unipc": "unipc",
    "lcm": "lcm",
}
SAMPLER_LABELS = {
    "euler a": "Euler a",
    "euler": "Euler",
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "dpm++ 2m": "DPM++ 2M",
    "dpm++ 2m karras": "DPM++ 2M Karras",
    "heun": "Heun",
    "lms": "LMS",
    "plms": "PLMS",
    "unipc": "UniPC",
    "lcm": "LCM",
}


class A1111Overrides(pydantic.BaseModel):
    """``override_settings``: only the checkpoint applies; other A1111 options are accepted and ignored."""

    model_config = pydantic.ConfigDict(extra="allow", strict=True)

    sd_model_checkpoint: str | None = None


class Txt2ImgRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    prompt: str = ""
    negative_prompt: str | None = ""
    steps: int = 20
    cfg_scale: float = pydantic.Field(7.0, ge=0.0, le=100.0)
    seed: int = -1
    width: int | None = pydantic.Field(None, description="Default: the model's native size.")
    height: int | None = pydantic.Field(None, description="Default: the model's native size.")
    batch_size: int = pydantic.Field(1, ge=1)
    n_iter: int = pydantic.Field(1, ge=1)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    eta: float | None = None
    distilled_cfg_scale: float | None = pydantic.Field(
        None,
        ge=0.0,
        le=100.0,
        description="Forge's distilled guidance scale: the `distilled_guidance` of models that take it (FLUX.1-dev; "
        "default 3.5); ignored by the others, as Forge clients send it on every request.",
    )
    override_settings: A1111Overrides | None = None
    send_images: bool = pydantic.Field(True, description="False: `images` is empty (A1111's field).")
    # features this server does not have: refused when asked for
    enable_hr: bool | None = False
    restore_faces: bool | None = False
    tiling: bool | None = False
    subseed_strength: float | None = 0.0
    styles: list[str] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    # extensions
    policy: str | dict[str, Any] | None = None
    lora: list[LoraRef] | None = None
    model: str | None = None

    @pydantic.model_validator(mode="before")
    @classmethod
    def _json(cls, data: Any) -> Any:
        return json_body(data)


def _only(*values: Any) -> dict[str, Any]:
    """The JSON schema of a field refused unless it holds one of ``values`` (or null)."""
    return {"anyOf": [*({"const": v} for v in values), {"type": "null"}]}


FLAG = bool | Literal[0, 1]  # A1111 takes 0/1 as well as booleans for these


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's img2img body: txt2img's fields plus the init image, the mask and how they are used."""

    init_images: list[str] = pydantic.Field(
        min_length=1,
        max_length=1,
        description="The image to start from: base64 (or a data:image URL) of a PNG, JPEG or WebP; one image.",
    )
    width: int | None = pydantic.Field(
        None, description="Default: the init image's width, rounded down to the model's size multiple."
    )
    height: int | None = pydantic.Field(
        None, description="Default: the init image's height, rounded down to the model's size multiple."
    )
    resize_mode: int = pydantic.Field(
        0,
        ge=0,
        le=3,
        description="How the init image becomes width × height: 0 just resize (stretch), 1 crop and resize "
        "(cover, centred), 2 resize and fill (fit, the borders filled with the stretched edges), 3 as 0.",
    )
    denoising_strength: float = pydantic.Field(
        0.75,
        ge=0.0,
        le=1.0,
        description="How much of the init image is noised away: the last strength × steps steps run.",
    )
    mask: str | None = pydantic.Field(
        None, description="Inpainting: white repaints (or, with transparency, the alpha channel); base64 or data URL."
    )
    mask_blur: int = pydantic.Field(4, ge=0, le=64, description="Gaussian blur of the mask (σ in pixels).")
    inpainting_fill: int = pydantic.Field(
        0, ge=0, le=3, description="Masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing."
    )
    inpaint_full_res: FLAG = pydantic.Field(
        True, description="Inpaint area: true 'only masked' (the mask's box, at width × height), false whole picture."
    )
    inpaint_full_res_padding: int = pydantic.Field(0, ge=0, description="Pixels around the mask's box (only masked).")
    inpainting_mask_invert: FLAG = pydantic.Field(0, description="1: repaint what the mask leaves black.")
    include_init_images: bool = pydantic.Field(False, description="Return the init image and mask in `parameters`.")
    image_cfg_scale: float | None = pydantic.Field(None, description="Ignored (instruct-pix2pix models only).")
    initial_noise_multiplier: float | None = pydantic.Field(
        None, description="Not supported: 1 or null.", json_schema_extra=_only(1)
    )
    s_churn: float | None = pydantic.Field(None, description="Not supported: 0 or null.", json_schema_extra=_only(0))
    seed_resize_from_h: int | None = pydantic.Field(
        None,
        description="Not supported: ≤ 0 or null.",
        json_schema_extra={"anyOf": [{"type": "integer", "maximum": 0}, {"type": "null"}]},
    )
    seed_resize_from_w: int | None = pydantic.Field(
        None,
        description="Not supported: ≤ 0 or null.",
        json_schema_extra={"anyOf": [{"type": "integer", "maximum": 0}, {"type": "null"}]},
    )
    refiner_checkpoint: str | None = pydantic.Field(
        None, description="Not supported: empty or null.", json_schema_extra=_only("")
    )


class A1111OptionsUpdate(pydantic.BaseModel):
    """``POST /options``: the checkpoint for the caller's A1111 requests; other options are accepted and ignored."""

    model_config = pydantic.ConfigDict(extra="allow", strict=True)

    sd_model_checkpoint: str | None = pydantic.Field(None, description="A model of this server (GET /sd-models).")


class PngInfoRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)

    image: str = pydantic.Field(description="base64 (or a data:image URL) of a PNG, JPEG or WebP; empty: no info.")


class PngInfoResponse(pydantic.BaseModel):
    info: str = pydantic.Field(description="The `parameters` text (A1111's infotext).")
    items: dict[str, Any] = pydantic.Field(description="The image's other text fields.")
    parameters: dict[str, Any] = pydantic.Field(description="The infotext parsed as A1111 parses it.")


class A1111State(pydantic.BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class A1111Progress(pydantic.BaseModel):
    progress: float = pydantic.Field(description="0 with nothing in flight; else 0.01 + the share of steps done.")
    eta_relative: float = pydantic.Field(description="Seconds left, estimated from the time taken so far.")
    state: A1111State
    current_image: str | None = pydantic.Field(description="A latent preview (base64 PNG) of the running request.")
    textinfo: str | None
    current_task: str | None


class A1111Lora(pydantic.BaseModel):
    name: str
    alias: str
    path: str = pydantic.Field(description="The file, relative to the server's LoRA folder.")
    metadata: dict[str, Any]


# A1111/Forge sampler name (lower case) -> our scheduler, on flow-matching models (Forge's names for FLUX/SD3)
FLOW_SAMPLERS = {label.lower(): ours for ours, (label, _) in A1111_FLOW_SAMPLERS.items()}
FLOW_SAMPLER_LABELS = [label for label, _ in A1111_FLOW_SAMPLERS.values()]
# A1111 "Schedule type" (lower case) -> its label: on VP models, on flow models (Forge's "Simple": the model's
# own shifted σ grid, which every flow scheduler here samples), and where the model is not known yet
VP_SCHEDULE_TYPES = {"automatic": "Automatic", "karras": "Karras"}
FLOW_SCHEDULE_TYPES = {"automatic": "Automatic", "simple": "Simple"}
A1111_SCHEDULERS = {**VP_SCHEDULE_TYPES, **FLOW_SCHEDULE_TYPES}


def resolve_sampler(name: str | None, scheduler: str | None, schedule: str | None = None, model: str = "") -> str:
    """Our scheduler for A1111's ``sampler_name`` and ``scheduler`` (schedule type) on a model of noise
    ``schedule`` ("vp", "flow"; None: not known before loading, where "Simple" is let through)."""
    if schedule == "flow":
        return resolve_flow_sampler(name, scheduler, model)
    if name is None or not name.strip():
        base = "default"
    else:
        key = name.strip().lower()
        if key not in SAMPLERS:
            accepted = ", ".join(SAMPLER_LABELS.values())
            raise InvalidInput("sampler_name", f"unknown sampler {name!r}; accepted values: {accepted}")
        base = SAMPLERS[key]
    kind = (scheduler or "automatic").strip().lower()
    if kind == "simple" and schedule is None:
        kind = "automatic"
    if kind not in VP_SCHEDULE_TYPES:
        on = f" on {model}" if model else ""
        raise ClientFieldError(
            "scheduler",
            f"unsupported scheduler {scheduler!r}{on}; accepted values: {', '.join(VP_SCHEDULE_TYPES.values())}"
            + (" (Simple: on flow-matching models)" if kind == "simple" else ""),
        )
    if kind == "karras" and base == "default":
        base = "dpmpp_2m"  # A1111's own default sampler, the one our Karras schedule exists for
    if kind == "karras" and base != "dpmpp_2m_karras":
        if base != "dpmpp_2m":
            raise ClientFieldError("scheduler", f"Karras sigmas are available with 'DPM++ 2M' only, not {name!r}")
        base = "dpmpp_2m_karras"
    return base


def resolve_flow_sampler(name: str | None, scheduler: str | None, model: str) -> str:
    """On a flow-matching model: Forge's samplers for FLUX/SD3 (Euler, Heun, DPM++ 2M, UniPC) with the schedule
    type Simple (or Automatic, the same: the model's own σ grid); others are refused naming the accepted ones."""
    if name is None or not name.strip():
        base = "default"
    else:
        key = name.strip().lower()
        if key not in FLOW_SAMPLERS:
            problem = f"{name!r} has no flow-matching form" if key in SAMPLERS else f"unknown sampler {name!r}"
            raise InvalidInput(
                "sampler_name",
                f"{problem}; accepted values on {model}, a flow-matching model: {', '.join(FLOW_SAMPLER_LABELS)}",
            )
        base = FLOW_SAMPLERS[key]
    kind = (scheduler or "automatic").strip().lower()
    if kind not in FLOW_SCHEDULE_TYPES:
        raise ClientFieldError(
            "scheduler",
            f"unsupported scheduler {scheduler!r} on {model}, a flow-matching model; accepted values: "
            f"{', '.join(FLOW_SCHEDULE_TYPES.values())}",
        )
    return base


def resolve_policy(policy: str | dict[str, Any] | None, cfg_scale: float) -> Any:
    """The request's policy, with ``cfg_scale`` as its ``scale`` when the policy has one and leaves it unset."""
    if policy is None:
        return {"name": "cfg", "scale": cfg_scale}
    if isinstance(policy, str):
        text = policy.strip()
        data = parse_json_object(text) if text.startswith("{") else parse_spec_string(text)
    else:
        data = dict(policy)
    if not isinstance(data, dict):
        return policy
    name = data.get("name")
    try:
        fields = policy_class(name).Params.model_fields if isinstance(name, str) else {}
    except InvalidInput:
        return data  # unknown name: reported by the validation
    if "scale" in fields and "scale" not in data:
        data["scale"] = cfg_scale
    return data


def unsupported(body: Txt2ImgRequest) -> None:
    checks = [
        ("enable_hr", bool(body.enable_hr), "hires fix is not supported"),
        ("restore_faces", bool(body.restore_faces), "face restoration is not supported"),
        ("tiling", bool(body.tiling), "tiling is not supported"),
        ("subseed_strength", bool(body.subseed_strength), "variation seeds are not supported"),
        ("styles", bool(body.styles), "styles are not supported; put the text into the prompt"),
        ("script_name", bool(body.script_name), "scripts are not supported"),
        ("alwayson_scripts", bool(body.alwayson_scripts), "extensions (alwayson_scripts) are not supported"),
    ]
    if isinstance(body, Img2ImgRequest):
        multiplier, churn = body.initial_noise_multiplier, body.s_churn
        checks += [
            ("initial_noise_multiplier", multiplier not in (None, 1), "scaling the initial noise is not supported"),
            ("s_churn", churn not in (None, 0), "stochastic churn (s_churn) is not supported"),
            ("seed_resize_from_h", (body.seed_resize_from_h or 0) > 0, "resizing the seed's noise is not supported"),
            ("seed_resize_from_w", (body.seed_resize_from_w or 0) > 0, "resizing the seed's noise is not supported"),
            ("refiner_checkpoint", bool(body.refiner_checkpoint), "refiner checkpoints are not supported"),
        ]
    for name, asked, message in checks:
        if asked:
            raise InvalidInput(name, message)


def requested_model(body: Txt2ImgRequest, checkpoint: str | None = None) -> str | None:
    """The model a body names: ``model``, else ``override_settings.sd_model_checkpoint``, else ``checkpoint`` (the
    caller's ``sd_model_checkpoint`` option)."""
    if body.model is not None:
        return body.model
    if body.override_settings is not None and body.override_settings.sd_model_checkpoint is not None:
        return body.override_settings.sd_model_checkpoint
    return checkpoint


def generate_data(
    body: Txt2ImgRequest, engine: Engine | None = None, checkpoint: str | None = None
) -> tuple[dict[str, Any], str, ModelTraits | None]:
    """The GenerateRequest fields of an A1111 body, the model's name and its traits (None: not known yet)."""
    unsupported(body)
    if body.seed < -1:
        raise InvalidInput("seed", f"{body.seed}: -1 (a random seed) or a seed ≥ 0")
    model = requested_model(body, checkpoint)
    name, traits = offered_model(engine, model)
    schedule = traits.family.schedule if traits is not None else None
    label = f"{name} ({traits.family.title})" if traits is not None else ""
    data: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or None,
        "scheduler": resolve_sampler(body.sampler_name or body.sampler_index, body.scheduler, schedule, label),
        "seed": None if body.seed < 0 else body.seed,
        "width": body.width,
        "height": body.height,
        "num_images": body.batch_size * body.n_iter,
        "model": model,
        "lora": body.lora or [],
        "output_format": "png",
    }
    given = body.model_fields_set
    if "steps" in given:
        data["steps"] = body.steps
    if body.policy is not None or "cfg_scale" in given:  # else the model's recommended policy
        data["policy"] = resolve_policy(body.policy, body.cfg_scale)
    if body.eta is not None:
        data["eta"] = body.eta
    if body.distilled_cfg_scale is not None and traits is not None and traits.distilled_guidance:
        data["distilled_guidance"] = body.distilled_cfg_scale
    return data, name, traits


def to_generate_request(
    body: Txt2ImgRequest, engine: Engine | None = None, checkpoint: str | None = None
) -> GenerateRequest:
    """The GenerateRequest of an A1111 body; with ``engine``, samplers and Forge's ``distilled_cfg_scale`` are
    mapped for the model the request names (:meth:`Engine.model_traits`); ``checkpoint``: the model when the body
    names none (the caller's ``sd_model_checkpoint`` option)."""
    return GenerateRequest.model_validate(generate_data(body, engine, checkpoint)[0])


def offered_model(engine: Engine | None, model: str | None) -> tuple[str, ModelTraits | None]:
    """The canonical name and traits of the model a request names (traits None: no engine, or known only once
    loaded); an unknown name is left to the request's validation, which names the field."""
    if engine is None:
        return model or "", None
    try:
        name = engine.resolve_model(model)
    except InvalidInput:
        return model or "", None
    return name, engine.model_traits(name)


FIELD_NAMES = {
    "num_images": "batch_size",
    "scheduler": "sampler_name",
    "distilled_guidance": "distilled_cfg_scale",
    "strength": "denoising_strength",
    "init_image": "init_images.0",
}


def a1111_field(field: str) -> str:
    head, dot, rest = field.partition(".")
    return FIELD_NAMES.get(head, head) + dot + rest


def renamer(body: Txt2ImgRequest) -> Callable[[str], str]:
    """Our field names -> the body's: ``model`` is ``override_settings.sd_model_checkpoint`` when that named it."""
    via_override = body.model is None and requested_model(body) is not None

    def rename(name: str) -> str:
        if name == "model" and via_override:
            return "override_settings.sd_model_checkpoint"
        return a1111_field(name)

    return rename


# -- img2img -------------------------------------------------------------------------------------------------------


@dataclass
class Img2ImgPlan:
    data: dict[str, Any]  # the GenerateRequest's fields
    images: Img2ImgImages


def img2img_plan(body: Img2ImgRequest, engine: Engine, checkpoint: str | None) -> Img2ImgPlan:
    """The GenerateRequest fields of an img2img body, with its images decoded, resized, cropped and masked as
    A1111 does (:func:`diffsteer.service.routers.a1111_img2img.prepare_images`); InvalidInput names A1111's
    fields. Runs off the event loop (decoding and resizing take time)."""
    data, name, traits = generate_data(body, engine, checkpoint)
    init = decode_image(body.init_images[0], "init_images.0")
    mask = decode_image(body.mask, "mask") if body.mask else None  # A1111: an empty mask is no mask
    width, height = generation_size(body, init, engine, name, traits)
    images = prepare_images(
        init,
        mask,
        width,
        height,
        resize_mode=body.resize_mode,
        mask_blur=body.mask_blur,
        invert=bool(body.inpainting_mask_invert),
        only_masked=bool(body.inpaint_full_res),
        padding=body.inpaint_full_res_padding,
    )
    data.update(
        width=width,
        height=height,
        init_image=png_base64(images.init),
        strength=body.denoising_strength,
    )
    if images.mask is not None:
        # blurred here already, at the mask's own resolution (A1111's order); the core binarises it at 0.5
        data.update(mask=png_base64(images.mask), mask_blur=0, inpainting_fill=INPAINTING_FILLS[body.inpainting_fill])
    return Img2ImgPlan(data, images)


def generation_size(
    body: Img2ImgRequest, init: Image.Image, engine: Engine, name: str, traits: ModelTraits | None
) -> tuple[int, int]:
    """(width, height) of the generation: the body's, else the init image's rounded down to the model's size
    multiple; checked against the limits before any image is resized to it."""
    multiple = math.lcm(8, traits.size_multiple) if traits is not None and traits.size_multiple else 8
    try:
        limits = engine.limits.for_model(engine.model_defaults(engine.resolve_model(name)))
    except InvalidInput:
        limits = engine.limits  # an unknown model: the request's validation names it
    sizes = []
    for field_name, given, own, maximum in (
        ("width", body.width, init.width, limits.max_width),
        ("height", body.height, init.height, limits.max_height),
    ):
        if given is None:
            size = own // multiple * multiple
            if not size or size > maximum:
                raise InvalidInput(
                    "init_images.0",
                    f"its {field_name} {own} gives a generation {field_name} of {size}, outside 8..{maximum}; "
                    f"give {field_name}",
                )
        else:
            size = given
            if size < 8 or size % 8:
                raise InvalidInput(field_name, f"must be a multiple of 8 (≥ 8), got {size}")
            if size > maximum:
                raise InvalidInput(field_name, f"{size} is above the maximum of {maximum}")
        sizes.append(size)
    return sizes[0], sizes[1]


def finish_img2img(outcome: Outcome, images: Img2ImgImages, body: Img2ImgRequest) -> tuple[list[bytes], list[dict]]:
    """The answer's PNGs and their metadata: composited as A1111 does where a mask was used (with the request's
    ``mask_blur`` in the infotext: the core got the mask blurred already, and A1111's inpainting keys), the
    generation's own otherwise."""
    if images.overlay is None:
        return outcome.encoded, outcome.metadata
    inpainting = {
        "mask_blur": body.mask_blur,
        "inpaint_area": "Only masked" if body.inpaint_full_res else None,
        "masked_area_padding": body.inpaint_full_res_padding if body.inpaint_full_res else None,
        "mask_mode": "Inpaint not masked" if body.inpainting_mask_invert else None,
    }
    metadata = [{**meta, **inpainting} for meta in outcome.metadata]
    finished = [images.finish(image) for image in outcome.result.images]
    return [encode_image(image, "png", meta) for image, meta in zip(finished, metadata)], metadata


# -- progress, interrupt, skip ---------------------------------------------------------------------------------------


@dataclass
class A1111Task:
    """One of a caller's txt2img/img2img requests in flight, as its ticket's events describe it."""

    kind: str
    owner: str | None
    submitted: float = field(default_factory=time.time)
    ticket: Ticket | None = None
    started: bool = False
    step: int = 0
    total: int = 0
    model: Any = None
    latents: Any = None
    preview: tuple[int, asyncio.Future] | None = None  # (step, its rendering), shared by progress calls

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    @property
    def timestamp(self) -> str:
        return time.strftime("%Y%m%d%H%M%S", time.localtime(self.submitted))


@dataclass
class CallerFlags:
    interrupted: bool = False
    skipped: bool = False


class A1111Session:
    """The A1111 state of every caller (an API key's fingerprint; None: every caller, without keys): its requests
    in flight, whether the last was interrupted or skipped, and its ``sd_model_checkpoint`` option."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: list[A1111Task] = []
        self._flags: dict[str | None, CallerFlags] = {}
        self._checkpoints: dict[str | None, str] = {}

    def track(self, kind: str, owner: str | None) -> A1111Task:
        """A new request of ``owner``, in flight until it finishes or :meth:`discard`."""
        task = A1111Task(kind, owner)
        with self._lock:
            self._tasks.append(task)
        return task

    def follower(self, task: A1111Task) -> Attach:
        """What :meth:`Engine.submit` attaches to the task's ticket before it is queued."""

        def attach(ticket: Ticket) -> None:
            task.ticket = ticket
            ticket.listeners.append(lambda kind, data: self._on_ticket(task, kind, data))

        return attach

    def _on_ticket(self, task: A1111Task, kind: str, data: Any) -> None:  # on the queue's worker thread
        if kind == "started":
            task.started = True
            with self._lock:
                self._flags[task.owner] = CallerFlags()  # A1111 clears interrupted/skipped when a job begins
        elif kind == "prepared":
            task.model = data[0]
        elif kind == "step":
            task.step, task.total, task.latents = data.step, data.total, data.latents
        elif kind == "finished":
            self.discard(task)

    def discard(self, task: A1111Task) -> None:
        with self._lock:
            if task in self._tasks:
                self._tasks.remove(task)

    def tasks(self, owner: str | None) -> list[A1111Task]:
        """The caller's requests in flight, oldest first."""
        with self._lock:
            return [t for t in self._tasks if t.owner == owner]

    def flags(self, owner: str | None) -> CallerFlags:
        with self._lock:
            return self._flags.get(owner) or CallerFlags()

    def stop(self, owner: str | None, how: str) -> int:
        """Stop the caller's requests: the running ones end their denoising at the next step and answer with
        their images as they stand (``interrupt`` and ``skip``); ``interrupt`` also cancels the queued ones.
        How many were stopped."""
        with self._lock:
            self._flags[owner] = CallerFlags(interrupted=how == "interrupt", skipped=how == "skip")
            tickets = [t.ticket for t in self._tasks if t.owner == owner and t.ticket is not None]
        reason = "interrupted (POST /sdapi/v1/interrupt)" if how == "interrupt" else "skipped (POST /sdapi/v1/skip)"
        stopped = 0
        for ticket in tickets:
            if ticket.interrupt(reason):
                stopped += 1
            elif how == "interrupt" and ticket.state == "queued":
                stopped += ticket.cancel(reason)
        return stopped

    def checkpoint(self, owner: str | None) -> str | None:
        with self._lock:
            return self._checkpoints.get(owner)

    def set_checkpoint(self, owner: str | None, model: str) -> None:
        with self._lock:
            self._checkpoints[owner] = model


async def a1111_session(request: Request) -> A1111Session:
    """The app's A1111 session state (made on first use; async: on the event loop, so made once)."""
    state = request.app.state
    session = getattr(state, "a1111", None)
    if session is None:
        session = state.a1111 = A1111Session()
    return session


async def run_a1111(
    request: Request,
    engine: Engine,
    build: Callable[[], GenerateRequest],
    rename: Callable[[str], str],
    session: A1111Session,
    owner: str | None,
    kind: str,
) -> Outcome | None:
    """:func:`run_translated`, followed by the caller's progress; None when the client went away."""
    task = session.track(kind, owner)
    try:
        return await run_translated(request, engine, build, rename, attach=session.follower(task))
    finally:
        session.discard(task)  # also when the queue refused it: its ticket never finishes


PREVIEW_WAIT_S = 1.0  # a progress call waits this long for a preview, which then comes with a later call


async def current_preview(engine: Engine, task: A1111Task) -> str | None:
    """A latent preview of the task's first image at its latest step (rendered once per step)."""
    model, latents, step = task.model, task.latents, task.step
    if model is None or latents is None or engine.settings.preview == "none":
        return None
    if task.preview is None or task.preview[0] != step:  # no await between the check and the store
        task.preview = (step, asyncio.ensure_future(run_in_threadpool(engine.preview, model, latents[:1])))
    try:
        pngs = await asyncio.wait_for(asyncio.shield(task.preview[1]), PREVIEW_WAIT_S)
    except TimeoutError:
        return None
    except Exception:  # a preview must never break the progress call
        log.exception("preview failed")
        return None
    return base64.b64encode(pngs[0]).decode("ascii")


# -- PNG info ------------------------------------------------------------------------------------------------------

# A1111 (1.10) modules/infotext_utils.py
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
# A1111 modules/images.py: what read_info_from_image leaves out of `items`
IGNORED_INFO_KEYS = {
    "jfif",
    "jfif_version",
    "jfif_unit",
    "jfif_density",
    "dpi",
    "exif",
    "loop",
    "background",
    "timestamp",
    "duration",
    "progressive",
    "progression",
    "icc_profile",
    "chromaticity",
    "photoshop",
}
USER_COMMENT = 0x9286
EXIF_IFD = 0x8769


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's ``parse_generation_parameters``: the prompt lines, ``Negative prompt:`` lines, then the last line's
    ``key: value`` pairs (JSON in double quotes; ``WxH`` split into ``KEY-1``/``KEY-2``), with A1111's defaults
    for the keys every infotext implies (``Clip skip`` 1, ``Schedule type`` Automatic)."""
    result: dict[str, Any] = {}
    prompt, negative, in_negative = "", "", False
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for key, value in RE_PARAM.findall(last):
        if value and value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        size = RE_IMAGESIZE.match(value)
        if size is not None:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    result["Prompt"] = prompt
    result["Negative prompt"] = negative
    result.setdefault("Clip skip", "1")
    result.setdefault("Schedule type", "Automatic")
    return result


def user_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment of a JPEG/WebP (where A1111 and this server write the infotext)."""
    try:
        exif = image.getexif()
        value = exif.get_ifd(EXIF_IFD).get(USER_COMMENT, exif.get(USER_COMMENT))
    except Exception:
        return None
    if isinstance(value, bytes):
        head, body = value[:8], value[8:]
        if head == b"UNICODE\x00":
            return body.decode("utf-16-be" if body[:1] == b"\x00" else "utf-16-le", errors="ignore")
        if head in (b"ASCII\x00\x00\x00", b"\x00" * 8):
            return body.decode("utf-8", errors="ignore")
        return value.decode("utf-8", errors="ignore")
    return value if isinstance(value, str) else None


def read_info(image: Image.Image) -> tuple[str, dict[str, Any]]:
    """(infotext, other text items) as A1111's ``read_info_from_image``."""
    items = dict(image.info or {})
    info = items.pop("parameters", None)
    if "exif" in items:
        info = user_comment(image) or info
    elif "comment" in items:  # GIF
        comment = items["comment"]
        info = comment.decode("utf-8", errors="ignore") if isinstance(comment, bytes) else comment
    for key in IGNORED_INFO_KEYS:
        items.pop(key, None)
    clean: dict[str, Any] = {}
    for key, value in items.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        elif isinstance(value, tuple):
            value = list(value)
        if isinstance(value, str | int | float | bool | list) or value is None:
            clean[str(key)] = value
    return info if isinstance(info, str) else "", clean


def png_info(image_text: str) -> dict[str, Any]:
    if not image_text.strip():
        return {"info": "", "items": {}, "parameters": {}}
    image = decode_image(image_text, "image")
    info, items = read_info(image)
    return {"info": info, "items": items, "parameters": parse_infotext(info) if info else {}}


# -- LoRAs ---------------------------------------------------------------------------------------------------------


def lora_metadata(path: Any) -> dict[str, Any]:
    """A safetensors file's ``__metadata__``, JSON values read back (A1111's ``read_metadata_from_safetensors``)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception:
        return {}
    metadata: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str) and value[:1] == "{":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        metadata[key] = value
    return metadata


def list_loras(engine: Engine) -> list[dict[str, Any]]:
    library = engine.loras
    rows = []
    for name in library.names():
        try:
            path = library.path(name)
        except InvalidInput:  # gone meanwhile, or a link out of the folder
            continue
        metadata = lora_metadata(path)
        alias = metadata.get("ss_output_name")
        rows.append(
            {
                "name": name,
                "alias": alias if isinstance(alias, str) and alias else name,
                "path": path.relative_to(library.folder).as_posix(),
                "metadata": metadata,
            }
        )
    return rows


# -- info ----------------------------------------------------------------------------------------------------------


def a1111_info(body: Txt2ImgRequest, outcome: Outcome, metadata: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The ``info`` of a txt2img/img2img answer: A1111's keys, from the infotexts' fields so that both agree."""
    r = outcome.result
    meta = metadata[0]
    prompts = r.params.prompts
    info = {
        "prompt": body.prompt,
        "all_prompts": prompts,
        "negative_prompt": body.negative_prompt or "",
        "all_negative_prompts": [body.negative_prompt or ""] * len(prompts),
        "seed": r.seeds[0],
        "all_seeds": r.seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(r.seeds),
        "subseed_strength": 0,
        "width": r.images[0].width,
        "height": r.images[0].height,
        "sampler_name": meta.get("sampler"),
        "scheduler": meta.get("schedule_type") or "Automatic",
        "cfg_scale": meta.get("cfg_scale"),
        "distilled_cfg_scale": meta.get("distilled_guidance"),
        "steps": r.params.steps,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "restore_faces": False,
        "sd_model_name": r.model,
        "sd_model_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": None,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "index_of_first_image": 0,
        "infotexts": [a1111_parameters(m) for m in metadata],
        "version": "diffsteer",
        "policy": r.params.policy.spec(),
        "nfe": r.nfe,
    }
    info.update(extra)
    return info


def a1111_answer(images: list[bytes], parameters: dict[str, Any], info: dict[str, Any], send: bool) -> JSONResponse:
    return JSONResponse(
        {
            "images": [base64.b64encode(b).decode("ascii") for b in images] if send else [],
            "parameters": parameters,
            "info": json.dumps(info),
        }
    )


def inpainting_conditioning(engine: Engine, model: str) -> bool:
    """Whether the model takes inpainting inputs (a 9-channel UNet): A1111's ``is_using_inpainting_conditioning``."""
    loaded = engine.loaded_model(model)
    try:
        return bool(loaded is not None and loaded.family.inpainting_inputs(loaded))
    except Exception:
        return False


# -- routes --------------------------------------------------------------------------------------------------------

QUEUED_ERRORS = {
    status: {
        "description": text,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for status, text in (
        (429, "Queue full; retry after Retry-After seconds"),
        (503, "Shutting down, model unavailable, or the work was cancelled (an interrupt while queued)"),
        (504, "Not finished within request_timeout_s"),
    )
}


@router.post("/txt2img", response_model=Txt2ImgResponse, summary="AUTOMATIC1111-compatible text to image")
async def txt2img(
    request: Request,
    body: Txt2ImgRequest,
    engine: Engine = Depends(get_engine),
    session: A1111Session = Depends(a1111_session),
    owner: str | None = Depends(job_owner),
) -> Response:
    checkpoint = session.checkpoint(owner)
    outcome = await run_a1111(
        request,
        engine,
        lambda: to_generate_request(body, engine, checkpoint),
        renamer(body),
        session,
        owner,
        "txt2img",
    )
    if outcome is None:
        return Response(status_code=CLIENT_CLOSED)
    parameters = body.model_dump(mode="json")
    parameters["seed"] = outcome.result.seeds[0]
    info = a1111_info(body, outcome, outcome.metadata)
    return a1111_answer(outcome.encoded, parameters, info, body.send_images)


@router.post(
    "/img2img",
    response_model=Txt2ImgResponse,
    responses=QUEUED_ERRORS,
    summary="AUTOMATIC1111-compatible image to image and inpainting",
)
async def img2img(
    request: Request,
    body: Img2ImgRequest,
    engine: Engine = Depends(get_engine),
    session: A1111Session = Depends(a1111_session),
    owner: str | None = Depends(job_owner),
) -> Response:
    planned = await run_in_threadpool(img2img_plan, body, engine, session.checkpoint(owner))
    outcome = await run_a1111(
        request,
        engine,
        lambda: GenerateRequest.model_validate(planned.data),
        renamer(body),
        session,
        owner,
        "img2img",
    )
    if outcome is None:
        return Response(status_code=CLIENT_CLOSED)
    encoded, metadata = await run_in_threadpool(finish_img2img, outcome, planned.images, body)
    parameters = body.model_dump(mode="json")
    parameters["seed"] = outcome.result.seeds[0]
    if not body.include_init_images:  # as A1111: the images are not sent back unless asked for
        parameters["init_images"], parameters["mask"] = None, None
    info = a1111_info(
        body,
        outcome,
        metadata,
        denoising_strength=body.denoising_strength,
        is_using_inpainting_conditioning=planned.images.mask is not None
        and inpainting_conditioning(engine, outcome.result.model),
    )
    return a1111_answer(encoded, parameters, info, body.send_images)


@router.get("/progress", response_model=A1111Progress, summary="The progress of the caller's A1111 requests")
async def progress(
    skip_current_image: bool = Query(False, description="Leave out the preview."),
    engine: Engine = Depends(get_engine),
    session: A1111Session = Depends(a1111_session),
    owner: str | None = Depends(job_owner),
) -> JSONResponse:
    tasks = session.tasks(owner)
    flags = session.flags(owner)
    running = [t for t in tasks if t.started]
    current = running[0] if running else tasks[0] if tasks else None
    state = {
        "skipped": flags.skipped,
        "interrupted": flags.interrupted,
        "stopping_generation": False,
        "job": current.kind if current is not None else "",
        "job_count": len(tasks),
        "job_timestamp": current.timestamp if current is not None else "0",
        "job_no": 0,
        "sampling_step": current.step if current is not None else 0,
        "sampling_steps": current.total if current is not None else 0,
    }
    if current is None:
        body = {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
        return JSONResponse({**body, "current_task": None})
    done = min(1.0, 0.01 + sum(t.fraction for t in tasks) / len(tasks))  # A1111's: never 0 while a job runs
    elapsed = max(0.0, time.time() - tasks[0].submitted)
    image = None if skip_current_image or not current.started else await current_preview(engine, current)
    if current.started:
        text = f"{current.kind}: step {current.step} of {current.total or '?'}"
    else:
        text = f"{current.kind}: in the queue"
    return JSONResponse(
        {
            "progress": done,
            "eta_relative": elapsed / done - elapsed,
            "state": state,
            "current_image": image,
            "textinfo": text,
            "current_task": None,
        }
    )


@router.post("/interrupt", summary="Stop the caller's A1111 requests, running and queued")
async def interrupt(
    session: A1111Session = Depends(a1111_session), owner: str | None = Depends(job_owner)
) -> JSONResponse:
    session.stop(owner, "interrupt")
    return JSONResponse({})


@router.post("/skip", summary="Stop the caller's running A1111 requests; queued ones still run")
async def skip(session: A1111Session = Depends(a1111_session), owner: str | None = Depends(job_owner)) -> JSONResponse:
    session.stop(owner, "skip")
    return JSONResponse({})


@router.post("/png-info", response_model=PngInfoResponse, summary="The generation parameters an image carries")
async def png_info_route(body: PngInfoRequest) -> JSONResponse:
    return JSONResponse(await run_in_threadpool(png_info, body.image))


@router.get("/loras", response_model=list[A1111Lora], summary="The LoRA adapters of the server's folder")
async def loras(engine: Engine = Depends(get_engine)) -> JSONResponse:
    return JSONResponse(await run_in_threadpool(list_loras, engine))


@router.post("/refresh-loras", summary="Nothing to do: the LoRA folder is read on every listing")
async def refresh_loras() -> JSONResponse:
    return JSONResponse(None)


@router.get("/samplers", response_model=list[A1111Sampler], summary="A1111 sampler names this server maps")
async def samplers() -> JSONResponse:
    return JSONResponse(
        [{"name": label, "aliases": [SAMPLERS[key]], "options": {}} for key, label in SAMPLER_LABELS.items()]
    )


@router.get("/schedulers", response_model=list[A1111Scheduler], summary="A1111 noise schedules this server maps")
async def schedulers() -> JSONResponse:
    return JSONResponse(
        [
            {"name": key, "label": label, "aliases": None, "default_rho": None, "need_inner_model": False}
            for key, label in A1111_SCHEDULERS.items()
        ]
    )


@router.get("/sd-models", response_model=list[A1111Model], summary="The models, as A1111 lists checkpoints")
async def sd_models(engine: Engine = Depends(get_engine)) -> JSONResponse:
    return JSONResponse(
        [
            {
                "title": m["name"],
                "model_name": m["name"],
                "hash": None,
                "sha256": None,
                "filename": m["name"],
                "config": None,
            }
            for m in engine.describe_models()
        ]
    )


@router.get("/scripts", response_model=A1111Scripts, summary="No scripts or extensions")
async def scripts() -> JSONResponse:
    return JSONResponse({"txt2img": [], "img2img": []})


@router.get("/options", response_model=A1111Options, summary="The few A1111 options that apply")
async def options(
    engine: Engine = Depends(get_engine),
    session: A1111Session = Depends(a1111_session),
    owner: str | None = Depends(job_owner),
) -> JSONResponse:
    return JSONResponse({"sd_model_checkpoint": session.checkpoint(owner) or engine.default_model})


@router.post("/options", summary="Set the checkpoint of the caller's A1111 requests (other options are ignored)")
async def set_options(
    body: A1111OptionsUpdate,
    engine: Engine = Depends(get_engine),
    session: A1111Session = Depends(a1111_session),
    owner: str | None = Depends(job_owner),
) -> JSONResponse:
    if body.sd_model_checkpoint is not None:
        session.set_checkpoint(owner, engine.resolve_model(body.sd_model_checkpoint, field="sd_model_checkpoint"))
    return JSONResponse(None)
