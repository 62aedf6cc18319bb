"""The stochastic sampler of Flow-GRPO: an SDE with the flow ODE's marginals, its Gaussian transitions and their
log-probabilities.

Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL" (arXiv 2505.05470), Sec. 4.2. A
rectified-flow model writes x_t = (1 − t)·x0 + t·ε (t = σ ∈ [0, 1], t = 1 pure noise) and samples with the ODE
dx_t = v(x_t, t) dt from t = 1 to 0. The score of x_t's marginal is ∇log p_t(x) = −(x + (1 − t)·v)/t, so the
reverse-time SDE

    dx_t = [v(x_t, t) + σ_t²/(2t)·(x_t + (1 − t)·v(x_t, t))] dt + σ_t dw          (eq. 8)

has the same marginals p_t for every choice of σ_t. Flow-GRPO takes σ_t = a·√(t/(1 − t)), with the *noise
level* a a hyper-parameter (0.7 in the paper), and discretises it by Euler–Maruyama over the sampler's σ grid
(Δt = t_next − t < 0):

    x_{t+Δt} = x_t + [v + σ_t²/(2t)·(x_t + (1 − t)·v)]·Δt + σ_t·√(−Δt)·ε,   ε ~ N(0, I)   (eq. 9)

so each step is a Gaussian transition N(μ, s²I) with μ the bracket's deterministic part and s = σ_t·√(−Δt), whose
log-density is known in closed form. At t = 1 the scale a·√(t/(1 − t)) is infinite; as the paper's code does, the
denominator takes the grid's second σ there (``sigma_max``), so the first step's noise stays finite. a = 0 is the
Euler ODE step exactly.

The per-sample log-probability is the *mean* over the latent's elements of the elementwise Gaussian
log-density (the paper's code reduces over every non-batch dimension by a mean, which keeps ratios of
probabilities at a scale that clipping can act on), and the KL divergence between the policy's and the
reference's transitions, two Gaussians with the same covariance s²I, is ‖μ_θ − μ_ref‖²/(2s²), also averaged over
elements (Flow-GRPO eq. 12's closed form).
"""

from __future__ import annotations

import math

import torch

Level = float | torch.Tensor  # a scalar, or a tensor broadcasting over the batch ([B, 1, 1, 1])


def sde_noise_scale(sigma: Level, noise_level: float, sigma_max: float) -> Level:
    """σ_t = a·√(t/(1 − t)) at t = ``sigma`` (Flow-GRPO Sec. 4.2); at t = 1 the denominator uses
    1 − ``sigma_max`` (the grid's largest σ below 1) so the first step's scale is finite."""
    if torch.is_tensor(sigma):
        capped = torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)
    else:
        capped = sigma_max if sigma == 1 else sigma
    return noise_level * (sigma / (1 - capped)) ** 0.5


def sde_transition(
    x: torch.Tensor, velocity: torch.Tensor, sigma: Level, sigma_next: Level, noise_level: float, sigma_max: float
) -> tuple[torch.Tensor, Level]:
    """(μ, s) of the Gaussian transition x_{t+Δt} ~ N(μ, s²I) from x_t = ``x`` with model velocity ``velocity``
    (eq. 9): μ = x + [v + σ_t²/(2t)(x + (1 − t)v)]·Δt, s = σ_t·√(−Δt), Δt = ``sigma_next`` − ``sigma`` < 0."""
    dt = sigma_next - sigma
    scale = sde_noise_scale(sigma, noise_level, sigma_max)
    drift = velocity + scale**2 / (2 * sigma) * (x + (1 - sigma) * velocity)
    return x + drift * dt, scale * (-dt) ** 0.5


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: Level) -> torch.Tensor:
    """Per-sample log N(sample; mean, std²I), averaged over every non-batch element (Flow-GRPO's reduction)."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    elementwise = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return elementwise.mean(dim=tuple(range(1, elementwise.ndim)))


def transition_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: Level) -> torch.Tensor:
    """Per-sample KL(N(mean, s²I) ‖ N(reference_mean, s²I)) = ‖μ − μ_ref‖²/(2s²), averaged over elements."""
    elementwise = (mean - reference_mean) ** 2 / (2 * std**2)
    return elementwise.mean(dim=tuple(range(1, elementwise.ndim)))
