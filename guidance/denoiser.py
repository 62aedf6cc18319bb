"""Evaluates the model for the conditions a guidance policy asks for, in one batched UNet call.

A policy never calls the UNet itself: it asks the :class:`Denoiser` for named conditions ("cond", "uncond",
...), optionally for a subset of the images of the batch, and gets model outputs back. The denoiser
concatenates every requested (condition, image) pair into a single UNet call, so a policy that skips the
unconditional pass really saves an evaluation, and counts evaluations per image (NFE) and UNet calls.

Model outputs live in the checkpoint's prediction space (``epsilon``, ``v_prediction`` or ``sample``);
:class:`StepInfo` carries the step's ᾱ so policies can move between that space, x0 (denoised) and ε with
the helpers of :mod:`diffsteer.guidance.parameterisation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from diffsteer.guidance.executor import DIRECT, Executor
from diffsteer.guidance.parameterisation import PredictionType


@dataclass(frozen=True)
class StepInfo:
    """Where the sampler is: step ``index`` of ``num_steps`` at ``timestep``, with ᾱ and σ = √((1−ᾱ)/ᾱ)."""

    index: int
    num_steps: int
    timestep: torch.Tensor
    alpha_bar: float
    prediction_type: PredictionType

    @property
    def sigma(self) -> float:
        return ((1.0 - self.alpha_bar) / self.alpha_bar) ** 0.5

    @property
    def fraction(self) -> float:
        """Position of this step in [0, 1): index / num_steps (0 at the first step)."""
        return self.index / self.num_steps

    @property
    def progress(self) -> float:
        """Position in [0, 1] that reaches 1 at the last step: index / (num_steps − 1)."""
        return self.index / (self.num_steps - 1) if self.num_steps > 1 else 0.0


@dataclass
class Condition:
    """One encoded condition for every image of the batch: cross-attention states and SDXL's added inputs."""

    hidden_states: torch.Tensor  # [B, L, D]
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds [B, P], time_ids [B, 6]

    def rows(self, index: torch.Tensor | None) -> Condition:
        if index is None:
            return self
        return Condition(self.hidden_states[index], {k: v[index] for k, v in self.added.items()})


def concat_conditions(parts: Sequence[Condition]) -> Condition:
    if len(parts) == 1:
        return parts[0]
    hidden = torch.cat([p.hidden_states for p in parts])
    added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
    return Condition(hidden, added)


def call_unet(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
    """One UNet forward pass (the default ``unet_fn``)."""
    return unet(
        x,
        t,
        encoder_hidden_states=condition.hidden_states,
        added_cond_kwargs=condition.added or None,
        return_dict=False,
    )[0]


ConditionRequest = Sequence[str] | Mapping[str, torch.Tensor | None]


class Denoiser:
    """Batched, counted evaluations of one UNet for the encoded conditions of one generation.

    Args:
        unet: the diffusers UNet2DConditionModel.
        conditions: encoded conditions by name; every tensor has the batch's images as rows.
        aliases: names that are the same condition as another (e.g. "uncond" is "empty" when no negative
            prompt was given); a request for both evaluates once.
        prediction_type: the model's output space.
        gradient_checkpointing: recompute each UNet call in the backward pass instead of storing its
            activations (for the differentiable sampler).
        executor: where the generation's model work runs (:mod:`diffsteer.guidance.executor`; default: this thread). Its
            ``unet_fn`` evaluates the UNet (the service's batches calls across requests), and policies run
            other model work through ``denoiser.executor.run`` (dynamic CFG's candidate scoring).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        conditions: Mapping[str, Condition],
        prediction_type: PredictionType,
        *,
        aliases: Mapping[str, str] | None = None,
        gradient_checkpointing: bool = False,
        executor: Executor | None = None,
    ):
        self.unet = unet
        self.conditions = dict(conditions)
        self.aliases = dict(aliases or {})
        self.prediction_type = prediction_type
        self.gradient_checkpointing = gradient_checkpointing
        self.executor = executor or DIRECT
        self.unet_fn = self.executor.unet_fn or call_unet
        self.batch_size = next(iter(self.conditions.values())).hidden_states.shape[0]
        self.evaluations = torch.zeros(self.batch_size, dtype=torch.long)  # per image (NFE)
        self.unet_calls = 0
        self.unet_dtype = next(unet.parameters()).dtype

    def resolve(self, name: str) -> str:
        if name in self.conditions:
            return name
        if name in self.aliases:
            return self.resolve(self.aliases[name])
        raise KeyError(f"condition {name!r} was not encoded; available: {sorted(self.conditions)}")

    def __call__(self, x: torch.Tensor, step: StepInfo, request: ConditionRequest) -> dict[str, torch.Tensor]:
        """Evaluate the model at ``x`` (scaled model input, all B images) for the requested conditions.

        ``request`` is a list of names (every image) or a mapping name -> LongTensor of image indices
        (None for every image). Returns name -> model output with one row per requested image.
        """
        if not isinstance(request, Mapping):
            request = {name: None for name in request}
        unique: dict[tuple[str, tuple[int, ...] | None], list[str]] = {}
        for name, index in request.items():
            key = (self.resolve(name), None if index is None else tuple(int(i) for i in index))
            unique.setdefault(key, []).append(name)
        keys = [k for k in unique if k[1] is None or len(k[1]) > 0]

        xs, conds, sizes = [], [], []
        for cond_name, index in keys:
            rows = None if index is None else torch.tensor(index, dtype=torch.long, device=x.device)
            xs.append(x if rows is None else x[rows])
            conds.append(self.conditions[cond_name].rows(rows))
            sizes.append(self.batch_size if rows is None else len(index))
            if index is None:
                self.evaluations += 1
            else:
                self.evaluations[list(index)] += 1

        outputs: dict[str, torch.Tensor] = {}
        if keys:
            out = self._evaluate(torch.cat(xs), step.timestep, concat_conditions(conds))
            self.unet_calls += 1
            for key, chunk in zip(keys, out.split(sizes)):
                for name in unique[key]:
                    outputs[name] = chunk
        for key, names in unique.items():
            if key not in keys:
                for name in names:
                    outputs[name] = x.new_zeros((0, *x.shape[1:]))
        return outputs

    def _evaluate(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        x_in = x.to(self.unet_dtype)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            out = activation_checkpoint(self._checkpointed, x_in, t, condition, use_reentrant=False)
        else:
            out = self.unet_fn(self.unet, x_in, t, condition)
        return out.to(x.dtype)

    def _checkpointed(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        return self.unet_fn(self.unet, x, t, condition)
