"""SmPO: smoothed preferences and ReNoise inversion for preference fine-tuning (``diffsteer train smpo``).

SmPO (Lu et al. 2025, "Smoothed Preference Optimization via ReNoise Inversion for Aligning Diffusion Models
with Varied Human Preferences", arXiv:2506.02698, Eq. 9) replaces the binary preference by a smoothed one,
p = p̃(x^0 ≻ x^1 | c) ∈ [0, 1], and weights the DPO margin by (2p − 1) (its (2α − γ) with γ = 1):

    L_SmPO = −log σ( −½ β (2p − 1) · [ (e_θ^0 − e_θ^1) − (e_ref^0 − e_ref^1) ] )

so p = 1 is Diffusion-DPO with x^0 the winner, p = 0 the same with the roles swapped, and at p = ½ the argument
is 0 whatever the model does: the loss is log 2 with zero gradient (similar images teach nothing). p comes from a
reward's scores (:func:`smoothed_preference`, the public code's preprocessing):

    n^i = (s^i − s_min) / (s_max − s_min),     p = σ((n^0 − n^1) / τ)

The public code's ``scale_term = -0.5 * beta_dpo * (2*p - 1) * 10`` carries an extra factor 10: its
``--beta_dpo B`` is β = 10·B here (its SD1.5 example, B = 2000, is β = 20000; its SDXL one, B = 5000,
is β = 50000). It also applies the first pair's p to every pair of a batch (``batch['probs'][0]``); here
each pair uses its own p.

The trajectory (SmPO Sec. 4.2): Diffusion-DPO noises x_0 with random ε, a point the model's own sampler would
not visit. SmPO instead carries each clean latent up to the pair's timestep t by ReNoise inversion with the
model being trained (no gradient; :mod:`diffsteer.training.renoise`: ``inversion_steps`` inverse DDIM steps, each
averaging ``renoise_iterations`` + 1 noise predictions) and recovers the target noise from the inverted latent,
ε* = (z_t − √ᾱ_t x_0) / √(1 − ᾱ_t). Both images of a pair share t; each has its own inverted latent. The cost
is ``inversion_steps · (renoise_iterations + 1)`` extra UNet forwards (no backward) per image and step.

    diffsteer train smpo --config training/configs/smpo-proving-ground.yaml

With ``smoothed_preference: false`` and ``inversion: false`` it is Diffusion-DPO at the same β (on data
without ties).

Where the inversion hurts: on the proving ground (pairs sampled from the shipped model at ``cfg:scale=3`` and
ordered by the CLIP reward), training on the inverted latents made the objects shrink and vanish and lowered the
held-out verifier pass rate, whichever β, whether the model being trained or the frozen base model inverted, and
with the public code's inversion grid too (a fixed grid through the points below t, the latent then treated as
t's); the same pairs on forward-noised latents (``inversion: false``) raised it, which is why the proving-ground
config turns the inversion off. A likely reason: the noise recovered from an inverted latent is far from unit
variance and the model's own error on it is already small, so the loss compares the model's self-consistency
rather than its denoising. The damage grows with the guidance scale, and the inversion-trained model lacks what
the fine-tunes that gained have in common, a little extra guidance scale along the base model's guidance
direction mid-trajectory (``benchmarks/learned_guidance.py``; a guidance schedule adding the same does not
reproduce their gain, so it marks them rather than explains them). The figures: BENCHMARKS.md, section
Diffusion-DPO and SmPO. Compare both settings on held-out prompts before relying on the inversion for a new model
or data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.parameterisation import to_eps, to_velocity
from diffsteer.training.cli import run_method
from diffsteer.training.dpo import DPOConfig, DPOTrainer, preference_margin
from diffsteer.training.preference_data import PreferenceDataset
from diffsteer.training.renoise import inversion_grid, renoise_invert
from diffsteer.training.trainer import with_default

# SmPO's normalisation bounds for PickScore (the raw cosine of its CLIP-H embeddings, as its preprocessing
# computes them): the public code's constants, with temperature 1.
PICKSCORE_MIN = 0.11543526500463486
PICKSCORE_MAX = 0.28201571106910706


def smoothed_preference(
    score_0: torch.Tensor, score_1: torch.Tensor, low: float, high: float, temperature: float = 1.0
) -> torch.Tensor:
    """SmPO's smoothed preference of image 0 over image 1 from reward scores: σ((n^0 − n^1)/τ) with
    n = (s − low)/(high − low) (the public code: exp(n^0) / (exp(n^0) + exp(n^1)), τ = 1)."""
    if not high > low:
        raise ValueError(f"preference_score_max must exceed preference_score_min, got {low} and {high}")
    if not temperature > 0:
        raise ValueError(f"preference_temperature must be positive, got {temperature}")
    n0, n1 = (score_0 - low) / (high - low), (score_1 - low) / (high - low)
    return torch.sigmoid((n0 - n1) / temperature)


def preference_bounds(
    dataset: PreferenceDataset, score_min: float | None = None, score_max: float | None = None
) -> tuple[float, float]:
    """SmPO's normalisation bounds (s_min, s_max) for ``dataset``: the given ones, else its own score range."""
    low, high = dataset.score_range()
    bounds = (score_min if score_min is not None else low, score_max if score_max is not None else high)
    if not bounds[1] > bounds[0]:
        raise InvalidInput(
            "preference_score_max",
            f"must exceed preference_score_min, got the bounds {bounds} "
            "(from the data's score range where not given: every score equal?)",
        )
    return bounds


