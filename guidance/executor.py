"""How a generation's model work runs: in the calling thread, or through a server's device worker.

:func:`diffsteer.guidance.sampler.generate` is the one path from parameters to pixels for the library, the CLI, the
trainers and the HTTP service; what differs between them is only *where* the modules are evaluated. An
:class:`Executor` says that:

- ``backbone_fn``: how a backbone call runs (a :data:`BackboneFn`, given the family's forward; None: the
  forward is called here);
- ``run(fn, cost=...)``: one unit of other model work (prompt encoding, VAE decode, reward scoring, a
  backward pass), run where the model's modules may be used, with its estimated cost;
- ``session(backbone, latent_shape)``: a sampler loop is about to submit one backbone call per step (a batching
  executor can then tell when every running loop has a call waiting);
- ``differentiable_backbone``: its ``backbone_fn`` is differentiable by itself, recomputing each call in the backward
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
# (forward, backbone, x, t, Condition) -> output, where forward(backbone, x, t, Condition) is the family's call
BackboneFn = Callable[..., torch.Tensor]


class Executor(Protocol):
    backbone_fn: BackboneFn | None
    differentiable_backbone: bool

    def run(self, fn: Callable[[], T], *, cost: float = 0.0) -> T:
        """Run ``fn()`` (a unit of model work costing ``cost`` UNet evaluations at native size) and return its value."""

    def session(self, backbone: torch.nn.Module, latent_shape: tuple[int, ...]) -> contextlib.AbstractContextManager:
        """Announce a sampler loop over latents of ``latent_shape`` (per image) for the duration of the block."""


class DirectExecutor:
    """Everything in the calling thread, in its grad mode: the library's and the trainers' executor."""

    backbone_fn: BackboneFn | None = None
    differentiable_backbone = False

    def run(self, fn: Callable[[], T], *, cost: float = 0.0) -> T:
        return fn()

    @contextlib.contextmanager
    def session(self, backbone: torch.nn.Module, latent_shape: tuple[int, ...]) -> Iterator[None]:
        yield


DIRECT = DirectExecutor()


def run_with_grad(executor: Executor, fn: Callable[[], T], *, cost: float = 0.0) -> T:
    """``executor.run(fn)`` with autograd on inside the unit (grad mode is per thread; a worker's is off)."""

    def unit() -> Any:
        with torch.enable_grad():
            return fn()

    return executor.run(unit, cost=cost)
