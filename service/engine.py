"""The generation engine behind every route: validation, queueing, sampling through the device worker.

One request, from route to pixels (each step once)::

    route -> Engine.plan(request)           validate: GenerationParams, limits, LoRA, the seed; with the model
                                            loaded, Engine.check (the service's one call of
                                            sampler.check_request: policy, steps and cost against the model),
                                            so bad input is a 422 naming the field before anything is queued
          -> Engine.submit(plan, attach=)   one pass: the Ticket (its cost from the check), the caller's
                                            ``attach(ticket)`` (a job follows it) before it can run, the bounded
                                            WorkQueue; 429 + Retry-After when full, 503 when not running
          -> queue thread: Engine._run      the model (loaded now if it was not; Engine.check then, only for a
                                            plan made before the model was loaded), then Engine.sample:
                                            sampler.generate(model, checked, executor=DeviceExecutor(flow)),
                                            every unit (encode, each backbone call, ReNO's backward passes, dynamic
                                            CFG's scoring, decode) on the device worker, in the request's flow,
                                            which schedules flows fairly by cost and batches backbone calls; the step
                                            callback reports progress, and a cancelled flow's units stop
          -> Outcome                        encoded images + metadata, on the ticket's future

A/B runs (:mod:`diffsteer.service.ab`) are queued by :meth:`Engine.submit_ab` on their own queue, and each of
their batches is ``Engine.sample(model, Engine.check(model, params))``.
"""

from __future__ import annotations

import base64
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

from diffsteer.guidance.errors import unknown_choice
from diffsteer.guidance.events import StepCallback, StepEvent
from diffsteer.guidance.families import ModelFamily
from diffsteer.guidance.images import encode_image
from diffsteer.guidance.models import (
    DEFAULT_MODEL,
    DiffusionModel,
    ModelCache,
    ModelDefaults,
    canonical_spec,
    model_defaults,
    model_family,
)
from diffsteer.guidance.request import GenerationParams
from diffsteer.guidance.reward_models import DEFAULT_REWARDS, RewardModels
from diffsteer.guidance.sampler import CheckedRequest, GenerationResult, check_request, generate
from diffsteer.guidance.schedulers import scheduler_names
from diffsteer.service.device import (
    NO_ADAPTERS,
    AdapterControl,
    AdapterSet,
    DeviceExecutor,
    DeviceWorker,
    backbone_call_cost,
)
from diffsteer.service.errors import ServiceError
from diffsteer.service.lora import LoraControl, LoraLibrary, describe_target
from diffsteer.service.metrics import Metrics
from diffsteer.service.owners import owner_secret
from diffsteer.service.preview import LatentPreviewer
from diffsteer.service.queue import Cancelled, QueueFull, ShuttingDown, Ticket, TimedOut, WorkQueue
from diffsteer.service.schemas import GenerateRequest
from diffsteer.service.settings import ServiceSettings

log = logging.getLogger("diffsteer.service.engine")


class ModelUnavailable(Exception):
    """A configured model could not be loaded (a server-side problem: 503)."""


Attach = Callable[[Ticket], None]  # the caller's hold on a ticket before it is queued, e.g. Job.attach


def canonical_model(spec: str | None) -> str:
    return DEFAULT_MODEL if spec in (None, "", "default") else spec


@dataclass(frozen=True)
class ModelTraits:
    """What a client must know of a model to build valid requests: its family, noise schedule, the
    scheduler names it accepts and whether it takes ``distilled_guidance``."""

    family: ModelFamily
    distilled_guidance: bool
    size_multiple: int | None = None  # known once the model is loaded (the VAE's factor × patch size)

    @property
    def schedulers(self) -> list[str]:
        return scheduler_names(self.family.schedule)

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "family_title": self.family.title,
            "schedule": self.family.schedule,
            "schedulers": self.schedulers,
            "distilled_guidance": self.distilled_guidance,
            "size_multiple": self.size_multiple,
        }


def loaded_traits(model: DiffusionModel) -> ModelTraits:
    family = model.family
    return ModelTraits(family, family.takes_distilled_guidance(model.backbone.config), family.size_multiple(model))


def offered_traits(spec: str) -> ModelTraits | None:
    """The traits of a model from its files, without loading it (:func:`model_family`); None where only
    loading tells (hub ids, single files)."""
    found = model_family(spec)
    if found is None:
        return None
    family, config = found
    return ModelTraits(family, family.takes_distilled_guidance(config))