def pairs_preference(scores: np.ndarray, bounds: tuple[float, float], temperature: float) -> torch.Tensor:
    """[N] float64: :func:`smoothed_preference` of image 0 over image 1 for each pair from its ``scores`` [N, 2]
    (a :class:`~diffsteer.training.preference_data.PreferenceDataset`'s ``scores``, or rows of them)."""
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    return smoothed_preference(scores[:, 0], scores[:, 1], bounds[0], bounds[1], temperature)


def smpo_loss(
    model_err_0: torch.Tensor,
    model_err_1: torch.Tensor,
    ref_err_0: torch.Tensor,
    ref_err_1: torch.Tensor,
    preference: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair SmPO loss −log σ(−½β(2p − 1)·margin) with p = ``preference`` (image 0 preferred), [B] -> [B]."""
    margin = preference_margin(model_err_0, model_err_1, ref_err_0, ref_err_1)
    return -F.logsigmoid(-0.5 * beta * (2 * preference - 1) * margin)


@dataclass
class SmPOConfig(DPOConfig):
    """SmPO: smoothed preferences and ReNoise inversion (training/smpo.py); Diffusion-DPO's fields and these."""

    output_dir: str = with_default("output_dir", "runs/smpo")
    adapter_name: str = with_default("adapter_name", "smpo")
    beta: float = field(
        default=20000.0,
        metadata={
            "help": "beta of the loss -log sigmoid(-beta/2 (2p - 1) margin), in Diffusion-DPO's convention: the public "
            "SmPO code's --beta_dpo B is beta = 10 B here (its SD1.5 example, B = 2000, is 20000)."
        },
    )
    smoothed_preference: bool = field(
        default=True,
        metadata={
            "help": "p from the pair's reward scores (sigmoid of the normalised score difference); false: the binary label."
        },
    )
    preference_score_min: float | None = field(
        default=None,
        metadata={
            "help": "Normalisation lower bound s_min of the scores (null: the data's smallest score). SmPO's for "
            "PickScore (raw cosine): 0.11543526500463486."
        },
    )
    preference_score_max: float | None = field(
        default=None,
        metadata={
            "help": "Normalisation upper bound s_max (null: the data's largest score). SmPO's for PickScore: "
            "0.28201571106910706."
        },
    )
    preference_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature tau of p = sigmoid((n0 - n1) / tau) (SmPO: 1; smaller is closer to the binary label)."
        },
    )
    inversion: bool = field(
        default=True,
        metadata={
            "help": "Carry the clean latents to t by ReNoise inversion (false: Diffusion-DPO's random forward noise; "
            "on the proving ground's self-generated pairs the inversion lowered the held-out pass rate, see the module docstring)."
        },
    )
    inversion_steps: int = field(
        default=5,
        metadata={
            "help": "Inverse steps from the clean latent to t: DDIM on VP models, Euler on flow models (SmPO's SD1.5 "
            "setting: 5; SDXL: 10)."
        },
    )
    renoise_iterations: int = field(
        default=1,
        metadata={
            "help": "ReNoise iterations per inverse step: 0 is plain DDIM inversion, 1 is SmPO's (two predictions averaged)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.preference_temperature > 0:
            raise InvalidInput("preference_temperature", f"must be positive, got {self.preference_temperature}")
        low, high = self.preference_score_min, self.preference_score_max
        if low is not None and high is not None and not high > low:
            raise InvalidInput("preference_score_max", f"must exceed preference_score_min, got {high} <= {low}")
        if self.inversion_steps < 1:
            raise InvalidInput("inversion_steps", f"must be at least 1, got {self.inversion_steps}")
        if self.renoise_iterations < 0:
            raise InvalidInput("renoise_iterations", f"must be non-negative, got {self.renoise_iterations}")


class SmPOTrainer(DPOTrainer):
    """SmPO on the shared trainer: Diffusion-DPO's data and reference, SmPO's preference and trajectory."""

    name = "smpo"

    def select_rows(self, dataset: PreferenceDataset) -> np.ndarray:
        c = self.config
        if not c.smoothed_preference:
            return super().select_rows(dataset)
        if not dataset.has_scores:
            raise InvalidInput(
                "data",
                f"{dataset.path}: rows without {c.score_fields[0]}/{c.score_fields[1]}; the "
                "smoothed preference needs per-image reward scores (diffsteer data pairs writes them)",
            )
        self.score_bounds = preference_bounds(dataset, c.preference_score_min, c.preference_score_max)
        return np.arange(len(dataset))  # ties stay: p = 1/2 gives them zero gradient

    def row_preferences(self, dataset: PreferenceDataset, rows: np.ndarray) -> torch.Tensor:
        if not self.config.smoothed_preference:
            return super().row_preferences(dataset, rows)
        return pairs_preference(dataset.scores[rows], self.score_bounds, self.config.preference_temperature).float()

    def noisy_latents(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, condition
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ReNoise inversion of ``x0`` to each sample's t with the model being trained; the noise target recovered
        from the inverted latent (``noise`` is unused unless ``inversion`` is off)."""
        c = self.config
        if not c.inversion:
            return super().noisy_latents(x0, t, noise, condition)

        def velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            out = self.backbone_call(self.model.backbone, x, timesteps, condition).float()
            return to_velocity(out, x, self.noise_level(timesteps), self.model.prediction_type)

        grid = inversion_grid(t, c.inversion_steps)
        x_t = renoise_invert(velocity, x0, grid, self.noise_level, c.renoise_iterations)
        # the ε with x_t = a_t·x_0 + s_t·ε: the x0 "prediction" is the clean latent itself
        return x_t, to_eps(x0, x_t, self.noise_level(t), "sample")

    def pair_loss(self, errors: dict[str, torch.Tensor], preference: torch.Tensor) -> torch.Tensor:
        return smpo_loss(
            errors["model_0"], errors["model_1"], errors["ref_0"], errors["ref_1"], preference, self.config.beta
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m diffsteer.training.smpo`` (and ``torchrun ... -m diffsteer.training.smpo``): the same as ``diffsteer train smpo``."""
    return run_method("smpo", argv)


if __name__ == "__main__":
    raise SystemExit(main())
