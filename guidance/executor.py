"""How a generation's model work runs: in the calling thread, or through a server's device worker.

:func:`diffsteer.guidance.sampler.generate` is the one path from parameters to pixels for the library, the CLI, the
trainers and the HTTP service; what differs between them is only *where* the modules are evaluated. An
:class:`Executor` says that:

- ``unet_fn``: how a UNet call runs (a :data:`UNetFn`; None: :func:`call_unet` here);
- ``run(fn, cost=...)``: one unit of other model work (prompt encoding, VAE decode, reward scoring, a
  backward pass), run where the model's modules may be used, with its estimated cost;
- ``session(unet, latent_shape)``: a sampler loop is about to submit one UNet call per step (a batching
  executor can then tell when every running loop has a call waiting);
- ``differentiable_unet``: its ``unet_fn`` is differentiable by itself, recomputing each call in the backward
  pass (so the denoiser must not add its own activation checkpointing around it).

:class:`DirectExecutor` runs everything in the calling thread; the service's is
:class:`diffsteer.service.device.DeviceExecutor`, which hands each unit to the device worker that batches UNet calls
across requests and schedules units fairly by cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import torch

T = TypeVar("T")
BACKWARD_COST = 3.0  # a UNet call's backward pass with recomputation ≈ 1 forward + a backward of ≈ 2 forwards
UNetFn = Callable[..., torch.Tensor]  # (unet, x, t, Condition) -> output, as diffsteer.guidance.denoiser.call_unet


class Executor(Protocol):
    unet_fn: UNetFn | None
    differentiable_unet: bool

    def run(self, fn: Callable[[], T], *, cost: float = 0.0) -> T:
        """Run ``fn()`` (a unit of model work costing ``cost`` UNet evaluations at native size) and return its value."""

    def session(self, unet: torch.nn.Module, latent_shape: tuple[int, ...]) -> contextlib.AbstractContextManager:
        """Announce a sampler loop over latents of ``latent_shape`` (per image) for the duration of the block."""


class DirectExecutor:
    """Everything in the calling thread, in its grad mode: the library's and the trainers' executor."""

    unet_fn: UNetFn | None = None
    differentiable_unet = False

    def run(self, fn: Callable[[], T], *, cost: float = 0.0) -> T:
        return fn()

    @contextlib.contextmanager
    def session(self, unet: torch.nn.Module, latent_shape: tuple[int, ...]) -> Iterator[None]:
        yield


DIRECT = DirectExecutor()


def run_with_grad(executor: Executor, fn: Callable[[], T], *, cost: float = 0.0) -> T:
    """``executor.run(fn)`` with autograd on inside the unit (grad mode is per thread; a worker's is off)."""

    def unit() -> Any:
        with torch.enable_grad():
            return fn()

    return executor.run(unit, cost=cost)
