"""Evaluates the model for the conditions a guidance policy asks for, in one batched backbone call.

A policy never calls the backbone (UNet or transformer) itself: it asks the :class:`Denoiser` for named
conditions ("cond", "uncond", ...), optionally for a subset of the images of the batch, and gets model outputs
back. The denoiser concatenates every requested (condition, image) pair into a single backbone call, so a
policy that skips the unconditional pass really saves an evaluation, and counts evaluations per image (NFE)
and backbone calls (``unet_calls``, the name the API reports).

Model outputs live in the checkpoint's prediction space (``epsilon``, ``v_prediction``, ``sample`` or
``flow``); :class:`StepInfo` carries the step's noise level so policies can move between that space, x0
(denoised), ε and the ODE velocity with the helpers of :mod:`diffsteer.guidance.parameterisation`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from diffsteer.guidance.executor import DIRECT, Executor
from diffsteer.guidance.families.base import Condition, concat_conditions
from diffsteer.guidance.families.unet import StableDiffusion
from diffsteer.guidance.parameterisation import NoiseLevel, PredictionType


@dataclass(frozen=True)
class StepInfo:
    """Where the sampler is: step ``index`` of ``num_steps`` at scheduler ``timestep`` and noise ``level``, with
    the model's ``prediction_type`` and its latent ``patch`` size (pixels of latent per token side; 1 for UNets)."""

    index: int
    num_steps: int
    timestep: torch.Tensor
    level: NoiseLevel
    prediction_type: PredictionType
    patch: int = 1

    @property
    def sigma(self) -> float:
        """The schedule's σ (:attr:`NoiseLevel.sigma`: flow σ ∈ [0, 1], or the VP noise-to-signal ratio)."""
        return float(self.level.sigma)

    @property
    def alpha_bar(self) -> float:
        """ᾱ with this step's signal-to-noise ratio (what log-SNR-keyed evaluators take)."""
        return float(self.level.alpha_bar)

    @property
    def fraction(self) -> float:
        """Position of this step in [0, 1): index / num_steps (0 at the first step)."""
        return self.index / self.num_steps

    @property
    def progress(self) -> float:
        """Position in [0, 1] that reaches 1 at the last step: index / (num_steps − 1)."""
        return self.index / (self.num_steps - 1) if self.num_steps > 1 else 0.0


BackboneForward = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Condition], torch.Tensor]
UNET_FAMILY = StableDiffusion()


def call_unet(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
    """One UNet forward pass: the UNet families' backbone call (the Denoiser's default ``forward``)."""
    return UNET_FAMILY.forward(unet, x, t, condition)


ConditionRequest = Sequence[str] | Mapping[str, torch.Tensor | None]


class Denoiser:
    """Batched, counted evaluations of one backbone (UNet or transformer) for the encoded conditions of one
    generation.

    Args:
        backbone: the model's denoising network.
        conditions: encoded conditions by name; every tensor has the batch's images as rows.
        aliases: names that are the same condition as another (e.g. "uncond" is "empty" when no negative
            prompt was given); a request for both evaluates once.
        prediction_type: the model's output space.
        gradient_checkpointing: recompute each backbone call in the backward pass instead of storing its
            activations (for the differentiable sampler).
        executor: where the generation's model work runs (:mod:`diffsteer.guidance.executor`; default: this thread). Its
            ``backbone_fn`` evaluates the backbone (the service's batches calls across requests), and policies
            run other model work through ``denoiser.executor.run`` (dynamic CFG's candidate scoring).
        forward: the family's backbone call (:meth:`ModelFamily.forward`; default: a UNet's).
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        conditions: Mapping[str, Condition],
        prediction_type: PredictionType,
        *,
        aliases: Mapping[str, str] | None = None,
        gradient_checkpointing: bool = False,
        executor: Executor | None = None,
        forward: BackboneForward = call_unet,
    ):
        self.backbone = backbone
        self.forward = forward
        self.conditions = dict(conditions)
        self.aliases = dict(aliases or {})
        self.prediction_type = prediction_type
        self.gradient_checkpointing = gradient_checkpointing
        self.executor = executor or DIRECT
        self.batch_size = next(iter(self.conditions.values())).hidden_states.shape[0]
        self.evaluations = torch.zeros(self.batch_size, dtype=torch.long)  # per image (NFE)
        self.unet_calls = 0
        self.backbone_dtype = next(backbone.parameters()).dtype

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
            out = self._evaluate(torch.cat(xs) if len(xs) > 1 else xs[0], step.timestep, concat_conditions(conds))
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
        x_in = x.to(self.backbone_dtype)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            out = activation_checkpoint(self._call, x_in, t, condition, use_reentrant=False)
        else:
            out = self._call(x_in, t, condition)
        return out.to(x.dtype)

    def _call(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        if self.executor.backbone_fn is not None:
            return self.executor.backbone_fn(self.forward, self.backbone, x, t, condition)
        return self.forward(self.backbone, x, t, condition)
