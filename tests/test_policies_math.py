"""Each policy's math against a direct, independent computation of its paper's equations."""

import math

import numpy as np
import pytest
import torch

from diffsteer.guidance.parameterisation import NoiseLevel, from_eps, from_x0, to_eps, to_x0
from diffsteer.guidance.policies.apg import apg_update
from diffsteer.guidance.policies.cfg import cfg_combine, rescale_guidance, scheduled_scale
from diffsteer.guidance.policies.cfg_zero_star import cfg_zero_star_combine, optimised_scale
from diffsteer.guidance.policies.linear_ag import estimate_difference
from diffsteer.guidance.policies.perp_neg import perp_neg_combine
from diffsteer.guidance.sampler import generate

rng = np.random.default_rng(0)


def rand(*shape):
    return rng.standard_normal(shape).astype(np.float64)


def apg_reference(d_conds, d_unconds, w, eta, beta, r):
    """Sadat et al. 2024, Algorithm 1, one image at a time with explicit dot products."""
    running, outputs = None, []
    for dc, du in zip(d_conds, d_unconds):
        diff = dc - du
        if running is not None:
            diff = diff + beta * running
        running = diff.copy()
        out = np.empty_like(dc)
        for b in range(dc.shape[0]):
            v = diff[b].ravel()
            if r > 0:
                v = v * min(1.0, r / np.sqrt(np.sum(v * v)))
            u = dc[b].ravel()
            par = (np.dot(v, u) / np.dot(u, u)) * u
            orth = v - par
            out[b] = (u + (w - 1) * (orth + eta * par)).reshape(dc[b].shape)
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("eta,beta,r", [(0.0, -0.5, 0.0), (0.3, 0.4, 2.0), (1.0, 0.0, 0.0), (0.0, -0.75, 5.0)])
def test_apg_matches_algorithm(eta, beta, r):
    steps = [(rand(3, 4, 5, 5), rand(3, 4, 5, 5)) for _ in range(4)]
    expected = apg_reference([c for c, _ in steps], [u for _, u in steps], 6.0, eta, beta, r)
    running = None
    for (dc, du), exp in zip(steps, expected):
        out, running = apg_update(torch.tensor(dc), torch.tensor(du), running, 6.0, eta, beta, r)
        np.testing.assert_allclose(out.numpy(), exp, rtol=1e-10, atol=1e-10)


def test_apg_with_eta_one_no_momentum_no_threshold_is_cfg():
    dc, du = torch.tensor(rand(2, 4, 3, 3)), torch.tensor(rand(2, 4, 3, 3))
    out, _ = apg_update(dc, du, None, 7.0, 1.0, 0.0, 0.0)
    torch.testing.assert_close(out, du + 7.0 * (dc - du))


def test_apg_drops_parallel_component():
    """η = 0: the update is orthogonal to D_c (its inner product with D_c is that of D_c alone)."""
    dc, du = torch.tensor(rand(1, 4, 3, 3)), torch.tensor(rand(1, 4, 3, 3))
    out, _ = apg_update(dc, du, None, 5.0, 0.0, 0.0, 0.0)
    update = (out - dc).flatten()
    assert abs(float(update @ dc.flatten())) < 1e-9
    assert float(update.norm()) > 1e-3


def test_cfg_and_rescale_hand_worked():
    cond = torch.tensor([[1.0, 3.0]])
    uncond = torch.tensor([[1.0, 1.0]])
    guided = cfg_combine(cond, uncond, 3.0)  # 1 + 3*(0, 2) = (1, 7)
    assert guided.tolist() == [[1.0, 7.0]]
    # std (unbiased) of cond = sqrt(2), of guided = sqrt(18): rescaled = guided / 3
    out = rescale_guidance(guided, cond, 0.5)
    expected = 0.5 * torch.tensor([[1 / 3, 7 / 3]]) + 0.5 * guided
    torch.testing.assert_close(out, expected)