@dataclass
class Plan:
    """A validated request, ready to queue."""

    params: GenerationParams
    model: str
    adapters: AdapterSet
    output_format: str
    label: str = ""
    checked: CheckedRequest | None = None  # Engine.check's result when the model was loaded at plan time


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
            "distilled_guidance": self.distilled_guidance,
            "width": first.width,
            "height": first.height,
            "lora": [{"name": n, "weight": w} for n, w in self.adapters],
            "timings": self.timings,
            "trace": jsonable(r.trace),
            "metadata": self.metadata,
        }

    @property
    def distilled_guidance(self) -> float | None:
        """The distilled guidance scale the model ran with (None: a model without that input)."""
        return self.metadata[0].get("distilled_guidance") if self.metadata else None

    def summary(self) -> dict[str, Any]:
        return {"seeds": self.result.seeds, "nfe": self.result.nfe}

    def final_progress(self) -> dict[str, Any]:
        return {"nfe": sum(self.result.nfe)}


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
        self.models = models or ModelCache(
            device=settings.device,
            dtype=settings.dtype,
            config=settings.model_config_dir,
            fast_paths=settings.fast_paths,
            latent_evaluators=settings.latent_evaluators,
        )
        self.loras = LoraLibrary(settings.lora_dir)
        self.rewards = RewardModels(settings.rewards) if settings.rewards else DEFAULT_REWARDS
        self.previewer = LatentPreviewer()
        self.default_model = canonical_model(settings.model)
        self.allowed_models = list(dict.fromkeys([self.default_model, *(canonical_model(m) for m in settings.models)]))
        self._controls: dict[int, AdapterControl] = {}
        self._controls_lock = threading.Lock()
        self._defaults: dict[str, ModelDefaults] = {}
        self._traits: dict[str, ModelTraits | None] = {}
        self.device: DeviceWorker | None = None
        self.queue: WorkQueue | None = None
        # A/B runs (diffsteer.service.ab), apart so they never take a generation slot
        self.ab_queue: WorkQueue | None = None
        self.load_error: str | None = None
        self._preloaded = threading.Event()
        self.closing = False

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.device = DeviceWorker(
            batching=s.batching,
            max_rows=s.max_batch_rows,
            window_s=s.batch_window_ms / 1000,
            on_batch=self.metrics.observe_batch,
            anticipate_s=s.anticipate_ms / 1000,
        )
        self.queue = WorkQueue(s.concurrency, s.queue_size, throughput=self.device.throughput)
        if s.ab_dir is not None:
            s.ab_dir.expanduser().mkdir(parents=True, exist_ok=True)  # an unusable ab_dir fails the start, not a run
        self.owner_secret = owner_secret(s.ab_dir)
        if s.ab_dir is not None:
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
        """Validate a request fully (limits, model, LoRA; policy, steps and cost against the model by
        :meth:`check` when it is loaded, else when the queue thread has loaded it), with the model's
        recommended defaults filled in."""
        model = self.resolve_model(request.model)
        defaults = self.model_defaults(model)
        limits = self.limits.for_model(defaults)
        params = request.generation_params().with_model_defaults(defaults, request.model_fields_set, limits)
        params.check_limits(limits)
        adapters = self.loras.normalise(request.lora, self.lora_target(model) if request.lora else None)
        if params.seed is None and params.seeds is None:
            params = params.model_copy(update={"seed": secrets.randbelow(2**32)})
        loaded = self.loaded_model(model)
        if loaded is None:
            return Plan(params, model, adapters, request.output_format, label)
        checked = self.check(loaded, params)
        return Plan(checked.params, model, adapters, request.output_format, label, checked)

    def check(self, model: DiffusionModel, params: GenerationParams | dict[str, Any]) -> CheckedRequest:
        """``params`` validated against ``model`` under this server's limits for it, with this server's rewards
        (InvalidInput names the field): the service's only call of
        :func:`diffsteer.guidance.sampler.check_request`."""
        return check_request(model, params, limits=self.limits.for_model(model.defaults), rewards=self.rewards)

    def model_defaults(self, spec: str) -> ModelDefaults:
        """The recommendations of an offered model (read once, without loading the model)."""
        with self._controls_lock:
            found = self._defaults.get(spec)
        if found is None:
            found = model_defaults(spec)
            with self._controls_lock:
                self._defaults[spec] = found
        return found

    def model_traits(self, spec: str) -> ModelTraits | None:
        """The traits of an offered model (:class:`ModelTraits`): from the loaded model, else from its files
        (read once); None for a model only loading describes (a hub id or single file not loaded yet)."""
        loaded = self.loaded_model(spec)
        if loaded is not None:
            return loaded_traits(loaded)
        with self._controls_lock:
            if spec in self._traits:
                return self._traits[spec]
        found = offered_traits(spec)
        with self._controls_lock:
            self._traits[spec] = found
        return found

    def lora_target(self, spec: str) -> tuple[str, str] | None:
        """What LoRAs for an offered model change: its backbone's key and its description (None: not known
        before loading; the load then refuses a LoRA that does not fit)."""
        traits = self.model_traits(spec)
        if traits is None:
            return None
        family = traits.family
        return family.backbone_key, describe_target(spec, family.title, family.backbone_key)

    def resolve_model(self, spec: str | None, field: str = "model") -> str:
        """The canonical name of a model this server offers (None and "default": the default model)."""
        model = self.default_model if spec in (None, "default") else canonical_model(spec) if spec else ""
        if model not in self.allowed_models:
            raise unknown_choice(field, spec, ["default", *self.allowed_models])
        return model

    # -- submission --------------------------------------------------------------------------------------
    def submit(self, plan: Plan, *, attach: Attach | None = None) -> Ticket:
        """Queue ``plan`` on the generation queue, in one pass: its ticket (with the checked cost, for fair
        scheduling and Retry-After), ``attach(ticket)`` before it can run (a job follows it from its first
        event), then the queue. ServiceError 429 with Retry-After when the queue is full, 503 when the server
        is not running; a refused ticket never runs."""
        ticket = Ticket(lambda t: self._run(plan, t), self.settings.request_timeout_s, plan.label)
        ticket.cost = plan.checked.cost.total if plan.checked is not None else 0.0
        ticket.listeners.append(self._observe)
        return self._enqueue(ticket, self.queue, attach)

    def submit_ab(self, run: Callable[[Ticket], object], label: str, *, attach: Attach | None = None) -> Ticket:
        """Queue an A/B run (``run(ticket)``, :func:`diffsteer.service.ab.run_job`) on the A/B queue, under
        ``ab_timeout_s``; refused as :meth:`submit` refuses."""
        return self._enqueue(Ticket(run, self.settings.ab_timeout_s, label), self.ab_queue, attach)

    def _enqueue(self, ticket: Ticket, queue: WorkQueue | None, attach: Attach | None) -> Ticket:
        if queue is None or self.closing:
            raise ServiceError(503, "the server is not running", code="shutting_down")
        if attach is not None:
            attach(ticket)
        try:
            return queue.submit(ticket)
        except QueueFull as e:
            if queue is self.queue:
                self.metrics.generations.labels("rejected").inc()
            raise ServiceError(
                429, f"too many requests: {e}", headers={"Retry-After": str(e.retry_after)}, code="queue_full"
            ) from None
        except ShuttingDown as e:
            raise ServiceError(503, str(e), code="shutting_down") from None

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
            ticket.check_step()

        checked = plan.checked
        if checked is None:  # the model was not loaded when the request was planned
            checked = self.check(model, plan.params)
            ticket.cost = checked.cost.total
        ticket.emit("prepared", (model, None))
        result = self.sample(
            model,
            checked,
            adapters=plan.adapters,
            callback=on_step,
            stopped=lambda: ticket.stop_reason is not None,
            on_cost=ticket.add_cost_done,
        )
        metadata = [jsonable(image_metadata(result, k, plan.adapters)) for k in range(len(result.images))]
        encoded = [encode_image(img, plan.output_format, meta) for img, meta in zip(result.images, metadata)]
        timings = {
            "queued_s": queued_s,
            "load_s": t_loaded - t_start,
            **result.phases,
            "total_s": time.monotonic() - ticket.submitted,
            "steps_s": result.step_times,
        }
        self.metrics.generation_seconds.labels(model.name).observe(time.perf_counter() - t_start)
        return Outcome(result, encoded, plan.output_format, plan.adapters, timings, metadata)

    def lane_weight(self, cost: float) -> float:
        """A request's share of the device worker: 1 in the light lane, ``heavy_weight`` above ``heavy_cost``."""
        return 1.0 if cost <= self.settings.heavy_cost else self.settings.heavy_weight

    def sample(
        self,
        model: DiffusionModel,
        checked: CheckedRequest,
        *,
        adapters: AdapterSet = (),
        callback: StepCallback | None = None,
        stopped: Callable[[], bool] | None = None,
        on_cost: Callable[[float], None] | None = None,
    ) -> GenerationResult:
        """One generation of a request :meth:`check` validated, through :func:`diffsteer.guidance.sampler.generate`
        with every unit of model work on the device worker, in a flow of its own weighted by its cost;
        ``stopped()`` True fails its waiting units (cancel)."""
        assert self.device is not None
        flow = self.device.flow(self.lane_weight(checked.cost.total), stopped=stopped, on_cost=on_cost)
        executor = DeviceExecutor(
            self.device,
            flow,
            control=self.control_for(model),
            adapters=adapters,
            call_cost=backbone_call_cost(model),
            pad_text=model.family.variable_text,
            max_unit_cost=self.settings.max_unit_cost,
        )
        try:
            result = generate(model, checked, callback=callback, executor=executor, rewards=self.rewards)
        finally:
            self.device.close_flow(flow)
        self.metrics.images.labels(model.name).inc(len(result.images))
        self.metrics.nfe.labels(model.name).inc(sum(result.nfe))
        return result

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
                row.update(
                    native_size=model.native_size,
                    prediction_type=model.prediction_type,
                    scheduler=model.scheduler_config.get("_class_name"),
                )
            traits = self.model_traits(spec)
            if traits is not None:
                row.update(traits.describe())
            defaults = self.model_defaults(spec)
            row["defaults"] = {
                **defaults.model_dump(),
                "native_size": model.native_size if model is not None else defaults.native_size,
            }
            rows.append(row)
        return rows


def image_metadata(
    result: GenerationResult, index: int, adapters: tuple[tuple[str, float], ...] = ()
) -> dict[str, Any]:
    """Image ``index``'s parameters (:meth:`GenerationResult.metadata`) with the LoRA adapters it ran with."""
    meta = result.metadata(index)
    if adapters:
        meta["lora"] = ",".join(f"{n}:{w:g}" for n, w in adapters)
    return meta
