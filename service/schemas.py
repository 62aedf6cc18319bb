"""Request and response bodies of the native API (``/generate``, ``/jobs``).

The request is :class:`guidance.request.GenerationParams` (the schema the CLI and the Python API validate
with) plus what only the service has: the output format, a model name and LoRA adapters.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from guidance.request import GenerationParams

OutputFormat = Literal["png", "jpeg", "webp"]


class LoraRef(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = pydantic.Field(max_length=128, description="Adapter name: a file NAME.safetensors (or folder NAME) in the server's lora_dir.")
    weight: float = pydantic.Field(1.0, ge=-10.0, le=10.0, description="Adapter weight (0: not applied).")


class GenerateRequest(GenerationParams):
    """A generation: GenerationParams' fields plus output format, model and LoRA adapters."""

    output_format: OutputFormat = pydantic.Field("png", description="Image encoding; PNGs carry the parameters as text chunks.")
    model: str | None = pydantic.Field(None, description="A model the server offers (GET /models); default: the server's default.")
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
    nfe: list[int] = pydantic.Field(description="UNet evaluations per image.")
    unet_calls: int = pydantic.Field(description="UNet calls this request asked for (shared calls count once per request).")
    policy: str = pydantic.Field(description="The policy as a spec string (non-default parameters).")
    model: str
    scheduler: str
    steps: int
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


class JobStatus(pydantic.BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = pydantic.Field(None, description="When a finished job is purged (unix time).")
    progress: Progress
    result: GenerateResponse | None = None
    error: ErrorBody | None = None
