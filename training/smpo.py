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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.dpo import preference_margin

# SmPO's normalisation bounds for PickScore (the raw cosine of its CLIP-H embeddings, as its preprocessing
# computes them): the public code's constants, with temperature 1.
PICKSCORE_MIN = 0.11543526500463486
PICKSCORE_MAX = 0.28201571106910706


def smoothed_preference(score_0: torch.Tensor, score_1: torch.Tensor, low: float, high: float,
                        temperature: float = 1.0) -> torch.Tensor:
    """SmPO's smoothed preference of image 0 over image 1 from reward scores: σ((n^0 − n^1)/τ) with
    n = (s − low)/(high − low) (the public code: exp(n^0) / (exp(n^0) + exp(n^1)), τ = 1)."""
    if not high > low:
        raise ValueError(f"preference_score_max must exceed preference_score_min, got {low} and {high}")
    if not temperature > 0:
        raise ValueError(f"preference_temperature must be positive, got {temperature}")
    n0, n1 = (score_0 - low) / (high - low), (score_1 - low) / (high - low)
    return torch.sigmoid((n0 - n1) / temperature)


def smpo_loss(model_err_0: torch.Tensor, model_err_1: torch.Tensor, ref_err_0: torch.Tensor, ref_err_1: torch.Tensor,
              preference: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair SmPO loss −log σ(−½β(2p − 1)·margin) with p = ``preference`` (image 0 preferred), [B] -> [B]."""
    margin = preference_margin(model_err_0, model_err_1, ref_err_0, ref_err_1)
    return -F.logsigmoid(-0.5 * beta * (2 * preference - 1) * margin)
