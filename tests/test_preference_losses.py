"""Diffusion-DPO and SmPO losses against hand-computed cases (training/dpo.py, training/smpo.py)."""

import math

import pytest
import torch

from diffsteer.training.dpo import diffusion_dpo_loss, implicit_accuracy, per_sample_mse, preference_margin
from diffsteer.training.smpo import PICKSCORE_MAX, PICKSCORE_MIN, smoothed_preference, smpo_loss


def errors(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4)]


def test_hand_worked_case():
    # model errors 0.3 (image 0) and 0.5 (image 1), reference 0.4 and 0.4: margin = -0.2
    e0, e1, r0, r1 = (torch.tensor([v], dtype=torch.float64) for v in (0.3, 0.5, 0.4, 0.4))
    assert preference_margin(e0, e1, r0, r1).item() == pytest.approx(-0.2)
    # p = 1, beta = 10: -log sigmoid(-0.5 * 10 * -0.2) = log(1 + e^-1)
    assert smpo_loss(e0, e1, r0, r1, torch.tensor([1.0], dtype=torch.float64), 10).item() == pytest.approx(
        math.log1p(math.exp(-1))
    )
    assert diffusion_dpo_loss(e0, e1, r0, r1, 10).item() == pytest.approx(math.log1p(math.exp(-1)))
    # p = 0.75 halves the argument: log(1 + e^-0.5)
    assert smpo_loss(e0, e1, r0, r1, torch.tensor([0.75], dtype=torch.float64), 10).item() == pytest.approx(
        math.log1p(math.exp(-0.5))
    )
    # p = 0 makes image 1 the winner: log(1 + e^1)
    assert smpo_loss(e0, e1, r0, r1, torch.tensor([0.0], dtype=torch.float64), 10).item() == pytest.approx(
        math.log1p(math.exp(1))
    )


def test_half_preference_gives_log2_and_zero_gradient():
    e0, e1, r0, r1 = errors()
    e0.requires_grad_(True)
    e1.requires_grad_(True)
    loss = smpo_loss(e0, e1, r0, r1, torch.full((6,), 0.5, dtype=torch.float64), beta=5000.0)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)))
    loss.sum().backward()
    assert torch.count_nonzero(e0.grad) == 0 and torch.count_nonzero(e1.grad) == 0
    # and close to 1/2 the gradient vanishes continuously
    e0.grad = None
    smpo_loss(e0, e1, r0, r1, torch.full((6,), 0.5001, dtype=torch.float64), beta=10.0).sum().backward()
    assert 0 < e0.grad.abs().max() < 1e-3


def test_p_one_without_inversion_is_diffusion_dpo_and_the_public_codes_beta_is_ten_times_smaller():
    e0, e1, r0, r1 = errors(1)
    beta = 2000.0 * 10
    ours = smpo_loss(e0, e1, r0, r1, torch.ones(6, dtype=torch.float64), beta)
    assert torch.allclose(ours, diffusion_dpo_loss(e0, e1, r0, r1, beta))
    # independent computation, written as the public SmPO code writes it (scale_term with the extra x10):
    public_beta_dpo = 2000.0
    for p in (1.0, 0.8, 0.3):
        scale_term = -0.5 * public_beta_dpo * (2 * p - 1) * 10
        public = -torch.nn.functional.logsigmoid(scale_term * ((e0 - e1) - (r0 - r1)))
        assert torch.allclose(
            smpo_loss(e0, e1, r0, r1, torch.full((6,), p, dtype=torch.float64), 10 * public_beta_dpo), public
        )
    # and as the public Diffusion-DPO code writes its loss
    scale_term = -0.5 * beta
    dpo_public = -torch.nn.functional.logsigmoid(scale_term * ((e0 - e1) - (r0 - r1)))
    assert torch.allclose(diffusion_dpo_loss(e0, e1, r0, r1, beta), dpo_public)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 0.73, 1.0])
def test_swapping_winner_and_loser_with_one_minus_p_leaves_the_loss_unchanged(p):
    e0, e1, r0, r1 = errors(2)
    pref = torch.full((6,), p, dtype=torch.float64)
    assert torch.allclose(smpo_loss(e0, e1, r0, r1, pref, 300.0), smpo_loss(e1, e0, r1, r0, 1 - pref, 300.0))


def test_smoothed_preference_matches_the_public_preprocessing():
    s0, s1 = torch.tensor([0.20, 0.15, 0.2]), torch.tensor([0.15, 0.20, 0.2])
    p = smoothed_preference(s0, s1, PICKSCORE_MIN, PICKSCORE_MAX)
    n0 = (0.20 - PICKSCORE_MIN) / (PICKSCORE_MAX - PICKSCORE_MIN)
    n1 = (0.15 - PICKSCORE_MIN) / (PICKSCORE_MAX - PICKSCORE_MIN)
    expected = math.exp(n0) / (math.exp(n0) + math.exp(n1))
    assert p[0].item() == pytest.approx(expected, rel=1e-6)
    assert p[1].item() == pytest.approx(1 - expected, rel=1e-6)
    assert p[2].item() == 0.5
    # a temperature sharpens towards the binary label
    assert smoothed_preference(s0[:1], s1[:1], PICKSCORE_MIN, PICKSCORE_MAX, 0.01).item() > 0.999
    with pytest.raises(ValueError, match="preference_score_max"):
        smoothed_preference(s0, s1, 1.0, 1.0)
    with pytest.raises(ValueError, match="preference_temperature"):
        smoothed_preference(s0, s1, 0.0, 1.0, 0.0)


def test_per_sample_mse_and_implicit_accuracy():
    a, b = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.allclose(per_sample_mse(a, b), torch.stack([((a[i] - b[i]) ** 2).mean() for i in range(3)]))
    margin = torch.tensor([-1.0, 1.0, -1.0, 2.0])
    assert implicit_accuracy(margin, torch.tensor([1.0, 1.0, 0.0, 0.5])).item() == pytest.approx(1 / 3)
