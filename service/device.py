"""The device worker: one thread that runs every UNet call of every request, batching them across requests.

Each request runs its own sampler loop in its own thread (see :mod:`service.queue`); its ``Denoiser`` gets
:meth:`DeviceWorker.unet_fn` as its ``unet_fn``, which hands ``(x, t, Condition)`` to this worker and waits.
The worker takes the oldest call, gathers the calls of other requests that can share a UNet forward pass
(same UNet, same LoRA set, same latent and condition shapes), concatenates their rows with each row's own
timestep (the UNet accepts a ``[B]`` timestep tensor), runs ONE forward pass and splits the output back.

Exactness: every operation of a Stable-Diffusion UNet acts on each row on its own (convolutions, group norm,
attention), and the UNet casts timesteps to float32 itself before embedding them, so a request's rows get
the same values batched as alone, up to floating-point reassociation in the kernels (~1e-6 on CPU). A batch
of one call passes its arguments through untouched: unbatched results are bit-identical to the library's.

Gathering stops at the first of: every sampler loop of that (model, LoRA set, shape) has a call waiting,
the batch holds ``max_rows`` rows, or ``window_s`` has passed since the oldest call arrived. Sampler loops
announce themselves with :meth:`session`, which is what makes the first condition (and so low latency at
full batches) possible. Work is taken oldest first, so other groups and tasks wait at most one window
and one batch.

The worker also runs, one at a time with the UNet calls, every other use of modules that a LoRA adapter
changes (text encoding) and the VAE decode, through :meth:`run_task`. Since nothing else touches those
modules, the worker can switch the active LoRA adapters before each batch (batches never mix LoRA sets)
without any request seeing another's adapters.

Outputs are computed under ``torch.no_grad()``: this ``unet_fn`` is for inference, not for backpropagation.
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

from guidance.denoiser import Condition, call_unet, concat_conditions

log = logging.getLogger("service.device")

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
class _Work:
    kind: str  # "unet" | "task"
    control: AdapterControl
    adapters: AdapterSet | None  # None: the task does not care which adapters are active
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)
    group: tuple | None = None
    session: tuple | None = None
    unet: torch.nn.Module | None = None
    x: torch.Tensor | None = None
    t: torch.Tensor | None = None
    condition: Condition | None = None
    fn: Callable[[], Any] | None = None

    @property
    def rows(self) -> int:
        return 0 if self.x is None else int(self.x.shape[0])


BatchObserver = Callable[[int, int, float], None]  # (rows, requests, seconds)


class DeviceWorker:
    def __init__(self, *, batching: bool = True, max_rows: int = 16, window_s: float = 0.005,
                 on_batch: BatchObserver | None = None, name: str = "diffsteer-device"):
        self.batching = batching
        self.max_rows = max_rows
        self.window_s = window_s
        self.on_batch = on_batch
        self._cv = threading.Condition()
        self._pending: collections.deque[_Work] = collections.deque()
        self._sessions: collections.Counter[tuple] = collections.Counter()
        self._current: dict[int, AdapterSet] = {}
        self._closed = False
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- request side ------------------------------------------------------------------------------------
    @staticmethod
    def session_key(unet: torch.nn.Module, adapters: AdapterSet, latent_shape: tuple[int, ...]) -> tuple:
        return (id(unet), adapters, tuple(latent_shape))

    @contextlib.contextmanager
    def session(self, unet: torch.nn.Module, adapters: AdapterSet, latent_shape: tuple[int, ...]) -> Iterator[None]:
        """Announce a sampler loop that will submit one UNet call at a time for these latents."""
        key = self.session_key(unet, adapters, latent_shape)
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

    def unet_fn(self, control: AdapterControl = NO_ADAPTERS, adapters: AdapterSet = ()) -> Callable[..., torch.Tensor]:
        """A ``Denoiser`` ``unet_fn`` that evaluates through this worker with ``adapters`` active."""

        def fn(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
            work = _Work(
                "unet", control, adapters, unet=unet, x=x, t=t, condition=condition,
                group=(
                    id(unet), adapters, tuple(x.shape[1:]), x.dtype, x.device,
                    tuple(condition.hidden_states.shape[1:]),
                    tuple(sorted((k, tuple(v.shape[1:])) for k, v in condition.added.items())),
                ),
                session=self.session_key(unet, adapters, tuple(x.shape[1:])),
            )
            return self._submit(work).result()

        return fn

    def run_task(self, fn: Callable[[], Any], control: AdapterControl = NO_ADAPTERS,
                 adapters: AdapterSet | None = None) -> Any:
        """Run ``fn()`` on the worker thread, alone, with ``adapters`` active (None: whichever are)."""
        return self._submit(_Work("task", control, adapters, fn=fn)).result()

    def _submit(self, work: _Work) -> concurrent.futures.Future:
        with self._cv:
            if self._closed:
                raise WorkerClosed("the device worker is shut down")
            self._pending.append(work)
            self._cv.notify_all()
        return work.future

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._pending)

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
    def _gather(self, first: _Work) -> tuple[list[_Work], bool]:
        """Compatible calls in arrival order within the row budget; True when the batch cannot grow."""
        batch, rows, full = [first], first.rows, first.rows >= self.max_rows
        for work in self._pending:
            if work is first or work.kind != "unet" or work.group != first.group:
                continue
            if rows + work.rows > self.max_rows:
                full = True
                break
            batch.append(work)
            rows += work.rows
        return batch, full or rows >= self.max_rows

    def _next_batch(self) -> list[_Work] | None:
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if not self._pending:
                return None
            first = self._pending[0]
            if first.kind != "unet" or not self.batching:
                return [self._pending.popleft()]
            deadline = first.enqueued + self.window_s
            while True:
                batch, full = self._gather(first)
                expected = max(1, self._sessions.get(first.session, 0))
                remaining = deadline - time.monotonic()
                if full or len(batch) >= expected or remaining <= 0 or self._closed:
                    break
                self._cv.wait(remaining)
            chosen = set(map(id, batch))
            self._pending = collections.deque(w for w in self._pending if id(w) not in chosen)
            return batch

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                try:
                    self._execute(batch)
                except BaseException as e:  # noqa: BLE001 - the callers get it
                    for work in batch:
                        if not work.future.done():
                            work.future.set_exception(e)

    def _activate(self, work: _Work) -> None:
        if work.adapters is None:
            return
        key = id(work.control)
        if key in self._current and self._current[key] == work.adapters:
            return
        self._current.pop(key, None)  # unknown until activate succeeds
        work.control.activate(work.adapters)
        self._current[key] = work.adapters

    def forget_adapters(self, control: AdapterControl) -> None:
        """The control changed its modules outside :meth:`_activate` (e.g. loaded an adapter)."""
        self._current.pop(id(control), None)

    def _execute(self, batch: list[_Work]) -> None:
        first = batch[0]
        self._activate(first)
        if first.kind == "task":
            first.future.set_result(first.fn())
            return
        start = time.perf_counter()
        if len(batch) == 1:
            out = call_unet(first.unet, first.x, first.t, first.condition)
            outputs = [out]
        else:
            x = torch.cat([w.x for w in batch])
            t = torch.cat([_row_timesteps(w.t, w.rows) for w in batch]).to(x.device)
            condition = concat_conditions([w.condition for w in batch])
            out = call_unet(first.unet, x, t, condition)
            outputs = list(out.split([w.rows for w in batch]))
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        elapsed = time.perf_counter() - start
        self.batches += 1
        for work, chunk in zip(batch, outputs):
            work.future.set_result(chunk)
        if self.on_batch is not None:
            self.on_batch(sum(w.rows for w in batch), len(batch), elapsed)


def _row_timesteps(t: torch.Tensor | float | int, rows: int) -> torch.Tensor:
    """One float32 timestep per row (the UNet embeds ``t.float()``, so this changes no value)."""
    t = torch.as_tensor(t)
    flat = t.reshape(-1).to(torch.float32)
    return flat.expand(rows) if flat.numel() == 1 else flat
