"""What the online-RL trainers share (Flow-GRPO, :mod:`diffsteer.training.grpo`; DiffusionNFT,
:mod:`diffsteer.training.nft`): groups of rollouts per prompt, their rewards, group-normalised advantages over
every process, the reference model (the base: LoRA off), and the model calls on a rollout's conditions.

One optimizer-step round (:meth:`GroupRolloutTrainer.training_step`):

1. every micro-batch's share of the step's global batch is drawn (:meth:`draw_batch`): ``global batch /
   group_size`` prompts from the step's generator, each repeated ``group_size`` times (a group is G consecutive
   positions of the global batch), and one seed per image; N processes with ``batch_size`` B hold exactly the
   images one process with N·B holds;
2. the method samples them (:meth:`rollout`, no gradients) and scores them with the reward (any ``rewards/`` spec
   or weighted composite, ``'a:0.7,b:0.3'``);
3. the rewards of every process are gathered and normalised within each group
   (:func:`diffsteer.training.group_advantages.group_advantages`), clipped to ±``adv_clip_max``;
4. the method trains on its rollouts and advantages (:meth:`policy_update`), calling
   ``self.optimizer_step()`` as often as it updates.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.latents import decode
from diffsteer.guidance.request import Limits
from diffsteer.guidance.reward_models import get_reward
from diffsteer.guidance.sampler import PreparedGeneration, prepare
from diffsteer.training.group_advantages import gather_global, group_advantages
from diffsteer.training.lora import has_lora
from diffsteer.training.prompts import load_training_prompts
from diffsteer.training.trainer import Trainer, TrainerConfig


@dataclass
class GroupRolloutConfig(TrainerConfig):
    """Fields of the online-RL methods (training/online_rl.py): prompts, reward, groups, rollouts."""

    prompts: str = field(
        default="pg-train:all",
        metadata={"help": "Training prompts: pg-train:all, pg-train:CATEGORY[,...], or a text / GenEval / Parti file."},
    )
    reward: str = field(
        default="clip:1",
        metadata={
            "help": "Reward of the rollouts, 'name:weight,...' (any reward of rewards/, or a weighted composite such "
            "as 'clip:0.7,aesthetic:0.3'); need not be differentiable. Also scored on the evaluation images unless "
            "eval_reward is set, beside the verifier, so reward hacking shows as a widening gap."
        },
    )
    group_size: int = field(
        default=4, metadata={"help": "Images per prompt (G); advantages are normalised within each group."}
    )
    sample_steps: int = field(
        default=10,
        metadata={"help": "Denoising steps of the training rollouts (fewer than the evaluation's `steps`)."},
    )
    rollout_cfg: float = field(
        default=4.5, metadata={"help": "Classifier-free guidance scale of the rollouts (≤ 1: none)."}
    )
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to ±adv_clip_max."})
    kl_beta: float = field(
        default=0.04, metadata={"help": "Weight of the KL penalty to the reference model (the base, LoRA off)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("group_size", "sample_steps"):
            if getattr(self, name) < 1:
                raise InvalidInput(name, f"must be at least 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise InvalidInput("group_size", f"must be at least 2 (advantages compare a group), got {self.group_size}")
        if self.adv_clip_max <= 0:
            raise InvalidInput("adv_clip_max", f"must be positive, got {self.adv_clip_max}")
        if self.kl_beta < 0:
            raise InvalidInput("kl_beta", f"must be non-negative, got {self.kl_beta}")
        if not 0 <= self.rollout_cfg <= 100:
            raise InvalidInput("rollout_cfg", f"must be in [0, 100], got {self.rollout_cfg}")


@dataclass
class RolloutBatch:
    """This process's share of one micro-batch: prompts and seeds of the global positions ``start`` onwards."""

    prompts: list[str]
    seeds: list[int]
    start: int
    shared: dict[str, Any] = field(default_factory=dict)  # the method's other draws, the same for every image
    per_image: dict[str, np.ndarray] = field(default_factory=dict)  # and its per-image draws (this share)


