"""The device worker: one thread that runs every backbone call (UNet or transformer) of every request, batching
them across requests.

Each request runs its own sampler loop in its own thread (see :mod:`diffsteer.service.queue`) with a
:class:`DeviceExecutor` of its own; the loop's ``Denoiser`` calls the backbone through the executor's ``backbone_fn``,
which hands ``(forward, backbone, x, t, Condition)`` to this worker and waits (``forward`` is the model family's
backbone call, :meth:`diffsteer.guidance.families.base.ModelFamily.forward`).
The worker takes the oldest call, gathers the calls of other requests that can share a forward pass
(same backbone, same LoRA set, same latent and condition shapes), concatenates their rows with each row's own
timestep (every family's backbone accepts a ``[B]`` timestep tensor), runs ONE forward pass and splits the output
back. Families whose backbone honours the condition's text mask (Qwen-Image, Z-Image: their texts are as long as
their prompts) also batch calls whose texts differ in length: ``concat_conditions`` zero-pads and masks them.

Exactness: every operation of a Stable-Diffusion UNet acts on each row on its own (convolutions, group norm,
attention), and the UNet casts timesteps to float32 itself before embedding them; the flow transformers likewise
act per row (their attention is within a row's image and text tokens, masked text tokens excluded), so a request's
rows get the same values batched as alone, up to floating-point reassociation in the kernels (~1e-6 on CPU). A batch
of one call passes its arguments through untouched: unbatched results are bit-identical to the library's.

Gathering stops at the first of: every sampler loop of that (model, LoRA set, shape) has a call waiting,
the batch holds ``max_rows`` rows, or ``window_s`` has passed since the call arrived. Sampler loops
announce themselves with :meth:`session`, which is what makes the first condition (and so low latency at
full batches) possible.

Fair scheduling by cost. Every unit of work (a backbone call, forward or backward; an encode, decode or scoring
task) belongs to a :class:`Flow`, one per request, with a weight. The worker runs the unit of the flow with
the least virtual time, and charges each flow the device time its units took divided by its weight (start-time
fair queuing, Goyal, Vin & Cheng 1996, with measured service as in Linux's CFS): a flow that was idle starts at
the current virtual clock, so it neither banks credit nor waits behind the others' backlog. A heavy request
(the engine puts it in the heavy lane: a smaller weight) therefore cannot hold the device for more than its
share, one unit at a time, and a light request's calls go between its units. A sampler loop submits its next
call a moment after the previous one returns, so after a flow's unit the worker waits up to
``anticipate_s`` (at most the unit's own duration) for that flow's next unit when it would be chosen next
(anticipatory scheduling, Iyer & Druschel 2001) instead of starting another flow's longer unit. A backbone call
costing more than the executor's ``max_unit_cost`` (a batch of many images, or large ones) is split by rows into
units of at most that cost, and a batch holds one unit per flow, so those units run one at a time and another
flow waits for one of them, not for the whole call. Units of a
flow whose request was cancelled fail with GenerationCancelled instead of running, so a cancel frees the
worker within the unit in flight. Work submitted without a flow shares one default flow (first come, first served).

The worker also runs, one at a time with the backbone calls, every other use of modules that a LoRA adapter
changes (text encoding) and the VAE decode, through :meth:`run_task`. Since nothing else touches those
modules, the worker can switch the active LoRA adapters before each batch (batches never mix LoRA sets)
without any request seeing another's adapters.

Outputs are computed under ``torch.no_grad()``; :class:`DeviceExecutor` makes a backbone call differentiable by
running its backward pass as a unit of its own (ReNO).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from diffsteer.guidance.denoiser import BackboneForward, Condition, concat_conditions
from diffsteer.guidance.events import GenerationCancelled
from diffsteer.guidance.executor import BACKWARD_COST

log = logging.getLogger("diffsteer.service.device")

AdapterSet = tuple[tuple[str, float], ...]  # sorted (LoRA name, weight), no zero weights


class AdapterControl(Protocol):
    def activate(self, adapters: AdapterSet) -> None:
        """Make exactly ``adapters`` active on the model's modules (called on the worker thread only)."""


class _NoAdapters:
    def activate(self, adapters: AdapterSet) -> None:
        if adapters:
            raise RuntimeError("this model has no LoRA support configured")


NO_ADAPTERS = _NoAdapters()


class WorkerClosed(RuntimeError):
    pass


