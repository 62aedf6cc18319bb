"""Diffusion-DPO: preference fine-tuning of a diffusion model on pairs of images (``diffsteer train dpo``).

Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization",
arXiv:2311.12908, Eq. 14). For a pair (x^w, x^l) with caption c, one timestep t ~ U(0, T) and one noise ε
shared by both images, x_t^* = √ᾱ_t x_0^* + √(1 − ᾱ_t) ε, and per-sample squared errors

    e_θ^*   = ‖ε − ε_θ(x_t^*, t, c)‖²        (mean over the latent's elements)
    e_ref^* = ‖ε − ε_ref(x_t^*, t, c)‖²
    L_DPO   = −log σ( −½ β · [ (e_θ^w − e_θ^l) − (e_ref^w − e_ref^l) ] )

(the paper's βT ω(λ_t) is folded into β, and its factor ½ is the public code's ``scale_term = -0.5 * beta_dpo``;
a pair whose label is a tie carries no preference and Diffusion-DPO drops it). A v-prediction UNet compares
v errors the same way (its target from :func:`diffsteer.guidance.parameterisation.from_x0_and_eps`).

**Flow form** (SD3, FLUX, Qwen-Image: x_t = (1 − σ)·x0 + σ·ε, the model predicts the velocity u = ε − x0), as
Flow-DPO (Liu et al. 2025, "Improving Video Generation with Human Feedback", arXiv:2501.13918, Sec. 4) and the
flow-matching DPO of SimpleTuner's ``flow_dpo`` write it: the same σ and the same ε for both images of a pair, and
per-sample velocity errors in place of ε errors,

    e_θ^* = ‖(ε − x_0^*) − u_θ(x_σ^*, σ, c)‖²,   e_ref^* likewise,   L the same expression with one constant β.

σ is drawn as the family trains: u from ``timestep_density`` (logit-normal(0, 1) by default, SD3's training
density; or uniform), shifted by the scheduler's static shift (:func:`flow_training_sigmas`; SD3's 3.0, none
for the families that shift by resolution, as diffusers' SD3/FLUX training scripts draw it), and the backbone is
called at timestep σ·T. *How β carries over*: at one σ the ε error is (1 − σ)² times the velocity error
(ε − ε̂ = (1 − σ)(u − û), since ε̂ = x_σ + (1 − σ)·û), so a constant β on velocity errors is Diffusion-DPO's loss on
ε errors with β_ε(σ) = β / (1 − σ)²: the same β near the data, 4β at σ = ½; over logit-normal(0, 1) σ the factor
has median 4 and mean 11.7, over SD3's shift-3 σ median 16 and mean 78. Flow-DPO's derivation carries such a
σ-dependent weight in its β_t; a constant β on velocity errors is used here, as in SimpleTuner's ``flow_dpo``. A β
tuned on ε errors (Diffusion-DPO's 5000) matches, at the median σ, β/4 on velocity errors (unshifted σ) or β/16
(SD3's shift 3); the default stays 5000, untuned on flow models.

Training (``diffsteer train dpo --config dpo.yaml``, on :class:`diffsteer.training.trainer.Trainer`): pairs come
from a Pick-a-Pic-layout file or a ``datasets`` Arrow folder (:mod:`diffsteer.training.preference_data`: streamed,
only labels and scores held; e.g. made by ``diffsteer data pairs``); ties are dropped; each step draws pairs by
epoch permutation (:meth:`~diffsteer.training.trainer.Trainer.epoch_indices`), and for every pair one timestep,
one noise seed and, with ``random_flip``, a left-right mirror of both images (from the seed), all drawn in the
training process from ``seed`` and the step, so runs and resumes repeat and N processes draw what one process with
N× the batch draws; ``data_workers`` DataLoader processes read and decode the planned pairs ahead. The reference is
the base backbone itself: with ``trainable: lora`` the adapter is switched off for the reference pass (no second
copy in memory), with ``trainable: full`` a frozen copy of the initial backbone is kept. ``gradient_checkpointing``
recomputes the trained backbone's call in the backward pass. Images are encoded with the VAE's posterior mean.

    diffsteer data pairs -o pairs.parquet --prompts pg-train:single --images-per-prompt 4
    diffsteer train dpo --config training/configs/dpo-proving-ground.yaml [--resume] [--set beta=2000]
    torchrun --nproc_per_node 2 -m diffsteer.training.dpo --config dpo.yaml      # several processes
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from diffsteer.guidance.conditioning import encode_conditions
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.families.base import concat_conditions
from diffsteer.guidance.latents import encode
from diffsteer.guidance.parameterisation import add_noise, from_x0_and_eps
from diffsteer.training.cli import run_method
from diffsteer.training.preference_data import PairImages, PlannedBatches, PreferenceDataset, load_preference_pairs
from diffsteer.training.trainer import Trainer, TrainerConfig, with_default


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖target − prediction‖² averaged over every dimension but the batch: [B, ...] -> [B] (in float32)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def preference_margin(
    model_err_0: torch.Tensor, model_err_1: torch.Tensor, ref_err_0: torch.Tensor, ref_err_1: torch.Tensor
) -> torch.Tensor:
    """(e_θ^0 − e_θ^1) − (e_ref^0 − e_ref^1): negative when the model, more than the reference, prefers image 0."""
    return (model_err_0 - model_err_1) - (ref_err_0 - ref_err_1)


def diffusion_dpo_loss(
    model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-pair Diffusion-DPO loss −log σ(−½β·margin(winner, loser)), [B] -> [B]."""
    return -F.logsigmoid(-0.5 * beta * preference_margin(model_err_w, model_err_l, ref_err_w, ref_err_l))


