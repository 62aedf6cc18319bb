"""Dynamic classifier-free guidance via online feedback.

Papalampidi et al. 2025, "Dynamic Classifier-Free Diffusion Guidance via Online Feedback" (arXiv:2509.16131):
instead of one guidance scale for all steps and prompts, the scale is chosen per step and per sample by
evaluators scoring candidate scales, greedily (Sec. 3):

    for each candidate w_k:  ε_k = ε_u + w_k·(ε_c − ε_u),  ẑ0_k = x0(ε_k)
    w* = argmax_k  Σ_j λ_j·E_j(ẑ0_k, t, prompt)

The candidates are combinations of the same two predictions, so choosing costs no extra backbone evaluation:
only scoring the K candidates. The combination is CFG on the model output (ε, v or, on flow models, the velocity
v, whose candidate is ẑ0_k = x_t − σ·v_k); the evaluators score x0, and the latent ones read the step's noise as
the ᾱ of the same signal-to-noise ratio (:attr:`StepInfo.alpha_bar`: (1 − σ)²/((1 − σ)² + σ²) on flow models).
Two kinds of evaluators (``evaluator``):

* ``latent`` (the paper's design, and the default where the model has them: ``auto``): the model's small
  latent-space evaluators (:mod:`diffsteer.guidance.latent_evaluators`) read ẑ0_k and the step's noise level directly,
  without the VAE, and the prompt as the model's text-encoder states or, for an embedding-form alignment evaluator
  (the paper's CLIP-style one: a latent image tower), as the reward's text embedding, computed once per generation
  with the reward's text tower (from the caller's reward library). All K × B candidates are scored in one batched
  call, one unit of the executor (the device worker in the service). ``latent_weights`` are the λ_j ('': those
  saved with them).
* ``pixel``: every candidate is decoded by the VAE and scored by rewards/ models with weights (``reward``); the
  K × B images go in chunks of at most SCORE_CHUNK native-size images, each one executor unit.

Evaluation runs at chosen steps (every ``evaluate_every`` steps inside ``[start, end)``; other steps keep the
last choice); ``eval_downsample`` average-pools the candidate latents before a pixel decode. The chosen schedule
per image is returned in the trace.

Where ours differs from the paper. The paper's evaluators are trained on real data by the authors for their
models (CLIP-style alignment, a fidelity discriminator, a human-preference reward, and for specific skills, e.g.
text rendering, dedicated ones) and it reports about 1% overhead at their model size. Ours are trained per model
by ``diffsteer train latent-evaluator``: alignment is *distilled* from a configurable pixel reward on the decoded
ẑ0 (so its quality is bounded by that reward and by the distillation; its agreement with the reward by noise
level: see BENCHMARKS.md, section Dynamic CFG with latent evaluators), and fidelity discriminates the model's
guided ẑ0 from its ẑ0 on noised real-data latents. The per-step greedy argmax and the weighted sum are the
paper's; we add the unguided start. At the first, noisiest steps the predicted clean images are blurry averages
that evaluators score poorly, and a greedy choice there tends to take the largest scale, which can erase the
objects. ``start=0.2, initial_scale=1`` (no guidance before the evaluators take over; compare the guidance
interval of Kynkäänniemi et al. 2024) avoids that choice; see BENCHMARKS.md, section Dynamic CFG.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F

from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.latent_evaluators import (
    LatentEvaluators,
    PromptInputs,
    evaluators_for,
    parse_weights,
    text_states,
)
from diffsteer.guidance.latents import decode
from diffsteer.guidance.models import DiffusionModel
from diffsteer.guidance.parameterisation import to_x0
from diffsteer.guidance.policies.base import GuidancePolicy, PolicyParams, PolicyState, SamplingContext
from diffsteer.guidance.policies.cfg import cfg_combine
from diffsteer.guidance.reward_models import DEFAULT_REWARDS, RewardModels
from diffsteer.rewards import CompositeReward

CandidateScale = pydantic.confloat(ge=0.0, le=100.0)


class DynamicCFGParams(PolicyParams):
    name: Literal["dynamic_cfg"] = "dynamic_cfg"
    candidates: list[CandidateScale] = pydantic.Field(  # type: ignore[valid-type]
        default_factory=lambda: [1.0, 2.0, 3.0, 4.5, 6.0, 9.0],
        min_length=1,
        max_length=32,
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
        1, ge=1, le=8, description="Average-pool candidate latents by this factor before decoding (pixel evaluators)."
    )
    evaluator: Literal["auto", "latent", "pixel"] = pydantic.Field(
        "auto",
        description="Candidate scorer: latent (the model's latent evaluators, no VAE), pixel (decode, score "
        "with `reward`), auto (latent where the model has latent evaluators, else pixel).",
    )
    latent_weights: str = pydantic.Field(
        "", description="Latent evaluators with weights, 'alignment:1,fidelity:0.5' ('': the weights saved with them)."
    )


@dataclass
class DynamicCFGState(PolicyState):
    model: DiffusionModel | None = None
    rewards: RewardModels | None = None  # the reward library passed down
    latent: LatentEvaluators | None = None  # the model's evaluators when scoring in latent space
    latent_weights: dict[str, float] = field(default_factory=dict)
    # what the latent evaluators read of the prompts, made at the first choice
    prompt_inputs: PromptInputs | None = None
    prompts: list[str] = field(default_factory=list)
    current: torch.Tensor | None = None  # the scale in force per image
    schedule: list[list[float]] = field(default_factory=list)


class DynamicCFG(GuidancePolicy):
    name = "dynamic_cfg"
    Params = DynamicCFGParams
    summary = "Dynamic CFG: per step and image, pick the candidate scale whose predicted image scores best."
    cost_field = "candidates"

    def start(self, ctx: SamplingContext) -> DynamicCFGState:
        p = self.params
        rewards = ctx.rewards or DEFAULT_REWARDS
        latent, weights = None, {}
        if ctx.model is not None and p.evaluator != "pixel":
            latent = evaluators_for(ctx.model)
            if latent is None and p.evaluator == "latent":
                raise InvalidInput(
                    "policy.evaluator",
                    "this model has no latent evaluators (train them with `diffsteer "
                    "train latent-evaluator`); accepted here: auto, pixel",
                )
            if latent is not None:
                weights = parse_weights(p.latent_weights, latent.kinds) if p.latent_weights else latent.default_weights
                if latent.reads_text_embedding(weights):
                    latent.text_tower(rewards)  # load (and check) the reward's text tower before sampling starts
        if ctx.model is not None and latent is None:
            rewards.get(p.reward, ctx.model.device)  # load (and validate) before sampling starts
        return DynamicCFGState(
            model=ctx.model,
            rewards=rewards,
            latent=latent,
            latent_weights=weights,
            prompts=list(ctx.prompts),
            current=torch.full((ctx.batch_size,), float(self.params.initial_scale)),
        )

    def step(self, state: DynamicCFGState, x: torch.Tensor, info: StepInfo, denoiser: Denoiser) -> torch.Tensor:
        p = self.params
        out = denoiser(x, info, ["uncond", "cond"])
        cond, uncond = out["cond"], out["uncond"]
        evaluating = p.start <= info.fraction < p.end and (info.index - _first_index(p, info)) % p.evaluate_every == 0
        if evaluating:
            choose = self._choose_latent if state.latent is not None else self._choose
            state.current = choose(state, cond, uncond, x, info, denoiser)
        state.schedule.append(state.current.tolist())
        state.trace["scale_schedule"] = state.schedule
        w = state.current.to(device=cond.device, dtype=cond.dtype).view(-1, *([1] * (cond.ndim - 1)))
        return uncond + w * (cond - uncond)

    def cost_per_step(self) -> float:
        """Two UNet rows, plus scoring the candidates at the steps that evaluate: a latent evaluation of a candidate
        counted as LATENT_SCORE_COST evaluations (``evaluator: latent``), a decode and a score as SCORE_COST at
        ``eval_downsample``'s reduced size (``pixel``, and ``auto``, which cannot know the model here: an upper
        bound)."""
        p = self.params
        evaluated = max(0.0, p.end - p.start) / p.evaluate_every
        per_candidate = LATENT_SCORE_COST if p.evaluator == "latent" else SCORE_COST / p.eval_downsample**2
        return 2.0 + evaluated * len(p.candidates) * per_candidate

    def _choose_latent(
        self, state: DynamicCFGState, cond, uncond, x, info: StepInfo, denoiser: Denoiser
    ) -> torch.Tensor:
        """The best candidate per image by the latent evaluators: all K × B candidates in one executor unit, batched
        (LATENT_CHUNK native-size candidates per evaluator call, so memory stays near cfg's for 32 candidates)."""
        p = self.params
        batch = cond.shape[0]
        with torch.no_grad():
            x0 = candidate_x0(cond, uncond, x, info, p.candidates)
        cost = LATENT_SCORE_COST * x0.shape[0] * x0.shape[-2] * x0.shape[-1] / native_latent_area(state.model)
        chunk = max(1, LATENT_CHUNK * native_latent_area(state.model) // (x0.shape[-2] * x0.shape[-1]))

        def score() -> torch.Tensor:
            if state.prompt_inputs is None:  # once per generation: an embedding evaluator's text tower runs here
                state.prompt_inputs = state.latent.prompt_inputs(
                    text_states(denoiser), state.prompts, state.rewards, state.latent_weights
                )
            inputs = state.prompt_inputs.repeat(len(p.candidates))
            return latent_scores(state.latent, x0, info.alpha_bar, inputs, state.latent_weights, chunk)

        scores = denoiser.executor.run(score, cost=cost).view(len(p.candidates), batch)
        return torch.tensor(p.candidates, dtype=torch.float32)[scores.argmax(dim=0)]

    def _choose(self, state: DynamicCFGState, cond, uncond, x, info: StepInfo, denoiser: Denoiser) -> torch.Tensor:
        """The best candidate per image. The K × B candidate images are decoded and scored in chunks of at most
        SCORE_CHUNK native-size images, each chunk one unit of ``executor`` (the device worker in the service),
        so memory stays bounded and other requests' UNet calls interleave with the scoring."""
        p = self.params
        executor = denoiser.executor
        batch = cond.shape[0]
        with torch.no_grad():
            x0 = candidate_x0(cond, uncond, x, info, p.candidates)
            if p.eval_downsample > 1:
                x0 = F.avg_pool2d(x0, p.eval_downsample)
        reward = state.rewards.get(p.reward, x0.device)
        prompts = state.prompts * len(p.candidates)
        chunk = score_chunk(state.model, x0.shape[-2] * x0.shape[-1])
        cost = SCORE_COST * x0.shape[-2] * x0.shape[-1] / native_latent_area(state.model)
        scores = torch.cat(
            [
                executor.run(
                    functools.partial(score_images, state.model, reward, x0[i : i + chunk], prompts[i : i + chunk]),
                    cost=cost * len(prompts[i : i + chunk]),
                )
                for i in range(0, x0.shape[0], chunk)
            ]
        ).view(len(p.candidates), batch)
        best = scores.argmax(dim=0)
        return torch.tensor(p.candidates, dtype=torch.float32)[best]


SCORE_CHUNK = 16  # candidate images of the model's native size decoded and scored at once
SCORE_COST = 1.0  # a decode and a score of one image, in UNet evaluations (a rough estimate, not measured per model)
LATENT_CHUNK = 64  # candidates of the native size scored per evaluator call, within the step's one executor unit
# the latent evaluators on one candidate, in UNet evaluations: an estimate for small evaluators like the proving
# ground's two 4×4-patch ones (their FLOPs and time against a UNet row: BENCHMARKS.md, section Dynamic CFG with
# latent evaluators)
LATENT_SCORE_COST = 0.02


def candidate_x0(
    cond: torch.Tensor, uncond: torch.Tensor, x: torch.Tensor, info: StepInfo, candidates: list[float]
) -> torch.Tensor:
    """[K·B, ...] the clean-latent prediction of every candidate scale, candidate-major: row k·B + b is image b
    at scale w_k, x0(ε_u + w_k·(ε_c − ε_u))."""
    return torch.cat([to_x0(cfg_combine(cond, uncond, w), x, info.level, info.prediction_type) for w in candidates])


@torch.no_grad()
def latent_scores(
    evaluators: LatentEvaluators,
    x0: torch.Tensor,
    alpha_bar: float,
    prompts: PromptInputs,
    weights: dict[str, float],
    chunk: int | None = None,
) -> torch.Tensor:
    """Σ_j λ_j·E_j of every row of ``x0``, float32 on the CPU: batched calls of at most ``chunk`` rows (None: all
    in one), so that the evaluators' activations stay small beside the UNet's (memory ∝ rows × latent area)."""
    chunk = chunk or x0.shape[0]
    return torch.cat(
        [
            evaluators.score(x0[i : i + chunk].float(), alpha_bar, prompts.rows(slice(i, i + chunk)), weights)
            .total.float()
            .cpu()
            for i in range(0, x0.shape[0], chunk)
        ]
    )


def native_latent_area(model: DiffusionModel) -> int:
    """Latent pixels of one image at the model's native size (UNets and transformers alike)."""
    size = model.native_size // model.vae_scale_factor
    return size * size


def score_chunk(model: DiffusionModel, latent_area: int) -> int:
    """Images per scoring unit: SCORE_CHUNK at the native size, fewer for larger latents (memory ∝ pixels)."""
    return max(1, int(SCORE_CHUNK * native_latent_area(model) / latent_area))


@torch.no_grad()
def score_images(model: DiffusionModel, reward: CompositeReward, x0: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Reward of the decoded clean-latent predictions ``x0``, as float32 on the CPU."""
    return reward.evaluate(decode(model, x0), prompts).total_score.float().cpu()


def _first_index(p: DynamicCFGParams, info: StepInfo) -> int:
    """Index of the first step inside the evaluation window (the cadence counts from there)."""
    return math.ceil(p.start * info.num_steps)
