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

**Flow models** (x_t = (1 − σ)·x0 + σ·ε, velocity u = ε − x0): the same deterministic move with the same (x̂0, ε̂)
is the Euler step of the flow ODE, move(x, u; σ_a → σ_b) = x + (σ_b − σ_a)·u, so the inversion is inverse Euler
steps of the trained model from σ = 0 up to the training σ, with ReNoise's fixed-point iterations and averaging of
the velocities (for a fixed start point ε̂ is affine in û, so averaging either is the same). Both schedules go
through :func:`inverse_move` with the model's velocity in the schedule's own time
(:func:`diffsteer.guidance.parameterisation.to_velocity`: ε for VP, u for flow); a DDIM step is the Euler step
of the VE-scaled x/√ᾱ along σ = √(1 − ᾱ)/√ᾱ, so one rule covers both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffsteer.guidance.parameterisation import NoiseLevel, add_noise, to_x0

# (x [B, ...], timesteps [B]) -> the model's velocity in the schedule's own time (ε for VP, u = ε − x0 for flow)
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# timesteps [B] -> each sample's NoiseLevel, broadcasting over x (e.g. Trainer.noise_level)
LevelFn = Callable[[torch.Tensor], NoiseLevel]


def ddim_move(x: torch.Tensor, eps: torch.Tensor, level_from: NoiseLevel, level_to: NoiseLevel) -> torch.Tensor:
    """One deterministic DDIM step from ``level_from`` to ``level_to`` (up or down): x̂0 of ε at x, noised again
    with the same ε."""
    return add_noise(to_x0(eps, x, level_from, "epsilon"), eps, level_to)


def inverse_move(x: torch.Tensor, velocity: torch.Tensor, level_from: NoiseLevel, level_to: NoiseLevel) -> torch.Tensor:
    """One deterministic step between two levels of one schedule with the velocity ``velocity``: DDIM for VP
    (velocity ε), Euler x + (σ_to − σ_from)·u for flow (the same move, without dividing by 1 − σ)."""
    if level_from.schedule == "flow":
        return x + (level_to.noise - level_from.noise) * velocity
    return ddim_move(x, velocity, level_from, level_to)


def inversion_grid(t: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, K] timesteps t_k = k·t/K, k = 1..K, per sample: K inverse steps ending exactly at t (rounded for integer
    VP timesteps; for t < K some then repeat, and a move between equal noise levels is the identity)."""
    fractions = torch.arange(1, steps + 1, device=t.device, dtype=torch.float64) / steps
    grid = t[:, None].double() * fractions[None]
    return grid.to(t.dtype) if t.is_floating_point() else grid.round().long()


def _clean(x: torch.Tensor, schedule: str) -> NoiseLevel:
    """Signal 1, noise 0 (ᾱ = 1, σ = 0) for every sample of ``x``."""
    ones = torch.ones((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device)
    return NoiseLevel(ones, 0 * ones, schedule)


@torch.no_grad()
def renoise_invert(
    velocity_fn: VelocityFn, x0: torch.Tensor, grid: torch.Tensor, level_of: LevelFn, renoise_iterations: int
) -> torch.Tensor:
    """Carry clean latents ``x0`` [B, ...] up the per-sample ``grid`` [B, K] (see the module docstring);
    ``renoise_iterations`` = R (0: plain DDIM / Euler inversion). Returns z at the grid's last timestep."""
    if renoise_iterations < 0:
        raise ValueError(f"renoise_iterations must be non-negative, got {renoise_iterations}")
    z = x0
    level_from = _clean(x0, level_of(grid[:, 0]).schedule)
    for k in range(grid.shape[1]):
        t = grid[:, k]
        level_to = level_of(t)
        predictions = [velocity_fn(z, t)]
        estimate = inverse_move(z, predictions[0], level_from, level_to)
        for _ in range(renoise_iterations):
            predictions.append(velocity_fn(estimate, t))
            estimate = inverse_move(z, predictions[-1], level_from, level_to)
        if renoise_iterations:
            estimate = inverse_move(z, torch.stack(predictions).mean(0), level_from, level_to)
        z, level_from = estimate, level_to
    return z


@torch.no_grad()
def reconstruct(velocity_fn: VelocityFn, z: torch.Tensor, grid: torch.Tensor, level_of: LevelFn) -> torch.Tensor:
    """Denoise ``z`` (at the grid's last timestep) back down the same grid to the clean latent (DDIM / Euler)."""
    clean = _clean(z, level_of(grid[:, 0]).schedule)
    for k in reversed(range(grid.shape[1])):
        t = grid[:, k]
        level_to = level_of(grid[:, k - 1]) if k else clean
        z = inverse_move(z, velocity_fn(z, t), level_of(t), level_to)
    return z


def vp_levels(alpha_bars: torch.Tensor) -> LevelFn:
    """The level function of a VP schedule's ᾱ table (integer timesteps)."""

    def level_of(t: torch.Tensor) -> NoiseLevel:
        return NoiseLevel.vp(alpha_bars.to(t.device, torch.float32)[t.long()].view(-1, 1, 1, 1))

    return level_of