@dataclass(eq=False)
class Flow:
    """One request's stream of units on the worker: its share (``weight``) and its virtual time.

    ``stopped()`` says the request is over (cancelled, timed out): its waiting units then fail with
    GenerationCancelled instead of running. ``on_cost(cost)`` is told the cost of each unit done.
    """

    weight: float = 1.0
    stopped: Callable[[], bool] | None = None
    on_cost: Callable[[float], None] | None = None
    name: str = ""
    vtime: float = 0.0  # device seconds received / weight, from the virtual clock when it started
    closed: bool = False  # the request will submit nothing more (no anticipation)
    started: bool = False
    pending: int = 0

    def is_stopped(self) -> bool:
        return self.stopped is not None and self.stopped()


@dataclass(eq=False)
class _Work:
    kind: str  # "backbone" | "task"
    control: AdapterControl
    adapters: AdapterSet | None  # None: the task does not care which adapters are active
    flow: Flow | None = None
    cost: float = 0.0  # backbone evaluations at the model's native size this unit stands for
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)
    group: tuple | None = None
    session: tuple | None = None
    forward: BackboneForward | None = None
    backbone: torch.nn.Module | None = None
    x: torch.Tensor | None = None
    t: torch.Tensor | None = None
    condition: Condition | None = None
    fn: Callable[[], Any] | None = None

    @property
    def rows(self) -> int:
        return 0 if self.x is None else int(self.x.shape[0])


BatchObserver = Callable[[int, int, float], None]  # (rows, requests, seconds)