def test_scale_schedules_hand_worked():
    assert scheduled_scale("constant", 7.0, 1.0, 0.3) == 7.0
    assert scheduled_scale("linear", 7.0, 1.0, 0.25) == pytest.approx(5.5)
    assert scheduled_scale("cosine", 7.0, 1.0, 0.0) == pytest.approx(7.0)
    assert scheduled_scale("cosine", 7.0, 1.0, 0.5) == pytest.approx(4.0)
    assert scheduled_scale("cosine", 7.0, 1.0, 1.0) == pytest.approx(1.0)


def test_cfg_zero_star_matches_equations():
    c, u = rand(2, 4, 3, 3), rand(2, 4, 3, 3)
    w = 4.0
    s = optimised_scale(torch.tensor(c), torch.tensor(u))
    for b in range(2):
        s_b = np.dot(c[b].ravel(), u[b].ravel()) / np.dot(u[b].ravel(), u[b].ravel())
        assert float(s[b]) == pytest.approx(s_b)
    out = cfg_zero_star_combine(torch.tensor(c), torch.tensor(u), s, w).numpy()
    for b in range(2):
        s_b = float(s[b])
        np.testing.assert_allclose(out[b], (1 - w) * s_b * u[b] + w * c[b], rtol=1e-12)


def test_perp_neg_matches_equations():
    c, e, n = rand(2, 4, 3, 3), rand(2, 4, 3, 3), rand(2, 4, 3, 3)
    out = perp_neg_combine(torch.tensor(c), torch.tensor(e), torch.tensor(n), 5.0, 2.0).numpy()
    for b in range(2):
        pos = (c[b] - e[b]).ravel()
        neg = (n[b] - e[b]).ravel()
        perp = neg - np.dot(neg, pos) / np.dot(pos, pos) * pos
        expected = e[b].ravel() + 5.0 * pos - 2.0 * perp
        np.testing.assert_allclose(out[b].ravel(), expected, rtol=1e-10)


def test_linear_ag_estimator_hand_worked():
    d2, d4 = torch.tensor([1.0]), torch.tensor([3.0])
    assert estimate_difference([(4, d4)], 5, True).item() == 3.0
    assert estimate_difference([(2, d2), (4, d4)], 5, False).item() == 3.0
    # Δ4 + (5−4)/(4−2)·(Δ4 − Δ2) = 3 + 0.5·2 = 4
    assert estimate_difference([(2, d2), (4, d4)], 5, True).item() == 4.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_space_conversions(prediction_type):
    ab = 0.37
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    x0, eps = torch.tensor(rand(2, 3)), torch.tensor(rand(2, 3))
    x = a * x0 + s * eps
    output = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
    level = NoiseLevel.vp(ab)
    torch.testing.assert_close(to_x0(output, x, level, prediction_type), x0)
    torch.testing.assert_close(to_eps(output, x, level, prediction_type), eps)
    torch.testing.assert_close(from_x0(x0, x, level, prediction_type), output)
    torch.testing.assert_close(from_eps(eps, x, level, prediction_type), output)


def _pixels(model, policy, **kw):
    params = {"prompt": "a red circle", "steps": 5, "seed": 3, "num_images": 2, "policy": policy, **kw}
    return generate(model, params).pixels


@pytest.mark.parametrize("fixture", ["sd_model", "vpred_model"])
def test_apg_reduces_to_cfg_in_a_generation(fixture, request):
    model = request.getfixturevalue(fixture)
    apg = _pixels(model, "apg:scale=6,eta=1,momentum=0,norm_threshold=0")
    cfg = _pixels(model, "cfg:scale=6")
    torch.testing.assert_close(apg, cfg, atol=2e-5, rtol=0)
    assert (_pixels(model, "apg:scale=6,eta=0,momentum=-0.5") - cfg).abs().max() > 1e-3


