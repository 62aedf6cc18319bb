"""The generation engine behind every route: validation, queueing, sampling through the device worker.

One request, from route to pixels::

    route -> Engine.plan(request)           validate (GenerationParams + limits + model + LoRA), resolve seed
          -> Engine.submit(plan)            a Ticket in the bounded WorkQueue (429 when full)
          -> worker thread: Engine._run     model from the cache; on the device worker: encode prompts,
                                            then each UNet call (batched with other requests), then decode;
                                            the step callback reports progress and stops on cancel/timeout
          -> Outcome                        encoded images + metadata, on the ticket's future
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from guidance.errors import unknown_choice
from guidance.images import encode_image
from guidance.models import DEFAULT_MODEL, DiffusionModel, ModelCache, canonical_spec
from guidance.registry import build_policy
from guidance.request import GenerationParams
from guidance.sampler import GenerationResult, StepEvent, decode, make_scheduler, prepare, sampling_context, to_pil
from service.device import NO_ADAPTERS, AdapterControl, AdapterSet, DeviceWorker
from service.lora import LoraControl, LoraLibrary
from service.metrics import Metrics
from service.preview import LatentPreviewer
from service.queue import Cancelled, QueueFull, ShuttingDown, Ticket, TimedOut, WorkQueue
from service.schemas import GenerateRequest
from service.settings import ServiceSettings

log = logging.getLogger("service.engine")


class ModelUnavailable(Exception):
    """A configured model could not be loaded (a server-side problem: 503)."""


def canonical_model(spec: str | None) -> str:
    return DEFAULT_MODEL if spec in (None, "", "default") else spec


@dataclass
class Plan:
    """A validated request, ready to queue."""

    params: GenerationParams
    model: str
    adapters: AdapterSet
    output_format: str
    label: str = ""


@dataclass
class Outcome:
    result: GenerationResult
    encoded: list[bytes]
    output_format: str
    adapters: AdapterSet
    timings: dict[str, Any]
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def response(self) -> dict[str, Any]:
        r = self.result
        first = r.images[0]
        return {
            "images": [base64.b64encode(b).decode("ascii") for b in self.encoded],
            "format": self.output_format,
            "seeds": r.seeds,
            "nfe": r.nfe,
            "unet_calls": r.unet_calls,
            "policy": r.params.policy.spec(),
            "model": r.model,
            "scheduler": r.params.scheduler,
            "steps": r.params.steps,
            "width": first.width,
            "height": first.height,
            "lora": [{"name": n, "weight": w} for n, w in self.adapters],
            "timings": self.timings,
            "trace": jsonable(r.trace),
            "metadata": self.metadata,
        }


def optimise_noise(prepared: Any, callback: Any) -> tuple[torch.Tensor, dict[str, Any], int]:
    """A policy's outer loop over whole trajectories (ReNO), run as one task on the device worker.

    It backpropagates through the sampler, so it evaluates the UNet directly (with autograd, on the worker
    thread, where the request's LoRA adapters are active) instead of through the batching ``unet_fn``; its
    callback still reports progress and stops it on cancellation.
    """
    direct = dataclasses.replace(prepared, unet_fn=None)
    with torch.enable_grad():
        noise, trace, nfe = prepared.policy.optimise_noise(direct, callback)
    return noise.detach(), trace, nfe


def jsonable(value: Any) -> Any:
    """Tensors, arrays, tuples and non-finite floats made JSON-safe (NaN/inf -> None)."""
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray | np.generic):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class Engine:
    def __init__(self, settings: ServiceSettings, models: ModelCache | None = None):
        self.settings = settings
        self.limits = settings.limits
        self.metrics = Metrics()
        self.models = models or ModelCache(device=settings.device, dtype=settings.dtype, config=settings.model_config_dir)
        self.loras = LoraLibrary(settings.lora_dir)
        self.previewer = LatentPreviewer()
        self.default_model = canonical_model(settings.model)
        self.allowed_models = list(dict.fromkeys([self.default_model, *(canonical_model(m) for m in settings.models)]))
        self._controls: dict[int, AdapterControl] = {}
        self._controls_lock = threading.Lock()
        self.device: DeviceWorker | None = None
        self.queue: WorkQueue | None = None
        self.load_error: str | None = None
        self._preloaded = threading.Event()
        self.closing = False

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        if s.rewards:
            from guidance.reward_models import configure_rewards

            configure_rewards(s.rewards)
        self.device = DeviceWorker(batching=s.batching, max_rows=s.max_batch_rows, window_s=s.batch_window_ms / 1000,
                                   on_batch=self.metrics.observe_batch)
        self.queue = WorkQueue(s.concurrency, s.queue_size)
        if s.preload:
            threading.Thread(target=self._preload, name="diffsteer-preload", daemon=True).start()
        else:
            self._preloaded.set()

    def _preload(self) -> None:
        try:
            self.models.get(self.default_model)
            log.info("model %s loaded", self.default_model)
        except Exception as e:  # reported by /readyz and by requests
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load the default model %s: %s", self.default_model, self.load_error)
        finally:
            self._preloaded.set()

    @property
    def ready(self) -> bool:
        return self._preloaded.is_set() and self.load_error is None and not self.closing and self.queue is not None

    def close(self) -> None:
        self.closing = True
        if self.queue is not None:
            self.queue.close()
        if self.device is not None:
            self.device.close()

    def tick(self) -> None:
        """Periodic housekeeping: time out overdue tickets, refresh gauges."""
        if self.queue is None:
            return
        expired = self.queue.expire_overdue()
        if expired:
            log.warning("%d request(s) timed out", expired)
        self.metrics.queue_depth.set(self.queue.depth)
        self.metrics.running.set(self.queue.running)
        self.metrics.models_loaded.set(len(self.models.loaded()))

    # -- validation --------------------------------------------------------------------------------------
    def loaded_model(self, spec: str) -> DiffusionModel | None:
        """The model if it is already loaded (never loads)."""
        loaded = set(self.models.loaded())
        if spec in loaded or canonical_spec(spec) in loaded:
            return self.models.get(spec)
        return None

    def plan(self, request: GenerateRequest, label: str = "") -> Plan:
        """Validate a request fully (limits, model, LoRA; policy and steps against the model when it is loaded)."""
        params = request.generation_params()
        params.check_limits(self.limits)
        model = self.default_model if request.model in (None, "", "default") else canonical_model(request.model)
        if model not in self.allowed_models:
            raise unknown_choice("model", request.model, ["default", *self.allowed_models])
        adapters = self.loras.normalise(request.lora)
        if params.seed is None and params.seeds is None:
            params = params.model_copy(update={"seed": secrets.randbelow(2**32)})
        loaded = self.loaded_model(model)
        if loaded is not None:
            self._preflight(loaded, params)
        return Plan(params, model, adapters, request.output_format, label)

    @staticmethod
    def _preflight(model: DiffusionModel, params: GenerationParams) -> None:
        """What ``prepare`` checks before work starts, without encoding anything (no UNet or encoder runs)."""
        policy = build_policy(params.policy)
        _, timesteps = make_scheduler(model, params)
        policy.start(sampling_context(model, params, timesteps))

    # -- submission --------------------------------------------------------------------------------------
    def ticket(self, plan: Plan) -> Ticket:
        """A ticket for ``plan``, not yet queued (attach listeners, then :meth:`enqueue`)."""
        ticket = Ticket(lambda t: self._run(plan, t), self.settings.request_timeout_s, plan.label)
        ticket.listeners.append(self._observe)
        return ticket

    def enqueue(self, ticket: Ticket) -> Ticket:
        """Queue ``ticket``; QueueFull (429) when the queue is full, ShuttingDown (503) when closing."""
        if self.queue is None or self.closing:
            raise ShuttingDown("the server is not running")
        try:
            return self.queue.submit(ticket)
        except QueueFull:
            self.metrics.generations.labels("rejected").inc()
            raise

    def submit(self, plan: Plan) -> Ticket:
        return self.enqueue(self.ticket(plan))

    def _observe(self, kind: str, data: Any) -> None:
        if kind != "finished":
            return
        error = data.exception()
        if error is None:
            outcome = "succeeded"
        elif isinstance(error, Cancelled):
            outcome = "cancelled"
        elif isinstance(error, TimedOut):
            outcome = "timeout"
        else:
            outcome = "failed"
        self.metrics.generations.labels(outcome).inc()

    def control_for(self, model: DiffusionModel) -> AdapterControl:
        if self.loras.folder is None:
            return NO_ADAPTERS
        with self._controls_lock:
            control = self._controls.get(id(model))
            if control is None:
                control = LoraControl(model, self.loras, self.settings.max_loaded_loras)
                self._controls[id(model)] = control
            return control

    def get_model(self, spec: str) -> DiffusionModel:
        try:
            return self.models.get(spec)
        except Exception as e:
            raise ModelUnavailable(f"model {spec!r} could not be loaded: {type(e).__name__}: {e}") from e

    # -- the work, on a queue worker thread ----------------------------------------------------------------
    def _run(self, plan: Plan, ticket: Ticket) -> Outcome:
        assert self.device is not None
        device = self.device
        t_start = time.perf_counter()
        queued_s = time.monotonic() - ticket.submitted
        self.metrics.queue_wait_seconds.observe(queued_s)
        model = self.get_model(plan.model)
        t_loaded = time.perf_counter()
        ticket.check()
        control = self.control_for(model)
        unet_fn = device.unet_fn(control, plan.adapters)
        prepared = device.run_task(lambda: prepare(model, plan.params, limits=self.limits, unet_fn=unet_fn),
                                   control, plan.adapters)
        t_prepared = time.perf_counter()
        ticket.check()
        ticket.emit("prepared", (model, prepared))

        def on_step(event: StepEvent) -> None:
            ticket.emit("step", event)
            ticket.check()

        noise, outer_trace, outer_nfe = None, {}, 0
        if hasattr(prepared.policy, "optimise_noise"):
            noise, outer_trace, outer_nfe = device.run_task(
                lambda: optimise_noise(prepared, on_step), control, plan.adapters
            )
        t_optimised = time.perf_counter()
        with torch.no_grad(), device.session(model.unet, plan.adapters, tuple(prepared.noise.shape[1:])):
            run = prepared.run(noise, callback=on_step)
        t_denoised = time.perf_counter()
        ticket.check()
        pixels = device.run_task(lambda: decode(model, run.latents).cpu())
        t_decoded = time.perf_counter()
        result = GenerationResult(
            images=to_pil(pixels),
            pixels=pixels,
            seeds=prepared.seeds,
            nfe=[n + outer_nfe for n in run.denoiser.evaluations.tolist()],
            unet_calls=run.denoiser.unet_calls,
            step_times=run.step_times,
            total_time=t_decoded - t_start,
            trace={**prepared.policy.finish(run.state), **outer_trace},
            params=prepared.params,
            model=model.name,
        )
        metadata = []
        for k in range(len(result.images)):
            meta = result.metadata(k)
            if plan.adapters:
                meta["lora"] = ",".join(f"{n}:{w:g}" for n, w in plan.adapters)
            metadata.append(jsonable(meta))
        encoded = [encode_image(img, plan.output_format, meta) for img, meta in zip(result.images, metadata)]
        timings = {
            "queued_s": queued_s,
            "load_s": t_loaded - t_start,
            "encode_s": t_prepared - t_loaded,
            "optimise_s": t_optimised - t_prepared,
            "denoise_s": t_denoised - t_optimised,
            "decode_s": t_decoded - t_denoised,
            "total_s": time.monotonic() - ticket.submitted,
            "steps_s": run.step_times,
        }
        self.metrics.generation_seconds.labels(model.name).observe(time.perf_counter() - t_start)
        self.metrics.images.labels(model.name).inc(len(result.images))
        self.metrics.nfe.labels(model.name).inc(sum(result.nfe))
        return Outcome(result, encoded, plan.output_format, plan.adapters, timings, metadata)

    # -- previews ----------------------------------------------------------------------------------------
    def preview(self, model: DiffusionModel, latents: torch.Tensor) -> list[bytes]:
        run = self.device.run_task if self.device is not None else (lambda fn: fn())
        return self.previewer.render(model, latents, run=run)

    # -- listings ----------------------------------------------------------------------------------------
    def describe_models(self) -> list[dict[str, Any]]:
        rows = []
        for spec in self.allowed_models:
            model = self.loaded_model(spec)
            row: dict[str, Any] = {"name": spec, "default": spec == self.default_model, "loaded": model is not None}
            if model is not None:
                row.update(family=model.family, native_size=model.default_size, prediction_type=model.prediction_type,
                           scheduler=model.scheduler_config.get("_class_name"))
            rows.append(row)
        return rows
