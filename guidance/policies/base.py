"""The guidance-policy interface.

A policy is immutable: its validated ``params`` and nothing else. Everything that changes during a
generation (momentum buffers, switch steps, traces) lives in the state object returned by :meth:`start`,
which belongs to one generation only, so one policy object can serve concurrent requests.

Per step, the sampler calls ``step(state, x, info, denoiser)`` with the scheduler-scaled model input ``x``;
the policy asks the denoiser for the conditions it needs and returns the guided model output, in the
checkpoint's prediction space, which the scheduler then consumes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import pydantic
import torch

from diffsteer.guidance.denoiser import Condition, Denoiser, StepInfo
from diffsteer.guidance.events import StepCallback
from diffsteer.guidance.executor import Executor
from diffsteer.guidance.models import DiffusionModel
from diffsteer.guidance.reward_models import RewardModels


class PolicyParams(pydantic.BaseModel):
    """Base of every policy's parameter schema: unknown fields, NaN and infinities are rejected."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    def spec(self) -> str:
        """The compact spec string (``name:key=value,...``) of the non-default parameters."""
        values = self.model_dump(exclude_defaults=True, exclude={"name"})
        if not values:
            return self.name  # type: ignore[attr-defined]
        body = ",".join(f"{k}={_format_value(v)}" for k, v in values.items())
        return f"{self.name}:{body}"  # type: ignore[attr-defined]


def _format_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class SamplingContext:
    """What a policy may know before the first step."""

    num_steps: int  # model evaluations points (the scheduler's timesteps; > steps for Heun, PNDM)
    batch_size: int
    prediction_type: str
    has_negative_prompt: bool
    schedule: str = "vp"  # the model's noise schedule: "vp" or "flow"
    requested_steps: int | None = None  # the request's `steps`
    prompts: tuple[str, ...] = ()  # one per image
    model: DiffusionModel | None = None  # for policies that decode or score (dynamic CFG, ReNO)
    rewards: RewardModels | None = None  # the reward library the caller passed down (None: the defaults)


@dataclass
class PolicyState:
    """Per-generation state; policies subclass it. ``trace`` is returned in the result."""

    trace: dict[str, Any] = field(default_factory=dict)


class GuidancePolicy(ABC):
    """Base class: ``name``, ``Params`` and ``conditions`` (the prompt conditions to encode)."""

    name: ClassVar[str]
    Params: ClassVar[type[PolicyParams]]
    conditions: ClassVar[tuple[str, ...]] = ("cond", "uncond")
    summary: ClassVar[str] = ""
    cost_field: ClassVar[str] = ""  # the parameter that drives its cost beyond cost_per_step (named when refused)

    def __init__(self, params: PolicyParams | None = None):
        self.params = params if params is not None else self.Params()

    def start(self, ctx: SamplingContext) -> PolicyState:
        """Fresh state for one generation; validate step-dependent parameters here."""
        return PolicyState()

    @abstractmethod
    def step(self, state: PolicyState, x: torch.Tensor, info: StepInfo, denoiser: Denoiser) -> torch.Tensor:
        """The guided model output for step ``info`` at scaled input ``x``."""

    def finish(self, state: PolicyState) -> dict[str, Any]:
        """The trace reported with the result (JSON-serialisable)."""
        return state.trace

    def cost_per_step(self) -> float:
        """Estimated UNet evaluations per image and step (the conditions it asks for; 2 for CFG), for cost limits."""
        return float(len(self.conditions))

    def cost_multiplier(self) -> float:
        """Estimated work of a whole generation relative to one sampling pass (an outer loop's passes, etc.)."""
        return 1.0


class Rollout(Protocol):
    """One run of the reverse process, as an outer loop reads it."""

    latents: torch.Tensor  # the final (clean) latents
    denoiser: Denoiser  # its evaluation counters


class PreparedRun(Protocol):
    """A request with its prompts encoded and its noise drawn, that an outer loop can sample from many times
    (the sampler's ``PreparedGeneration``; declared here so that policies do not depend on the sampler)."""

    model: DiffusionModel
    executor: Executor
    rewards: RewardModels
    conditions: dict[str, Condition]
    noise: torch.Tensor  # the seeds' unit Gaussian noise

    @property
    def prompts(self) -> list[str]: ...

    def run(self, noise: torch.Tensor | None = None, *, gradient_checkpointing: bool | None = None) -> Rollout: ...


@dataclass
class NoiseOptimisation:
    """What an outer loop returns: the initial noise of the final run, its trace and the evaluations it spent
    (per image, counted towards every image's NFE)."""

    noise: torch.Tensor
    trace: dict[str, Any]
    nfe: int


class OuterLoopPolicy(GuidancePolicy):
    """A policy with a loop over whole trajectories before the final run (ReNO optimises the initial noise).

    :func:`diffsteer.guidance.sampler.generate` calls :meth:`optimise_noise` once, then samples from the noise it returns
    with :meth:`step`. The loop runs its model work through ``prepared.executor``, one UNet call (forward, or
    backward with recomputation) per unit, so a server can interleave other requests between them.
    """

    @abstractmethod
    def optimise_noise(self, prepared: PreparedRun, callback: StepCallback | None = None) -> NoiseOptimisation:
        """Run the outer loop for ``prepared``; ``callback`` gets its progress and may raise GenerationCancelled
        to stop."""