def test_perp_neg_without_negative_is_cfg(sd_model):
    torch.testing.assert_close(
        _pixels(sd_model, "perp_neg:scale=6"), _pixels(sd_model, "cfg:scale=6"), atol=2e-5, rtol=0
    )
    with_negative = _pixels(sd_model, "perp_neg:scale=6", negative_prompt="blue square")
    assert (with_negative - _pixels(sd_model, "cfg:scale=6")).abs().max() > 1e-4


def test_cfg_zero_star_zero_init_leaves_the_sample_in_place(sd_model):
    """ε = 0 for every step: DDIM keeps x/√ᾱ fixed, so the result is the decoded initial noise scaled."""
    from diffsteer.guidance.sampler import prepare

    prepared = prepare(
        sd_model,
        {"prompt": "x", "steps": 4, "seed": 1, "scheduler": "ddim", "policy": "cfg_zero_star:zero_init_steps=4"},
    )
    with torch.no_grad():
        run = prepared.run()
    from diffsteer.guidance.sampler import make_scheduler

    scheduler, timesteps = make_scheduler(sd_model, prepared.params)
    acp = scheduler.alphas_cumprod
    final_alpha_bar = float(scheduler.final_alpha_cumprod)
    expected = prepared.noise * math.sqrt(final_alpha_bar) / math.sqrt(float(acp[int(timesteps[0])]))
    torch.testing.assert_close(run.latents, expected, atol=1e-5, rtol=1e-5)
    assert run.denoiser.unet_calls == 0


def test_linear_ag_and_perp_neg_combine_eps_on_vp_models():
    """On VP models both combine ε (the velocity of the VP sampling ODE); for a v-prediction model
    ε = s·x + a·v and back v = (ε − s·x)/a."""
    from diffsteer.guidance.denoiser import StepInfo
    from diffsteer.guidance.policies.base import PolicyState
    from diffsteer.guidance.policies.linear_ag import LinearAG, LinearAGParams
    from diffsteer.guidance.policies.perp_neg import PerpNeg, PerpNegParams

    levels = [0.3, 0.6]  # ᾱ at steps 0 and 1
    xs = [rand(2, 4, 3, 3) for _ in levels]
    outs = [{k: rand(2, 4, 3, 3) for k in ("cond", "uncond", "empty", "negative")} for _ in levels]

    def eps(i, name):
        return math.sqrt(1 - levels[i]) * xs[i] + math.sqrt(levels[i]) * outs[i][name]

    def back(i, e):
        return (e - math.sqrt(1 - levels[i]) * xs[i]) / math.sqrt(levels[i])

    def info(i):
        return StepInfo(i, len(levels), torch.tensor(500 - 100 * i), NoiseLevel.vp(levels[i]), "v_prediction")

    def denoiser(x, step, request):
        return {k: torch.tensor(outs[step.index][k]) for k in request}

    out = PerpNeg(PerpNegParams(scale=5.0, negative_scale=2.0)).step(
        PolicyState(), torch.tensor(xs[0]), info(0), denoiser
    )
    guided = np.empty_like(xs[0])
    for b in range(2):
        pos, neg = (eps(0, "cond") - eps(0, "empty"))[b].ravel(), (eps(0, "negative") - eps(0, "empty"))[b].ravel()
        perp = neg - np.dot(neg, pos) / np.dot(pos, pos) * pos
        guided[b] = (eps(0, "empty")[b].ravel() + 5.0 * pos - 2.0 * perp).reshape(guided[b].shape)
    np.testing.assert_allclose(out.numpy(), back(0, guided), rtol=1e-9, atol=1e-12)

    policy = LinearAG(LinearAGParams(scale=4.0, warmup_steps=0, period=2))  # step 1 estimated from step 0
    state = policy.start(None)
    policy.step(state, torch.tensor(xs[0]), info(0), denoiser)
    out = policy.step(state, torch.tensor(xs[1]), info(1), denoiser)
    e_u = eps(1, "cond") + (eps(0, "uncond") - eps(0, "cond"))
    expected = back(1, e_u + 4.0 * (eps(1, "cond") - e_u))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert state.estimated_steps == [1]
