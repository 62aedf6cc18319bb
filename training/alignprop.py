"""AlignProp: reward fine-tuning of a text-to-image model by backpropagating the reward through sampling.

Prabhudesai, Goyal, Pathak & Fragkiadaki 2023, "Aligning Text-to-Image Diffusion Models with Reward
Backpropagation" (arXiv:2310.03739). With a LoRA adapter θ on the backbone (the paper's UNet, or a flow-matching
transformer: SD3, FLUX.1, ...), images are sampled by the full reverse process x_T ~ N(0, I) → x_0 = f_θ(x_T, c),
decoded by the VAE, and the model is trained to maximise a differentiable reward by gradient ascent through the
whole chain (Sec. 4.1):

    θ ← θ + η ∇_θ E_{c, x_T}[ r(D(f_θ(x_T, c)), c) ]

made affordable by (Sec. 4.2) LoRA, gradient checkpointing of every backbone call (memory independent of the
number of steps, at one extra forward each) and randomized truncated backpropagation (the gradient flows
through the last K steps only; see :mod:`diffsteer.training.truncation` for the strategies and how K is drawn). Here the
reward is any composite of :mod:`rewards` and the objective is its ReNO-style loss Σ_i w_i (o_i − r_i), whose
gradient is that of −Σ_i w_i r_i. Sampling is the project's own sampler under any guidance policy (CFG by
default; APG, schedules, ...) with any scheduler of the model's schedule (DDIM with ``eta`` as in the paper for
UNets; for a flow model f_θ is the ODE solver over the velocity field, e.g. ``scheduler: euler``: x_{σ'} = x_σ +
(σ' − σ)·v_θ(x_σ, σ, c), so the same chain rule runs through every Euler step, and each transformer call in the
backward window is recomputed instead of stored).

The loop, the adapter, checkpoints, evaluation and export are the shared trainer's (:mod:`diffsteer.training.trainer`);
this file is the method: its config fields, :meth:`AlignPropTrainer.draw_batch` and the rollout loss.
Everything random in a step (prompts, seeds, truncation windows) is drawn for the whole global batch from a
generator seeded by (``seed``, step), and each process takes its share, so a resumed run repeats the
uninterrupted one exactly and N processes with ``batch_size`` B train as one process with B·N.

    diffsteer train alignprop --config alignprop.yaml [--resume] [--set max_steps=200]
    diffsteer train alignprop --print-config > alignprop.yaml
    torchrun --nproc_per_node 2 -m diffsteer.training.alignprop --config alignprop.yaml   # 2 processes (GPUs or CPU)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.latents import decode
from diffsteer.guidance.request import Limits
from diffsteer.guidance.reward_models import get_reward
from diffsteer.guidance.sampler import prepare
from diffsteer.training.cli import run_method
from diffsteer.training.prompts import load_training_prompts
from diffsteer.training.trainer import EvalResult, Trainer, TrainerConfig, TrainingInterrupted, with_default  # noqa: F401 (re-exported)
from diffsteer.training.truncation import STRATEGIES, TruncationStrategy, draw_truncation, window_mask


@dataclass
class AlignPropConfig(TrainerConfig):
    """AlignProp: LoRA fine-tuning by reward backpropagation through the sampler (training/alignprop.py)."""

    output_dir: str = with_default("output_dir", "runs/alignprop")
    adapter_name: str = with_default("adapter_name", "alignprop")
    # --- data and objective
    prompts: str = field(
        default="pg-train:all",
        metadata={"help": "Training prompts: pg-train:all, pg-train:CATEGORY[,...], or a text / GenEval / Parti file."},
    )
    reward: str = field(
        default="clip:1",
        metadata={
            "help": "Differentiable reward, 'name:weight[:offset],...' (e.g. 'hps:1', 'aesthetic:1,clip:0.01'); "
            "weights are configured as for the service (the proving-ground clip needs none). Also scored "
            "on the evaluation images unless eval_reward is set."
        },
    )
    # --- truncated backpropagation
    truncation: TruncationStrategy = field(
        default="fixed",
        metadata={"help": f"How many final steps each trajectory backpropagates through: {', '.join(STRATEGIES)}."},
    )
    truncation_k: int = field(default=1, metadata={"help": "fixed: K (K ≥ steps: full backpropagation)."})
    truncation_k_min: int = field(default=1, metadata={"help": "uniform: smallest K."})
    truncation_k_max: int = field(default=10, metadata={"help": "uniform: largest K."})
    truncation_k_mean: float = field(default=5.0, metadata={"help": "gaussian: mean of K."})
    truncation_k_std: float = field(default=2.0, metadata={"help": "gaussian: standard deviation of K."})
    gradient_checkpointing: bool = field(
        default=True,
        metadata={
            "help": "Recompute every backbone call (UNet or transformer) and the VAE decoder in the backward pass "
            "instead of storing activations."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.truncation_k < 1:
            raise InvalidInput("truncation_k", f"must be at least 1, got {self.truncation_k}")
        if self.truncation_k_std < 0:
            raise InvalidInput("truncation_k_std", f"must be non-negative, got {self.truncation_k_std}")
        if self.truncation == "uniform" and not 1 <= self.truncation_k_min <= self.truncation_k_max:
            raise InvalidInput("truncation_k_min", "uniform truncation needs 1 ≤ truncation_k_min ≤ truncation_k_max")
        if self.sharding == "fsdp" and self.truncation != "fixed":
            raise InvalidInput(
                "truncation",
                "sharding: fsdp needs truncation: fixed (every process must backpropagate through the same steps: "
                "each recorded transformer call gathers the sharded weights again in the backward pass)",
            )


class AlignPropTrainer(Trainer):
    """Runs one AlignProp job described by an :class:`AlignPropConfig` (see the module docstring)."""

    name = "alignprop"
    config: AlignPropConfig

    def build(self) -> None:
        """The shared LoRA (or full backbone), the reward, the prompts; the rollout settings checked up front."""
        c = self.config
        super().build()
        self.reward = get_reward(c.reward, self.device, torch.float32, field="reward")
        if not self.reward.differentiable:
            raise InvalidInput("reward", f"{c.reward!r} has a non-differentiable term; AlignProp needs gradients")
        self.train_prompts = load_training_prompts(c.prompts)
        self._check_rollout()

    def _check_rollout(self) -> None:
        """Validate the sampling fields (policy, scheduler, size...) before any training work."""
        prepare(self.model, self.generation_params(self.train_prompts[:1], [0]), limits=self._limits())

    def _limits(self):
        n = max(self.config.batch_size, self.config.eval_batch_size)
        return Limits(max_num_images=max(n, Limits.max_num_images))

    def eval_reward(self) -> str:
        return self.config.eval_reward or self.config.reward

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['reward']:.4g}", "k": f"{metrics['k_mean']:.3g}"}

    # ------------------------------------------------------------------ one micro-batch

    def draw_batch(self, step: int, micro: int) -> tuple[list[str], list[int], np.ndarray]:
        """This process's prompts, seeds and truncation K of micro-batch ``micro``, cut from the step's global batch."""
        c = self.config
        rng, n, share = self.step_rng(step), self.global_batch_size, self.shard(micro)
        prompts = [self.train_prompts[i] for i in rng.integers(0, len(self.train_prompts), n)[share]]
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, n)[share]]
        ks = draw_truncation(
            c.truncation,
            rng,
            n,
            c.steps,
            k=c.truncation_k,
            k_min=c.truncation_k_min,
            k_max=c.truncation_k_max,
            k_mean=c.truncation_k_mean,
            k_std=c.truncation_k_std,
        )[share]
        return prompts, seeds, ks

    def compute_loss(self, batch: tuple[list[str], list[int], np.ndarray]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.rollout_loss(*batch)

    def rollout_loss(
        self, prompts: list[str], seeds: list[int], ks: np.ndarray
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Sample with gradients through each image's last K steps, decode, score; the loss and its metrics."""
        c = self.config
        with self.autocast():
            prepared = prepare(
                self.model,
                self.generation_params(prompts, seeds),
                limits=self._limits(),
                gradient_checkpointing=c.gradient_checkpointing,
            )
            trajectory = prepared.run(grad_at_step=window_mask(ks, c.steps))
            images = decode(self.model, trajectory.latents, checkpoint=c.gradient_checkpointing)
        result = self.reward.evaluate(images.float(), prompts)
        metrics = {"reward": float(result.total_score.detach().mean())}
        if len(result.scores) > 1:
            metrics.update({f"reward.{n}": float(s.detach().mean()) for n, s in result.scores.items()})
        metrics["k_mean"] = float(np.mean(ks))
        return result.loss, metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m diffsteer.training.alignprop`` (and ``torchrun ... -m diffsteer.training.alignprop``): the same as
    ``diffsteer train alignprop``."""
    return run_method("alignprop", argv)


if __name__ == "__main__":
    raise SystemExit(main())