class DeviceWorker:
    def __init__(
        self,
        *,
        batching: bool = True,
        max_rows: int = 16,
        window_s: float = 0.005,
        on_batch: BatchObserver | None = None,
        name: str = "diffsteer-device",
        anticipate_s: float = 0.01,
    ):
        self.batching = batching
        self.max_rows = max_rows
        self.window_s = window_s
        self.anticipate_s = anticipate_s
        self.on_batch = on_batch
        self._cv = threading.Condition()
        self._pending: collections.deque[_Work] = collections.deque()
        self._sessions: collections.Counter[tuple] = collections.Counter()
        self._current: dict[int, AdapterSet] = {}
        self._closed = False
        self._default_flow = Flow(name="default")
        self._vclock = 0.0  # virtual time of the last unit started: the least of the waiting flows' (never decreases)
        self._last: tuple[Flow, float, float] | None = None  # (flow, finished at, seconds) of the last lone unit
        self._served: collections.deque[tuple[float, float]] = collections.deque(maxlen=256)  # (cost, seconds)
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- request side ------------------------------------------------------------------------------------
    def flow(
        self,
        weight: float = 1.0,
        *,
        stopped: Callable[[], bool] | None = None,
        on_cost: Callable[[float], None] | None = None,
        name: str = "",
    ) -> Flow:
        """A new flow (one per request); :meth:`close_flow` it when the request ends."""
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        return Flow(weight, stopped, on_cost, name)

    def close_flow(self, flow: Flow) -> None:
        with self._cv:
            flow.closed = True
            self._cv.notify_all()  # an anticipation wait for it is over

    @staticmethod
    def session_key(backbone: torch.nn.Module, adapters: AdapterSet, latent_shape: tuple[int, ...]) -> tuple:
        return (id(backbone), adapters, tuple(latent_shape))

    @contextlib.contextmanager
    def session(self, backbone: torch.nn.Module, adapters: AdapterSet, latent_shape: tuple[int, ...]) -> Iterator[None]:
        """Announce a sampler loop that will submit one backbone call at a time for these latents."""
        key = self.session_key(backbone, adapters, latent_shape)
        with self._cv:
            self._sessions[key] += 1
        try:
            yield
        finally:
            with self._cv:
                self._sessions[key] -= 1
                if self._sessions[key] <= 0:
                    del self._sessions[key]
                self._cv.notify_all()  # a gathering batch may now be complete

    def submit_backbone(
        self,
        forward: BackboneForward,
        backbone: torch.nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        condition: Condition,
        control: AdapterControl,
        adapters: AdapterSet,
        flow: Flow | None,
        cost: float,
        *,
        pad_text: bool = False,
    ) -> concurrent.futures.Future:
        """Queue one backbone call ``forward(backbone, x, t, condition)``; it shares a batch with the calls of the
        same backbone, LoRA set, latent shape and condition shapes. ``pad_text``: the backbone honours the
        condition's mask (Qwen-Image, Z-Image), so calls whose texts differ in length share a batch too, zero-padded
        and masked by ``concat_conditions``."""
        states = tuple(condition.hidden_states.shape[1:])  # (text length, width)
        text = states[1:] if pad_text else (states, condition.mask is None)
        work = _Work(
            "backbone",
            control,
            adapters,
            flow,
            cost,
            forward=forward,
            backbone=backbone,
            x=x,
            t=t,
            condition=condition,
            group=(
                id(backbone),
                adapters,
                tuple(x.shape[1:]),
                x.dtype,
                x.device,
                pad_text,
                text,
                tuple(sorted((k, tuple(v.shape[1:])) for k, v in condition.added.items())),
            ),
            session=self.session_key(backbone, adapters, tuple(x.shape[1:])),
        )
        return self._submit(work)

    def run_task(
        self,
        fn: Callable[[], Any],
        control: AdapterControl = NO_ADAPTERS,
        adapters: AdapterSet | None = None,
        flow: Flow | None = None,
        cost: float = 0.0,
    ) -> Any:
        """Run ``fn()`` on the worker thread, alone, with ``adapters`` active (None: whichever are), in ``flow``."""
        return self._submit(_Work("task", control, adapters, flow, cost, fn=fn)).result()

    def _submit(self, work: _Work) -> concurrent.futures.Future:
        flow = work.flow = work.flow or self._default_flow
        with self._cv:
            if self._closed:
                raise WorkerClosed("the device worker is shut down")
            if not flow.started:  # a new request starts at the clock: no credit for the time before it came
                flow.vtime = max(flow.vtime, self._vclock)
                flow.started = True
            flow.pending += 1
            self._pending.append(work)
            self._cv.notify_all()
        return work.future

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._pending)

    def throughput(self) -> float | None:
        """Cost units done per second of device time over the recent units (None before any costed unit)."""
        with self._cv:
            cost = sum(c for c, _ in self._served)
            seconds = sum(s for _, s in self._served)
        return cost / seconds if cost > 0 and seconds > 0 else None

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            self._cv.notify_all()
        for work in pending:
            work.future.set_exception(WorkerClosed("the device worker is shut down"))
        self._thread.join(timeout)

    # -- worker side -------------------------------------------------------------------------------------
    def _remove(self, works: list[_Work]) -> None:
        chosen = set(map(id, works))
        self._pending = collections.deque(w for w in self._pending if id(w) not in chosen)
        for work in works:
            work.flow.pending -= 1

    def _drop_stopped(self) -> None:
        """Fail the waiting units of requests that are over, without running them."""
        stopped = [w for w in self._pending if w.flow.is_stopped()]
        if stopped:
            self._remove(stopped)
            for work in stopped:
                work.future.set_exception(GenerationCancelled("the request was stopped"))

    def _pick(self) -> _Work:
        """The oldest unit of the flow with the least virtual time."""
        best: _Work | None = None
        for work in self._pending:
            if best is None or work.flow.vtime < best.flow.vtime:
                best = work
        return best

    def _anticipation_left(self, first: _Work) -> float:
        """Seconds to wait for the flow whose lone unit just ran, when it would be chosen before ``first``."""
        if self._last is None:
            return 0.0
        flow, finished, seconds = self._last
        if flow is first.flow or flow.closed or flow.pending or flow.vtime > first.flow.vtime:
            return 0.0
        return finished + min(self.anticipate_s, seconds) - time.monotonic()

    def _gather(self, first: _Work) -> tuple[list[_Work], bool]:
        """Compatible calls of other flows in arrival order within the row budget; True when the batch cannot
        grow. A batch holds one unit per flow: the units a heavy call was split into (:class:`DeviceExecutor`)
        stay apart, so other flows' units can run between them (the default flow, shared by the calls submitted
        without one, is not one request: its units batch together)."""
        batch, rows, full = [first], first.rows, first.rows >= self.max_rows
        flows = {id(first.flow)} - {id(self._default_flow)}
        for work in self._pending:
            if work is first or work.kind != "backbone" or work.group != first.group or id(work.flow) in flows:
                continue
            if work.flow is not self._default_flow:
                flows.add(id(work.flow))
            if rows + work.rows > self.max_rows:
                full = True
                break
            batch.append(work)
            rows += work.rows
        return batch, full or rows >= self.max_rows

    def _next_batch(self) -> list[_Work] | None:
        with self._cv:
            while True:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return None
                self._drop_stopped()
                if not self._pending:
                    continue
                first = self._pick()
                wait = self._anticipation_left(first)
                if wait > 0 and not self._closed:
                    self._cv.wait(wait)
                    continue
                self._last = None
                break
            self._vclock = max(self._vclock, first.flow.vtime)
            if first.kind != "backbone" or not self.batching:
                self._remove([first])
                return [first]
            deadline = first.enqueued + self.window_s
            while True:
                batch, full = self._gather(first)
                expected = max(1, self._sessions.get(first.session, 0))
                remaining = deadline - time.monotonic()
                if full or len(batch) >= expected or remaining <= 0 or self._closed:
                    break
                self._cv.wait(remaining)
            self._remove(batch)
            return batch

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                start = time.perf_counter()
                try:
                    self._execute(batch)
                except BaseException as e:  # noqa: BLE001 - the callers get it
                    for work in batch:
                        if not work.future.done():
                            work.future.set_exception(e)
                self._charge(batch, time.perf_counter() - start)

    def _charge(self, batch: list[_Work], seconds: float) -> None:
        """Each unit's flow pays its share of the device time (by rows; a task alone pays it all) / its weight."""
        rows = sum(w.rows for w in batch)
        with self._cv:
            for work in batch:
                share = seconds * (work.rows / rows if rows else 1.0 / len(batch))
                work.flow.vtime += share / work.flow.weight
            self._served.append((sum(w.cost for w in batch), seconds))
            flows = {id(w.flow) for w in batch}
            self._last = (batch[0].flow, time.monotonic(), seconds) if len(flows) == 1 else None
            self._cv.notify_all()
        for work in batch:
            if work.flow.on_cost is not None and work.cost:
                try:
                    work.flow.on_cost(work.cost)
                except Exception:  # accounting must never break the worker
                    log.exception("cost callback failed")

    def _activate(self, work: _Work) -> None:
        if work.adapters is None:
            return
        key = id(work.control)
        if key in self._current and self._current[key] == work.adapters:
            return
        self._current.pop(key, None)  # unknown until activate succeeds
        work.control.activate(work.adapters)
        self._current[key] = work.adapters

    def _execute(self, batch: list[_Work]) -> None:
        first = batch[0]
        self._activate(first)
        if first.kind == "task":
            first.future.set_result(first.fn())
            return
        start = time.perf_counter()
        if len(batch) == 1:
            out = first.forward(first.backbone, first.x, first.t, first.condition)
            outputs = [out]
        else:
            x = torch.cat([w.x for w in batch])
            t = torch.cat([_row_timesteps(w.t, w.rows) for w in batch]).to(x.device)
            condition = concat_conditions([w.condition for w in batch])
            out = first.forward(first.backbone, x, t, condition)
            outputs = list(out.split([w.rows for w in batch]))
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        elapsed = time.perf_counter() - start
        self.batches += 1
        for work, chunk in zip(batch, outputs):
            work.future.set_result(chunk)
        if self.on_batch is not None:
            self.on_batch(sum(w.rows for w in batch), len(batch), elapsed)


