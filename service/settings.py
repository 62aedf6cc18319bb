"""Typed settings of the HTTP service.

Sources, lowest to highest priority: defaults < a YAML/JSON config file (``diffsteer serve --config FILE``)
< environment variables ``DIFFSTEER_<FIELD>`` (e.g. ``DIFFSTEER_API_KEYS=key1,key2``,
``DIFFSTEER_MAX_STEPS=50``) < explicit command-line options. Unknown keys in a config file are refused, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from diffsteer.guidance.errors import InvalidInput, from_pydantic
from diffsteer.guidance.fast_paths import FastPaths
from diffsteer.guidance.request import Limits
from diffsteer.service.http import protocol_with_head_timeout


def _split_list(value: Any) -> Any:
    """Lists from the environment: a JSON list, or comma-separated text."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class RaySettings(pydantic.BaseModel):
    """How ``diffsteer serve --ray`` (and ``serve run diffsteer.service.ray_serve:build_app``) deploys the app on Ray Serve:
    replicas of the whole app, each with its own engine, model cache and device worker."""

    model_config = pydantic.ConfigDict(extra="forbid")

    address: str | None = pydantic.Field(
        None, description="Ray cluster to join (ray.init address: 'auto', 'ray://head:10001'); None: start a local one."
    )
    num_cpus: int | None = pydantic.Field(
        None, ge=1, description="CPUs of the local cluster started when address is None (default: all)."
    )
    num_replicas: int | None = pydantic.Field(
        1, ge=1, description="Fixed number of replicas; None: autoscale between min_replicas and max_replicas."
    )
    min_replicas: int = pydantic.Field(1, ge=0, description="Autoscaling: fewest replicas (num_replicas None).")
    max_replicas: int = pydantic.Field(4, ge=1, description="Autoscaling: most replicas (num_replicas None).")
    target_ongoing_requests: float | None = pydantic.Field(
        None, gt=0, description="Autoscaling: requests per replica to aim for (default: the replica's concurrency)."
    )
    stream_slots: int = pydantic.Field(
        32,
        ge=0,
        description="Requests a replica holds besides queued generations (event streams, listings); "
        "max_ongoing_requests is concurrency + queue_size + stream_slots, so a full replica answers our 429.",
    )
    max_queued_requests: int = pydantic.Field(
        -1,
        ge=-1,
        description="Requests Ray's router holds when every replica is at max_ongoing_requests (-1: no "
        "limit); beyond that Ray answers 429 with Retry-After (a plain-text body, not our JSON).",
    )
    num_gpus_per_replica: float | None = pydantic.Field(
        None,
        ge=0,
        description="GPUs per replica (Ray sets CUDA_VISIBLE_DEVICES); None: 1 where CUDA is available "
        "to the process deploying, else 0 (CPU replicas).",
    )
    num_cpus_per_replica: float = pydantic.Field(
        1.0,
        gt=0,
        description="CPUs reserved per replica; CPU replicas also use this many torch threads "
        "unless torch_threads is set.",
    )
    route_prefix: str = pydantic.Field("/", description="Where the app is mounted on Ray's HTTP proxy.")

    @pydantic.model_validator(mode="after")
    def _replica_range(self) -> RaySettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.num_replicas is None


