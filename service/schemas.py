"""Request and response bodies of the native API (``/generate``, ``/jobs``, ``/ab``).

The generation request is :class:`diffsteer.guidance.request.GenerationParams` (the schema the CLI and the Python API
validate with) plus what only the service has: the output format, a model name and LoRA adapters. The A/B
request is :class:`diffsteer.evaluation.ab.ABConfig` less what the server decides (output folder, device, dtype).
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from diffsteer.evaluation.ab import ABConfig, ABProgress
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.request import GenerationParams

OutputFormat = Literal["png", "jpeg", "webp"]


# Request bodies are validated strictly: "5" is not an integer nor 1 a boolean, as the published schema says.
STRICT = pydantic.ConfigDict(strict=True)


MAX_BODY_NESTING = 32  # no field of any request nests deeper; a deeper body is refused before any recursive walk


def integral_floats_to_int(data: Any, path: str = "", depth: int = 0) -> Any:
    """JSON Schema's ``integer`` includes ``16.0``; strict validation does not: integral floats become ints
    (float fields accept ints), everywhere in a request body. A body nested deeper than :data:`MAX_BODY_NESTING`
    is refused naming the field it is deep in (hundreds of levels would otherwise exhaust the recursion)."""
    if isinstance(data, float) and data.is_integer():
        return int(data)
    if isinstance(data, dict | list) and depth >= MAX_BODY_NESTING:
        raise InvalidInput(path.split(".")[0] or "body", f"nested more than {MAX_BODY_NESTING} levels deep")
    if isinstance(data, dict):
        return {k: integral_floats_to_int(v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in data.items()}
    if isinstance(data, list):
        return [integral_floats_to_int(v, f"{path}.{i}" if path else str(i), depth + 1) for i, v in enumerate(data)]
    return data


def json_body(data: Any, nullable_defaults: tuple[str, ...] = ()) -> Any:
    """A request body as strict validation wants it: integral floats as ints, and ``null`` for the fields in
    ``nullable_defaults`` the same as leaving them out (their default, e.g. the model's recommended policy)."""
    data = integral_floats_to_int(data)
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if not (k in nullable_defaults and v is None)}
    return data