CallCost = Callable[[torch.Tensor], float]  # a backbone call's latents -> its cost


def unet_call_cost(x: torch.Tensor, native_area: int | None) -> float:
    """Rows × latent area relative to the model's native latent area: UNet evaluations at native size."""
    area = int(x.shape[-2]) * int(x.shape[-1])
    return int(x.shape[0]) * area / (native_area or area)


def backbone_call_cost(model: Any) -> CallCost:
    """The cost of a backbone call of ``model`` (a :class:`diffsteer.guidance.models.DiffusionModel`) in the
    units of :mod:`diffsteer.guidance.cost`: rows × one evaluation at the latents' size over one at the model's
    native size, by the family's own model of it (UNets: the area ratio, :func:`unet_call_cost`; transformers:
    image + text tokens with their attention term, ``ModelFamily.relative_cost``), so that a request's units
    add up to the cost its admission was checked against."""
    factor, native = model.vae_scale_factor, model.native_size
    per_row: dict[tuple[int, int], float] = {}

    def cost(x: torch.Tensor) -> float:
        size = (int(x.shape[-2]) * factor, int(x.shape[-1]) * factor)
        if size not in per_row:
            per_row[size] = float(model.family.relative_cost(model, size[0], size[1], native))
        return int(x.shape[0]) * per_row[size]

    return cost


