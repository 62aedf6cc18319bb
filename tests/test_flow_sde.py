"""Flow-GRPO's SDE (training/flow_sde.py) against independent computations: its transition log-probability is the
Gaussian density computed by scipy, it keeps the flow ODE's marginals on Gaussian data (exact velocity in closed
form), a = 0 is the Euler ODE step, and the KL of two transitions is the Gaussian KL by its general formula. Group
advantages (training/group_advantages.py) by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from diffsteer.training.distributed import Processes
from diffsteer.training.flow_sde import gaussian_log_prob, sde_noise_scale, sde_transition, transition_kl
from diffsteer.training.group_advantages import gather_global, group_advantages


def exact_gaussian_velocity(x: np.ndarray, t: float, mean: float, std: float) -> np.ndarray:
    """E[ε − x0 | x_t = x] for data N(mean, std²): x_t ~ N((1 − t)m, (1 − t)²s² + t²) and
    Cov(ε − x0, x_t) = t − (1 − t)s², so v(x) = −m + (t − (1 − t)s²)/((1 − t)²s² + t²)·(x − (1 − t)m)."""
    variance = (1 - t) ** 2 * std**2 + t**2
    return -mean + (t - (1 - t) * std**2) / variance * (x - (1 - t) * mean)


def test_the_step_log_probability_is_the_gaussian_density_computed_by_scipy():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g).double()
    sigma, sigma_next, a = 0.6, 0.45, 0.7
    mean, std = sde_transition(x, v, sigma, sigma_next, a, sigma_max=0.9)
    # μ and s written out from eq. 9 by hand
    scale = a * np.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    expected_mean = x.numpy() + (v.numpy() + scale**2 / (2 * sigma) * (x.numpy() + (1 - sigma) * v.numpy())) * dt
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-12)
    assert std == pytest.approx(scale * np.sqrt(-dt), rel=1e-12)
    sample = mean + std * torch.randn(mean.shape, generator=g, dtype=torch.float64)
    direct = stats.norm.logpdf(sample.numpy(), loc=mean.numpy(), scale=std).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(gaussian_log_prob(sample, mean, std).numpy(), direct, rtol=1e-12)


def test_the_first_step_caps_the_scale_with_the_grids_second_sigma_and_per_sample_levels_broadcast():
    assert sde_noise_scale(1.0, 0.7, sigma_max=0.95) == pytest.approx(0.7 * np.sqrt(1 / 0.05))
    levels = torch.tensor([1.0, 0.5]).view(2, 1, 1, 1)
    scales = sde_noise_scale(levels, 0.7, sigma_max=0.95).flatten()
    np.testing.assert_allclose(scales.numpy(), [0.7 * np.sqrt(1 / 0.05), 0.7], rtol=1e-6)


def test_noise_level_zero_is_the_euler_ode_step():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mean, std = sde_transition(x, v, 0.8, 0.7, 0.0, sigma_max=0.9)
    torch.testing.assert_close(mean, x + v * (0.7 - 0.8), rtol=0, atol=1e-7)
    assert std == 0


@pytest.mark.parametrize("noise_level", [0.5, 1.0])
def test_the_sde_keeps_the_flow_odes_marginals_on_gaussian_data(noise_level):
    """Data N(m, s²): the marginal at t is N((1 − t)m, (1 − t)²s² + t²) in closed form; particles simulated with the
    SDE (exact velocity) from N(0, 1) at t = 1 match it at several t, as the ODE's do, while the extra noise is
    real (the SDE paths differ from the ODE paths)."""
    m, s = 1.5, 0.4
    grid = np.linspace(1.0, 0.0, 401)
    rng = np.random.default_rng(0)
    start = rng.standard_normal(200_000)
    x_sde, x_ode = start.copy(), start.copy()
    checks = {0.75: None, 0.5: None, 0.25: None, 0.0: None}
    for t, t_next in zip(grid[:-1], grid[1:]):
        v = exact_gaussian_velocity(x_sde, t, m, s)
        mean, std = sde_transition(x_sde, v, t, t_next, noise_level, grid[1])  # plain arrays: the same arithmetic
        x_sde = mean + std * rng.standard_normal(len(x_sde))
        x_ode = x_ode + exact_gaussian_velocity(x_ode, t, m, s) * (t_next - t)
        for key in checks:
            if abs(t_next - key) < 1e-9:
                checks[key] = (x_sde.copy(), x_ode.copy())
    for t, (sde, ode) in checks.items():
        mean, variance = (1 - t) * m, (1 - t) ** 2 * s**2 + t**2
        for particles in (sde, ode):
            assert particles.mean() == pytest.approx(mean, abs=0.01), t
            assert particles.var() == pytest.approx(variance, rel=0.02, abs=0.002), t
        assert np.abs(sde - ode).mean() > 0.05  # the SDE really is stochastic


def test_the_kl_of_two_transitions_is_the_general_gaussian_kl():
    g = torch.Generator().manual_seed(1)
    mu, mu_ref = (
        torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 2, 2, generator=g).double(),
    )
    std = 0.3
    # KL(N(μ1, Σ) ‖ N(μ2, Σ)) = ½[tr(Σ⁻¹Σ) − k + (μ2 − μ1)ᵀΣ⁻¹(μ2 − μ1) + ln(detΣ/detΣ)], per element then averaged
    k = 12
    diff = (mu - mu_ref).reshape(2, -1).numpy()
    general = 0.5 * (k - k + (diff**2).sum(axis=1) / std**2 + 0.0) / k
    np.testing.assert_allclose(transition_kl(mu, mu_ref, std).numpy(), general, rtol=1e-12)


def test_group_advantages_by_hand():
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    # group 1: mean 2.5, population std √1.25; group 2: all equal, std 0 -> advantages 0
    std = np.sqrt(1.25)
    expected = [(-1.5) / (std + 1e-4), (-0.5) / (std + 1e-4), 0.5 / (std + 1e-4), 1.5 / (std + 1e-4), 0, 0, 0, 0]
    np.testing.assert_allclose(group_advantages(rewards, 4), expected, rtol=1e-12)
    np.testing.assert_allclose(group_advantages(np.array([0.0, 1.0]), 2), [-0.5 / 0.5001, 0.5 / 0.5001], rtol=1e-12)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_gather_places_each_piece_at_its_positions_and_refuses_a_gap():
    one = Processes()
    np.testing.assert_array_equal(gather_global(one, {2: [3.0, 4.0], 0: [1.0, 2.0]}, 4), [1, 2, 3, 4])
    with pytest.raises(RuntimeError, match="missing"):
        gather_global(one, {0: [1.0]}, 2)
