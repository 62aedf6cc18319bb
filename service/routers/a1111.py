"""AUTOMATIC1111 web UI API: ``POST /sdapi/v1/txt2img`` and the listings its clients read.

Request fields used: ``prompt``, ``negative_prompt``, ``steps``, ``cfg_scale``, ``seed`` (-1: random),
``width``, ``height`` (default: the model's native size), ``batch_size`` x ``n_iter`` images, ``sampler_name``
(or ``sampler_index``) and ``scheduler`` (A1111 1.9+: ``automatic`` or ``karras``), ``eta``,
``override_settings.sd_model_checkpoint`` (a model of this server). Extensions: ``policy`` (when its ``scale``
is not given, ``cfg_scale`` fills it), ``lora``. Without ``policy`` and ``cfg_scale`` the model's recommended
policy is used, without ``steps`` its recommended steps (``diffsteer.guidance.models.ModelDefaults``). Fields
A1111 clients send with defaults are accepted and ignored; features this server does not have (hires fix, face
restoration, tiling, variation seeds, styles, scripts) are refused with 422 when asked for. Response:
``{"images": [base64 PNG...], "parameters": {...}, "info": "<JSON string>"}`` with ``seed``/``all_seeds``/
``infotexts`` like A1111; ``sampler_name``, ``scheduler`` (schedule type) and ``cfg_scale`` in ``info`` are
those the PNGs' infotexts carry (A1111's names: ``DPM++ 2M`` + ``Karras``).

Flow-matching models (SD3, FLUX.1, Qwen-Image) as Forge serves them: samplers ``Euler``, ``Heun``,
``DPM++ 2M``, ``UniPC`` with schedule type ``Simple`` (or ``Automatic``), the flow forms of those samplers on the
model's own σ grid; other samplers are refused naming ``sampler_name`` and the accepted ones. Forge's
``distilled_cfg_scale`` (sent on every request) is the ``distilled_guidance`` of models that take it (FLUX.1-dev)
and ignored by the others; infotexts carry it as Forge writes it (``Distilled CFG Scale: 3.5``).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pydantic
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.images import a1111_parameters
from diffsteer.guidance.registry import parse_json_object, parse_spec_string, policy_class
from diffsteer.guidance.schedulers import A1111_FLOW_SAMPLERS
from diffsteer.service.deps import get_engine, require_api_key
from diffsteer.service.engine import Engine, ModelTraits
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
    for field, asked, message in checks:
        if asked:
            raise InvalidInput(field, message)


def to_generate_request(body: Txt2ImgRequest, engine: Engine | None = None) -> GenerateRequest:
    """The GenerateRequest of an A1111 body; with ``engine``, samplers and Forge's ``distilled_cfg_scale`` are
    mapped for the model the request names (:meth:`Engine.model_traits`)."""
    unsupported(body)
    if body.seed < -1:
        raise InvalidInput("seed", f"{body.seed}: -1 (a random seed) or a seed ≥ 0")
    checkpoint = body.override_settings.sd_model_checkpoint if body.override_settings is not None else None
    model = body.model if body.model is not None else checkpoint
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
    return GenerateRequest.model_validate(data)


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


FIELD_NAMES = {"num_images": "batch_size", "scheduler": "sampler_name", "distilled_guidance": "distilled_cfg_scale"}


def a1111_field(field: str) -> str:
    head, dot, rest = field.partition(".")
    return FIELD_NAMES.get(head, head) + dot + rest


@router.post("/txt2img", response_model=Txt2ImgResponse, summary="AUTOMATIC1111-compatible text to image")
async def txt2img(request: Request, body: Txt2ImgRequest, engine: Engine = Depends(get_engine)) -> Response:
    outcome = await run_translated(request, engine, lambda: to_generate_request(body, engine), a1111_field)
    if outcome is None:
        return Response(status_code=CLIENT_CLOSED)
    r = outcome.result
    meta = outcome.metadata[0]  # the infotexts' fields, so that info and the PNGs agree
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
        "infotexts": [a1111_parameters(m) for m in outcome.metadata],
        "version": "diffsteer",
        "policy": r.params.policy.spec(),
        "nfe": r.nfe,
    }
    parameters = body.model_dump(mode="json")
    parameters["seed"] = r.seeds[0]
    return JSONResponse(
        {
            "images": [base64.b64encode(b).decode("ascii") for b in outcome.encoded],
            "parameters": parameters,
            "info": json.dumps(info),
        }
    )


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
async def options(engine: Engine = Depends(get_engine)) -> JSONResponse:
    return JSONResponse({"sd_model_checkpoint": engine.default_model})