class DeviceExecutor:
    """A :class:`diffsteer.guidance.executor.Executor` for one request: every unit on ``worker``, in the request's flow,
    with its LoRA ``adapters`` active. Inference UNet calls are batched with other requests'; with autograd on
    (ReNO), a UNet call is differentiable by itself: its forward is an ordinary (batchable) call, and its
    backward is one unit that recomputes the call with autograd and returns the gradient in its input (the
    model's parameters and the prompt conditions get none: nothing served trains them)."""

    differentiable_backbone = True

    def __init__(
        self,
        worker: DeviceWorker,
        flow: Flow | None,
        *,
        control: AdapterControl = NO_ADAPTERS,
        adapters: AdapterSet = (),
        native_area: int | None = None,
        call_cost: CallCost | None = None,
        pad_text: bool = False,
        max_unit_cost: float | None = None,
    ):
        self.worker = worker
        self.max_unit_cost = max_unit_cost
        self.flow = flow
        self.control = control
        self.adapters = adapters
        self.native_area = native_area
        self.call_cost = call_cost or (lambda x: unet_call_cost(x, native_area))
        self.pad_text = pad_text

    def run(self, fn: Callable[[], Any], *, cost: float = 0.0) -> Any:
        return self.worker.run_task(fn, self.control, self.adapters, flow=self.flow, cost=cost)

    def session(self, backbone: torch.nn.Module, latent_shape: tuple[int, ...]) -> contextlib.AbstractContextManager:
        return self.worker.session(backbone, self.adapters, latent_shape)

    def backbone_fn(
        self,
        forward: BackboneForward,
        backbone: torch.nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        condition: Condition,
    ) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _BackboneOnWorker.apply(x, self, forward, backbone, t, condition)
        return self._forward(forward, backbone, x, t, condition)

    def _forward(
        self,
        forward: BackboneForward,
        backbone: torch.nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        condition: Condition,
    ) -> torch.Tensor:
        """One backbone call through the worker. A call costing more than ``max_unit_cost`` is split by rows into
        units of at most that cost (at least one row each), submitted together: the worker runs them one at a time
        (a batch holds one unit per flow), so another flow's units can go between them and a light request waits
        for a slice of a heavy batch, not all of it. Rows are independent in the backbone, so the rows' outputs are
        those of one call."""
        rows = int(x.shape[0])
        chunk = rows_per_unit(rows, self.call_cost(x[:1]), self.max_unit_cost)
        futures = []
        for start in range(0, rows, chunk):
            index = None if chunk >= rows else torch.arange(start, min(start + chunk, rows), device=x.device)
            part_x = x if index is None else x[index]
            part_t = t if index is None or t.ndim == 0 or t.numel() == 1 else t[index]
            futures.append(
                self.worker.submit_backbone(
                    forward,
                    backbone,
                    part_x,
                    part_t,
                    condition if index is None else condition.rows(index),
                    self.control,
                    self.adapters,
                    self.flow,
                    self.call_cost(part_x),
                    pad_text=self.pad_text,
                )
            )
        outputs = [future.result() for future in futures]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def rows_per_unit(rows: int, row_cost: float, max_unit_cost: float | None) -> int:
    """Rows of a backbone call per unit: all when the call costs at most ``max_unit_cost`` (None: no limit), else
    as many as fit in it, at least one."""
    if max_unit_cost is None or rows * row_cost <= max_unit_cost:
        return rows
    return max(1, int(max_unit_cost // row_cost))


class _BackboneOnWorker(torch.autograd.Function):
    """A backbone call through the worker whose backward pass is another unit there (recompute, then the VJP)."""

    @staticmethod
    def forward(ctx, x, executor, call, backbone, t, condition):  # noqa: ANN001 - autograd's signature
        ctx.executor, ctx.call, ctx.backbone, ctx.t, ctx.condition = executor, call, backbone, t, condition
        ctx.save_for_backward(x)
        return executor._forward(call, backbone, x.detach(), t, condition)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        (x,) = ctx.saved_tensors
        executor, call, backbone, t, condition = ctx.executor, ctx.call, ctx.backbone, ctx.t, ctx.condition

        def vjp() -> torch.Tensor:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                out = call(backbone, leaf, t, condition)
                return torch.autograd.grad(out, leaf, grad)[0]

        cost = BACKWARD_COST * executor.call_cost(x)
        return executor.run(vjp, cost=cost), None, None, None, None, None


def _row_timesteps(t: torch.Tensor | float | int, rows: int) -> torch.Tensor:
    """One float32 timestep per row (the UNet embeds ``t.float()``, so this changes no value)."""
    t = torch.as_tensor(t)
    flat = t.reshape(-1).to(torch.float32)
    return flat.expand(rows) if flat.numel() == 1 else flat
