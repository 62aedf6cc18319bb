"""Dynamic classifier-free guidance via online feedback.

Papalampidi et al. 2025, "Dynamic Classifier-Free Diffusion Guidance via Online Feedback" (arXiv:2509.16131):
instead of one guidance scale for all steps and prompts, the scale is chosen per step and per sample by
evaluators scoring candidate scales on the predicted clean image, greedily (Sec. 3):

    for each candidate w_k:  ε_k = ε_u + w_k·(ε_c − ε_u),  x̂0_k = x0(ε_k)
    w* = argmax_k  Σ_j λ_j·R_j(D(x̂0_k), prompt)

The candidates are combinations of the same two predictions, so choosing costs no extra UNet evaluation:
only decoding and scoring the K candidate clean images. To keep that cheap, evaluation runs at chosen steps
(every ``evaluate_every`` steps inside ``[start, end)`` of the trajectory; other steps keep the last choice)
and the candidate latents can be average-pooled by ``eval_downsample`` before the VAE decode. The evaluators
are rewards/ models with weights (``reward``: alignment, aesthetics, anything differentiable or not, since no
gradient is needed). The chosen schedule per image is returned in the trace.

At the first, noisiest steps the predicted clean images are blurry averages that evaluators score poorly, and
a greedy choice there tends to take the largest scale. On the proving ground that choice erases objects.
``start=0.2, initial_scale=1`` (no guidance before the evaluators take over; compare the guidance interval of
Kynkäänniemi et al. 2024) is what reaches the best fixed scale there; see BENCHMARKS.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic
import torch
import torch.nn.functional as F

from guidance.denoiser import Denoiser, StepInfo, to_x0
from guidance.policies.base import GuidancePolicy, PolicyParams, PolicyState, SamplingContext
from guidance.policies.cfg import cfg_combine

CandidateScale = pydantic.confloat(ge=0.0, le=100.0)


class DynamicCFGParams(PolicyParams):
    name: Literal["dynamic_cfg"] = "dynamic_cfg"
    candidates: list[CandidateScale] = pydantic.Field(  # type: ignore[valid-type]
        default_factory=lambda: [1.0, 2.0, 3.0, 4.5, 6.0, 9.0], min_length=1, max_length=32,
        description="Candidate guidance scales scored at each evaluation step.",
    )
    initial_scale: float = pydantic.Field(
        4.5, ge=0.0, le=100.0, description="Scale used before the first evaluation step."
    )
    reward: str = pydantic.Field("clip:1", description="Evaluators with weights, 'name:weight,...'.")
    evaluate_every: int = pydantic.Field(1, ge=1, le=1000, description="Re-select the scale every N steps.")
    start: float = pydantic.Field(0.0, ge=0.0, le=1.0, description="First step fraction with evaluation.")
    end: float = pydantic.Field(1.0, ge=0.0, le=1.0, description="Evaluation stops at this step fraction.")
    eval_downsample: int = pydantic.Field(
        1, ge=1, le=8, description="Average-pool candidate latents by this factor before decoding."
    )


@dataclass
class DynamicCFGState(PolicyState):
    model: Any = None
    rewards: Any = None  # the RewardModels passed down (guidance.reward_models)
    prompts: list[str] = field(default_factory=list)
    current: torch.Tensor | None = None  # the scale in force per image
    schedule: list[list[float]] = field(default_factory=list)


class DynamicCFG(GuidancePolicy):
    name = "dynamic_cfg"
    Params = DynamicCFGParams
    summary = "Dynamic CFG: per step and image, pick the candidate scale whose predicted image scores best."
    cost_field = "candidates"

    def start(self, ctx: SamplingContext) -> DynamicCFGState:
        from guidance.reward_models import DEFAULT_REWARDS

        rewards = ctx.rewards or DEFAULT_REWARDS
        if ctx.model is not None:
            rewards.get(self.params.reward, ctx.model.device)  # load (and validate) before sampling starts
        return DynamicCFGState(
            model=ctx.model,
            rewards=rewards,
            prompts=list(ctx.prompts),
            current=torch.full((ctx.batch_size,), float(self.params.initial_scale)),
        )

    def step(self, state: DynamicCFGState, x: torch.Tensor, info: StepInfo, denoiser: Denoiser) -> torch.Tensor:
        p = self.params
        out = denoiser(x, info, ["uncond", "cond"])
        cond, uncond = out["cond"], out["uncond"]
        evaluating = p.start <= info.fraction < p.end and (info.index - _first_index(p, info)) % p.evaluate_every == 0
        if evaluating:
            state.current = self._choose(state, cond, uncond, x, info, denoiser.executor)
        state.schedule.append(state.current.tolist())
        state.trace["scale_schedule"] = state.schedule
        w = state.current.to(device=cond.device, dtype=cond.dtype).view(-1, *([1] * (cond.ndim - 1)))
        return uncond + w * (cond - uncond)

    def cost_per_step(self) -> float:
        """Two UNet rows, plus decoding and scoring the candidates at the steps that evaluate (a decode and a
        score of an image counted as SCORE_COST evaluations, at ``eval_downsample``'s reduced size)."""
        p = self.params
        evaluated = max(0.0, p.end - p.start) / p.evaluate_every
        return 2.0 + evaluated * len(p.candidates) * SCORE_COST / p.eval_downsample**2

    def _choose(self, state: DynamicCFGState, cond, uncond, x, info: StepInfo, executor) -> torch.Tensor:
        """The best candidate per image. The K × B candidate images are decoded and scored in chunks of at most
        SCORE_CHUNK native-size images, each chunk one unit of ``executor`` (the device worker in the service),
        so memory stays bounded and other requests' UNet calls interleave with the scoring."""
        p = self.params
        batch = cond.shape[0]
        with torch.no_grad():
            x0 = torch.cat(
                [to_x0(cfg_combine(cond, uncond, w), x, info.alpha_bar, info.prediction_type) for w in p.candidates]
            )
            if p.eval_downsample > 1:
                x0 = F.avg_pool2d(x0, p.eval_downsample)
        reward = state.rewards.get(p.reward, x0.device)
        prompts = state.prompts * len(p.candidates)
        chunk = score_chunk(state.model, x0.shape[-2] * x0.shape[-1])
        cost = SCORE_COST * x0.shape[-2] * x0.shape[-1] / native_latent_area(state.model)
        scores = torch.cat([
            executor.run(functools.partial(score_images, state.model, reward, x0[i:i + chunk], prompts[i:i + chunk]),
                         cost=cost * len(prompts[i:i + chunk]))
            for i in range(0, x0.shape[0], chunk)
        ]).view(len(p.candidates), batch)
        best = scores.argmax(dim=0)
        return torch.tensor(p.candidates, dtype=torch.float32)[best]


SCORE_CHUNK = 16  # candidate images of the model's native size decoded and scored at once
SCORE_COST = 1.0  # a decode and a score of one image, in UNet evaluations (a rough estimate, not measured per model)


def native_latent_area(model: Any) -> int:
    size = int(model.unet.config.sample_size)
    return size * size


def score_chunk(model: Any, latent_area: int) -> int:
    """Images per scoring unit: SCORE_CHUNK at the native size, fewer for larger latents (memory ∝ pixels)."""
    return max(1, int(SCORE_CHUNK * native_latent_area(model) / latent_area))


@torch.no_grad()
def score_images(model: Any, reward: Any, x0: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Reward of the decoded clean-latent predictions ``x0``, as float32 on the CPU."""
    from guidance.sampler import decode

    return reward.evaluate(decode(model, x0), prompts).total_score.float().cpu()


def _first_index(p: DynamicCFGParams, info: StepInfo) -> int:
    """Index of the first step inside the evaluation window (the cadence counts from there)."""
    import math

    return math.ceil(p.start * info.num_steps)