class LoraRef(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    name: str = pydantic.Field(
        max_length=128, description="Adapter name: a file NAME.safetensors (or folder NAME) in the server's lora_dir."
    )
    weight: float = pydantic.Field(1.0, ge=-10.0, le=10.0, description="Adapter weight (0: not applied).")


class GenerateRequest(GenerationParams):
    """A generation: GenerationParams' fields plus output format, model and LoRA adapters."""

    model_config = STRICT

    @pydantic.model_validator(mode="before")
    @classmethod
    def _json(cls, data: Any) -> Any:
        return json_body(data, ("policy", "steps"))

    output_format: OutputFormat = pydantic.Field(
        "png", description="Image encoding; PNGs carry the parameters as text chunks."
    )
    model: str | None = pydantic.Field(
        None, description="A model the server offers (GET /models); default: the server's default."
    )
    lora: list[LoraRef] = pydantic.Field(default_factory=list, max_length=8, description="LoRA adapters with weights.")

    def generation_params(self) -> GenerationParams:
        return GenerationParams.model_validate({name: getattr(self, name) for name in GenerationParams.model_fields})


class Timings(pydantic.BaseModel):
    queued_s: float = pydantic.Field(description="Waiting for a worker.")
    load_s: float = pydantic.Field(description="Getting the model (0 when already loaded).")
    encode_s: float = pydantic.Field(description="Validation, prompt encoding and initial noise.")
    optimise_s: float = pydantic.Field(description="A policy's outer loop over trajectories (ReNO); else 0.")
    denoise_s: float = pydantic.Field(description="The denoising loop.")
    decode_s: float = pydantic.Field(description="VAE decode.")
    total_s: float = pydantic.Field(description="Submission to encoded images.")
    steps_s: list[float] = pydantic.Field(description="Wall time of each denoising step.")


class GenerateResponse(pydantic.BaseModel):
    images: list[str] = pydantic.Field(description="Base64-encoded images.")
    format: OutputFormat
    seeds: list[int]
    nfe: list[int] = pydantic.Field(description="Backbone (UNet or transformer) evaluations per image.")
    unet_calls: int = pydantic.Field(
        description="Backbone calls this request asked for (shared calls count once per request)."
    )
    policy: str = pydantic.Field(description="The policy as a spec string (non-default parameters).")
    model: str
    scheduler: str
    steps: int
    distilled_guidance: float | None = pydantic.Field(
        None, description="The distilled guidance scale the model ran with (guidance-distilled models; else null)."
    )
    width: int
    height: int
    lora: list[LoraRef]
    timings: Timings
    trace: dict[str, Any] = pydantic.Field(description="The policy's trace (e.g. AG's switch steps).")
    metadata: list[dict[str, Any]] = pydantic.Field(description="Per image: the parameters written into its PNG.")


class ErrorBody(pydantic.BaseModel):
    field: str | None
    message: str


class Progress(pydantic.BaseModel):
    step: int
    total: int | None
    nfe: int
    phase: str = pydantic.Field("denoise", description="'denoise', or a policy's outer loop such as 'reno'.")


class JobStatusBase(pydantic.BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = pydantic.Field(None, description="When a finished job is purged (unix time).")
    error: ErrorBody | None = None


class JobStatus(JobStatusBase):
    progress: Progress
    result: GenerateResponse | None = None


# --- A/B evaluations ----------------------------------------------------------------------------------------

# ABConfig fields that are the server's choice, never the client's: why, for the 422
SERVER_SIDE_AB_FIELDS = {
    "output_dir": "the server puts each run in a folder of its own under its ab_dir; leave it out",
    "device": "the server's models decide it; leave it out",
    "dtype": "the server's models decide it; leave it out",
}


def _refuse_server_side(data: Any) -> Any:
    if isinstance(data, dict):
        for name, why in SERVER_SIDE_AB_FIELDS.items():
            if name in data:
                raise InvalidInput(name, why)
    return data


def _ab_request_model() -> type[pydantic.BaseModel]:
    """ABConfig's fields (types, bounds, descriptions), less the server-side ones; ABConfig's own validators
    run when the service builds the run's config from it (InvalidInput names the field)."""
    fields: dict[str, Any] = {
        name: (info.annotation, info)
        for name, info in ABConfig.model_fields.items()
        if name not in SERVER_SIDE_AB_FIELDS
    }
    arms_type, arms_info = fields["arms"]
    fields.update(
        arms=(arms_type, pydantic.Field(min_length=2, max_length=16, description=arms_info.description)),
        prompts=(
            str | list[str],
            pydantic.Field(
                description="pg:all or pg:CATEGORY[,...] (the proving ground's held-out suite), or a list of prompts "
                "(no files: the server reads none on a client's behalf)."
            ),
        ),
        model=(
            str | None,
            pydantic.Field(
                None,
                description="A model the server offers (GET /models), for arms that name none; default: the "
                "server's default.",
            ),
        ),
    )
    return pydantic.create_model(
        "ABRequest",
        __config__=pydantic.ConfigDict(extra="forbid", allow_inf_nan=False, strict=True),
        __doc__="An A/B evaluation: ABConfig's fields; the server picks the output folder, device and dtype.",
        __validators__={
            "_server_side": pydantic.model_validator(mode="before")(_refuse_server_side),
            "_json": pydantic.model_validator(mode="before")(lambda cls, data: json_body(data)),
        },
        **fields,
    )


ABRequest = _ab_request_model()


class ABFiles(pydantic.BaseModel):
    report: str | None = pydantic.Field(description="URL of report.html (None with report=false).")
    results: str = pydantic.Field(description="URL of results.json.")
    base: str = pydantic.Field(description="URL the images' relative paths (images/ARM/...png) resolve against.")


class ABResult(pydantic.BaseModel):
    """results.json of the run (see diffsteer.evaluation.ab), with the URLs of its files."""

    model_config = pydantic.ConfigDict(extra="allow")

    version: int
    config: dict[str, Any] = pydantic.Field(description="The run's configuration (output_dir: the job's URL).")
    arms: list[dict[str, Any]]
    prompts: dict[str, Any]
    items: list[dict[str, Any]]
    metrics: list[dict[str, Any]] = pydantic.Field(description="Columns with their direction.")
    images: list[dict[str, Any]] = pydantic.Field(description="Every image: arm, item, prompt, seed, path, metrics.")
    summary: dict[str, Any] = pydantic.Field(description="Per arm and column: mean, n and a bootstrap CI.")
    statistics: list[dict[str, Any]] = pydantic.Field(
        description="Per pair of arms and column: paired differences, tests."
    )
    run: dict[str, Any]
    files: ABFiles


class ABJobStatus(JobStatusBase):
    progress: ABProgress = pydantic.Field(
        description="Stage ('queued', 'generate', 'score', 'statistics', 'report', 'done') and images done of total."
    )
    result: ABResult | None = None


# --- listings and compatibility responses -------------------------------------------------------------------


class PolicyParameter(pydantic.BaseModel):
    name: str
    default: Any = pydantic.Field(description="The default value (JSON).")
    help: str


class PolicyInfo(pydantic.BaseModel):
    name: str
    summary: str
    parameters: list[PolicyParameter]
    schema_: dict[str, Any] = pydantic.Field(alias="schema", description="The policy's parameters as JSON schema.")


class PoliciesResponse(pydantic.BaseModel):
    policies: list[PolicyInfo]
    schedulers: list[str]


class ModelDefaultsBody(pydantic.BaseModel):
    policy: str | None = pydantic.Field(description="Recommended policy (spec string) when a request names none.")
    steps: int | None = pydantic.Field(description="Recommended steps when a request names none.")
    native_size: int | None = pydantic.Field(description="The size the model was trained at (pixels).")
    max_size: int | None = pydantic.Field(description="Largest width/height the model is recommended for.")


class ModelInfo(pydantic.BaseModel):
    name: str
    default: bool
    loaded: bool
    family: str | None = pydantic.Field(
        None, description="The model's family: sd, sdxl, sd3, flux or qwenimage (None: known once loaded)."
    )
    family_title: str | None = pydantic.Field(None, description="The family for people, e.g. 'FLUX.1'.")
    schedule: Literal["vp", "flow"] | None = pydantic.Field(
        None, description="The noise schedule: 'vp' (SD, SDXL) or 'flow' (flow matching: SD3, FLUX, Qwen-Image)."
    )
    schedulers: list[str] | None = pydantic.Field(
        None, description="The `scheduler` values this model accepts (flow models: the samplers with a flow form)."
    )
    distilled_guidance: bool | None = pydantic.Field(
        None, description="Whether the model takes `distilled_guidance` (guidance-distilled models: FLUX.1-dev)."
    )
    size_multiple: int | None = pydantic.Field(
        None, description="Width and height must be multiples of this (loaded models)."
    )
    native_size: int | None = None
    prediction_type: str | None = None
    scheduler: str | None = None
    defaults: ModelDefaultsBody | None = pydantic.Field(
        None, description="The model's recommendations (loaded models)."
    )


class ModelsResponse(pydantic.BaseModel):
    default: str
    models: list[ModelInfo]
    loras: list[str]


class HealthResponse(pydantic.BaseModel):
    status: Literal["ok"]


class ReadyResponse(pydantic.BaseModel):
    status: Literal["ready"]
    model: str


class OpenAIImage(pydantic.BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class OpenAIDiffsteerInfo(pydantic.BaseModel):
    seeds: list[int]
    nfe: list[int]
    policy: str
    model: str
    steps: int
    scheduler: str
    distilled_guidance: float | None = None


class OpenAIImagesResponse(pydantic.BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: OutputFormat
    diffsteer: OpenAIDiffsteerInfo


class OpenAIModel(pydantic.BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class OpenAIModelList(pydantic.BaseModel):
    object: Literal["list"]
    data: list[OpenAIModel]


class Txt2ImgResponse(pydantic.BaseModel):
    images: list[str] = pydantic.Field(description="Base64 PNGs.")
    parameters: dict[str, Any] = pydantic.Field(description="The request as understood, with the seed used.")
    info: str = pydantic.Field(description="JSON text: seeds, prompts, sampler, infotexts (A1111's `info`).")


class A1111Sampler(pydantic.BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class A1111Scheduler(pydantic.BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float | None
    need_inner_model: bool


class A1111Model(pydantic.BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class A1111Scripts(pydantic.BaseModel):
    txt2img: list[str]
    img2img: list[str]


class A1111Options(pydantic.BaseModel):
    sd_model_checkpoint: str
