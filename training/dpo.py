"""Diffusion-DPO: preference fine-tuning of a diffusion model on pairs of images (``diffsteer train dpo``).

Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization",
arXiv:2311.12908, Eq. 14). For a pair (x^w, x^l) with caption c, one timestep t ~ U(0, T) and one noise ε
shared by both images, x_t^* = √ᾱ_t x_0^* + √(1 − ᾱ_t) ε, and per-sample squared errors

    e_θ^*   = ‖ε − ε_θ(x_t^*, t, c)‖²        (mean over the latent's elements)
    e_ref^* = ‖ε − ε_ref(x_t^*, t, c)‖²
    L_DPO   = −log σ( −½ β · [ (e_θ^w − e_θ^l) − (e_ref^w − e_ref^l) ] )

(the paper's βT ω(λ_t) is folded into β, and its factor ½ is the public code's ``scale_term = -0.5 * beta_dpo``;
a pair whose label is a tie carries no preference and Diffusion-DPO drops it).

Training (``diffsteer train dpo --config dpo.yaml``, on :class:`diffsteer.training.trainer.Trainer`): pairs come from a
Pick-a-Pic-layout file (:mod:`diffsteer.training.preference_data`, e.g. made by ``diffsteer data pairs``); ties are dropped;
each step draws pairs by epoch permutation, and for every pair one timestep and one noise (from per-pair seeds
drawn from ``seed`` and the step, so runs and resumes repeat). The reference ε_ref is the base UNet itself: with
``trainable: lora`` the adapter is switched off for the reference pass (no second copy in memory), with
``trainable: full`` a frozen copy of the initial UNet is kept. Images are encoded with the VAE's posterior mean.

    diffsteer data pairs -o pairs.parquet --prompts pg-train:single --images-per-prompt 4
    diffsteer train dpo --config training/configs/dpo-proving-ground.yaml [--resume] [--set beta=2000]
    torchrun --nproc_per_node 2 -m diffsteer.training.dpo --config dpo.yaml      # several processes
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffsteer.guidance.conditioning import encode_conditions
from diffsteer.guidance.denoiser import call_unet
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.families.base import concat_conditions
from diffsteer.guidance.latents import encode
from diffsteer.guidance.parameterisation import NoiseLevel, add_noise, from_x0_and_eps
from diffsteer.training.cli import run_method
from diffsteer.training.preference_data import load_preference_pairs
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
            "public Diffusion-DPO code's default."
        },
    )
    learning_rate: float = with_default("learning_rate", 1e-4)

    def __post_init__(self) -> None:
        super().__post_init__()
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


@contextlib.contextmanager
def adapters_disabled(unet: torch.nn.Module):
    """The base UNet: its LoRA adapters switched off for the duration (the reference model, no copy)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


PREFERENCE_PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_preference_prediction_type(prediction_type: str) -> None:
    """Preference training compares ε- or v-prediction errors: the model must predict one of them (its target at
    x_t is :func:`diffsteer.guidance.parameterisation.from_x0_and_eps`)."""
    if prediction_type not in PREFERENCE_PREDICTION_TYPES:
        raise InvalidInput(
            "model",
            f"prediction type {prediction_type!r} is not supported for preference training (epsilon, v_prediction)",
        )


def image_tensor(image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> [3, H, W] in [0, 1]: the shorter side resized to fit, then centre-cropped to ``size`` (h, w)."""
    h, w = size
    scale = max(h / image.height, w / image.width)
    if (image.height, image.width) != (h, w):
        image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.BICUBIC)
        top, left = (image.height - h) // 2, (image.width - w) // 2
        image = image.crop((left, top, left + w, top + h))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


class DPOTrainer(Trainer):
    """Diffusion-DPO on the shared trainer (see the module docstring); SmPO extends it (training/smpo.py)."""

    name = "dpo"
    eval_summary_metrics = ("reward", "verifier.passed")

    # ------------------------------------------------------------------ data

    def build(self) -> None:
        c = self.config
        if not c.data:
            raise InvalidInput(
                "data", "required: a preference-pair file or folder (make one with `diffsteer data pairs`)"
            )
        dataset = load_preference_pairs(c.data, score_fields=c.score_fields)
        self.pairs = self.select_pairs(dataset)
        check_preference_prediction_type(self.model.prediction_type)
        scheduler = self.model.fresh_scheduler()
        self.alpha_bars = scheduler.alphas_cumprod.float().to(self.device)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.image_size = (c.height or self.model.default_size, c.width or self.model.default_size)
        super().build()
        self.reference_unet = None
        if c.trainable == "full":  # a frozen copy of the initial weights is the reference
            self.reference_unet = copy.deepcopy(self.model.unet).requires_grad_(False).eval().to(self.weight_dtype)

    def select_pairs(self, dataset) -> list[Any]:
        """Diffusion-DPO trains on decided pairs only: ties are dropped."""
        pairs = [p for p in dataset.pairs if p.label_0 != 0.5]
        if not pairs:
            raise InvalidInput("data", f"{dataset.path}: every pair is a tie; DPO needs pairs with a preferred image")
        return pairs

    def pair_preferences(self, pairs: list[Any]) -> torch.Tensor:
        """p = P(image 0 preferred) per pair: the label (1 or 0) for DPO."""
        return torch.tensor([p.label_0 for p in pairs], dtype=torch.float32)

    def draw_batch(self, step: int, micro: int) -> PairBatch:
        rng = self.step_rng(step)
        n = self.global_batch_size
        timesteps = rng.integers(0, self.num_train_timesteps, n)[self.shard(micro)]
        seeds = rng.integers(0, 2**31 - 1, n)[self.shard(micro)]
        pairs = [self.pairs[i] for i in self.epoch_indices(step, micro, len(self.pairs))]
        images = [p.images() for p in pairs]
        return PairBatch(
            pixels_0=torch.stack([image_tensor(a, self.image_size) for a, _ in images]),
            pixels_1=torch.stack([image_tensor(b, self.image_size) for _, b in images]),
            captions=[p.caption for p in pairs],
            preference=self.pair_preferences(pairs),
            timesteps=torch.from_numpy(timesteps).long(),
            noise_seeds=[int(s) for s in seeds],
        )

    # ------------------------------------------------------------------ the loss

    def unet_call(self, unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        return call_unet(unet, x.to(self.weight_dtype), t, condition)

    def reference_prediction(self, x: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        with torch.no_grad():
            if self.reference_unet is not None:
                return self.unet_call(self.reference_unet, x, t, condition)
            with adapters_disabled(self.model.unet):
                return self.unet_call(self.model.unet, x, t, condition)

    def level(self, t: torch.Tensor) -> NoiseLevel:
        """The noise level of each sample's training timestep ``t`` [N], broadcasting over [N, C, h, w]."""
        return NoiseLevel.vp(self.alpha_bars[t].view(-1, 1, 1, 1))

    def noisy_latents(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, condition
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, ε) for clean latents ``x0`` [2B] at ``t`` [2B]: Diffusion-DPO's forward process with the given
        noise (the same for both images of a pair). SmPO replaces this with ReNoise inversion."""
        return add_noise(x0, noise, self.level(t)), noise

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
            target = from_x0_and_eps(x0, eps, self.level(t), self.model.prediction_type)
            model_err = per_sample_mse(self.unet_call(self.model.unet, x_t, t, condition), target)
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
