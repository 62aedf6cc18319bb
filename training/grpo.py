"""Flow-GRPO: online reinforcement learning of a flow-matching model with group-relative policy optimisation.

Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL" (arXiv 2505.05470). Each step:

1. **Rollouts with the SDE** (Sec. 4.2, :mod:`diffsteer.training.flow_sde`): G images per prompt are sampled by
   the stochastic sampler whose marginals are the flow ODE's, x_{t+Δt} ~ N(μ_θ(x_t), s_t²I) with noise level a
   (``noise_level``), recording every state and the log-probability log π_θold(x_{t+Δt} | x_t) of each
   stochastic transition. Rollouts use CFG at ``rollout_cfg`` and ``sample_steps`` steps, fewer than the
   evaluation's ``steps`` (*denoising reduction*, Sec. 4.3: 10 training steps against 40 in the paper).
   With ``sde_window`` = K > 0 only K consecutive steps are stochastic, the window's start drawn per step, and
   the others are Euler ODE steps (MixGRPO, Li et al. 2025, arXiv 2507.21802; Flow-GRPO-Fast): only the
   window's transitions are trained, which divides the cost of a step by steps/K.
2. **Rewards and group advantages** (eq. 4): any ``rewards/`` spec or weighted composite; Â_i =
   (R_i − mean_G)/(std_G + 1e-4) within each prompt's group, over every process
   (:mod:`diffsteer.training.group_advantages`), clipped to ±``adv_clip_max``.
3. **The clipped surrogate with a KL penalty** (eq. 5–6), averaged over images and trained transitions:

       ρ_t = π_θ(x_{t+Δt} | x_t) / π_θold(x_{t+Δt} | x_t)
       L = mean[ max(−Â·ρ_t, −Â·clip(ρ_t, 1 − ε, 1 + ε)) ] + β_KL·mean[ ‖μ_θ − μ_ref‖² / (2 s_t²) ]

   with ε = ``clip_range`` (1e-4 in the paper: log-probabilities are per-element means, so ratios stay near 1)
   and the KL to the reference policy (the base model: LoRA off) in closed form for Gaussian transitions.
   ``updates_per_rollout`` optimizer steps are taken on each round's rollouts (PPO's epochs): the first is
   on-policy (ρ = 1 exactly, the check the paper's users recommend; logged as ``ratio_dev.first``, the largest
   |ρ − 1| of the first pass, which is 0 unless sampling and training disagree numerically), the later ones
   off-policy, where the clip acts.

Flow models only (SD3, FLUX, Qwen-Image, Z-Image, the flow proving ground): the SDE is built on the rectified-flow
ODE's velocity and score; UNet (VP) models would need DDPO's DDIM-with-η likelihoods instead, which this file
does not implement — they are refused naming the field. (DiffusionNFT, :mod:`diffsteer.training.nft`, trains both.)

    diffsteer train grpo --config grpo-proving-ground [--resume] [--set max_steps=200]
    torchrun --nproc_per_node 2 -m diffsteer.training.grpo --config grpo.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from diffsteer.guidance.denoiser import StepInfo
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.parameterisation import NoiseLevel
from diffsteer.guidance.sampler import PreparedGeneration, draw_noise
from diffsteer.training.cli import run_method
from diffsteer.training.flow_sde import gaussian_log_prob, sde_transition, transition_kl
from diffsteer.training.online_rl import GroupRolloutConfig, GroupRolloutTrainer, RolloutBatch
from diffsteer.training.trainer import with_default


@dataclass
class GRPOConfig(GroupRolloutConfig):
    """Flow-GRPO (training/grpo.py): group-relative policy optimisation through the flow SDE."""

    output_dir: str = with_default("output_dir", "runs/grpo")
    adapter_name: str = with_default("adapter_name", "grpo")
    scheduler: str = with_default("scheduler", "euler")
    noise_level: float = field(
        default=0.7, metadata={"help": "a of the SDE's σ_t = a·√(t/(1 − t)) (0: the ODE; the paper's 0.7)."}
    )
    clip_range: float = field(default=1e-4, metadata={"help": "ε of the clipped importance ratio, clip(ρ, 1 ± ε)."})
    sde_window: int = field(
        default=0,
        metadata={
            "help": "Stochastic (and trained) steps per rollout, consecutive, the window's start drawn per step; "
            "the others are ODE steps (MixGRPO). 0: every step."
        },
    )
    updates_per_rollout: int = field(
        default=2,
        metadata={
            "help": "Optimizer steps on each round's rollouts (the first on-policy, ratio 1; the clip acts on the "
            "later ones)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noise_level < 0:
            raise InvalidInput("noise_level", f"must be non-negative, got {self.noise_level}")
        if not 0 < self.clip_range < 1:
            raise InvalidInput("clip_range", f"must be in (0, 1), got {self.clip_range}")
        if not 0 <= self.sde_window <= self.sample_steps:
            raise InvalidInput(
                "sde_window", f"must be in [0, sample_steps = {self.sample_steps}], got {self.sde_window}"
            )
        if self.updates_per_rollout < 1:
            raise InvalidInput("updates_per_rollout", f"must be at least 1, got {self.updates_per_rollout}")


@dataclass
class GRPORollout:
    batch: RolloutBatch
    prepared: PreparedGeneration
    state: object  # the rollout policy's state (CFG keeps none that changes its output)
    timesteps: torch.Tensor
    sigmas: list[float]  # the σ grid, one more than the steps (ends at 0)
    latents: list[torch.Tensor]  # x at every step, then the final sample
    log_probs: dict[int, torch.Tensor]  # step -> log π_old(x_{i+1} | x_i) per image, for the stochastic steps
    rewards: np.ndarray


class GRPOTrainer(GroupRolloutTrainer):
    """Runs one Flow-GRPO job described by a :class:`GRPOConfig` (see the module docstring)."""

    name = "grpo"
    config: GRPOConfig
    rollout_scheduler = "euler"  # the SDE replaces its steps

    def build(self) -> None:
        if self.model.family.schedule != "flow":
            raise InvalidInput(
                "model",
                f"{self.config.model!r} is a {self.model.family.title} (VP) model; Flow-GRPO's SDE needs a flow-matching "
                "model (SD3, FLUX, ...): use diffsteer train nft or alignprop for UNet models",
            )
        super().build()

    def draw_extra(self, rng: np.random.Generator, n: int):
        c = self.config
        width = c.sde_window or c.sample_steps
        return {"window_start": int(rng.integers(0, c.sample_steps - width + 1))}, {}

    def stochastic_steps(self, batch: RolloutBatch) -> range:
        width = self.config.sde_window or self.config.sample_steps
        return range(batch.shared["window_start"], batch.shared["window_start"] + width)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def rollout(self, batch: RolloutBatch) -> GRPORollout:
        """Sample ``batch`` with the SDE inside the window and Euler steps outside, recording every state and the
        stochastic transitions' log-probabilities; score the samples. Each image's SDE noise comes from its own
        generator (after its initial noise), so it does not depend on the batch it is in."""
        c = self.config
        prepared = self.prepare_rollout(batch)
        scheduler, timesteps, state = prepared.scheduler_and_state()
        sigmas = [float(s) for s in scheduler.sigmas]
        generators = prepared.generators()
        denoiser = self.denoiser(prepared)
        stochastic = self.stochastic_steps(batch)
        x = prepared.noise.float()
        latents, log_probs = [x], {}
        for i in range(len(timesteps)):
            velocity = self.guided_output(prepared, state, denoiser, x, self.step_info(timesteps, sigmas, i))
            if i in stochastic:
                mean, std = sde_transition(x, velocity, sigmas[i], sigmas[i + 1], c.noise_level, sigmas[1])
                x = mean + std * draw_noise(generators, tuple(x.shape[1:]), x.device)
                log_probs[i] = gaussian_log_prob(x, mean, std)
            else:
                x = x + velocity * (sigmas[i + 1] - sigmas[i])
            latents.append(x)
        return GRPORollout(batch, prepared, state, timesteps, sigmas, latents, log_probs, self.score(x, batch.prompts))

    def step_info(self, timesteps: torch.Tensor, sigmas: list[float], i: int) -> StepInfo:
        model = self.model
        return StepInfo(
            i,
            len(timesteps),
            timesteps[i],
            NoiseLevel.flow(sigmas[i]),
            model.prediction_type,
            model.family.patch_size(model),
        )

    def transition(self, rollout: GRPORollout, i: int, backbone=None) -> tuple[torch.Tensor, float]:
        """(μ, s) of step ``i``'s transition from the recorded x_i under the current weights (or ``backbone``)."""
        sigmas, x = rollout.sigmas, rollout.latents[i]
        denoiser = self.denoiser(rollout.prepared, backbone)
        velocity = self.guided_output(
            rollout.prepared, rollout.state, denoiser, x, self.step_info(rollout.timesteps, sigmas, i)
        )
        return sde_transition(x, velocity, sigmas[i], sigmas[i + 1], self.config.noise_level, sigmas[1])

    # ------------------------------------------------------------------ training

    def policy_update(self, rollouts: list[GRPORollout], advantages: list[np.ndarray]) -> dict[str, float]:
        c = self.config
        totals: dict[str, float] = {}
        collected: dict[str, list[float]] = {}
        count = sum(len(r.log_probs) for r in rollouts)
        for update in range(c.updates_per_rollout):
            for rollout, advantage in zip(rollouts, advantages):
                adv = torch.as_tensor(advantage, dtype=torch.float32, device=self.device)
                for i, old_log_prob in rollout.log_probs.items():
                    loss, metrics = self.transition_loss(rollout, i, old_log_prob, adv)
                    self.backward(loss / count)
                    for k, v in metrics.items():
                        collected.setdefault(k, []).append(v)
            if update == 0:
                totals["ratio_dev.first"] = max(collected["ratio_dev"])
            totals.update(self.optimizer_step())
        totals.update({k: float(np.mean(v)) for k, v in collected.items()})
        totals["ratio_dev"] = max(collected["ratio_dev"])
        return totals

    def transition_loss(
        self, rollout: GRPORollout, i: int, old_log_prob: torch.Tensor, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Clipped surrogate (+ KL) of step ``i``'s transitions of one rollout micro-batch."""
        c = self.config
        mean, std = self.transition(rollout, i)
        log_prob = gaussian_log_prob(rollout.latents[i + 1], mean, std)
        loss, ratio = clipped_surrogate(log_prob, old_log_prob, advantages, c.clip_range)
        metrics = {
            "policy_loss": float(loss.detach()),
            "ratio_dev": float((ratio.detach() - 1).abs().max()),
            "clip_fraction": float(((ratio.detach() - 1).abs() > c.clip_range).float().mean()),
            "approx_kl": float(0.5 * ((log_prob.detach() - old_log_prob) ** 2).mean()),
        }
        if c.kl_beta > 0:
            with torch.no_grad(), self.reference() as reference:
                reference_mean, _ = self.transition(rollout, i, reference)
            kl = transition_kl(mean, reference_mean, std).mean()
            loss = loss + c.kl_beta * kl
            metrics["kl"] = float(kl.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics


# ----------------------------------------------------------------------------- the method's math


def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a loss (Flow-GRPO eq. 5): mean over samples of
    max(−Â·ρ, −Â·clip(ρ, 1 − ε, 1 + ε)), ρ = exp(log π_θ − log π_old); returns (loss, ρ)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


def main(argv: list[str] | None = None) -> int:
    """``python -m diffsteer.training.grpo`` (and ``torchrun ... -m diffsteer.training.grpo``): ``diffsteer train grpo``."""
    return run_method("grpo", argv)


if __name__ == "__main__":
    raise SystemExit(main())