class GroupRolloutTrainer(Trainer):
    """The shared round of the online-RL methods (module docstring); a method fills in :meth:`rollout`,
    :meth:`policy_update` and, for more per-step draws, :meth:`draw_extra`."""

    config: GroupRolloutConfig
    rollout_scheduler = "euler"

    def build(self) -> None:
        c = self.config
        super().build()
        if self.global_batch_size % c.group_size:
            raise InvalidInput(
                "group_size",
                f"{c.group_size} does not divide the global batch of {self.global_batch_size} images "
                "(batch_size × processes × gradient_accumulation_steps)",
            )
        self.reward = get_reward(c.reward, self.device, torch.float32, field="reward")
        self.train_prompts = load_training_prompts(c.prompts)
        self.frozen_reference: torch.nn.Module | None = None
        if c.kl_beta > 0 and not has_lora(self.model.backbone):  # full weights: the base is a frozen copy
            self.frozen_reference = copy.deepcopy(self.model.backbone).requires_grad_(False).eval()
        self.prepare_rollout(RolloutBatch(self.train_prompts[:1], [0], 0))  # bad sampling fields fail here

    def eval_reward(self) -> str:
        return self.config.eval_reward or self.config.reward

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics.get('reward', float('nan')):.4g}", "loss": f"{metrics.get('loss', 0.0):.3g}"}

    # ------------------------------------------------------------------ data

    def draw_batch(self, step: int, micro: int) -> RolloutBatch:
        """This process's share of micro-batch ``micro``: the step's prompts (one per group, repeated G times) and
        per-image seeds, drawn for the whole global batch from ``step_rng(step)``."""
        c = self.config
        rng, n, share = self.step_rng(step), self.global_batch_size, self.shard(micro)
        groups = rng.integers(0, len(self.train_prompts), n // c.group_size)
        prompts = [self.train_prompts[i] for i in np.repeat(groups, c.group_size)]
        seeds = rng.integers(0, 2**31 - 1, n)
        shared, per_image = self.draw_extra(rng, n)
        return RolloutBatch(
            prompts[share],
            [int(s) for s in seeds[share]],
            share.start,
            shared,
            {k: v[share] for k, v in per_image.items()},
        )

    def draw_extra(self, rng: np.random.Generator, n: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """More draws of the step from its generator, after prompts and seeds: (the same for every image, one row
        per image of the global batch, cut to this process's share)."""
        return {}, {}

    # ------------------------------------------------------------------ sampling and scoring

    def rollout_model(self):
        """The model the rollouts sample from (default: the trained one)."""
        return self.model

    def prepare_rollout(self, batch: RolloutBatch, model=None) -> PreparedGeneration:
        """The batch's prompts encoded and noise drawn, for ``sample_steps`` steps of ``rollout_scheduler`` under
        CFG at ``rollout_cfg``."""
        c = self.config
        params = self.generation_params(batch.prompts, batch.seeds)
        params.update(steps=c.sample_steps, scheduler=self.rollout_scheduler, policy=f"cfg:scale={c.rollout_cfg}")
        limits = Limits(max_num_images=max(len(batch.prompts), Limits.max_num_images))
        try:
            return prepare(model or self.model, params, limits=limits)
        except InvalidInput as e:
            field_name = {"steps": "sample_steps", "scheduler": "scheduler"}.get(e.field, e.field)
            raise InvalidInput(field_name, e.reason) from None

    def denoiser(self, prepared: PreparedGeneration, backbone: torch.nn.Module | None = None) -> Denoiser:
        """Model calls on the rollout's encoded conditions, of ``backbone`` (default: the trained one)."""
        model = self.model
        return Denoiser(
            backbone if backbone is not None else model.backbone,
            prepared.conditions,
            model.prediction_type,
            aliases=prepared.aliases,
            forward=model.family.forward,
        )

    def guided_output(
        self, prepared: PreparedGeneration, state: Any, denoiser: Denoiser, x: torch.Tensor, info: StepInfo
    ) -> torch.Tensor:
        """The rollout policy's (CFG's) model output at ``x``, in float32."""
        with self.autocast():
            return prepared.policy.step(state, x, info, denoiser).float()

    @torch.no_grad()
    def score(self, latents: torch.Tensor, prompts: list[str]) -> np.ndarray:
        """The reward of each image (decoded from ``latents``), as float64."""
        with self.autocast():
            images = decode(self.model, latents)
        return self.reward.evaluate(images.float(), prompts).total_score.double().cpu().numpy()

    @contextlib.contextmanager
    def reference(self):
        """The reference backbone (the base model): the LoRA switched off for the duration, or the frozen copy of
        the base weights when every weight trains."""
        if self.frozen_reference is not None:
            yield self.frozen_reference
            return
        backbone = self.model.backbone
        backbone.disable_adapters()
        try:
            yield backbone
        finally:
            backbone.enable_adapters()

    # ------------------------------------------------------------------ one round

    def rollout(self, batch: RolloutBatch) -> Any:
        """Sample and score ``batch`` (no gradients); the result has ``rewards`` (one per image)."""
        raise NotImplementedError

    def policy_update(self, rollouts: list[Any], advantages: list[np.ndarray]) -> dict[str, float]:
        """Train on this process's rollouts (one per micro-batch) with their advantages; step the optimiser."""
        raise NotImplementedError

    def training_step(self) -> dict[str, float]:
        c = self.config
        batches = [self.draw_batch(self.step, micro) for micro in range(c.gradient_accumulation_steps)]
        rollouts = [self.rollout(b) for b in batches]
        n = self.global_batch_size
        rewards = gather_global(self.processes, {b.start: r.rewards for b, r in zip(batches, rollouts)}, n)
        normalised = np.clip(group_advantages(rewards, c.group_size), -c.adv_clip_max, c.adv_clip_max)
        advantages = [normalised[b.start : b.start + len(b.prompts)] for b in batches]
        metrics = self.policy_update(rollouts, advantages)
        groups = rewards.reshape(-1, c.group_size)
        metrics.update(
            reward=float(rewards.mean()),
            reward_group_std=float(groups.std(axis=1).mean()),
            zero_std_groups=float((groups.std(axis=1) == 0).mean()),
        )
        for name in self.emas:
            self.update_ema(name)
        return metrics
