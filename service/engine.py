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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from guidance.errors import unknown_choice
from guidance.images import encode_image
from guidance.models import DEFAULT_MODEL, DiffusionModel, ModelCache, canonical_spec
from guidance.registry import build_policy
from guidance.request import GenerationParams
from guidance.sampler import (
    GenerationResult,
    PreparedGeneration,
    StepCallback,
    StepEvent,
    decode,
    generation_result,
    make_scheduler,
    prepare,
    sampling_context,
)
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

    def summary(self) -> dict[str, Any]:
        return {"seeds": self.result.seeds, "nfe": self.result.nfe}

    def final_progress(self) -> dict[str, Any]:
        return {"nfe": sum(self.result.nfe)}


def optimise_noise(
    prepared: PreparedGeneration, callback: StepCallback | None, run_on_device: Callable[[Callable[[], Any]], Any]
) -> tuple[torch.Tensor, dict[str, Any], int]:
    """A policy's outer loop over whole trajectories (ReNO), each iteration one task on the device worker.

    An iteration backpropagates through the sampler, so it evaluates the UNet directly (with autograd, on the
    worker thread, where the request's LoRA adapters are active) instead of through the batching ``unet_fn``.
    The loop itself runs on the request's own thread, so between iterations the worker runs other requests'
    work; the callback (progress, cancellation) runs inside each iteration's task, before its backward pass.
    """
    direct = dataclasses.replace(prepared, unet_fn=None)

    def with_grad(fn: Callable[[], Any]) -> Any:
        def task() -> Any:
            with torch.enable_grad():  # grad mode is per thread, and the worker's is off
                return fn()

        return run_on_device(task)

    noise, trace, nfe = prepared.policy.optimise_noise(direct, callback, with_grad)
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
        self.models = models or ModelCache(device=settings.device, dtype=settings.dtype, config=settings.model_config_dir,
                                         fast_paths=settings.fast_paths)
        self.loras = LoraLibrary(settings.lora_dir)
        self.previewer = LatentPreviewer()
        self.default_model = canonical_model(settings.model)
        self.allowed_models = list(dict.fromkeys([self.default_model, *(canonical_model(m) for m in settings.models)]))
        self._controls: dict[int, AdapterControl] = {}
        self._controls_lock = threading.Lock()
        self.device: DeviceWorker | None = None
        self.queue: WorkQueue | None = None
        self.ab_queue: WorkQueue | None = None  # A/B runs (service.ab), apart so they never take a generation slot
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
        if s.ab_dir is not None:
            s.ab_dir.expanduser().mkdir(parents=True, exist_ok=True)  # an unusable ab_dir fails the start, not a run
            self.ab_queue = WorkQueue(s.ab_concurrent, s.ab_queue_size, name="diffsteer-ab")
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
        for queue in (self.queue, self.ab_queue):
            if queue is not None:
                queue.close()
        if self.device is not None:
            self.device.close()

    def tick(self) -> None:
        """Periodic housekeeping: time out overdue tickets, refresh gauges."""
        if self.queue is None:
            return
        expired = self.queue.expire_overdue() + (self.ab_queue.expire_overdue() if self.ab_queue is not None else 0)
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
        model = self.resolve_model(request.model)
        adapters = self.loras.normalise(request.lora)
        if params.seed is None and params.seeds is None:
            params = params.model_copy(update={"seed": secrets.randbelow(2**32)})
        loaded = self.loaded_model(model)
        if loaded is not None:
            self._preflight(loaded, params)
        return Plan(params, model, adapters, request.output_format, label)

    def resolve_model(self, spec: str | None, field: str = "model") -> str:
        """The canonical name of a model this server offers (None, "" and "default": the default model)."""
        model = self.default_model if spec in (None, "", "default") else canonical_model(spec)
        if model not in self.allowed_models:
            raise unknown_choice(field, spec, ["default", *self.allowed_models])
        return model

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

    def enqueue(self, ticket: Ticket, queue: WorkQueue | None = None) -> Ticket:
        """Queue ``ticket`` (on ``queue``, default the generation queue); QueueFull (429) when the queue is full,
        ShuttingDown (503) when closing."""
        queue = queue or self.queue
        if queue is None or self.closing:
            raise ShuttingDown("the server is not running")
        try:
            return queue.submit(ticket)
        except QueueFull:
            if queue is self.queue:
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
        t_start = time.perf_counter()
        queued_s = time.monotonic() - ticket.submitted
        self.metrics.queue_wait_seconds.observe(queued_s)
        model = self.get_model(plan.model)
        t_loaded = time.perf_counter()
        ticket.check()

        def on_step(event: StepEvent) -> None:
            ticket.emit("step", event)
            ticket.check()

        result, phases = self.sample(
            model, plan.params, adapters=plan.adapters, callback=on_step, check=ticket.check,
            on_prepared=lambda prepared: ticket.emit("prepared", (model, prepared)),
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
            **phases,
            "total_s": time.monotonic() - ticket.submitted,
            "steps_s": result.step_times,
        }
        self.metrics.generation_seconds.labels(model.name).observe(time.perf_counter() - t_start)
        return Outcome(result, encoded, plan.output_format, plan.adapters, timings, metadata)

    def sample(
        self,
        model: DiffusionModel,
        params: GenerationParams | dict[str, Any],
        *,
        adapters: AdapterSet = (),
        callback: StepCallback | None = None,
        check: Callable[[], None] | None = None,
        on_prepared: Callable[[PreparedGeneration], None] | None = None,
    ) -> tuple[GenerationResult, dict[str, float]]:
        """One generation with every use of the model's modules on the device worker (what
        :func:`guidance.sampler.generate` does in one thread): prompt encoding and the VAE decode as tasks, each UNet
        call through the batching ``unet_fn``, a policy's outer loop (ReNO) one iteration per task. ``check()``
        runs between the phases (it raises to stop); returns the result and the phases' wall times."""
        assert self.device is not None
        device, check = self.device, check or (lambda: None)
        t_start = time.perf_counter()
        control = self.control_for(model)
        unet_fn = device.unet_fn(control, adapters)
        prepared = device.run_task(lambda: prepare(model, params, limits=self.limits, unet_fn=unet_fn),
                                   control, adapters)
        t_prepared = time.perf_counter()
        check()
        if on_prepared is not None:
            on_prepared(prepared)
        noise, outer_trace, outer_nfe = None, {}, 0
        if hasattr(prepared.policy, "optimise_noise"):
            noise, outer_trace, outer_nfe = optimise_noise(
                prepared, callback, lambda fn: device.run_task(fn, control, adapters)
            )
        t_optimised = time.perf_counter()
        with torch.no_grad(), device.session(model.unet, adapters, tuple(prepared.noise.shape[1:])):
            run = prepared.run(noise, callback=callback)
        t_denoised = time.perf_counter()
        check()
        pixels = device.run_task(lambda: decode(model, run.latents).cpu())
        t_decoded = time.perf_counter()
        result = generation_result(prepared, run, pixels, t_decoded - t_start, outer_nfe, outer_trace)
        self.metrics.images.labels(model.name).inc(len(result.images))
        self.metrics.nfe.labels(model.name).inc(sum(result.nfe))
        phases = {
            "encode_s": t_prepared - t_start,
            "optimise_s": t_optimised - t_prepared,
            "denoise_s": t_denoised - t_optimised,
            "decode_s": t_decoded - t_denoised,
        }
        return result, phases

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
