"""The published OpenAPI schema: what FastAPI derives from the routes, made exact for this server.

FastAPI's own schema is a starting point that clients cannot trust as is: the policy is typed by an empty base
model, errors by FastAPI's ``{"detail": [...]}`` (this service answers ``{"error": {...}}``), most error statuses
are missing, and the server's configured limits are nowhere. :func:`build_openapi` fixes that, once per app:

- ``policy`` (on ``/generate``, ``/jobs``, the OpenAI and A1111 routes and A/B arms) is a spec string
  (``format: diffsteer-policy-spec``, pattern on the policy name) or a discriminated union (``name``) over every
  policy's own parameter schema (``PolicyParams_<name>``, from ``diffsteer.guidance.registry``).
- Every operation documents every status it answers, each error with the :data:`ERROR_SCHEMA` body:
  400 (malformed JSON; OpenAI routes: all bad input), 401 (API keys), 403 (A/B disabled), 404 (unknown job),
  405, 406, 413 (``max_body_bytes``; uploads: ``max_upload_bytes``), 422 (bad input, the field named), 429 (queue
  full), 503, 504.
- The limits (``max_steps``, ``max_width``/``max_height``, ``max_num_images``, ``max_prompt_chars``,
  ``max_body_bytes``, ``max_upload_bytes``, the models and LoRA adapters offered) are ``maximum``/``maxLength``/``enum`` of the
  fields they bound, and all of them are in ``info.x-diffsteer-limits``.
- With API keys configured, the security schemes (bearer, ``X-API-Key``, HTTP Basic) and their use.

Constraints between fields that JSON Schema cannot state (a ``cfg`` ``scales`` list has one value per step,
``interval_start < interval_end``, ``seeds`` has ``num_images`` values, A1111's Karras schedule only with
DPM++ 2M, the schedulers and ``distilled_guidance`` a model takes (``GET /models``), an A/B run's arms × prompts
× seeds ≤ ``ab_max_images``, a ``mask`` only with an ``init_image``, a ``strength`` that leaves a step to run...)
and what a string must hold beyond its type (an image in ``init_image`` and ``mask``) are in the descriptions and
answered 422 naming the field; :data:`CROSS_FIELD` lists the fields whose errors can come from them.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from diffsteer.guidance.registry import policy_names, policy_schemas
from diffsteer.guidance.request import MAX_SEED
from diffsteer.guidance.schedulers import scheduler_names
from diffsteer.service.middleware import FORM_UPLOAD_ROUTES, UPLOAD_ROUTES
from diffsteer.service.routers.a1111 import A1111_SCHEDULERS, SAMPLER_LABELS
from diffsteer.service.routers.generate import GENERATE_FORM
from diffsteer.service.routers.openai_images import EDIT_FORM, edit_form_schema
from diffsteer.service.schemas import GenerateRequest
from diffsteer.service.settings import ServiceSettings

REF = "#/components/schemas/"
POLICY_SPEC_FORMAT = "diffsteer-policy-spec"
IMAGE_SIZE_FORMAT = "diffsteer-image-size"
ARM_FORMAT = "diffsteer-arm"

# Fields whose 422 can come from a constraint between fields (see the module docstring), by operation.
CROSS_FIELD = {
    "policy.scales",
    "policy.interval_end",
    "policy.sigma_high",
    "policy.reward",
    "policy.zero_init_steps",
    "policy.warmup_steps",
    "policy.period",
    "policy.end",
    "num_images",
    "seeds",
    "batch_size",
    "n",
    "scheduler",
    "sampler_name",
    "distilled_guidance",
    "init_image",
    "mask",
    "strength",
    "denoising_strength",
    "init_images.0",
    "image",
    "arms",
    "prompts",
    "metrics",
    "directions",
    "baseline",
}

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["field", "message"],
            "properties": {
                "field": {
                    "type": ["string", "null"],
                    "description": "The offending field (`steps`, `policy.scale`, `lora.0.name`, `body`), or null.",
                },
                "message": {"type": "string", "description": "What was wrong and what is accepted."},
                "code": {
                    "type": ["string", "null"],
                    "description": "A machine-readable kind: not_found, queue_full, "
                    "timeout, invalid_api_key, ab_disabled, unavailable, ...",
                },
                "type": {
                    "type": "string",
                    "description": "OpenAI routes: invalid_request_error, "
                    "authentication_error, rate_limit_error, server_error.",
                },
                "param": {"type": ["string", "null"], "description": "OpenAI routes: the offending parameter."},
            },
        }
    },
}

STATUS_TEXT = {
    400: "Malformed JSON (and, on the OpenAI routes, any invalid input)",
    401: "Missing or invalid API key",
    403: "A/B runs are not enabled on this server (no ab_dir)",
    404: "No such job or file (also another API key's job)",
    405: "Method not allowed (see the Allow header)",
    406: "Raw image bytes asked for more than one image",
    413: "Request body larger than max_body_bytes",
    422: "Invalid input; the body names the field",
    429: "Queue full; retry after Retry-After seconds",
    503: "Shutting down, model unavailable, or the work was cancelled",
    504: "Not finished within request_timeout_s",
}


def build_openapi(
    app: FastAPI, settings: ServiceSettings, lora_names: list[str], models: list[str], max_size: int | None = None
) -> dict[str, Any]:
    """The schema of ``app`` (see the module docstring); ``max_size``: the default model's own size limit."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
        description=__doc__.split("\n\n")[0],
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _add_model_schema(components, GenerateRequest)  # /generate and /jobs read their body themselves (JSON or form)
    for name in ("HTTPValidationError", "ValidationError", "PolicyParams"):
        components.pop(name, None)
    components["ErrorResponse"] = ERROR_SCHEMA
    _add_policy_schemas(components)
    limits = _limits(settings, lora_names, models, max_size)
    schema["info"]["x-diffsteer-limits"] = limits
    _bound_generate(components["GenerateRequest"], limits)
    components[GENERATE_FORM] = _generate_form(components["GenerateRequest"], limits)
    _bound_openai(components["OpenAIImageRequest"], limits)
    components[EDIT_FORM] = _bound_openai_edit(edit_form_schema(), limits)
    _bound_a1111(components["Txt2ImgRequest"], limits)
    _bound_a1111(components["Img2ImgRequest"], limits)
    _bound_a1111_options(components["A1111OptionsUpdate"], limits)
    _bound_ab(components["ABRequest"], components["ArmConfig"], limits)
    auth = bool(settings.api_keys)
    if auth:
        components_root = schema["components"]
        components_root["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "basic": {"type": "http", "scheme": "basic", "description": "Any user name; the API key as password."},
        }
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            _document_statuses(path, method, operation, auth, settings)
    return schema


