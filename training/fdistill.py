"""f-distill: one-step (or k-step) distillation of a diffusion model by f-divergence distribution matching.

Xu, Nie & Vahdat 2025, "One-step Diffusion Models with f-Divergence Distribution Matching" (arXiv:2502.15681),
which generalises variational score distillation (DMD, Yin et al. 2024, arXiv:2311.18828; DMD2, Yin et al.
2024, arXiv:2405.14867) from the reverse KL to any f-divergence D_f(p‖q) = E_q[f(p/q)], p the teacher's
distribution, q the student's, r = p/q the density ratio. For a generator x = G_θ(z) the gradient is (their
Theorem 1; checked by quadrature in tests/test_fdistill.py):

    ∇_θ D_f(p‖q_θ) = E_z[ h(r(x)) · (s_q(x) − s_p(x)) · ∂x/∂θ ],      h(r) = f''(r) · r²          (eq. 7)

applied, as DMD does, at every noise level t: x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε, s_p the teacher's score (with
classifier-free guidance: here any guidance policy of ``guidance/policies``), s_q the score of a "fake score"
network trained by denoising score matching on the student's own samples (a two-time-scale update, DMD2
Sec. 4.1). In x0-space s_q − s_p ∝ x̂0_fake − x̂0_teacher, normalised per image by 1/mean|x − x̂0_teacher| (DMD
eq. 8). The ratio r is not known: a discriminator D trained with the logistic GAN loss has logit log(p/q) at
its optimum, so r = exp(logit), clamped, clipped to [r_min, r_max], optionally divided by its running mean in
its time bin, and h(r) is divided by its batch mean (Sec. 4.2). Both means are of the global batch: the sums
and counts are all-reduced over the processes, so N processes normalise as one process with N× the batch, and
every process holds the same running means (the checkpoint's). The generator also takes the non-saturating
GAN loss at ``gan_weight``; reverse KL (h ≡ 1) with the GAN term is DMD2.

The f's and their weightings (Table 1; constants kept, the batch-mean normalisation removes them):

    reverse KL            f = −log r                               h = 1
    forward KL            f = r log r                              h = r
    Jensen–Shannon        f = r log r − (r+1) log((r+1)/2)          h = r / (r+1)
    softened reverse KL   f = (r+1) log((r+1)/(2r))                 h = 1 / (r+1)
    squared Hellinger     f = (√r − 1)²                             h = √r / 2
    Jeffreys              f = (r−1) log r                           h = r + 1
    Neyman χ²             f = 1/r − 2 + r   ((1−r)²/r)              h = 2 / r

**Where the discriminator looks.** Its head (:class:`DiscriminatorHead`) reads the *teacher's* mid-block
features at the noisy input x_t (the UNet run only up to its mid block; on a transformer the image tokens of its
middle block, :func:`feature_block`, laid out on the latent grid), as FastGen does: the frozen teacher
is a fixed, good feature extractor at every t, so the head alone learns and the fake-score network's denoising
objective is left undisturbed (DMD2 instead shares the fake-score encoder, which couples the two losses); the
generator's GAN gradient flows through the frozen teacher into x_t. Real samples are the proving ground's
rendered training scenes (``real_data: pg-train``, encoded by the VAE) or the teacher's own samples under
``teacher_policy`` (``real_data: teacher``; any model, at the cost of a full teacher sampling per batch).

**The student.** A copy of the teacher UNet (every weight, or a LoRA on it), generating x = x̂0(G(z, t_s))
from pure noise z read at timestep t_s: the last training timestep T−1 by default, or ``student_timestep``
(DMD2's one-step SDXL generator reads its noise at 399). At T−1 the student starts from the teacher's own
one-step image, but x̂0 = (z − √(1−ᾱ)·ε̂)/√ᾱ multiplies every error of ε̂ by √(1−ᾱ)/√ᾱ (14.6 on Stable
Diffusion's scaled-linear schedule, which the proving-ground model uses), and on the proving ground that left a
field of small specks that distribution matching removed only slowly; at 399 the factor is 1.2 (see
BENCHMARKS.md, section f-distill one-step student). With
``steps: k`` it runs its own k-step DDIM chain on the "trailing" timesteps (t_s, ...), the training sample
being the x̂0 at a step drawn per batch after the earlier steps are simulated without gradients (DMD2's
backward simulation). The export writes that schedule as the pipeline's scheduler config (DDIM, trailing,
ᾱ_final = 1, and with ``student_timestep`` the noise schedule cut after t_s): one DDIM step from noise is
exactly x̂0(G(z, t_s)), so ``diffsteer generate``, the service and ``StableDiffusionPipeline`` (with
``num_inference_steps=1, guidance_scale=0``) reproduce the student, and ``diffsteer.json`` in the folder
recommends ``steps: 1`` and no guidance.

**The k-step chain is deterministic.** Between the student's steps the chain keeps the ε its own x̂0 implies
(DDIM with η = 0; on a flow model the Euler step), so the exported scheduler with its default settings is the
student's sampler and one noise gives one image. DMD2's multi-step generator (and FastGen's default
``student_sample_type: sde``) instead re-noises x̂0 with fresh Gaussian noise to the next timestep,
x_{t'} = √ᾱ_{t'}·x̂0 + √(1−ᾱ_{t'})·z (flow: (1 − σ')·x̂0 + σ'·z), which forgets the previous step's error at
the cost of a sampler that draws noise at every step (diffusers' FlowMatchEulerDiscreteScheduler
``stochastic_sampling``, LCMScheduler's step). It is not offered here: no run compared the two on the proving
ground, and the deterministic chain is the one whose exported folder reproduces the training-time sample
exactly.

**The GAN weight.** The losses are on DMD2's and FastGen's scale (the distribution-matching term a mean-reduced
MSE surrogate whose gradient is the normalised score difference over the number of elements, the GAN term a
mean of softplus), so ``gan_weight`` compares directly with theirs: FastGen's default and its SD 1.5 configs
use 1e-3 (DMD2's SD 1.5 setting), its and DMD2's SDXL 5e-3, FastGen's FLUX DMD2 0.03. The default here is
0.03 and the proving-ground configs use 0.1 and 0.03: with 64-pixel images, batch 4 and a few thousand steps
the GAN term has to act within the run, and on the proving ground a ten times larger weight (1.0) collapsed the
student (BENCHMARKS.md); 1e-3 was not measured there.

**Flow models** (SD3, FLUX.1; ``model`` a flow checkpoint). The same method on the rectified-flow
parameterisation x_t = (1 − σ)·x0 + σ·ε, every backbone call through the family's forward (the shared trainer's
``backbone_call``; FLUX packs 2×2 patches inside) at timestep σ·T: the student is a copy of the transformer
(full or LoRA on its attention projections), generating from pure noise at σ = 1 by k Euler steps x + (σ' −
σ)·v on the σ grid that ``steps`` steps of the model's own flow scheduler take at the training size (shift,
dynamic shift μ), its sample the last x̂0 = x − σ·v; the fake score is a copy trained with the flow-matching
loss (target ε − x0 at σ = t/T, t uniform in [timestep_min, timestep_max]); the real score is the teacher's
guided velocity through ``teacher_policy``, read as x̂0; the discriminator reads the middle transformer block.
The export is the family's pipeline folder with the model's own FlowMatchEulerDiscreteScheduler unchanged and
``diffsteer.json`` recommending ``steps: k``, no guidance and the training size: k steps of our sampler and of
the family's diffusers pipeline from the same noise are the student's training-time sample. SD3's own grid at
few steps ends very near zero (shift 3, 4 steps: σ = 1, 0.858, 0.602, 0.009), as diffusers' pipeline runs it;
FLUX's is linspace(1, 1/k) shifted by μ. ``student_timestep`` is refused on flow models: at σ = 1, x̂0 = x − v
multiplies no error.

**Regression** (optional, ``regression_weight``): DMD's (not DMD2's) paired loss, the latent MSE between the
student's sample from z and the teacher's own ``teacher_steps``-step sample from the same z, over
``regression_pairs`` pairs sampled once at the start of the run. It anchors the student to the teacher's
sample for each noise while distribution matching sharpens it.

    diffsteer train fdistill --config training/configs/fdistill-proving-ground.yaml [--resume]
    diffsteer train fdistill --print-config
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from tqdm import tqdm

from diffsteer.guidance.conditioning import encode_conditions
from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.latents import encode
from diffsteer.guidance.parameterisation import NoiseLevel, add_noise, from_x0_and_eps, to_eps, to_x0
from diffsteer.guidance.policies.base import SamplingContext
from diffsteer.guidance.registry import build_policy
from diffsteer.guidance.sampler import check_request, initial_noise, prepare
from diffsteer.guidance.schedulers import build_scheduler
from diffsteer.proving_ground.dataset import TrainingScenes
from diffsteer.training.cli import run_method
from diffsteer.training.lora import add_lora
from diffsteer.training.prompts import load_training_prompts
from diffsteer.training.trainer import Trainer, TrainerConfig, with_default

# ----------------------------------------------------------------------------- the f's and their weightings


def f_reverse_kl(r: torch.Tensor) -> torch.Tensor:
    return -torch.log(r)


def f_forward_kl(r: torch.Tensor) -> torch.Tensor:
    return r * torch.log(r)


def f_jensen_shannon(r: torch.Tensor) -> torch.Tensor:
    return r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2)


def f_softened_reverse_kl(r: torch.Tensor) -> torch.Tensor:
    return (r + 1) * torch.log((r + 1) / (2 * r))


def f_squared_hellinger(r: torch.Tensor) -> torch.Tensor:
    return (torch.sqrt(r) - 1) ** 2


def f_jeffreys(r: torch.Tensor) -> torch.Tensor:
    return (r - 1) * torch.log(r)


def f_neyman_chi2(r: torch.Tensor) -> torch.Tensor:
    return 1 / r - 2 + r


def h_reverse_kl(r: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(r)


def h_forward_kl(r: torch.Tensor) -> torch.Tensor:
    return r


def h_jensen_shannon(r: torch.Tensor) -> torch.Tensor:
    return r / (r + 1)


def h_softened_reverse_kl(r: torch.Tensor) -> torch.Tensor:
    return 1 / (r + 1)


def h_squared_hellinger(r: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(r) / 2


def h_jeffreys(r: torch.Tensor) -> torch.Tensor:
    return r + 1


def h_neyman_chi2(r: torch.Tensor) -> torch.Tensor:
    return 2 / r


Fn = Callable[[torch.Tensor], torch.Tensor]
# name -> (f, h = f''·r²)
DIVERGENCES: dict[str, tuple[Fn, Fn]] = {
    "reverse_kl": (f_reverse_kl, h_reverse_kl),
    "forward_kl": (f_forward_kl, h_forward_kl),
    "js": (f_jensen_shannon, h_jensen_shannon),
    "softened_reverse_kl": (f_softened_reverse_kl, h_softened_reverse_kl),
    "squared_hellinger": (f_squared_hellinger, h_squared_hellinger),
    "jeffreys": (f_jeffreys, h_jeffreys),
    "neyman_chi2": (f_neyman_chi2, h_neyman_chi2),
}
Divergence = Literal[
    "reverse_kl", "forward_kl", "js", "softened_reverse_kl", "squared_hellinger", "jeffreys", "neyman_chi2"
]


def density_ratio(logits: torch.Tensor, r_min: float, r_max: float, logit_clamp: float = 10.0) -> torch.Tensor:
    """r = exp(logit) per image (logits [B, ...] averaged over the rest), the logit clamped to ±``logit_clamp``
    against overflow, then r clipped to [r_min, r_max]; no gradient (h is a weight)."""
    logit = logits.detach().float().reshape(logits.shape[0], -1).mean(dim=1)
    return torch.exp(logit.clamp(-logit_clamp, logit_clamp)).clamp(r_min, r_max)


def time_bins(t: torch.Tensor, num_bins: int, num_timesteps: int) -> torch.Tensor:
    """Index of each timestep's bin among ``num_bins`` equal bins of [0, num_timesteps)."""
    return (t.long() * num_bins // num_timesteps).clamp(0, num_bins - 1)


Reduce = Callable[[torch.Tensor], torch.Tensor]


def one_process(totals: torch.Tensor) -> torch.Tensor:
    """The :data:`Reduce` of a single process: its own sums are the global ones."""
    return totals


def time_bin_totals(ratio: torch.Tensor, bins: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[2, num_bins] float64: the sum of r and the number of images in each time bin."""
    totals = torch.zeros(2, num_bins, dtype=torch.float64, device=ratio.device)
    totals[0].index_add_(0, bins, ratio.detach().double())
    totals[1].index_add_(0, bins, torch.ones_like(ratio, dtype=torch.float64))
    return totals


def normalise_by_time_bin(
    ratio: torch.Tensor, bins: torch.Tensor, running: torch.Tensor, rate: float, reduce: Reduce = one_process
) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide each r by the running mean of r in its time bin, after moving the running means of the bins seen
    in this batch: m_b ← rate·m_b + (1 − rate)·mean(r in b) (rate 0: this batch's mean). The bin means are of the
    global batch: ``reduce`` sums the per-bin sums and counts over the processes, so N processes move the running
    means exactly as one process with their N batches would. Returns the normalised ratios and the new running
    means."""
    totals = reduce(time_bin_totals(ratio, bins, len(running))).to(running.device)
    seen = totals[1] > 0
    running = running.clone()
    running[seen] = rate * running[seen] + (1 - rate) * totals[0, seen] / totals[1, seen]
    return ratio / (running.to(ratio.device, ratio.dtype)[bins] + 1e-6), running


def batch_normalised(h: torch.Tensor, eps: float = 1e-6, reduce: Reduce = one_process) -> torch.Tensor:
    """h / mean(h): the weights average to one over the (global) batch, whatever the divergence's constants; the
    mean is Σh / n with both summed over the processes by ``reduce``."""
    total = reduce(torch.stack([h.detach().double().sum(), torch.tensor(float(h.numel()), dtype=torch.float64)]))
    return h / (float(total[0] / total[1]) + eps)


def dmd_gradient(
    gen_x0: torch.Tensor, teacher_x0: torch.Tensor, fake_x0: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The per-sample direction the generator moves against: (x̂0_fake − x̂0_teacher) / mean|x − x̂0_teacher| (DMD
    eq. 8 in x0 space), times the f-divergence weight of each image."""
    dims = tuple(range(1, gen_x0.ndim))
    with torch.no_grad():
        norm = (gen_x0.float() - teacher_x0.float()).abs().mean(dim=dims, keepdim=True) + 1e-6
        grad = (fake_x0.float() - teacher_x0.float()) / norm
        if weights is not None:
            grad = grad * weights.float().view(-1, *([1] * (gen_x0.ndim - 1)))
    return grad


def distribution_matching_loss(gen_x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to ``gen_x0`` is ``grad`` / numel (the surrogate of DMD's Alg. 1)."""
    target = (gen_x0.float() - grad).detach()
    return 0.5 * F.mse_loss(gen_x0.float(), target, reduction="sum") / gen_x0.numel()


def regression_loss(gen_x0: torch.Tensor, teacher_sample: torch.Tensor) -> torch.Tensor:
    """DMD's regression loss (Yin et al. 2024, Sec. 3.3, eq. 9): the distance between the student's sample from a
    noise z and the teacher's own multi-step sample from the same z. DMD measures it with LPIPS on pixels; here it
    is the mean squared error of the latents (no LPIPS weights are downloaded), averaged over images."""
    dims = tuple(range(1, gen_x0.ndim))
    return (gen_x0.float() - teacher_sample.float()).pow(2).mean(dim=dims).mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the generator: softplus(−D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic loss of the discriminator: softplus(−D(real)) + softplus(D(fake)); at its optimum D = log(p/q)."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def student_scheduler_config(teacher_config: dict[str, Any], first_timestep: int | None = None) -> dict[str, Any]:
    """The student's scheduler: DDIM on 'trailing' timesteps (one step starts at T−1) with ᾱ_final = 1 (the
    last step returns x̂0 itself). With ``first_timestep`` the chain starts there instead: the noise schedule is
    cut after that timestep (``trained_betas``, the teacher's first ``first_timestep`` + 1 betas, so every ᾱ_t is
    the teacher's), which makes it the last "training" timestep that trailing spacing starts from, in every
    scheduler and pipeline that reads the config (diffusers' StableDiffusionPipeline resets a ``steps_offset``)."""
    from diffusers import DDIMScheduler

    config = {k: v for k, v in teacher_config.items() if not k.startswith("_") or k == "_class_name"}
    config.update(
        _class_name="DDIMScheduler",
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
        thresholding=False,
        steps_offset=1,
    )
    if first_timestep is not None:
        betas = DDIMScheduler.from_config(teacher_config).betas[: int(first_timestep) + 1]
        config.update(num_train_timesteps=len(betas), trained_betas=[float(b) for b in betas])
    return config


def student_timesteps(scheduler_config: dict[str, Any], steps: int) -> list[int]:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


# ----------------------------------------------------------------------------- networks


class DiscriminatorHead(torch.nn.Module):
    """Logits from a feature map [B, C, h, w] (a UNet's mid-block output, or a transformer block's image tokens
    laid out on their grid): conv → GroupNorm → SiLU → 1×1 conv, one logit per feature-map position ([B, h·w])."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        groups = math.gcd(hidden, 8)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, hidden, 3, padding=1),
            torch.nn.GroupNorm(groups, hidden),
            torch.nn.SiLU(),
            torch.nn.Conv2d(hidden, hidden, 3, padding=1),
            torch.nn.GroupNorm(groups, hidden),
            torch.nn.SiLU(),
            torch.nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).flatten(1)


# families whose backbone's features the discriminator reads (see :func:`feature_block`)
FEATURE_FAMILIES = ("sd", "sdxl", "sd3", "flux")


class _FeaturesReady(Exception):
    pass


def feature_block(backbone: torch.nn.Module) -> torch.nn.Module:
    """Where the discriminator reads the teacher: a UNet's mid block, or the middle block of a joint-attention
    transformer (SD3's ``transformer_blocks``; FLUX's double-stream then single-stream blocks, counted together),
    the generic equivalent: half the network's depth, where FastGen's DiT discriminators read by default."""
    if hasattr(backbone, "mid_block"):
        return backbone.mid_block
    blocks = [*backbone.transformer_blocks, *getattr(backbone, "single_transformer_blocks", [])]
    return blocks[len(blocks) // 2]


def feature_channels(backbone: torch.nn.Module) -> int:
    """Channels of :func:`backbone_features`: the UNet's deepest width, or the transformer's hidden width."""
    config = backbone.config
    if hasattr(backbone, "mid_block"):
        return int(config.block_out_channels[-1])
    return int(config.num_attention_heads) * int(config.attention_head_dim)


def backbone_features(
    family, backbone: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, condition, patch: int = 1
) -> torch.Tensor:
    """The output of :func:`feature_block` at (x, t, condition), running the backbone only that far, as a map
    [B, C, h, w]: a UNet block's output as it is; a transformer block's image stream (its outputs are the text and
    the image tokens) [B, (h/p)·(w/p), D] laid out on the latent grid of ``patch`` p (SD3's patches and FLUX's
    2×2 packing are both row-major)."""
    captured: list[Any] = []

    def hook(module, inputs, output):
        captured.append(output)
        raise _FeaturesReady

    handle = feature_block(backbone).register_forward_hook(hook)
    try:
        family.forward(backbone, x.to(next(backbone.parameters()).dtype), t, condition)
    except _FeaturesReady:
        pass
    finally:
        handle.remove()
    features = captured[0]
    if isinstance(features, torch.Tensor):
        return features
    tokens = features[1]
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- config


@dataclass
class FDistillConfig(TrainerConfig):
    """f-distill: a one-step student distilled from the model by f-divergence distribution matching
    (training/fdistill.py)."""

    output_dir: str = with_default("output_dir", "runs/fdistill")
    adapter_name: str = with_default("adapter_name", "fdistill")
    export: Literal["lora", "pipeline", "both"] = field(
        default="pipeline",
        metadata={
            "help": "pipeline (pipeline/: the student as a whole diffusers pipeline, one step by default), lora "
            "(the student's adapter, trainable: lora), or both."
        },
    )
    steps: int = field(
        default=1,
        metadata={
            "help": "The student's steps: 1 (from pure noise at student_timestep, by default the last timestep) or k "
            "(its own deterministic k-step chain: DDIM on trailing timesteps, or on a flow model Euler on the "
            "model's own k-step σ grid; DMD2 re-noises between steps instead); the evaluation samples the student "
            "with as many."
        },
    )
    student_timestep: int | None = field(
        default=None,
        metadata={
            "help": "The timestep at which the student reads its pure-noise input (DMD2's one-step SDXL generator reads "
            "it at 399; k-step students then take trailing steps below it). Default: the last training "
            "timestep T−1, where the student starts from the teacher's own one-step x̂0 = (z − √(1−ᾱ)·ε̂)/√ᾱ, "
            "which multiplies every error of ε̂ by √(1−ᾱ)/√ᾱ (14.6 at T−1 on SD's scaled-linear schedule); a lower "
            "timestep shrinks that factor but starts the student further from the teacher. Exported as a noise "
            "schedule cut after that timestep, so one DDIM step of the pipeline is still the student's sample."
        },
    )
    policy: str = field(
        default="cfg:scale=1",
        metadata={
            "help": "Policy of the student's evaluation samples (unguided by default; the teacher's guidance is "
            "teacher_policy)."
        },
    )
    scheduler: str = field(
        default="default",
        metadata={
            "help": "Scheduler of the student's evaluation: default, the student's own (a UNet student's DDIM, "
            "trailing, final ᾱ = 1; a flow student's, the model's flow-matching Euler scheduler)."
        },
    )
    trainable: Literal["lora", "full"] = field(
        default="full",
        metadata={
            "help": "The student: full (every UNet weight, fp32) or lora (a LoRA on a copy of the teacher UNet)."
        },
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "The student's AdamW learning rate."})
    # --- data
    prompts: str = field(
        default="pg-train:all",
        metadata={
            "help": "Training prompts with real_data: teacher (pg-train:..., or a prompt file); with real_data: "
            "pg-train the prompts are the rendered scenes' captions."
        },
    )
    real_data: Literal["pg-train", "teacher"] = field(
        default="pg-train",
        metadata={
            "help": "Real samples of the discriminator: pg-train (the proving ground's rendered training scenes and "
            "captions, VAE-encoded) or teacher (the teacher's samples under teacher_policy, teacher_steps)."
        },
    )
    teacher_steps: int = field(
        default=20,
        metadata={"help": "The teacher's sampling steps, for real_data: teacher and for the regression pairs."},
    )
    regression_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of DMD's regression loss (Yin et al. 2024, Sec. 3.3): the latent mean squared error between "
            "the student's sample from a noise z and the teacher's teacher_steps-step sample (teacher_policy) "
            "from the same z, over regression_pairs fixed pairs sampled at the start of the run. 0: off (DMD2 "
            "and f-distill train without it)."
        },
    )
    regression_pairs: int = field(
        default=1024,
        metadata={
            "help": "Number of (noise, prompt, teacher sample) pairs of the regression loss, drawn from the seed; "
            "sampled again, identically, on --resume."
        },
    )
    # --- the teacher's target
    teacher_policy: str = field(
        default="cfg:scale=1.5",
        metadata={"help": "Guidance policy that defines the teacher's score (cfg, apg, an interval, ...)."},
    )
    timestep_min: int = field(default=20, metadata={"help": "Smallest diffusion timestep of the matching loss."})
    timestep_max: int = field(default=980, metadata={"help": "Largest diffusion timestep of the matching loss."})
    # --- the divergence
    divergence: Divergence = field(
        default="js",
        metadata={"help": f"The f-divergence: {', '.join(DIVERGENCES)} (reverse_kl with gan_weight > 0 is DMD2)."},
    )
    ratio_min: float = field(default=0.1, metadata={"help": "Lower clip of the density ratio r = exp(logit)."})
    ratio_max: float = field(default=20.0, metadata={"help": "Upper clip of the density ratio."})
    logit_clamp: float = field(default=10.0, metadata={"help": "Clamp of the logit before exp (overflow guard)."})
    ratio_bins: int = field(
        default=10, metadata={"help": "Time bins of the running-mean normalisation of r (0: no normalisation)."}
    )
    ratio_ema: float = field(
        default=0.9,
        metadata={
            "help": "Running-mean rate of each bin (0: the current batch's mean in the bin, as FastGen at batch 2048; "
            "small batches need a longer memory, or a lone sample in its bin is normalised to r = 1)."
        },
    )
    gan_weight: float = field(
        default=0.03,
        metadata={
            "help": "Weight of the generator's GAN loss (0 with reverse_kl: DMD without the discriminator). On the "
            "scale of DMD2's and FastGen's: their default and SD 1.5 value is 1e-3, SDXL 5e-3, FastGen's FLUX "
            "DMD2 0.03 (this default); the proving-ground configs use 0.1 (UNet) and 0.03 (flow)."
        },
    )
    # --- the fake score and the discriminator
    fake_trainable: Literal["lora", "full"] = field(
        default="full",
        metadata={"help": "The fake-score network (a copy of the teacher): full or lora (lora_* fields)."},
    )
    fake_learning_rate: float = field(default=2e-5, metadata={"help": "The fake score's AdamW learning rate."})
    fake_updates_per_step: int = field(
        default=4,
        metadata={"help": "Fake-score (and discriminator) updates per student update (the two-time-scale rule)."},
    )
    discriminator_learning_rate: float = field(
        default=2e-4, metadata={"help": "The discriminator head's learning rate."}
    )
    discriminator_hidden: int = field(default=64, metadata={"help": "Width of the discriminator head."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute the activations of every backbone call that takes a gradient (the student's sample, "
            "the fake score's denoising loss, the teacher's features under the generator's GAN loss) in the "
            "backward pass instead of storing them: the same loss and gradients, less memory, about a third more "
            "compute for those calls."
        },
    )
    ema_decay: float = with_default("ema_decay", 0.99)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.divergence not in DIVERGENCES:
            raise InvalidInput(
                "divergence", f"unknown value {self.divergence!r}; accepted values: {', '.join(DIVERGENCES)}"
            )
        if not 0 < self.ratio_min < self.ratio_max:
            raise InvalidInput(
                "ratio_min", f"need 0 < ratio_min < ratio_max, got {self.ratio_min} and {self.ratio_max}"
            )
        if self.logit_clamp <= 0:
            raise InvalidInput("logit_clamp", f"must be positive, got {self.logit_clamp}")
        if self.ratio_bins < 0:
            raise InvalidInput("ratio_bins", f"must be non-negative, got {self.ratio_bins}")
        if not 0 <= self.ratio_ema < 1:
            raise InvalidInput("ratio_ema", f"must be in [0, 1), got {self.ratio_ema}")
        if self.gan_weight < 0:
            raise InvalidInput("gan_weight", f"must be non-negative, got {self.gan_weight}")
        if self.fake_updates_per_step < 1:
            raise InvalidInput("fake_updates_per_step", f"must be at least 1, got {self.fake_updates_per_step}")
        for name in ("fake_learning_rate", "discriminator_learning_rate"):
            if not 0 < getattr(self, name) < 1:
                raise InvalidInput(name, f"must be in (0, 1), got {getattr(self, name)}")
        if not 0 <= self.timestep_min <= self.timestep_max:
            raise InvalidInput(
                "timestep_min", f"need 0 ≤ timestep_min ≤ timestep_max, got {self.timestep_min} and {self.timestep_max}"
            )
        if self.regression_weight < 0:
            raise InvalidInput("regression_weight", f"must be non-negative, got {self.regression_weight}")
        if self.regression_weight > 0 and self.regression_pairs < 1:
            raise InvalidInput(
                "regression_pairs", f"must be at least 1 with regression_weight > 0, got {self.regression_pairs}"
            )
        if self.teacher_steps < 1:
            raise InvalidInput("teacher_steps", f"must be at least 1, got {self.teacher_steps}")
        if self.discriminator_hidden < 1:
            raise InvalidInput("discriminator_hidden", f"must be at least 1, got {self.discriminator_hidden}")
        if self.eta != 0:
            raise InvalidInput("eta", "the student's chain is deterministic DDIM; eta must be 0")

    @property
    def uses_discriminator(self) -> bool:
        return self.gan_weight > 0 or self.divergence != "reverse_kl"


# ----------------------------------------------------------------------------- the trainer


@dataclass
class DistillBatch:
    prompts: list[str]
    noise_seeds: list[int]  # the student's input noise, per image
    timesteps: torch.Tensor  # [B] long: the matching loss's t
    forward_seeds: list[int]  # ε of the forward process at t, per image
    real_t: torch.Tensor  # [B] long: the discriminator's t for the real samples
    real_seeds: list[int]  # ε for the real samples (and the teacher's sampling noise with real_data: teacher)
    real_images: np.ndarray | None  # [B, H, W, 3] uint8 with real_data: pg-train
    student_step: int  # which of the student's k steps trains (0 for one step)
    pairs: list[int] | None = None  # indices of the regression pairs (the student's update, regression_weight > 0)


class FDistillTrainer(Trainer):
    """Runs one f-distill job described by an :class:`FDistillConfig` (see the module docstring)."""

    name = "fdistill"
    config: FDistillConfig
    resumable_changes = frozenset({"gradient_checkpointing"})  # the same computation, stored or recomputed
    eval_summary_metrics = ("verifier.passed",)

    def build(self) -> None:
        c = self.config
        family = self.model.family
        if family.name not in FEATURE_FAMILIES:
            raise InvalidInput(
                "model",
                f"f-distill reads the teacher's features of SD 1.x/2.x, SDXL, SD3 and FLUX.1 backbones; "
                f"{self.model.name!r} is a {family.title} model",
            )
        self.flow = family.schedule == "flow"
        teacher = self.model.backbone
        T = self.num_timesteps = self.num_train_timesteps
        if c.timestep_max >= T:
            raise InvalidInput(
                "timestep_max", f"must be below the model's {T} training timesteps, got {c.timestep_max}"
            )
        if c.student_timestep is not None and self.flow:
            raise InvalidInput(
                "student_timestep",
                "a flow student reads its pure noise at σ = 1, where x̂0 = x − σ·v amplifies no error; leave it out",
            )
        if c.student_timestep is not None and not 0 <= c.student_timestep < T:
            raise InvalidInput("student_timestep", f"must be in [0, {T - 1}], got {c.student_timestep}")
        student_T = T if c.student_timestep is None else c.student_timestep + 1
        if c.steps > student_T:
            raise InvalidInput("steps", f"must be at most the student's {student_T} timesteps, got {c.steps}")
        self.teacher_policy = build_policy(c.teacher_policy, field="teacher_policy")
        if self.teacher_policy.name in ("reno", "dynamic"):
            raise InvalidInput(
                "teacher_policy",
                f"{self.teacher_policy.name!r} is not a per-step score; use cfg, apg, "
                "adaptive, linear_ag, cfg_zero_star or perp_neg",
            )
        self.alphas_cumprod = None if self.flow else self._alphas_cumprod()
        if self.flow:  # the model's own scheduler: k steps of it are the student's chain (see flow_student_grid)
            self.student_config = dict(self.model.scheduler_config)
        else:
            self.student_config = student_scheduler_config(self.model.scheduler_config, c.student_timestep)
        self.student_ts: list[Any] = []
        self.student_levels: list[NoiseLevel] = []
        self.student = self._trainable_copy(teacher, c.trainable, "student")
        self.fake_score = self._trainable_copy(teacher, c.fake_trainable, "fake_score")
        self.register_optimizer(
            "student", [p for p in self.student.parameters() if p.requires_grad], lr=c.learning_rate
        )
        self.register_optimizer(
            "fake_score", [p for p in self.fake_score.parameters() if p.requires_grad], lr=c.fake_learning_rate
        )
        self.discriminator = None
        if c.uses_discriminator:
            self.discriminator = DiscriminatorHead(feature_channels(teacher), c.discriminator_hidden).to(self.device)
            self.register_module("discriminator", self.discriminator, "full")
            self.register_optimizer(
                "discriminator",
                list(self.discriminator.parameters()),
                lr=c.discriminator_learning_rate,
                betas=(0.0, 0.99),
                weight_decay=0.0,
            )
        # the student's EMA: a frozen copy of a full student; of a LoRA student only the adapter's average, swapped
        # into the student for evaluation and export (a second copy of the base weights would hold nothing new)
        self.student_ema = None
        if c.ema_decay > 0:
            self.student_ema = self.register_ema(
                "student", self.student, c.ema_decay, trainable_only=c.trainable == "lora"
            )
        self.ratio_running = torch.ones(max(c.ratio_bins, 1), dtype=torch.float64)
        if c.real_data == "pg-train":
            self.scenes = TrainingScenes(seed=c.seed, resolution=self.model.default_size)
            self.train_prompts: list[str] = []
        else:
            self.train_prompts = load_training_prompts(c.prompts)
        self._check_sampling()
        self.student_ts, self.student_levels = self.student_grid()
        if c.regression_weight > 0:
            self.pair_prompts, self.pair_seeds, self.pair_samples = self.regression_pairs()

    def _trainable_copy(self, backbone: torch.nn.Module, trainable: str, name: str) -> torch.nn.Module:
        """A copy of the teacher's backbone that trains: every weight in fp32 (``full``), or the base weights in
        the run's weight dtype (bf16/fp16 on GPUs: a LoRA leaves them frozen) with fp32 adapters (``lora``)."""
        c = self.config
        copy_ = copy.deepcopy(backbone)
        if trainable == "lora":
            try:
                add_lora(copy_, c.lora_rank, c.lora_alpha, c.lora_targets, seed=c.seed + (name == "fake_score"))
            except ValueError as e:
                raise InvalidInput("lora_targets", str(e)) from None
            self.register_module(name, copy_, "trainable")
        else:
            copy_.float().requires_grad_(True)
            self.register_module(name, copy_, "full")
        return copy_.train()

    def _alphas_cumprod(self) -> torch.Tensor:
        return build_scheduler("ddim", self.model.scheduler_config).alphas_cumprod.to(torch.float64)

    def _check_sampling(self) -> None:
        check_request(self.eval_model(), self.generation_params(["a red circle"], [0]))
        if self.config.real_data == "teacher":
            check_request(self.model, self._teacher_params(self.train_prompts[:1], [0]))

    def student_grid(self) -> tuple[list[Any], list[NoiseLevel]]:
        """The student's timesteps and noise levels: the trailing DDIM timesteps from t_s (VP), or the σ grid of
        ``steps`` steps of the model's own flow scheduler at the training size, exactly as our sampler and the
        family's diffusers pipeline set it (shift, dynamic shift μ), read from the same scheduler."""
        c = self.config
        if not self.flow:
            ts = student_timesteps(self.student_config, c.steps)
            return ts, [NoiseLevel.vp(float(self.alphas_cumprod[t])) for t in ts]
        size = self.model.default_size  # the training size (FLUX's μ, hence its grid, depends on it)
        params = {**self.generation_params(["grid"], [0]), "height": size, "width": size}
        checked = check_request(self.student_model(), params)
        sigmas = checked.scheduler.sigmas[: len(checked.timesteps)]
        return [float(t) for t in checked.timesteps], [NoiseLevel.flow(float(s)) for s in sigmas]

    def _teacher_params(self, prompts: list[str], seeds: list[int]) -> dict[str, Any]:
        c = self.config
        return {
            "prompt": prompts,
            "seeds": seeds,
            "steps": c.teacher_steps,
            "scheduler": "default" if self.flow else "ddim",
            "policy": c.teacher_policy,
        }

    @torch.no_grad()
    def regression_pairs(self, batch_size: int = 16) -> tuple[list[str], list[int], torch.Tensor]:
        """The regression loss's fixed pairs: prompts (training captions or prompts) and noise seeds drawn from the
        config's seed, and the teacher's ``teacher_steps``-step samples (``teacher_policy``) from that noise, the
        batches shared among the processes (every process ends with all of them, on the CPU)."""
        c = self.config
        rng = np.random.default_rng([c.seed, 0x7265_6772])  # a stream of its own: "regr"
        if c.real_data == "pg-train":
            prompts = [self.scenes[int(i)].caption for i in rng.integers(0, 2**40, c.regression_pairs)]
        else:
            prompts = [self.train_prompts[int(i)] for i in rng.integers(0, len(self.train_prompts), c.regression_pairs)]
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, c.regression_pairs)]
        starts = range(0, len(seeds), batch_size)
        own = len(range(self.processes.rank, len(starts), self.processes.world_size))
        with tqdm(total=own, desc="regression pairs", disable=not (c.progress and self.processes.is_main)) as bar:

            def sample_chunk(index: int) -> torch.Tensor:  # each process samples every world_size-th chunk
                chunk = slice(starts[index], starts[index] + batch_size)
                latents = prepare(self.model, self._teacher_params(prompts[chunk], seeds[chunk])).run().latents
                bar.update()
                return latents.float().cpu()

            samples = self.processes.share_work(len(starts), sample_chunk)
        return prompts, seeds, torch.cat(samples)

    # ------------------------------------------------------------------ models the loop reads

    def student_model(self, backbone: torch.nn.Module | None = None):
        """A DiffusionModel that samples the student (the EMA by default) with its own scheduler config."""
        backbone = backbone if backbone is not None else self.export_backbone()
        return dataclasses.replace(self.model, backbone=backbone, scheduler_config=self.student_config)

    def eval_model(self):
        return self.student_model()

    def export_backbone(self) -> torch.nn.Module:
        return self.student_ema if self.student_ema is not None else self.student

    def extra_state(self) -> dict[str, Any]:
        return {"ratio_running": self.ratio_running.clone()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.ratio_running = state["ratio_running"].clone()

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        keys = ("loss.student", "loss.fake_score", "loss.discriminator")
        return {k.split(".")[1]: f"{metrics[k]:.4g}" for k in keys if k in metrics}

    # ------------------------------------------------------------------ data

    def draw_batch(self, step: int, micro: int, phase: int = 0) -> DistillBatch:
        """This process's share of micro-batch ``micro`` of update ``phase`` (0 .. fake_updates_per_step − 1: the
        critics'; fake_updates_per_step: the student's) of optimizer step ``step``, drawn from (seed, step, phase)."""
        c = self.config
        rng = np.random.default_rng([c.seed, step, phase])
        n, share = self.global_batch_size, self.shard(micro)
        if c.real_data == "pg-train":
            indices = rng.integers(0, 2**40, n)[share]
            examples = [self.scenes[int(i)] for i in indices]
            prompts = [e.caption for e in examples]
            real_images = np.stack([e.image for e in examples])
        else:
            prompts = [self.train_prompts[i] for i in rng.integers(0, len(self.train_prompts), n)[share]]
            real_images = None
        seeds = rng.integers(0, 2**31 - 1, (3, n))[:, share]
        timesteps = torch.as_tensor(rng.integers(c.timestep_min, c.timestep_max + 1, (2, n))[:, share])
        student_step = int(rng.integers(0, c.steps))
        pairs = None
        if c.regression_weight > 0 and phase == c.fake_updates_per_step:
            pairs = [int(i) for i in rng.integers(0, c.regression_pairs, n)[share]]
        return DistillBatch(
            prompts,
            [int(s) for s in seeds[0]],
            timesteps[0],
            [int(s) for s in seeds[1]],
            timesteps[1],
            [int(s) for s in seeds[2]],
            real_images,
            student_step,
            pairs,
        )

    def _gaussian(self, seeds: list[int]) -> torch.Tensor:
        size = self.model.default_size
        return initial_noise(seeds, self.model.latent_shape(size, size), self.device)[0]

    def _encode(self, prompts: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
        size = self.model.default_size
        names = dict.fromkeys(["cond", *self.teacher_policy.conditions])
        with torch.no_grad():
            return encode_conditions(self.model, prompts, None, names, height=size, width=size)

    @torch.no_grad()
    def real_latents(self, batch: DistillBatch, conditions) -> torch.Tensor:
        """Clean latents of the real samples: the rendered scenes through the VAE, or the teacher's samples."""
        model = self.model
        if batch.real_images is not None:
            pixels = torch.as_tensor(batch.real_images, device=self.device).permute(0, 3, 1, 2).float() / 255
            return encode(model.vae, pixels).float()

        return prepare(model, self._teacher_params(batch.prompts, batch.real_seeds)).run().latents.float()

    # ------------------------------------------------------------------ the networks' predictions

    def _x0(
        self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, condition, level: NoiseLevel | None = None
    ) -> torch.Tensor:
        """x̂0 of ``net`` at (x, t) (``level``: the noise level of t, by default :meth:`noise_level`)."""
        level = level if level is not None else self.noise_level(t)
        return to_x0(self._backbone_out(net, x, t, condition), x, level, self.model.prediction_type)

    def _backbone_out(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        checkpoint = self.config.gradient_checkpointing
        return self.backbone_call(net, x, t.to(self.device), condition, checkpoint=checkpoint).float()

    def generate(self, batch: DistillBatch, condition, backbone: torch.nn.Module | None = None) -> torch.Tensor:
        """The student's clean latents from the batch's noise (see :meth:`generate_from`)."""
        return self.generate_from(self._gaussian(batch.noise_seeds), batch.student_step, condition, backbone)

    def generate_from(
        self, x: torch.Tensor, student_step: int, condition, backbone: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """The student's clean latents: from noise ``x`` through its first ``student_step`` steps without
        gradients, then its x̂0 at that step (with gradients when enabled). A step is deterministic: x̂0 and the ε
        it implies, noised to the next level (DDIM with η = 0; on a flow model the Euler step
        x + (σ' − σ)·v, the same move)."""
        net = backbone if backbone is not None else self.student
        dtype = torch.float32 if self.flow else torch.long
        for i, (t, level) in enumerate(zip(self.student_ts, self.student_levels)):
            tt = torch.full((x.shape[0],), t, dtype=dtype)
            if i == student_step:
                return self._x0(net, x, tt, condition, level)
            with torch.no_grad():
                x0 = self._x0(net, x, tt, condition, level)
                x = add_noise(x0, to_eps(x0, x, level, "sample"), self.student_levels[i + 1])
        raise AssertionError("student_step is beyond the student's steps")

    @torch.no_grad()
    def teacher_x0(self, x: torch.Tensor, t: torch.Tensor, conditions, aliases) -> torch.Tensor:
        """x̂0 of the guided teacher at each image's (x_t, t), through ``teacher_policy`` (one policy step per
        distinct t, its StepInfo placing t among the T training timesteps)."""
        out = torch.empty_like(x)
        model, T = self.model, self.num_timesteps
        for value in torch.unique(t).tolist():
            rows = (t == value).nonzero().flatten()
            conds = {k: v.rows(rows.to(v.hidden_states.device)) for k, v in conditions.items()}
            denoiser = Denoiser(
                model.backbone, conds, model.prediction_type, aliases=aliases, forward=model.family.forward
            )
            level = self.noise_level(torch.tensor([value]))
            level = NoiseLevel(float(level.signal), float(level.noise), level.schedule)
            timestep = torch.tensor(float(value) if self.flow else value, device=self.device)
            info = StepInfo(
                T - 1 - int(value), T, timestep, level, model.prediction_type, model.family.patch_size(model)
            )
            state = self.teacher_policy.start(
                SamplingContext(
                    num_steps=T,
                    batch_size=len(rows),
                    prediction_type=self.model.prediction_type,
                    has_negative_prompt=False,
                    requested_steps=T,
                    model=self.model,
                )
            )
            guided = self.teacher_policy.step(state, x[rows], info, denoiser).float()
            out[rows] = to_x0(guided, x[rows], level, self.model.prediction_type)
        return out

    def _features(self, x: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        """The teacher's :func:`backbone_features` at (x, t); with ``gradient_checkpointing`` and autograd on
        (the generator's GAN loss), recomputed in the backward pass instead of stored."""
        model = self.model
        args = (model.family, model.backbone, x, t.to(self.device), condition, model.family.patch_size(model))
        if self.config.gradient_checkpointing and torch.is_grad_enabled():
            return activation_checkpoint(backbone_features, *args, use_reentrant=False)
        return backbone_features(*args)

    def _logits(self, x: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        return self.discriminator(self._features(x, t, condition))

    # ------------------------------------------------------------------ the updates

    def critic_loss(self, batch: DistillBatch) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """Denoising score matching of the fake score on the student's samples, and the discriminator's loss
        on real against student samples."""
        conditions, _ = self._encode(batch.prompts)
        cond = conditions["cond"]
        with self.autocast():
            with torch.no_grad():
                gen = self.generate(batch, cond).float()
            level, eps = self.noise_level(batch.timesteps), self._gaussian(batch.forward_seeds)
            x_t = add_noise(gen, eps, level)
            target = from_x0_and_eps(gen, eps, level, self.model.prediction_type)  # flow: the velocity ε − x0
            out = self._backbone_out(self.fake_score, x_t, batch.timesteps, cond)
            fake_loss = F.mse_loss(out, target)
            metrics = {"loss.fake_score": float(fake_loss.detach())}
            disc_loss = None
            if self.discriminator is not None:
                real = self.real_latents(batch, conditions)
                real_t = add_noise(real, self._gaussian(batch.real_seeds), self.noise_level(batch.real_t))
                with torch.no_grad():
                    f_fake = self._features(x_t, batch.timesteps, cond)
                    f_real = self._features(real_t, batch.real_t, cond)
                fake_logits, real_logits = self.discriminator(f_fake), self.discriminator(f_real)
                disc_loss = gan_discriminator_loss(real_logits, fake_logits)
                metrics.update(
                    {
                        "loss.discriminator": float(disc_loss.detach()),
                        "d_real": float(torch.sigmoid(real_logits.detach()).mean()),
                        "d_fake": float(torch.sigmoid(fake_logits.detach()).mean()),
                    }
                )
        return fake_loss, disc_loss, metrics

    def generator_loss(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The f-weighted distribution-matching loss (eq. 7) plus gan_weight × the generator's GAN loss."""
        c = self.config
        conditions, aliases = self._encode(batch.prompts)
        cond = conditions["cond"]
        with self.autocast():
            gen = self.generate(batch, cond).float()
            x_t = add_noise(gen, self._gaussian(batch.forward_seeds), self.noise_level(batch.timesteps))
            with torch.no_grad():
                fake_x0 = self._x0(self.fake_score, x_t.detach(), batch.timesteps, cond)
                real_x0 = self.teacher_x0(x_t.detach(), batch.timesteps, conditions, aliases)
            metrics: dict[str, float] = {}
            weights = None
            gan = torch.zeros((), device=self.device)
            if self.discriminator is not None:
                logits = self._logits(x_t, batch.timesteps, cond)
                gan = gan_generator_loss(logits)
                if c.divergence != "reverse_kl":
                    weights = self.f_weights(logits, batch.timesteps)
                    metrics.update({"h_min": float(weights.min()), "h_max": float(weights.max())})
            grad = dmd_gradient(gen, real_x0, fake_x0, weights)
            dm = distribution_matching_loss(gen, grad)
            loss = dm + c.gan_weight * gan
            if batch.pairs is not None:
                regression = self.pair_regression_loss(batch.pairs)
                loss = loss + c.regression_weight * regression
                metrics["loss.regression"] = float(regression.detach())
        metrics.update(
            {"loss.student": float(loss.detach()), "loss.matching": float(dm.detach()), "loss.gan": float(gan.detach())}
        )
        return loss, metrics

    def pair_regression_loss(self, pairs: list[int]) -> torch.Tensor:
        """:func:`regression_loss` of the student's full chain (gradient through its last step) on these pairs."""
        conditions, _ = self._encode([self.pair_prompts[i] for i in pairs])
        gen = self.generate_from(
            self._gaussian([self.pair_seeds[i] for i in pairs]), len(self.student_ts) - 1, conditions["cond"]
        ).float()
        return regression_loss(gen, self.pair_samples[pairs].to(gen.device))

    def f_weights(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """h(r) of the configured divergence, normalised per time bin (optional) and by the batch mean, both over
        the global batch (every process's images), so every process holds the same running means."""
        c = self.config
        ratio = density_ratio(logits, c.ratio_min, c.ratio_max, c.logit_clamp)
        if c.ratio_bins > 0:
            bins = time_bins(t, c.ratio_bins, self.num_timesteps).to(ratio.device)
            ratio, self.ratio_running = normalise_by_time_bin(
                ratio.double(), bins, self.ratio_running, c.ratio_ema, self.sum_over_processes
            )
            ratio = ratio.float()
        return batch_normalised(DIVERGENCES[c.divergence][1](ratio), reduce=self.sum_over_processes)

    def sum_over_processes(self, totals: torch.Tensor) -> torch.Tensor:
        """``totals`` summed over the processes (an all-reduce over the CPU group; itself for one process)."""
        if not self.processes.distributed:
            return totals
        summed = totals.detach().to("cpu", torch.float64).clone()
        torch.distributed.all_reduce(summed)
        return summed.to(totals.device)

    def training_step(self) -> dict[str, float]:
        """fake_updates_per_step updates of the fake score (and discriminator), then one of the student."""
        c = self.config
        totals: dict[str, float] = {}

        def add(metrics: dict[str, float], weight: float) -> None:
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * weight

        critics = ("fake_score", "discriminator") if self.discriminator is not None else ("fake_score",)
        accumulation = c.gradient_accumulation_steps
        for phase in range(c.fake_updates_per_step):
            for micro in range(accumulation):
                fake_loss, disc_loss, metrics = self.critic_loss(self.draw_batch(self.step, micro, phase))
                self.backward(fake_loss / accumulation, "fake_score")
                if disc_loss is not None:
                    self.backward(disc_loss / accumulation, "discriminator")
                add(metrics, 1 / (accumulation * c.fake_updates_per_step))
            add(self.optimizer_step(*critics), 1 / c.fake_updates_per_step)
        critic_params = [p for name in critics for p in self.optimizers[name].params]
        for p in critic_params:  # the generator's loss must leave no gradient on the critics
            p.requires_grad_(False)
        try:
            for micro in range(accumulation):
                loss, metrics = self.generator_loss(self.draw_batch(self.step, micro, c.fake_updates_per_step))
                self.backward(loss / accumulation, "student")
                add(metrics, 1 / accumulation)
        finally:
            for p in critic_params:
                p.requires_grad_(True)
        totals.update(self.optimizer_step("student"))
        if "student" in self.emas:
            self.update_ema("student")
        return totals

    # ------------------------------------------------------------------ export

    def export_pipeline(self, directory: Path) -> Path:
        """The student as a whole diffusers pipeline whose scheduler is the student's (one DDIM step from noise
        is its sample), with ``diffsteer.json`` recommending its steps and no guidance."""
        saved = self.model
        self.model = self.student_model(saved.backbone)
        try:
            path = super().export_pipeline(directory)
        finally:
            self.model = saved
        write_model_defaults(path, self.config.steps, self.model.default_size)
        return path


def write_model_defaults(folder: Path, steps: int, native_size: int) -> None:
    """``diffsteer.json``: the model-aware defaults a folder carries: the student's steps, no guidance (cfg at scale
    1) and the size it was trained at (a flow model's σ grid depends on the size through the dynamic shift)."""
    defaults = {"policy": "cfg:scale=1", "steps": steps, "native_size": native_size}
    (Path(folder) / "diffsteer.json").write_text(json.dumps(defaults, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m diffsteer.training.fdistill`` (and ``torchrun ... -m diffsteer.training.fdistill``): ``diffsteer train fdistill``."""
    return run_method("fdistill", argv)


if __name__ == "__main__":
    raise SystemExit(main())
