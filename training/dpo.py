"""Diffusion-DPO: preference fine-tuning of a diffusion model on pairs of images (``diffsteer train dpo``).

Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization",
arXiv:2311.12908, Eq. 14). For a pair (x^w, x^l) with caption c, one timestep t ~ U(0, T) and one noise ε
shared by both images, x_t^* = √ᾱ_t x_0^* + √(1 − ᾱ_t) ε, and per-sample squared errors

    e_θ^*   = ‖ε − ε_θ(x_t^*, t, c)‖²        (mean over the latent's elements)
    e_ref^* = ‖ε − ε_ref(x_t^*, t, c)‖²
    L_DPO   = −log σ( −½ β · [ (e_θ^w − e_θ^l) − (e_ref^w − e_ref^l) ] )

(the paper's βT ω(λ_t) is folded into β, and its factor ½ is the public code's ``scale_term = -0.5 * beta_dpo``;
a pair whose label is a tie carries no preference and Diffusion-DPO drops it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖target − prediction‖² averaged over every dimension but the batch: [B, ...] -> [B] (in float32)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def preference_margin(model_err_0: torch.Tensor, model_err_1: torch.Tensor, ref_err_0: torch.Tensor,
                      ref_err_1: torch.Tensor) -> torch.Tensor:
    """(e_θ^0 − e_θ^1) − (e_ref^0 − e_ref^1): negative when the model, more than the reference, prefers image 0."""
    return (model_err_0 - model_err_1) - (ref_err_0 - ref_err_1)


def diffusion_dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                       ref_err_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair Diffusion-DPO loss −log σ(−½β·margin(winner, loser)), [B] -> [B]."""
    return -F.logsigmoid(-0.5 * beta * preference_margin(model_err_w, model_err_l, ref_err_w, ref_err_l))


def implicit_accuracy(margin: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs (with a preference) where the model's margin already agrees with it."""
    decided = preference != 0.5
    if not bool(decided.any()):
        return torch.tensor(float("nan"))
    agree = torch.where(preference > 0.5, margin < 0, margin > 0)
    return agree[decided].float().mean()
