"""ReNO: reward-based noise optimisation.

Eyring, Karthik, Roth, Dosovitskiy & Akata 2024, "ReNO: Enhancing One-step Text-to-Image Models through
Reward-based Noise Optimization" (NeurIPS 2024). For a one- or few-step generator G and a weighted set of
differentiable rewards R_i, ReNO optimises the initial noise ε (Sec. 3, eq. 4):

    ε* = argmin_ε  Σ_i w_i·(o_i − R_i(G(ε), p))  +  λ·K(ε),
    K(ε) = ½‖ε‖² − (d − 1)·log‖ε‖      (eq. 5: the negative log-density of ‖ε‖ under the χ_d law of a
                                         d-dimensional standard Gaussian's norm, up to a constant)

with SGD (lr 5, momentum 0.9, Nesterov), gradient-norm clipping at 0.1, λ = 0.01 and 50 iterations, and
returns the best iterate by reward (Sec. 4.1). K is computed in float32: in fp16, ‖ε‖² overflows for the
~16k-dimensional latents of SD (ReNO issue 4). Each image of a batch is optimised independently: losses are
summed and the gradient is clipped per image, so an image's result does not depend on its batch.

The inner sampler is the request's own (scheduler, steps) with plain CFG at ``scale`` (≤ 1: conditional only,
as SD-Turbo, SDXL-Turbo and FLUX.1-schnell are sampled). Backpropagation goes through every backbone call
(recomputed in the backward pass, as gradient checkpointing does), the scheduler's steps and the VAE decoder.
On flow models (the paper also steers FLUX.1-schnell) ε is the sample at σ = 1 (``init_noise_sigma`` 1), the
steps are the flow scheduler's (Euler: x ← x + (σ_next − σ)·v), and the reward reads the decoded clean latents
as on VP models; K(ε) is the same, ε being a standard Gaussian in both.
"""

from __future__ import annotations

import functools
import time
from typing import Literal

import pydantic
import torch

from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.events import StepCallback, StepEvent
from diffsteer.guidance.executor import BACKWARD_COST, run_with_grad
from diffsteer.guidance.latent_evaluators import PromptInputs, is_latent_spec, latent_reward
from diffsteer.guidance.latents import decode
from diffsteer.guidance.models import DiffusionModel
from diffsteer.guidance.policies.base import (
    NoiseOptimisation,
    OuterLoopPolicy,
    PolicyParams,
    PolicyState,
    PreparedRun,
    SamplingContext,
)
from diffsteer.guidance.policies.cfg import CFG, CFGParams
from diffsteer.rewards import CompositeReward


class ReNOParams(PolicyParams):
    name: Literal["reno"] = "reno"
    scale: float = pydantic.Field(1.0, ge=0.0, le=100.0, description="CFG scale of the inner sampler (≤ 1: off).")
    reward: str = pydantic.Field(
        "clip:1",
        description="Weighted rewards, 'name:weight[:offset],...', e.g. 'hps:5,pickscore:0.05,clip:0.01'; "
        "or 'latent[:alignment:1,...]', the model's latent evaluators on the clean latents.",
    )
    iterations: int = pydantic.Field(50, ge=0, le=1000, description="Optimisation iterations (0: plain sampling).")
    time_budget_s: float | None = pydantic.Field(None, gt=0.0, description="Stop after this many seconds.")
    lr: float = pydantic.Field(5.0, gt=0.0, le=1000.0, description="SGD learning rate.")
    momentum: float = pydantic.Field(0.9, ge=0.0, lt=1.0, description="SGD (Nesterov) momentum.")
    grad_clip: float = pydantic.Field(0.1, gt=0.0, description="Per-image gradient-norm clip.")
    reg_weight: float = pydantic.Field(0.01, ge=0.0, description="λ of the noise-norm regulariser K(ε).")


