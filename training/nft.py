"""DiffusionNFT: online reinforcement learning of a diffusion model on the forward process.

Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process" (arXiv 2509.16117). Images
are sampled from the *old* policy v_old with any solver (no likelihoods, no SDE, no trajectory kept: only the
clean samples x0), scored, and the reward becomes an optimality weight r ∈ [0, 1]. The model is then trained on
the ordinary forward process x_t = (1 − t)·x0 + t·ε with the flow-matching target v* = ε − x0, through two
*implicit* policies built from the trained velocity v_θ and the frozen old one (Sec. 3.2, eq. 6):

    v⁺ = (1 − β)·v_old + β·v_θ            (the positive policy)
    v⁻ = (1 + β)·v_old − β·v_θ            (the negative policy: v_old's reflection through v⁺)

    L(θ) = E[ r·‖v⁺ − v*‖² + (1 − r)·‖v⁻ − v*‖² ]                                        (eq. 7)

so good samples pull v⁺ towards them and bad ones push v⁻ towards them, which moves v_θ away from them; the
optimum is v_θ = v_old + (2/β)·Δ with Δ the reinforcement direction (Theorem 3.1). As in the authors' code:

- r: the group-normalised advantage Â (:mod:`diffsteer.training.group_advantages`) clipped to ±C
  (``adv_clip_max``) and mapped to r = clip(Â/(2C) + 0.5, 0, 1);
- the squared errors are taken on the implied clean images x0^± = x_t − t·v^± (x0^± − x0 = t·(v* − v^±): the
  velocity error weighted by t²), each divided by its own detached mean absolute error (their *adaptive
  weighting*, ``weighting: adaptive``; ``uniform`` keeps the plain x0 error), and the loss is scaled by C/β;
- a KL-type penalty ``kl_beta``·‖v_θ − v_ref‖² to the base model (LoRA off);
- the old policy is a frozen copy that follows the trained weights after every step,
  old ← d·old + (1 − d)·θ, with d = min(``old_decay_rate``·(step − ``old_decay_start``), ``old_decay_max``)
  (0 before ``old_decay_start``): their ``decay_type`` 1 is rate 0.001, max 0.5, start 0;
- sampling is CFG-free: rollouts and the trained model's evaluation at guidance 1 (``rollout_cfg: 1``,
  ``policy: cfg:scale=1``), the model being trained to need no guidance.

Families: written on the implied clean images, the objective needs only x0 = f(model output, x_t, level), which
:mod:`diffsteer.guidance.parameterisation` gives for every prediction type, and x0^± are the same affine
combinations of x0_θ and x0_old as v^± of the outputs (x0 is affine in the output at fixed x_t). On flow models
(SD3, FLUX, ...) it is the paper's loss exactly; on UNet models (ε or v prediction) it is the same objective on
the VP forward process x_t = √ᾱ·x0 + √(1 − ᾱ)·ε at the sampler's timesteps — the paper's argument (the optimum
is a reward-tilted mixture of the two implicit policies' data) holds for any denoiser trained by x0 regression,
but only the flow case is the one the paper evaluates.

    diffsteer train nft --config nft-proving-ground [--resume] [--set max_steps=200]
    torchrun --nproc_per_node 2 -m diffsteer.training.nft --config nft.yaml
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from diffsteer.guidance.denoiser import StepInfo
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.parameterisation import add_noise, to_x0
from diffsteer.guidance.sampler import PreparedGeneration, make_scheduler, step_levels
from diffsteer.training.cli import run_method
from diffsteer.training.lora import has_lora
from diffsteer.training.online_rl import GroupRolloutConfig, GroupRolloutTrainer, RolloutBatch
from diffsteer.training.trainer import RegisteredEMA, with_default


@dataclass
class NFTConfig(GroupRolloutConfig):
    """DiffusionNFT (training/nft.py): forward-process RL on implicit positive and negative policies."""

    output_dir: str = with_default("output_dir", "runs/nft")
    adapter_name: str = with_default("adapter_name", "nft")
    policy: str = with_default("policy", "cfg:scale=1")
    rollout_cfg: float = field(
        default=1.0, metadata={"help": "Guidance scale of the rollouts (1: CFG-free, as the paper samples)."}
    )
    kl_beta: float = field(
        default=1e-4, metadata={"help": "Weight of ‖v_θ − v_ref‖² to the base model's output (LoRA off)."}
    )
    beta: float = field(
        default=1.0, metadata={"help": "β of the implicit policies v± (how far v_θ moves from v_old per unit)."}
    )
    train_timesteps: int = field(
        default=2,
        metadata={"help": "Noise levels per image per step, drawn without repeats from the rollout sampler's grid."},
    )
    weighting: Literal["adaptive", "uniform"] = field(
        default="adaptive",
        metadata={
            "help": "adaptive: each x0 error divided by its detached mean absolute error (the authors'); "
            "uniform: the plain x0 error."
        },
    )
    old_decay_rate: float = field(
        default=0.001, metadata={"help": "The old policy's EMA decay grows by this per step after old_decay_start."}
    )
    old_decay_max: float = field(default=0.5, metadata={"help": "Largest decay of the old policy's EMA."})
    old_decay_start: int = field(default=0, metadata={"help": "Steps during which the old policy copies θ (decay 0)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise InvalidInput("beta", f"must be positive, got {self.beta}")
        if not 1 <= self.train_timesteps <= self.sample_steps:
            raise InvalidInput(
                "train_timesteps", f"must be in [1, sample_steps = {self.sample_steps}], got {self.train_timesteps}"
            )
        if not 0 <= self.old_decay_max < 1:
            raise InvalidInput("old_decay_max", f"must be in [0, 1), got {self.old_decay_max}")
        if self.old_decay_rate < 0 or self.old_decay_start < 0:
            raise InvalidInput("old_decay_rate", "old_decay_rate and old_decay_start must be non-negative")


@dataclass
class NFTRollout:
    batch: RolloutBatch
    prepared: PreparedGeneration
    clean: torch.Tensor  # x0: the old policy's samples
    rewards: np.ndarray


class NFTTrainer(GroupRolloutTrainer):
    """Runs one DiffusionNFT job described by an :class:`NFTConfig` (see the module docstring)."""

    name = "nft"
    config: NFTConfig

    @property
    def rollout_scheduler(self) -> str:
        return self.config.scheduler  # any solver

    def build(self) -> None:
        super().build()
        backbone = self.model.backbone
        # the old policy: a copy of the LoRA's parameters swapped in for its calls, or of the whole backbone
        average = None if has_lora(backbone) else copy.deepcopy(backbone).requires_grad_(False).eval()
        self.old = RegisteredEMA(backbone, average, 0.0)
        self.old.reset()

    def extra_state(self) -> dict[str, Any]:
        return {"old_policy": self.old.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.old.load_state_dict(state["old_policy"])

    @contextlib.contextmanager
    def old_policy(self):
        """The model with the old policy's weights, for the duration."""
        if self.old.average is not None:
            yield dataclasses.replace(self.model, backbone=self.old.average)
            return
        with self.old.swapped_in():
            yield self.model

    def draw_extra(self, rng: np.random.Generator, n: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        c = self.config
        levels = np.sort(rng.choice(c.sample_steps, c.train_timesteps, replace=False))
        return {"levels": levels}, {"noise_seeds": rng.integers(0, 2**31 - 1, n)}

    # ------------------------------------------------------------------ one round

    @torch.no_grad()
    def rollout(self, batch: RolloutBatch) -> NFTRollout:
        """The old policy's samples of ``batch`` with the configured solver, and their rewards."""
        with self.old_policy() as model:
            prepared = self.prepare_rollout(batch, model)
            with self.autocast():
                clean = prepared.run().latents.float()
        return NFTRollout(batch, prepared, clean, self.score(clean, batch.prompts))

    def policy_update(self, rollouts: list[NFTRollout], advantages: list[np.ndarray]) -> dict[str, float]:
        c = self.config
        totals: dict[str, float] = {}
        count = len(rollouts) * c.train_timesteps
        for rollout, advantage in zip(rollouts, advantages):
            for metrics in self.rollout_losses(rollout, advantage):
                self.backward(metrics.pop("_loss") / count)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v / count
        totals.update(self.optimizer_step())
        self.old.decay = old_policy_decay(self.step, c.old_decay_rate, c.old_decay_max, c.old_decay_start)
        self.old.update()
        totals["old_decay"] = self.old.decay
        return totals

    def rollout_losses(self, rollout: NFTRollout, advantage: np.ndarray):
        """The NFT loss of one rollout micro-batch at each drawn noise level (yielded one at a time, so each
        backward frees its graph before the next)."""
        c = self.config
        model, x0 = self.model, rollout.clean
        scheduler, timesteps = make_scheduler(model, rollout.prepared.params)
        levels = step_levels(scheduler, timesteps, model.family.schedule)
        generators = [torch.Generator().manual_seed(int(s)) for s in rollout.batch.per_image["noise_seeds"]]
        weight = torch.as_tensor(optimality_weight(advantage, c.adv_clip_max), dtype=x0.dtype, device=x0.device)
        patch = model.family.patch_size(model)
        for index in rollout.batch.shared["levels"]:
            level = levels[index]
            noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in generators]).to(x0.device)
            x_t = add_noise(x0, noise, level)
            info = StepInfo(int(index), len(timesteps), timesteps[index], level, model.prediction_type, patch)
            with torch.no_grad(), self.old_policy() as old:
                old_out = self.conditional_output(rollout.prepared, old.backbone, x_t, info)
            out = self.conditional_output(rollout.prepared, model.backbone, x_t, info)
            x0_old = to_x0(old_out, x_t, level, model.prediction_type)
            x0_theta = to_x0(out, x_t, level, model.prediction_type)
            positive, negative = implicit_policies(x0_old, x0_theta, c.beta)
            loss, parts = nft_loss(positive, negative, x0, weight, c.beta, c.adv_clip_max, c.weighting)
            metrics = {"policy_loss": float(loss.detach()), **parts}
            if c.kl_beta > 0:
                with torch.no_grad(), self.reference() as reference:
                    reference_out = self.conditional_output(rollout.prepared, reference, x_t, info)
                kl = ((out - reference_out) ** 2).mean()
                loss = loss + c.kl_beta * kl
                metrics["kl"] = float(kl.detach())
            metrics["loss"] = float(loss.detach())
            yield {"_loss": loss, **metrics}

    def conditional_output(
        self, prepared: PreparedGeneration, backbone: torch.nn.Module, x: torch.Tensor, info: StepInfo
    ) -> torch.Tensor:
        """The conditional model output (no guidance: NFT trains the CFG-free model), in float32."""
        with self.autocast():
            return self.denoiser(prepared, backbone)(x, info, ["cond"])["cond"].float()