def install_openapi(app: FastAPI, settings: ServiceSettings, lora_names, models, max_size) -> None:
    """Serve :func:`build_openapi` at /openapi.json (built on first use, then cached); the arguments after
    ``settings`` are callables, asked when the schema is built."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, settings, lora_names(), models(), max_size())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- policies -----------------------------------------------------------------------------------------------


def _add_policy_schemas(components: dict[str, Any]) -> None:
    mapping = {}
    for name, params in policy_schemas().items():
        params = copy.deepcopy(params)
        params.pop("$defs", None)
        params["title"] = f"PolicyParams_{name}"
        params["required"] = sorted({"name", *params.get("required", [])})
        components[f"PolicyParams_{name}"] = params
        mapping[name] = f"{REF}PolicyParams_{name}"
    components["PolicyObject"] = {
        "title": "PolicyObject",
        "description": "A policy as an object: its `name` and its parameters (GET /policies lists them).",
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "name", "mapping": mapping},
    }
    names = "|".join(policy_names())
    components["PolicySpec"] = {
        "title": "PolicySpec",
        "type": "string",
        "format": POLICY_SPEC_FORMAT,
        "pattern": rf"^\s*({names})\s*(:.*)?$",
        "maxLength": 4000,
        "description": "A policy as a spec string `name[:key=value,...]`, e.g. `apg:scale=10,eta=0`; values are "
        "JSON (numbers, true/false, null, lists like [7,5,3]), anything else a string. The keys and their "
        'ranges are those of PolicyParams_<name>; a JSON object in a string (`{"name": ...}`) is accepted too.',
    }
    components["Policy"] = {
        "title": "Policy",
        "description": "Guidance policy: a spec string or an object (both parse to the same parameters).",
        "anyOf": [{"$ref": f"{REF}PolicySpec"}, {"$ref": f"{REF}PolicyObject"}],
    }


def _policy(nullable: bool) -> dict[str, Any]:
    ref: dict[str, Any] = {"$ref": f"{REF}Policy"}
    return {"anyOf": [ref, {"type": "null"}]} if nullable else ref


# --- limits -------------------------------------------------------------------------------------------------


def _limits(
    settings: ServiceSettings, lora_names: list[str], models: list[str], max_size: int | None
) -> dict[str, Any]:
    return {
        "max_steps": settings.max_steps,
        "max_width": min(settings.max_width, max_size or settings.max_width),
        "max_height": min(settings.max_height, max_size or settings.max_height),
        "max_num_images": settings.max_num_images,
        "max_prompt_chars": settings.max_prompt_chars,
        "max_body_bytes": settings.max_body_bytes,
        "max_upload_bytes": settings.max_upload_bytes,
        "ab_max_images": settings.ab_max_images,
        "models": ["default", *models],
        "loras": lora_names,
        "schedulers": scheduler_names(),
        "policies": policy_names(),
    }


def _text(limits: dict[str, Any]) -> dict[str, Any]:
    return {"type": "string", "maxLength": limits["max_prompt_chars"]}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _size(limit: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": 8, "maximum": limit, "multipleOf": 8}


def _seeds(limits: dict[str, Any]) -> dict[str, Any]:
    """One seed per image."""
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": limits["max_num_images"],
        "items": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
    }


def _merge(props: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    """Replace a property's type keys by ``schema``, keeping its title, description and default."""
    old = props.get(name, {})
    keep = {k: old[k] for k in ("title", "description", "default") if k in old}
    props[name] = {**schema, **keep}