class ServiceSettings(BaseSettings):
    """Everything ``diffsteer serve`` can be configured with (see the module docstring for sources)."""

    model_config = SettingsConfigDict(env_prefix="DIFFSTEER_", extra="forbid", validate_default=True)

    # --- server ---------------------------------------------------------------------------------------
    host: str = pydantic.Field("127.0.0.1", description="Interface to listen on (0.0.0.0: all).")
    port: int = pydantic.Field(8000, ge=0, le=65535, description="TCP port.")

    # --- models ---------------------------------------------------------------------------------------
    model: str | None = pydantic.Field(
        None,
        description="Default model: diffusers folder, .safetensors file, hub id or builtin:NAME (None: built-in default).",
    )
    models: Annotated[list[str], NoDecode] = pydantic.Field(
        default_factory=list,
        description="Further models a request may name in its `model` field (loaded on first use).",
    )
    model_config_dir: str | None = pydantic.Field(
        None, description="diffusers config folder for single-file checkpoints."
    )
    device: str | None = pydantic.Field(None, description="cpu, cuda, cuda:1 (default: cuda when available).")
    dtype: str | None = pydantic.Field(None, description="auto, fp32, fp16, bf16.")
    preload: bool = pydantic.Field(
        True, description="Load the default model at startup (/readyz is 503 until it is loaded)."
    )
    torch_threads: int | None = pydantic.Field(
        None, ge=1, description="torch intra-op threads (default: torch's own choice)."
    )
    fast_paths: str = pydantic.Field(
        "none",
        description="UNet fast paths (transformer models load without them, with a warning), "
        "comma-separated: compile, channels_last, cuda_graphs (compile_mode=..., "
        "max_graphs=N); see guidance/fast_paths.py, and BENCHMARKS.md, section GPU suite and fast paths, for what "
        "each gains.",
    )
    latent_evaluators: dict[str, str] = pydantic.Field(
        default_factory=dict,
        description="Latent evaluators per model, for dynamic_cfg's evaluator=latent (and auto): model spec -> a "
        "folder holding latent_evaluators.json, or 'shipped' for builtin:proving-ground's. Opt-in: without an entry a "
        "model uses its folder's own latent_evaluators/ if it has one.",
    )
    lora_dir: Path | None = pydantic.Field(
        None,
        description="Folder of LoRA adapters in diffusers format: NAME.safetensors or NAME/pytorch_lora_weights.safetensors.",
    )
    rewards: dict[str, dict[str, Any]] = pydantic.Field(
        default_factory=dict,
        description="Where reward-driven policies (reno, dynamic_cfg) find each reward's weights: name -> reward "
        "config fields (a diffsteer.guidance.reward_models.RewardModels the engine passes down). Requests name rewards, never paths.",
    )
    max_loaded_loras: int = pydantic.Field(
        8, ge=1, description="LoRA adapters kept loaded per model (least recently used evicted)."
    )

    # --- scheduling -----------------------------------------------------------------------------------
    max_concurrent: int | None = pydantic.Field(
        None,
        ge=1,
        description="Generations whose sampler loops run at once (their backbone calls all go through the one device "
        "worker). Default: max_batch_requests with batching, 1 without.",
    )
    queue_size: int = pydantic.Field(16, ge=0, description="Requests that may wait for a free slot; beyond that: 429.")
    request_timeout_s: float = pydantic.Field(
        300.0, gt=0, description="Longest time from submission to result; then 504 (/generate) or a failed job."
    )
    job_ttl_s: float = pydantic.Field(600.0, gt=0, description="How long finished jobs (and their images) are kept.")
    max_stored_jobs: int = pydantic.Field(
        64, ge=1, description="Finished jobs kept at most, with their encoded images (oldest dropped first)."
    )
    max_stored_job_bytes: int = pydantic.Field(
        256 * 2**20,
        ge=1,
        description="Bytes of results (base64 images) finished jobs may hold in all (oldest "
        "dropped first); a single job above it is dropped at the next purge.",
    )
    batching: bool = pydantic.Field(
        True, description="Denoise concurrent compatible requests in shared backbone calls."
    )
    max_batch_rows: int = pydantic.Field(16, ge=1, description="Most latent rows in one shared backbone call.")
    max_batch_requests: int = pydantic.Field(8, ge=1, description="Default max_concurrent when batching is on.")
    batch_window_ms: float = pydantic.Field(
        5.0,
        ge=0,
        description="How long the device worker waits for other requests' backbone calls before running a batch.",
    )

    # --- A/B evaluations (POST /ab) -------------------------------------------------------------------
    ab_dir: Path | None = pydantic.Field(
        None,
        description="Folder of A/B runs, one sub-folder per job (results, images, report). None: POST /ab is "
        "disabled. In the Docker image e.g. /output/ab.",
    )
    ab_concurrent: int = pydantic.Field(
        1, ge=1, description="A/B runs at once (their batches share the device worker with generation requests)."
    )
    ab_queue_size: int = pydantic.Field(4, ge=0, description="A/B runs that may wait for a slot; beyond that: 429.")
    ab_timeout_s: float = pydantic.Field(86_400.0, gt=0, description="Longest time from submission to an A/B result.")
    ab_max_images: int = pydantic.Field(2_000, ge=2, description="Most images in one A/B run (arms x prompts x seeds).")

    # --- limits ---------------------------------------------------------------------------------------
    max_width: int = pydantic.Field(2048, ge=8)
    max_height: int = pydantic.Field(2048, ge=8)
    max_steps: int = pydantic.Field(200, ge=1)
    max_num_images: int = pydantic.Field(16, ge=1)
    max_prompt_chars: int = pydantic.Field(4000, ge=1)
    max_body_bytes: int = pydantic.Field(
        1_000_000,
        ge=1024,
        description="Largest accepted request body (JSON routes); beyond that: 413. Bodies that upload images have "
        "max_upload_bytes instead.",
    )
    max_upload_bytes: int = pydantic.Field(
        16 * 2**20,
        ge=1024,
        le=1024 * 2**20,
        description="Largest accepted body of a request that uploads images: POST /v1/images/edits, "
        "/sdapi/v1/img2img, /sdapi/v1/png-info, and multipart forms on POST /generate and /jobs; beyond that: 413. "
        "Every body is held in memory until it is read whole, so this times max_connections bounds that memory.",
    )
    max_header_bytes: int = pydantic.Field(
        65_536,
        ge=4096,
        le=16_777_216,
        description="Largest accepted request head (request line and headers); beyond "
        "that the connection is answered 400 and closed.",
    )
    max_connections: int = pydantic.Field(
        512,
        ge=8,
        description="Open connections (and in-flight requests) the server holds at most; beyond that new ones get 503 "
        "at once, so slow or idle clients cannot pin more file descriptors than this.",
    )
    header_timeout_s: float = pydantic.Field(
        10.0,
        gt=0.0,
        le=300.0,
        description="A connection whose request head is not complete after this many seconds "
        "is closed (slow clients cannot hold sockets open).",
    )
    keep_alive_s: float = pydantic.Field(
        5.0, gt=0.0, le=300.0, description="An idle keep-alive connection is closed after this many seconds."
    )
    max_cost: float = pydantic.Field(
        32_768.0,
        gt=0,
        description="Most work one request may ask for, in backbone (UNet or transformer) evaluations of one image "
        "at the model's native size: images x (one evaluation at its size / one at native size) x steps x the "
        "policy's evaluations per step x its passes (ReNO's iterations); beyond that: 422 naming the field that "
        "contributes most (diffsteer.guidance.cost).",
    )
    max_area_factor: float = pydantic.Field(
        16.0,
        gt=0,
        description="Largest image area relative to the model's native area (16: 4x its width and height).",
    )

    # --- fair scheduling of the device worker (diffsteer.service.device) ----------------------------------------
    heavy_cost: float = pydantic.Field(
        240.0,
        gt=0,
        description="Requests costing more than this (4 native-size 30-step CFG images) run in the heavy "
        "lane: their units get heavy_weight's share of the device against a light request's 1.",
    )
    heavy_weight: float = pydantic.Field(0.25, gt=0, le=1, description="Device share of a heavy request (light: 1).")
    max_unit_cost: float = pydantic.Field(
        8.0,
        gt=0,
        description="The most one backbone unit on the device worker may cost, in evaluations of one image at the "
        "model's native size: a heavier call (many images, large sizes) is split by rows into units of at most this "
        "(at least one row), run one at a time, so another request waits for one such unit, not the whole call. "
        "Larger: heavy requests batch more rows per call (throughput on a GPU); smaller: light requests wait less.",
    )
    anticipate_ms: float = pydantic.Field(
        10.0,
        ge=0,
        description="How long the device worker waits for the next call of the sampler loop it just served "
        "before starting another request's (longer) unit; at most the duration of the unit it served.",
    )

    # --- security -------------------------------------------------------------------------------------
    api_keys: Annotated[list[pydantic.SecretStr], NoDecode] = pydantic.Field(
        default_factory=list,
        description="Accepted API keys (Authorization: Bearer KEY, X-API-Key: KEY, or HTTP Basic with the key as "
        "password). Empty: no authentication.",
    )
    metrics_require_key: bool = pydantic.Field(False, description="Ask for an API key on /metrics too.")
    cors_origins: Annotated[list[str], NoDecode] = pydantic.Field(
        default_factory=list, description="Origins allowed by CORS; empty: no CORS headers at all."
    )

    # --- misc -----------------------------------------------------------------------------------------
    preview: Literal["latent", "none"] = pydantic.Field(
        "latent", description="Previews in job events: a linear latent->RGB approximation fitted per model, or none."
    )
    log_level: str = pydantic.Field("info")
    ray: RaySettings = pydantic.Field(
        default_factory=RaySettings, description="Ray Serve deployment (diffsteer serve --ray); see RaySettings."
    )

    @pydantic.field_validator("models", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @pydantic.field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[pydantic.SecretStr]) -> list[pydantic.SecretStr]:
        for i, key in enumerate(value):
            if not key.get_secret_value().strip():
                raise ValueError(f"api_keys.{i} is empty: an empty key would let every client in; remove it")
        return value

    @pydantic.field_validator("fast_paths")
    @classmethod
    def _fast_paths(cls, value: str) -> str:
        return FastPaths.parse(value, field="fast_paths").spec()

    def uvicorn_options(self) -> dict[str, Any]:
        """The HTTP server's bounds on connections and request heads: h11 (whose head size limit is enforced) with a
        head timeout (:mod:`diffsteer.service.http`), at most ``max_connections`` at once."""
        return {
            "http": protocol_with_head_timeout(self.header_timeout_s),
            "h11_max_incomplete_event_size": self.max_header_bytes,
            "limit_concurrency": self.max_connections,
            "timeout_keep_alive": self.keep_alive_s,
        }

    @property
    def concurrency(self) -> int:
        if self.max_concurrent is not None:
            return self.max_concurrent
        return self.max_batch_requests if self.batching else 1

    @property
    def limits(self) -> Limits:
        return Limits(
            max_width=self.max_width,
            max_height=self.max_height,
            max_steps=self.max_steps,
            max_num_images=self.max_num_images,
            max_prompt_chars=self.max_prompt_chars,
            max_cost=self.max_cost,
            max_area_factor=self.max_area_factor,
        )

    @property
    def default_model(self) -> str:
        return self.model or "default"

    def allowed_models(self) -> list[str]:
        return list(dict.fromkeys([self.default_model, *self.models]))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a YAML (.yaml/.yml) or JSON file, as a mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidInput("--config", f"cannot read {str(path)!r}: {e.strerror or e}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise their own types
        raise InvalidInput("--config", f"cannot parse {str(path)!r}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInput("--config", f"{str(path)!r} must hold a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_settings(config: str | Path | None = None, **overrides: Any) -> ServiceSettings:
    """Settings from ``config`` (file), then the environment, then ``overrides`` (None values are ignored)."""
    file_values = read_config_file(config) if config is not None else {}
    try:
        from_env = ServiceSettings()
        env_values = {k: getattr(from_env, k) for k in from_env.model_fields_set}
        merged = {**file_values, **env_values, **{k: v for k, v in overrides.items() if v is not None}}
        return ServiceSettings(**merged)
    except pydantic.ValidationError as e:
        raise from_pydantic(e, prefix="settings.") from None