class ReNO(OuterLoopPolicy):
    name = "reno"
    Params = ReNOParams
    summary = "ReNO: optimise the initial noise of a few-step model against differentiable rewards."
    cost_field = "iterations"

    def __init__(self, params: ReNOParams | None = None):
        super().__init__(params)
        self._inner = CFG(CFGParams(scale=self.params.scale))

    def start(self, ctx: SamplingContext) -> PolicyState:
        if ctx.model is not None and is_latent_spec(self.params.reward):
            latent_reward(ctx.model, self.params.reward, rewards=ctx.rewards)  # load (and validate) before any work
        elif ctx.model is not None and ctx.rewards is not None:
            if not ctx.rewards.get(self.params.reward, ctx.model.device).differentiable:
                raise InvalidInput(
                    "policy.reward",
                    f"{self.params.reward!r} has a non-differentiable term (a metric such as jpeg_compressibility "
                    "or verifier); ReNO needs gradients",
                )
        return self._inner.start(ctx)

    def step(self, state: PolicyState, x: torch.Tensor, info: StepInfo, denoiser: Denoiser) -> torch.Tensor:
        return self._inner.step(state, x, info, denoiser)

    def cost_per_step(self) -> float:
        return 1.0 if self.params.scale <= 1.0 else 2.0

    def cost_multiplier(self) -> float:
        """Every iteration samples (1) and, but the last, backpropagates through each UNet call (BACKWARD_COST)."""
        return 1.0 + self.params.iterations * (1.0 + BACKWARD_COST)

    def optimise_noise(self, prepared: PreparedRun, callback: StepCallback | None = None) -> NoiseOptimisation:
        """Run the optimisation; returns the best noise per image, the trace and the UNet evaluations per image.

        An iteration is: the sampling pass with autograd on (each UNet call one unit of ``prepared.executor``),
        the decode and reward with the gradient of the loss in the final latents (one unit), the callback, and
        unless it is the last, the backward pass through the sampler (each UNet call's recomputation and
        backward one unit) and the SGD step. So a server interleaves other requests' UNet calls with these.
        """

        p: ReNOParams = self.params
        model, executor = prepared.model, prepared.executor
        prompts = prepared.prompts
        if is_latent_spec(p.reward):  # the model's latent evaluators score the clean latents: no VAE decode
            scorer, states = (
                latent_reward(model, p.reward, rewards=prepared.rewards),
                prepared.conditions["cond"].hidden_states,
            )
            inputs: list[PromptInputs] = []  # the prompts' inputs, made in the first scoring unit (on the executor)

            def score_and_gradient(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                if not inputs:
                    inputs.append(scorer.prompt_inputs(states, prompts))
                return scorer.score_and_gradient(latents, inputs[0])
        else:
            reward = prepared.rewards.get(p.reward, model.device, torch.float32)

            def score_and_gradient(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return reward_and_gradient(model, reward, latents, prompts)

        noise = prepared.noise.detach().clone().float().requires_grad_(True)
        optimiser = torch.optim.SGD([noise], lr=p.lr, momentum=p.momentum, nesterov=True)
        batch = noise.shape[0]
        best_score = torch.full((batch,), float("-inf"))
        best_noise = noise.detach().clone()
        best_iteration = [0] * batch
        curve: list[list[float]] = []
        nfe = 0
        start = time.perf_counter()
        iteration = 0
        for iteration in range(p.iterations + 1):  # the last pass only scores the final iterate
            with torch.enable_grad():
                run = prepared.run(noise, gradient_checkpointing=True)
            nfe += int(run.denoiser.evaluations.max())
            latents = run.latents.detach()
            score, loss_grad = run_with_grad(executor, functools.partial(score_and_gradient, latents))
            improved = score > best_score
            best_score = torch.where(improved, score, best_score)
            best_noise[improved] = noise.detach()[improved]
            for b in improved.nonzero().flatten().tolist():
                best_iteration[b] = iteration
            curve.append(score.tolist())
            out_of_time = p.time_budget_s is not None and time.perf_counter() - start > p.time_budget_s
            if callback is not None:
                callback(
                    StepEvent(iteration + 1, p.iterations + 1, nfe * batch, time.perf_counter() - start, None, "reno")
                )
            if iteration == p.iterations or out_of_time:
                break
            with torch.enable_grad():
                # d(reward loss)/d(noise) = ∂L/∂latents · ∂latents/∂noise: the first factor is loss_grad (computed
                # with the decode), the second is the backward pass through the sampler
                surrogate = (run.latents * loss_grad.to(run.latents)).sum() + p.reg_weight * noise_norm_penalty(
                    noise
                ).sum()
                optimiser.zero_grad(set_to_none=True)
                surrogate.backward()
            clip_per_image(noise.grad, p.grad_clip)
            optimiser.step()
        trace = {
            "reno": {
                "iterations": iteration,
                "best_iteration": best_iteration,
                "reward_initial": curve[0],
                "reward_best": best_score.tolist(),
                "reward_curve": curve,
                "seconds": round(time.perf_counter() - start, 3),
            }
        }
        return NoiseOptimisation(best_noise.to(prepared.noise.dtype), trace, nfe)


def reward_and_gradient(
    model: DiffusionModel, reward: CompositeReward, latents: torch.Tensor, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score per image on the CPU, gradient of the summed reward loss in ``latents``): decode and score with
    autograd on, then backpropagate to the latents only (the decoder's activations are freed on return)."""
    leaf = latents.detach().requires_grad_(True)
    result = reward.evaluate(decode(model, leaf), prompts)
    (grad,) = torch.autograd.grad(result.loss_per_sample.sum(), leaf)
    return result.total_score.detach().float().cpu(), grad


def noise_norm_penalty(noise: torch.Tensor) -> torch.Tensor:
    """K(ε) = ½‖ε‖² − (d − 1)·log‖ε‖ per image, in float32 (eq. 5)."""
    flat = noise.float().flatten(1)
    d = flat.shape[1]
    norm = flat.norm(dim=1)
    return 0.5 * norm**2 - (d - 1) * torch.log(norm)


def clip_per_image(grad: torch.Tensor, max_norm: float) -> None:
    """Scale each image's gradient to norm ≤ max_norm, in place."""
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = torch.clamp(max_norm / norms, max=1.0)
    grad.mul_(factor.view(-1, *([1] * (grad.ndim - 1))))