def _lora(limits: dict[str, Any]) -> dict[str, Any]:
    names = limits["loras"]
    name = {"type": "string", "enum": names} if names else {"type": "string", "maxLength": 128}
    return {
        "type": "array",
        "maxItems": 8 if names else 0,
        "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {**name, "description": "An adapter of the server's lora_dir (GET /models lists them)."},
                "weight": {"type": "number", "minimum": -10.0, "maximum": 10.0, "default": 1.0},
            },
        },
    }


def _bound_generate(schema: dict[str, Any], limits: dict[str, Any]) -> None:
    props = schema["properties"]
    text = _text(limits)
    _merge(
        props,
        "prompt",
        {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": limits["max_num_images"]}]},
    )
    _merge(props, "negative_prompt", _nullable(text))
    _merge(props, "policy", _policy(nullable=True))
    props["policy"]["description"] += " Absent or null: the model's recommended policy (GET /models)."
    props["policy"].pop("default", None)
    _merge(
        props, "steps", {"anyOf": [{"type": "integer", "minimum": 1, "maximum": limits["max_steps"]}, {"type": "null"}]}
    )
    props["steps"]["description"] = (
        "Number of denoising steps (absent or null: the model's recommended steps, at most max_steps)."
    )
    props["steps"].pop("default", None)
    _merge(props, "scheduler", {"type": "string", "enum": limits["schedulers"]})
    _merge(props, "seed", _nullable({"type": "integer", "minimum": 0, "maximum": MAX_SEED}))
    _merge(props, "seeds", _nullable(_seeds(limits)))
    _merge(props, "num_images", {"type": "integer", "minimum": 1, "maximum": limits["max_num_images"]})
    _merge(props, "width", _nullable(_size(limits["max_width"])))
    _merge(props, "height", _nullable(_size(limits["max_height"])))
    _merge(props, "model", _nullable({"type": "string", "enum": limits["models"]}))
    _merge(props, "lora", _lora(limits))
    schema["not"] = {"required": ["seed", "seeds"]}
    schema["description"] = (
        schema.get("description", "") + " Between fields: `seed` or `seeds`, not both; "
        "`seeds` has one value per image; a prompt list sets num_images to its length."
    ).strip()


def _bound_openai(schema: dict[str, Any], limits: dict[str, Any]) -> None:
    props = schema["properties"]
    text = _text(limits)
    _merge(props, "prompt", text)
    _merge(props, "negative_prompt", _nullable(text))
    _merge(props, "n", _nullable({"type": "integer", "minimum": 1, "maximum": limits["max_num_images"]}))
    _merge(
        props,
        "size",
        _nullable(
            {
                "type": "string",
                "format": IMAGE_SIZE_FORMAT,
                "pattern": r"^(auto|\s*[0-9]+\s*[xX]\s*[0-9]+\s*)$",
                "description": f'"WxH" (ASCII digits; multiples of 8, width ≤ {limits["max_width"]}, height ≤ '
                f'{limits["max_height"]}) or "auto" (the model\'s native size).',
            }
        ),
    )
    _merge(props, "policy", _policy(nullable=True))
    _merge(props, "steps", _nullable({"type": "integer", "minimum": 1, "maximum": limits["max_steps"]}))
    _merge(props, "scheduler", _nullable({"type": "string", "enum": limits["schedulers"]}))
    _merge(props, "seed", _nullable({"type": "integer", "minimum": 0, "maximum": MAX_SEED}))
    _merge(props, "seeds", _nullable(_seeds(limits)))
    _merge(props, "eta", _nullable({"type": "number", "minimum": 0, "maximum": 1}))
    _merge(props, "lora", _nullable(_lora(limits)))
    _merge(props, "stream", {"enum": [False, None], "description": "Not supported: false or null."})
    _merge(
        props,
        "response_format",
        {
            "enum": ["b64_json", None],
            "description": "b64_json only ('url' is refused: this server keeps no image store).",
        },
    )
    openai_names = {"type": "string", "pattern": "^(dall-e|gpt-image)"}
    _merge(props, "model", _nullable({"anyOf": [{"type": "string", "enum": limits["models"]}, openai_names]}))
    schema["not"] = {"required": ["seed", "seeds"]}


def _bound_openai_edit(schema: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    """The edit form (/v1/images/edits): a generation's bounds; its size defaults to the image's."""
    _bound_openai(schema, limits)
    size = schema["properties"]["size"]
    size["anyOf"][0]["description"] = (
        f'"WxH" (ASCII digits; multiples of 8, width ≤ {limits["max_width"]}, height ≤ {limits["max_height"]}) or '
        '"auto"; "auto" or absent: the image\'s size, rounded down to the model\'s multiple (within the same limits).'
    )
    schema["description"] += f" The whole body is at most max_upload_bytes ({limits['max_upload_bytes']} bytes)."
    return schema


def _add_model_schema(components: dict[str, Any], model: type) -> None:
    """``model``'s JSON schema, and the schemas it refers to, among the components (those already there kept)."""
    schema = model.model_json_schema(ref_template=REF + "{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault(model.__name__, schema)


def _generate_form(request: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    """The multipart form of /generate and /jobs: the bounded JSON request's fields, with the images as files."""
    form = copy.deepcopy(request)
    for name, what in (("init_image", "The image to start from"), ("mask", "The inpainting mask (white repaints)")):
        text = form["properties"][name]
        form["properties"][name] = {
            "anyOf": [{"type": "string", "format": "binary"}, *text["anyOf"]],
            "description": f"{what}: a file part (PNG, JPEG or WebP), or as in the JSON body. " + text["description"],
        }
    form["title"] = GENERATE_FORM
    form["description"] = (
        "multipart/form-data: the JSON body's fields, init_image and mask as file parts. Text fields as they are; "
        "other fields their JSON value (num_images=2, seeds=[1,2], a policy object) or in bracket keys "
        "(policy[name]=cfg, policy[scale]=4); null the same as leaving a field out. The whole body is at most "
        f"max_upload_bytes ({limits['max_upload_bytes']} bytes). " + request.get("description", "")
    ).strip()
    return form


def _bound_a1111(schema: dict[str, Any], limits: dict[str, Any]) -> None:
    props = schema["properties"]
    text = _text(limits)
    _merge(props, "prompt", text)
    _merge(props, "negative_prompt", _nullable(text))
    _merge(props, "steps", {"type": "integer", "minimum": 1, "maximum": limits["max_steps"]})
    _merge(props, "width", _nullable(_size(limits["max_width"])))
    _merge(props, "height", _nullable(_size(limits["max_height"])))
    _merge(props, "cfg_scale", {"type": "number", "minimum": 0, "maximum": 100})
    _merge(props, "seed", {"type": "integer", "minimum": -1, "maximum": MAX_SEED})
    _merge(props, "batch_size", {"type": "integer", "minimum": 1, "maximum": limits["max_num_images"]})
    _merge(props, "n_iter", {"type": "integer", "minimum": 1, "maximum": limits["max_num_images"]})
    samplers = sorted(SAMPLER_LABELS.values())
    _merge(props, "sampler_name", _nullable({"type": "string", "enum": samplers}))
    _merge(props, "sampler_index", _nullable({"type": "string", "enum": samplers}))
    _merge(
        props,
        "scheduler",
        _nullable({"type": "string", "enum": sorted({*A1111_SCHEDULERS, *A1111_SCHEDULERS.values()})}),
    )
    _merge(props, "eta", _nullable({"type": "number", "minimum": 0, "maximum": 1}))
    for name in ("enable_hr", "restore_faces", "tiling"):
        _merge(props, name, {"enum": [False, None], "description": "Not supported: false or null."})
    _merge(
        props,
        "subseed_strength",
        {"anyOf": [{"const": 0}, {"type": "null"}], "description": "Not supported: 0 or null."},
    )
    _merge(props, "styles", _nullable({"type": "array", "maxItems": 0}))
    _merge(props, "script_name", {"anyOf": [{"const": ""}, {"type": "null"}]})
    _merge(props, "alwayson_scripts", _nullable({"type": "object", "maxProperties": 0}))
    model = {"type": "string", "enum": limits["models"]}
    _merge(
        props,
        "override_settings",
        _nullable({"type": "object", "properties": {"sd_model_checkpoint": _nullable(model)}}),
    )
    _merge(props, "model", _nullable(model))
    _merge(props, "policy", _policy(nullable=True))
    _merge(props, "lora", _nullable(_lora(limits)))


def _bound_a1111_options(schema: dict[str, Any], limits: dict[str, Any]) -> None:
    """POST /sdapi/v1/options: the checkpoint is a model of this server."""
    _merge(schema["properties"], "sd_model_checkpoint", _nullable({"type": "string", "enum": limits["models"]}))


def _bound_ab(schema: dict[str, Any], arm: dict[str, Any], limits: dict[str, Any]) -> None:
    props = schema["properties"]
    arm_props = arm["properties"]
    _merge(arm_props, "name", {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$"})
    _merge(arm_props, "policy", _policy(nullable=False))
    _merge(arm_props, "model", _nullable({"type": "string", "enum": limits["models"]}))
    arm_string = {
        "type": "string",
        "format": ARM_FORMAT,
        "pattern": r"^\s*[A-Za-z0-9_.-]{1,64}=.+$",
        "description": "NAME=POLICY or NAME=POLICY@MODEL, e.g. base=cfg:scale=1",
    }
    props["arms"]["items"] = {"anyOf": [arm_string, {"$ref": f"{REF}ArmConfig"}]}
    text = _text(limits)
    _merge(
        props,
        "prompts",
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*pg:"},
                {"type": "array", "items": text, "minItems": 1, "maxItems": limits["ab_max_images"]},
            ]
        },
    )
    _merge(props, "steps", {"type": "integer", "minimum": 1, "maximum": limits["max_steps"]})
    _merge(props, "scheduler", {"type": "string", "enum": limits["schedulers"]})
    _merge(props, "width", _nullable(_size(limits["max_width"])))
    _merge(props, "height", _nullable(_size(limits["max_height"])))
    _merge(props, "batch_size", {"type": "integer", "minimum": 1, "maximum": limits["max_num_images"]})
    _merge(props, "seeds", {"type": "integer", "minimum": 1, "maximum": limits["ab_max_images"]})
    _merge(props, "model", _nullable({"type": "string", "enum": limits["models"]}))


# --- statuses -----------------------------------------------------------------------------------------------

QUEUED = {
    ("post", "/generate"),
    ("post", "/jobs"),
    ("post", "/ab"),
    ("post", "/v1/images/generations"),
    ("post", "/v1/images/edits"),
    ("post", "/sdapi/v1/txt2img"),
}
WAITING = {
    ("post", "/generate"),
    ("post", "/v1/images/generations"),
    ("post", "/v1/images/edits"),
    ("post", "/sdapi/v1/txt2img"),
}
OPEN = {"/healthz", "/readyz"}


def _document_statuses(
    path: str, method: str, operation: dict[str, Any], auth: bool, settings: ServiceSettings
) -> None:
    responses = operation.setdefault("responses", {})
    statuses: set[int] = set()
    has_body = "requestBody" in operation
    has_params = bool(operation.get("parameters"))
    if path not in OPEN and not (path == "/metrics" and not settings.metrics_require_key):
        statuses.add(401)
    if has_body:
        statuses |= {400, 413, 422}
    if has_params or has_body:
        statuses.add(422)
    if "{job_id}" in path:
        statuses.add(404)
    if path.startswith("/ab"):
        statuses.add(403)
    if (method, path) in QUEUED:
        statuses |= {429, 503}
    if (method, path) in WAITING:
        statuses.add(504)
    if (method, path) == ("post", "/generate"):
        statuses.add(406)
    if path.startswith("/v1/"):
        statuses.discard(422)  # OpenAI answers bad input with 400
        responses.pop("422", None)
    if path == "/readyz":
        responses["503"] = {
            "description": "Not ready: loading, failed to load, or shutting down",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["status", "reason"],
                        "properties": {"status": {"const": "not ready"}, "reason": {"type": "string"}},
                    }
                }
            },
        }
    if 413 in statuses and path in UPLOAD_ROUTES:
        responses["413"] = {"description": "Request body larger than max_upload_bytes"}
    elif 413 in statuses and path in FORM_UPLOAD_ROUTES:
        responses["413"] = {
            "description": "Request body larger than max_body_bytes (JSON) or max_upload_bytes (multipart form)"
        }
    for status in sorted(statuses):
        description = responses.get(str(status), {}).get("description") or STATUS_TEXT[status]
        responses[str(status)] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": f"{REF}ErrorResponse"}}},
        }
    if auth and 401 in statuses:
        operation["security"] = [{"bearer": []}, {"apiKey": []}, {"basic": []}]