# ----------------------------------------------------------------------------- the method's math


def optimality_weight(advantages: np.ndarray, adv_clip_max: float) -> np.ndarray:
    """r = clip(Â/(2C) + 0.5, 0, 1) for advantages Â already clipped to ±C (C = ``adv_clip_max``): 0 for the worst,
    ½ for an average, 1 for the best sample (the authors' mapping of normalised rewards to optimality)."""
    return np.clip(np.asarray(advantages) / adv_clip_max / 2.0 + 0.5, 0.0, 1.0)


def implicit_policies(old: torch.Tensor, trained: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) = ((1 − β)·old + β·trained, (1 + β)·old − β·trained) (eq. 6), of velocities or of the
    clean images they imply; ``old`` is detached."""
    old = old.detach()
    return (1 - beta) * old + beta * trained, (1 + beta) * old - beta * trained


def nft_loss(
    positive_x0: torch.Tensor,
    negative_x0: torch.Tensor,
    x0: torch.Tensor,
    weight: torch.Tensor,
    beta: float,
    adv_clip_max: float,
    weighting: str = "adaptive",
) -> tuple[torch.Tensor, dict[str, float]]:
    """C/β · mean_b[ r_b·e⁺_b + (1 − r_b)·e⁻_b ] with e^± the per-sample mean squared error of x0^± against the
    sample x0, each divided by its detached mean absolute error (floored at 1e-5) under ``adaptive`` weighting."""
    errors = []
    for predicted in (positive_x0, negative_x0):
        squared = (predicted - x0) ** 2
        dims = tuple(range(1, squared.ndim))
        if weighting == "adaptive":
            scale = (predicted - x0).abs().mean(dim=dims, keepdim=True).detach().clamp(min=1e-5)
            squared = squared / scale
        errors.append(squared.mean(dim=dims))
    positive, negative = errors
    per_sample = weight * positive + (1 - weight) * negative
    loss = adv_clip_max * per_sample.mean() / beta
    return loss, {"positive_error": float(positive.detach().mean()), "negative_error": float(negative.detach().mean())}


def old_policy_decay(step: int, rate: float, maximum: float, start: int = 0) -> float:
    """The old policy's EMA decay after step ``step``: 0 before ``start``, then min(rate·(step − start), maximum)."""
    return 0.0 if step < start else min(rate * (step - start), maximum)


def main(argv: list[str] | None = None) -> int:
    """``python -m diffsteer.training.nft`` (and ``torchrun ... -m diffsteer.training.nft``): ``diffsteer train nft``."""
    return run_method("nft", argv)


if __name__ == "__main__":
    raise SystemExit(main())
