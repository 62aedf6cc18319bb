"""ReNoise inversion: carrying a clean latent up to timestep t along the model's own DDIM trajectory.

Garibi, Patashnik, Voynov, Averbuch-Elor & Cohen-Or 2024, "ReNoise: Real Image Inversion Through Iterative
Noising" (arXiv:2403.14602), as SmPO (Lu et al. 2025, Sec. 4.2) uses it to estimate the sampling trajectory
q(x_t | x_0) of the model instead of the forward process's random noise.

A deterministic DDIM step between noise levels ᾱ_a and ᾱ_b with noise prediction ε is (Song et al. 2021,
Eq. 12 with σ = 0)

    move(x, ε; ᾱ_a → ᾱ_b) = √ᾱ_b · (x − √(1 − ᾱ_a) ε) / √ᾱ_a + √(1 − ᾱ_b) · ε

Sampling takes it downwards with ε = ε_θ(x_{t_k}, t_k). Plain DDIM inversion takes it upwards, but the
prediction at the point it is heading for is unknown, so it uses the point it starts from,
z_{t_k} = move(z_{t_{k−1}}, ε_θ(z_{t_{k−1}}, t_k)), and the denoising step back does not return exactly to
z_{t_{k−1}}. ReNoise refines the estimate by fixed-point iterations on that implicit equation (its Eq. 5–6):

    z^(0) = move(z_{t_{k−1}}, ε_0),                 ε_0 = ε_θ(z_{t_{k−1}}, t_k)
    z^(j) = move(z_{t_{k−1}}, ε_j),                 ε_j = ε_θ(z^(j−1), t_k),   j = 1..R
    z_{t_k} = move(z_{t_{k−1}}, mean(ε_0, …, ε_R))  (averaging the predictions, its Sec. 4.2)

With R = 0 this is plain DDIM inversion; R = 1 is exactly what the public SmPO code does (the mean of the
initial and one renoised prediction). Following diffusers' inversion pipelines, every evaluation on the way up
to t_k is given the timestep t_k. The clean latent sits at ᾱ = 1; ``timesteps`` is the grid t_1 < … < t_K of
each sample (SmPO's code inverts on a fixed 5-step grid up to the last grid point below the training t and then
treats that latent as being at t; here the grid ends at each sample's own t, see :func:`inversion_grid`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffsteer.guidance.parameterisation import NoiseLevel, add_noise, to_x0

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, ...], timesteps [B] long) -> ε [B, ...]


def ddim_move(x: torch.Tensor, eps: torch.Tensor, level_from: NoiseLevel, level_to: NoiseLevel) -> torch.Tensor:
    """One deterministic DDIM step from ``level_from`` to ``level_to`` (up or down): x̂0 of ε at x, noised again
    with the same ε."""
    return add_noise(to_x0(eps, x, level_from, "epsilon"), eps, level_to)


def inversion_grid(t: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, K] timesteps t_k = round(k·t/K), k = 1..K, per sample: K inverse steps ending exactly at t. For t < K
    some steps repeat a timestep; a DDIM move between equal noise levels is the identity, so they cost only time."""
    fractions = torch.arange(1, steps + 1, device=t.device, dtype=torch.float64) / steps
    return (t[:, None].double() * fractions[None]).round().long()


def _per_sample(alpha_bars: torch.Tensor, t: torch.Tensor, ndim: int) -> NoiseLevel:
    return NoiseLevel.vp(alpha_bars[t].reshape(-1, *([1] * (ndim - 1))))


def _clean(x: torch.Tensor) -> NoiseLevel:
    """ᾱ = 1 for every sample of ``x``."""
    return NoiseLevel.vp(torch.ones((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device))


@torch.no_grad()
def renoise_invert(
    eps_fn: EpsFn, x0: torch.Tensor, grid: torch.Tensor, alpha_bars: torch.Tensor, renoise_iterations: int
) -> torch.Tensor:
    """Carry clean latents ``x0`` [B, ...] up the per-sample ``grid`` [B, K] (see the module docstring);
    ``renoise_iterations`` = R (0: plain DDIM inversion). Returns z at the grid's last timestep."""
    if renoise_iterations < 0:
        raise ValueError(f"renoise_iterations must be non-negative, got {renoise_iterations}")
    alpha_bars = alpha_bars.to(device=x0.device, dtype=torch.float32)
    z = x0
    level_from = _clean(x0)
    for k in range(grid.shape[1]):
        t = grid[:, k]
        level_to = _per_sample(alpha_bars, t, x0.ndim)
        predictions = [eps_fn(z, t)]
        estimate = ddim_move(z, predictions[0], level_from, level_to)
        for _ in range(renoise_iterations):
            predictions.append(eps_fn(estimate, t))
            estimate = ddim_move(z, predictions[-1], level_from, level_to)
        if renoise_iterations:
            estimate = ddim_move(z, torch.stack(predictions).mean(0), level_from, level_to)
        z, level_from = estimate, level_to
    return z


@torch.no_grad()
def ddim_reconstruct(eps_fn: EpsFn, z: torch.Tensor, grid: torch.Tensor, alpha_bars: torch.Tensor) -> torch.Tensor:
    """Denoise ``z`` (at the grid's last timestep) back down the same grid to the clean latent with DDIM."""
    alpha_bars = alpha_bars.to(device=z.device, dtype=torch.float32)
    clean = _clean(z)
    for k in reversed(range(grid.shape[1])):
        t = grid[:, k]
        level_to = _per_sample(alpha_bars, grid[:, k - 1], z.ndim) if k else clean
        z = ddim_move(z, eps_fn(z, t), _per_sample(alpha_bars, t, z.ndim), level_to)
    return z