def implicit_accuracy(margin: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs (with a preference) where the model's margin already agrees with it."""
    decided = preference != 0.5
    if not bool(decided.any()):
        return torch.tensor(float("nan"))
    agree = torch.where(preference > 0.5, margin < 0, margin > 0)
    return agree[decided].float().mean()


@dataclass
class DPOConfig(TrainerConfig):
    """Diffusion-DPO: preference fine-tuning on image pairs (training/dpo.py)."""

    output_dir: str = with_default("output_dir", "runs/dpo")
    adapter_name: str = with_default("adapter_name", "dpo")
    data: str = field(
        default="",
        metadata={
            "help": "Preference pairs: a Pick-a-Pic-layout .parquet or .jsonl file, or a folder of them "
            "(make one with `diffsteer data pairs`)."
        },
    )
    score_fields: tuple[str, ...] = field(
        default=("score_0", "score_1"),
        metadata={
            "help": "The two per-image reward-score columns (SmPO's preprocessed Pick-a-Pic: ps_score_0, ps_score_1)."
        },
    )
    beta: float = field(
        default=5000.0,
        metadata={
            "help": "DPO temperature beta (KL strength): the loss is -log sigmoid(-beta/2 * margin); 5000 is the "
            "public Diffusion-DPO code's default. On flow models the margin is of velocity errors, which weigh eps "
            "errors by 1/(1 - sigma)^2: beta/4 to beta/16 there matches a beta on eps errors (training/dpo.py)."
        },
    )
    learning_rate: float = with_default("learning_rate", 1e-4)
    random_flip: bool = field(
        default=False,
        metadata={
            "help": "Mirror both images of a pair left to right with probability 1/2 (drawn from the pair's seed). "
            "Diffusion-DPO flips by default (its --no_hflip turns it off); off here because a flip contradicts "
            "captions that say left or right (the proving ground's position prompts, many real ones): turn it on "
            "for data without them, e.g. Pick-a-Pic."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute the trained backbone's call in the backward pass instead of storing its activations "
            "(as AlignProp's): less memory for one more forward pass per step; the loss and gradients are the same."
        },
    )
    timestep_density: Literal["logit_normal", "uniform"] = field(
        default="logit_normal",
        metadata={
            "help": "Flow models only: the density of the training noise level, u ~ logit_normal(logit_mean, "
            "logit_std) (SD3's training density, diffusers' SD3/FLUX scripts' default) or uniform; sigma is u "
            "shifted by the scheduler's static shift. VP models draw t uniformly from 0..T-1 (Diffusion-DPO)."
        },
    )
    logit_mean: float = field(default=0.0, metadata={"help": "Mean m of the logit-normal density (SD3: 0)."})
    logit_std: float = field(
        default=1.0, metadata={"help": "Standard deviation s of the logit-normal density (SD3: 1)."}
    )
    data_workers: int = field(
        default=2,
        metadata={
            "help": "DataLoader worker processes that read and decode the pairs ahead of the step (0: in the "
            "training process). Changes nothing but speed: every random choice is made in the training process."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timestep_density not in TIMESTEP_DENSITIES:
            raise InvalidInput(
                "timestep_density",
                f"unknown value {self.timestep_density!r}; accepted values: {', '.join(TIMESTEP_DENSITIES)}",
            )
        if not self.logit_std > 0:
            raise InvalidInput("logit_std", f"must be positive, got {self.logit_std}")
        if self.data_workers < 0:
            raise InvalidInput("data_workers", f"must be non-negative, got {self.data_workers}")
        if not self.beta > 0:
            raise InvalidInput("beta", f"must be positive, got {self.beta}")
        if len(self.score_fields) != 2:
            raise InvalidInput("score_fields", f"expected two column names, got {list(self.score_fields)!r}")


@dataclass
class PairBatch:
    """One micro-batch of pairs: images in [0, 1], captions, preference of image 0, per-pair t and noise seed."""

    pixels_0: torch.Tensor
    pixels_1: torch.Tensor
    captions: list[str]
    preference: torch.Tensor
    timesteps: torch.Tensor
    noise_seeds: list[int]
    rows: list[int]  # the pairs' indices in the dataset
    flipped: list[bool]


@dataclass(frozen=True)
class PairDraws:
    """Everything random about one micro-batch, drawn in the training process: the dataset rows, each pair's
    training timestep and noise seed, and whether its images are mirrored."""

    rows: np.ndarray
    timesteps: np.ndarray
    noise_seeds: np.ndarray
    flips: np.ndarray


FLIP_STREAM = 7  # the flip of a pair is drawn from its noise seed, in a stream of its own


def flip_of(noise_seed: int) -> bool:
    """Whether the pair with this noise seed is mirrored (probability 1/2, independent of its noise)."""
    return bool(np.random.default_rng([int(noise_seed), FLIP_STREAM]).integers(2))


@contextlib.contextmanager
def adapters_disabled(backbone: torch.nn.Module):
    """The base backbone: its LoRA adapters switched off for the duration (the reference model, no copy)."""
    backbone.disable_adapters()
    try:
        yield backbone
    finally:
        backbone.enable_adapters()


PREFERENCE_PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def check_preference_prediction_type(prediction_type: str) -> None:
    """Preference training compares ε-, v- or flow-velocity-prediction errors: the model must predict one of them
    (its target at x_t is :func:`diffsteer.guidance.parameterisation.from_x0_and_eps`)."""
    if prediction_type not in PREFERENCE_PREDICTION_TYPES:
        raise InvalidInput(
            "model",
            f"prediction type {prediction_type!r} is not supported for preference training "
            f"({', '.join(PREFERENCE_PREDICTION_TYPES)})",
        )


TIMESTEP_DENSITIES = ("logit_normal", "uniform")


def flow_training_sigmas(u: np.ndarray, shift: float) -> np.ndarray:
    """σ = s·u / (1 + (s − 1)·u): the flow scheduler's shift s applied to u ∈ [0, 1] (Esser et al. 2024, Sec. 5.3.2;
    s = 1 leaves u as it is)."""
    return shift * u / (1 + (shift - 1) * u)


def draw_flow_u(rng: np.random.Generator, n: int, density: str, mean: float, std: float) -> np.ndarray:
    """n draws of u ∈ (0, 1): logit-normal, u = 1 / (1 + e^−(mean + std·z)) with z ~ N(0, 1) (Esser et al. 2024's
    π_ln(t; m, s), SD3's training density), or uniform."""
    if density == "logit_normal":
        return 1 / (1 + np.exp(-(mean + std * rng.standard_normal(n))))
    if density == "uniform":
        return rng.random(n)
    raise ValueError(f"timestep_density: unknown value {density!r}; accepted values: {', '.join(TIMESTEP_DENSITIES)}")


def scheduler_training_shift(scheduler_config: dict) -> float:
    """The shift of a flow scheduler's own training grid (diffusers' FlowMatchEulerDiscreteScheduler at init, which
    diffusers' SD3/FLUX training scripts draw their σ from): its static ``shift``, 1 where it shifts by resolution."""
    if scheduler_config.get("use_dynamic_shifting"):
        return 1.0
    return float(scheduler_config.get("shift", 1.0))


class DPOTrainer(Trainer):
    """Diffusion-DPO on the shared trainer (see the module docstring); SmPO extends it (training/smpo.py)."""

    name = "dpo"
    resumable_changes = frozenset({"data_workers"})  # where the pairs are decoded changes nothing
    eval_summary_metrics = ("reward", "verifier.passed")

    # ------------------------------------------------------------------ data

    def build(self) -> None:
        c = self.config
        if not c.data:
            raise InvalidInput(
                "data", "required: a preference-pair file or folder (make one with `diffsteer data pairs`)"
            )
        self.dataset = load_preference_pairs(c.data, score_fields=c.score_fields)
        self.rows = self.select_rows(self.dataset)
        self.preferences = self.row_preferences(self.dataset, self.rows)
        check_preference_prediction_type(self.model.prediction_type)
        self.flow = self.model.family.schedule == "flow"
        self.flow_shift = scheduler_training_shift(self.model.scheduler_config) if self.flow else 1.0
        self.image_size = (c.height or self.model.default_size, c.width or self.model.default_size)
        self.batches = PlannedBatches(
            PairImages(self.dataset, self.image_size),
            self.plan,
            c.gradient_accumulation_steps,
            c.max_steps,
            c.data_workers,
        )
        super().build()
        self.reference_backbone = None
        if c.trainable == "full":  # a frozen copy of the initial weights is the reference
            self.reference_backbone = (
                copy.deepcopy(self.model.backbone).requires_grad_(False).eval().to(self.weight_dtype)
            )

    def select_rows(self, dataset: PreferenceDataset) -> np.ndarray:
        """The dataset rows trained on: Diffusion-DPO trains on decided pairs only, ties are dropped."""
        rows = np.flatnonzero(dataset.label_0 != 0.5)
        if not len(rows):
            raise InvalidInput("data", f"{dataset.path}: every pair is a tie; DPO needs pairs with a preferred image")
        return rows

    def row_preferences(self, dataset: PreferenceDataset, rows: np.ndarray) -> torch.Tensor:
        """p = P(image 0 preferred) of each trained row: the label (1 or 0) for DPO."""
        return torch.from_numpy(dataset.label_0[rows]).float()

    def draws(self, step: int, micro: int) -> PairDraws:
        """This process's share of micro-batch ``micro`` of step ``step``: pairs by epoch permutation of the
        trained rows, and from the step's generator one timestep and one noise seed per pair of the global batch."""
        rng = self.step_rng(step)
        n, share = self.global_batch_size, self.shard(micro)
        timesteps = self.draw_timesteps(rng, n)[share]
        seeds = rng.integers(0, 2**31 - 1, n)[share]
        positions = self.epoch_indices(step, micro, len(self.rows))
        flips = np.array([self.config.random_flip and flip_of(s) for s in seeds], dtype=bool)
        return PairDraws(positions, timesteps, seeds, flips)

    def draw_timesteps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n training timesteps: VP, integers uniform in 0 … T − 1 (Diffusion-DPO's t ~ U(0, T)); flow, σ·T with
        σ from the scheduler-shifted ``timestep_density`` (:func:`draw_flow_u`, :func:`flow_training_sigmas`)."""
        if not self.flow:
            return rng.integers(0, self.num_train_timesteps, n)
        c = self.config
        u = draw_flow_u(rng, n, c.timestep_density, c.logit_mean, c.logit_std)
        return flow_training_sigmas(u, self.flow_shift) * self.num_train_timesteps

    def plan(self, step: int, micro: int) -> list[tuple[int, bool]]:
        """The (dataset row, flip) items the data workers decode for (``step``, ``micro``)."""
        d = self.draws(step, micro)
        return [(int(self.rows[p]), bool(f)) for p, f in zip(d.rows, d.flips)]

    def draw_batch(self, step: int, micro: int) -> PairBatch:
        d = self.draws(step, micro)
        decoded = self.batches.get(step, micro)
        rows = [int(self.rows[p]) for p in d.rows]
        if [x.index for x in decoded] != rows:  # the workers decode the plan; this would be a bug
            raise RuntimeError(f"the data workers returned rows {[x.index for x in decoded]} for {rows}")
        return PairBatch(
            pixels_0=torch.stack([x.pixels_0 for x in decoded]),
            pixels_1=torch.stack([x.pixels_1 for x in decoded]),
            captions=[x.caption for x in decoded],
            preference=self.preferences[torch.from_numpy(d.rows)],
            timesteps=torch.from_numpy(d.timesteps).float() if self.flow else torch.from_numpy(d.timesteps).long(),
            noise_seeds=[int(s) for s in d.noise_seeds],
            rows=rows,
            flipped=[bool(f) for f in d.flips],
        )

    def close(self) -> None:
        self.batches.close()
        super().close()

    # ------------------------------------------------------------------ the loss

    def trained_prediction(self, x: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        """The trained backbone's output at (x, t), recomputed in the backward pass with ``gradient_checkpointing``."""
        return self.backbone_call(self.model.backbone, x, t, condition, checkpoint=self.config.gradient_checkpointing)

    def reference_prediction(self, x: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        with torch.no_grad():
            if self.reference_backbone is not None:
                return self.backbone_call(self.reference_backbone, x, t, condition)
            with adapters_disabled(self.model.backbone):
                return self.backbone_call(self.model.backbone, x, t, condition)

    def noisy_latents(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, condition
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, ε) for clean latents ``x0`` [2B] at ``t`` [2B]: Diffusion-DPO's forward process with the given
        noise (the same for both images of a pair). SmPO replaces this with ReNoise inversion."""
        return add_noise(x0, noise, self.noise_level(t)), noise

    def pair_loss(self, errors: dict[str, torch.Tensor], preference: torch.Tensor) -> torch.Tensor:
        """Per-pair Diffusion-DPO loss with the preferred image as the winner (p is 1 or 0)."""
        first = preference > 0.5
        winner = {k: torch.where(first, errors[f"{k}_0"], errors[f"{k}_1"]) for k in ("model", "ref")}
        loser = {k: torch.where(first, errors[f"{k}_1"], errors[f"{k}_0"]) for k in ("model", "ref")}
        return diffusion_dpo_loss(winner["model"], loser["model"], winner["ref"], loser["ref"], self.config.beta)

    def compute_loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        b = len(batch.captions)
        device = self.device
        with torch.no_grad(), self.autocast():
            x0 = encode(self.model.vae, torch.cat([batch.pixels_0, batch.pixels_1]).to(device))
            cond = encode_conditions(
                self.model, batch.captions, None, ["cond"], height=self.image_size[0], width=self.image_size[1]
            )[0]["cond"]
        condition = concat_conditions([cond, cond])
        noise = torch.stack(
            [torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(s)) for s in batch.noise_seeds]
        )
        noise = torch.cat([noise, noise]).to(device)
        t = torch.cat([batch.timesteps, batch.timesteps]).to(device)
        with self.autocast():
            x_t, eps = self.noisy_latents(x0, t, noise, condition)
            target = from_x0_and_eps(x0, eps, self.noise_level(t), self.model.prediction_type)
            model_err = per_sample_mse(self.trained_prediction(x_t, t, condition), target)
            ref_err = per_sample_mse(self.reference_prediction(x_t, t, condition), target)
        errors = {"model_0": model_err[:b], "model_1": model_err[b:], "ref_0": ref_err[:b], "ref_1": ref_err[b:]}
        preference = batch.preference.to(device)
        loss = self.pair_loss(errors, preference).mean()
        margin = preference_margin(errors["model_0"], errors["model_1"], errors["ref_0"], errors["ref_1"]).detach()
        metrics = {
            "model_mse": float(model_err.detach().mean()),
            "ref_mse": float(ref_err.mean()),
            "implicit_acc": float(implicit_accuracy(margin, preference)),
            "preference": float(preference.mean()),
        }
        return loss, metrics

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {
            "loss": f"{metrics.get('loss', float('nan')):.4g}",
            "acc": f"{metrics.get('implicit_acc', float('nan')):.2f}",
        }


def main(argv: list[str] | None = None) -> int:
    """``python -m diffsteer.training.dpo`` (and ``torchrun ... -m diffsteer.training.dpo``): the same as ``diffsteer train dpo``."""
    return run_method("dpo", argv)


if __name__ == "__main__":
    raise SystemExit(main())
