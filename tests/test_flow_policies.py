"""Every guidance policy on flow-matching models (velocity v = ε − x0, x_t = (1 − σ)·x0 + σ·ε), against an
independent computation of its formula.

Most tests run one or a few policy steps with a stand-in for the denoiser (fixed velocities per condition and
step, evaluations counted per image) and compare the returned velocity with the paper's equations written out
here in numpy on v, x0 = x_t − σ·v or ε = x_t + (1 − σ)·v; the others run the tiny random-weight FLUX.1 models
(``builtin:tiny-flux``: guidance-distilled, ``builtin:tiny-flux-schnell``) end to end, for the σ schedule, NFE,
zero-init, dynamic CFG's choice and ReNO. The rewards are weight-free image statistics, so nothing downloads.
"""

from collections.abc import Mapping

import numpy as np
import pytest
import torch

from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.latents import decode
from diffsteer.guidance.models import load_model
from diffsteer.guidance.parameterisation import NoiseLevel
from diffsteer.guidance.policies.adaptive import AdaptiveGuidance, AGParams
from diffsteer.guidance.policies.apg import APG, APGParams
from diffsteer.guidance.policies.base import SamplingContext
from diffsteer.guidance.policies.cfg import CFG, CFGParams
from diffsteer.guidance.policies.cfg_zero_star import CFGZeroStar, CFGZeroStarParams
from diffsteer.guidance.policies.dynamic import native_latent_area
from diffsteer.guidance.policies.linear_ag import LinearAG, LinearAGParams
from diffsteer.guidance.policies.perp_neg import PerpNeg, PerpNegParams
from diffsteer.guidance.policies.reno import ReNO
from diffsteer.guidance.reward_models import RewardModels
from diffsteer.guidance.sampler import generate, make_scheduler, prepare
from diffsteer.rewards import build_reward

REWARD = "saturation:1"  # weight-free rewards: nothing to download
SHAPE = (2, 4, 4, 6)  # [B, C, h, w] latents: two images, 2×2 patches on a non-square grid
rng = np.random.default_rng(29)


@pytest.fixture(autouse=True)
def _fresh_draws():
    """The same random predictions for a test whichever tests run before it."""
    global rng
    rng = np.random.default_rng(29)


def rand(*shape):
    return rng.standard_normal(shape)


@pytest.fixture(scope="module")
def flux_dev():
    return load_model("builtin:tiny-flux")


@pytest.fixture(scope="module")
def flux_schnell():
    return load_model("builtin:tiny-flux-schnell")


class StandIn:
    """The Denoiser's call interface over fixed outputs: ``outputs`` maps condition names to [B, ...] arrays, or
    is a list of such mappings, one per step index. Counts evaluations per image and condition, and calls."""

    def __init__(self, outputs, batch=SHAPE[0]):
        self.outputs = outputs
        self.batch = batch
        self.counts: dict[str, np.ndarray] = {}
        self.calls = 0

    @property
    def evaluations(self) -> np.ndarray:
        return sum(self.counts.values(), np.zeros(self.batch, dtype=int))

    def __call__(self, x, info, request):
        if not isinstance(request, Mapping):
            request = {name: None for name in request}
        table = self.outputs[info.index] if isinstance(self.outputs, list) else self.outputs
        result = {}
        for name, index in request.items():
            rows = np.arange(self.batch) if index is None else np.asarray(index, dtype=int)
            self.counts.setdefault(name, np.zeros(self.batch, dtype=int))[rows] += 1
            result[name] = torch.tensor(table[name][rows])
        self.calls += 1
        return result


def flow_step(index, num_steps, sigma, patch=2):
    return StepInfo(index, num_steps, torch.tensor(1000.0 * sigma), NoiseLevel.flow(sigma), "flow", patch)


def context(num_steps, batch=SHAPE[0]):
    return SamplingContext(num_steps, batch, "flow", has_negative_prompt=False, schedule="flow")


def run_steps(policy, sigmas, xs, denoiser):
    """The policy's outputs (numpy) for steps at ``sigmas`` and inputs ``xs``, with one state."""
    state = policy.start(context(len(sigmas)))
    outs = [
        policy.step(state, torch.tensor(x), flow_step(i, len(sigmas), s), denoiser).numpy()
        for i, (s, x) in enumerate(zip(sigmas, xs))
    ]
    return outs, state


def per_image(fn, *arrays):
    """fn applied image by image to flattened rows, reshaped back."""
    return np.stack([fn(*(a[b].ravel() for a in arrays)).reshape(arrays[0].shape[1:]) for b in range(len(arrays[0]))])


# ---------------------------------------------------------------- CFG


def test_cfg_is_true_cfg_on_the_velocity_with_rescale():
    sigma, w, phi = 0.6, 5.0, 0.7
    x, c, u = rand(*SHAPE), rand(*SHAPE), rand(*SHAPE)
    stand_in = StandIn({"cond": c, "uncond": u})
    (out,), _ = run_steps(CFG(CFGParams(scale=w, rescale=phi)), [sigma], [x], stand_in)
    g = u + w * (c - u)
    expected = per_image(lambda gb, cb: phi * gb * np.std(cb, ddof=1) / np.std(gb, ddof=1) + (1 - phi) * gb, g, c)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    assert stand_in.evaluations.tolist() == [2, 2] and stand_in.calls == 1

    # without rescale, CFG on v is CFG on x0 = x − σ·v (and on ε = x + (1 − σ)·v), converted back
    (plain,), _ = run_steps(CFG(CFGParams(scale=w)), [sigma], [x], StandIn({"cond": c, "uncond": u}))
    x0_c, x0_u = x - sigma * c, x - sigma * u
    x0 = x0_u + w * (x0_c - x0_u)
    np.testing.assert_allclose(plain, (x - x0) / sigma, rtol=1e-10, atol=1e-12)
    eps_c, eps_u = x + (1 - sigma) * c, x + (1 - sigma) * u
    eps = eps_u + w * (eps_c - eps_u)
    np.testing.assert_allclose(plain, (eps - x) / (1 - sigma), rtol=1e-10, atol=1e-12)


def pack(t):
    """[B, C, h, w] -> [B, h/2·w/2, C·4]: diffusers' FLUX/Qwen-Image token packing of 2×2 patches."""
    b, ch, h, w = t.shape
    return t.reshape(b, ch, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), ch * 4)


def unpack(tokens, shape):
    b, ch, h, w = shape
    return tokens.reshape(b, h // 2, w // 2, ch, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(shape)


def test_cfg_renorm_matches_qwenimage_pipeline_on_packed_tokens():
    """QwenImagePipeline: comb = neg + w·(cond − neg); comb · ‖cond‖/‖comb‖ over each packed token's channels."""
    x, c, u = rand(*SHAPE), rand(*SHAPE), rand(*SHAPE)
    (out,), _ = run_steps(CFG(CFGParams(scale=4.0, renorm=True)), [0.5], [x], StandIn({"cond": c, "uncond": u}))
    comb, cond = pack(u + 4.0 * (c - u)), pack(c)
    norm = lambda t: np.linalg.norm(t, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(out, unpack(comb * (norm(cond) / norm(comb)), SHAPE), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(norm(pack(out)), norm(cond), rtol=1e-10)


def test_cfg_sigma_interval_boundaries():
    """Kynkäänniemi et al. 2024: guidance only where σ_lo < σ ≤ σ_hi, the conditional velocity alone elsewhere,
    without the unconditional evaluation."""
    sigmas = [1.0, 0.5, 0.375, 0.25, 0.125]
    x, c, u = rand(*SHAPE), rand(*SHAPE), rand(*SHAPE)
    stand_in = StandIn({"cond": c, "uncond": u})
    outs, state = run_steps(CFG(CFGParams(scale=3.0, sigma_low=0.25, sigma_high=0.5)), sigmas, [x] * 5, stand_in)
    guided = [False, True, True, False, False]
    for out, g in zip(outs, guided):
        np.testing.assert_allclose(out, u + 3.0 * (c - u) if g else c, rtol=1e-12, atol=1e-12)
    assert state.trace["scales"] == [3.0 if g else 1.0 for g in guided]
    assert stand_in.counts["uncond"].tolist() == [2, 2] and stand_in.counts["cond"].tolist() == [5, 5]


def flux_sigmas(model, steps, height, width):
    """FLUX.1's σ grid computed here: σ = linspace(1, 1/steps), shifted by exp(μ)/(exp(μ) + 1/σ − 1) with μ
    linear in the packed token count (FluxPipeline's calculate_shift)."""
    cfg = model.scheduler_config
    tokens = (height // model.vae_scale_factor // 2) * (width // model.vae_scale_factor // 2)  # 2×2 patches
    slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    mu = cfg["base_shift"] + slope * (tokens - cfg["base_image_seq_len"])
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    return np.exp(mu) / (np.exp(mu) + 1.0 / sigmas - 1.0), sigmas


def test_cfg_sigma_interval_on_the_shifted_flux_schedule(flux_dev):
    """The σ interval is in the shifted σ the model sees: the resolution shift moves which steps it covers."""
    steps, low, high = 6, 0.4, 0.7
    shifted, unshifted = flux_sigmas(flux_dev, steps, 32, 32)
    guided = [bool(low < s <= high) for s in shifted]
    assert guided != [bool(low < s <= high) for s in unshifted]  # the shift matters for this interval
    assert min(abs(shifted - low).min(), abs(shifted - high).min()) > 1e-3  # no σ on a boundary
    policy = f"cfg:scale=4,sigma_low={low},sigma_high={high}"
    result = generate(flux_dev, {"prompt": "a red circle", "steps": steps, "seed": 1, "policy": policy})
    assert result.trace["scales"] == [4.0 if g else 1.0 for g in guided]
    assert result.nfe == [sum(2 if g else 1 for g in guided)] and result.unet_calls == steps


def test_cfg_step_fraction_interval_and_linear_schedule():
    n = 8
    x, c, u = rand(*SHAPE), rand(*SHAPE), rand(*SHAPE)
    stand_in = StandIn({"cond": c, "uncond": u})
    params = CFGParams(scale=7.0, scale_end=1.0, schedule="linear", interval_start=0.25, interval_end=0.75)
    outs, _ = run_steps(CFG(params), list(np.linspace(1.0, 1.0 / n, n)), [x] * n, stand_in)
    for i, out in enumerate(outs):
        w = 7.0 + (1.0 - 7.0) * i / (n - 1)
        guided = 0.25 <= i / n < 0.75 and w > 1.0
        np.testing.assert_allclose(out, u + w * (c - u) if guided else c, rtol=1e-12, atol=1e-12)
    assert stand_in.counts["uncond"].tolist() == [4, 4]  # steps 2, 3, 4, 5


def test_cfg_nfe_on_a_flow_model_is_counted_as_on_a_unet_model(flux_dev, sd_model):
    """2 evaluations per guided step, 1 per unguided one (here: outside the step interval)."""
    params = {
        "prompt": "a red circle",
        "steps": 4,
        "seed": 1,
        "num_images": 2,
        "policy": "cfg:scale=4,interval_start=0.5",
    }
    flow, unet = generate(flux_dev, params), generate(sd_model, params)
    assert flow.nfe == unet.nfe == [1 + 1 + 2 + 2] * 2
    assert flow.unet_calls == unet.unet_calls == 4


def test_cfg_is_true_cfg_on_top_of_distilled_guidance_with_the_real_denoiser(flux_dev):
    """One step of the real tiny FLUX.1-dev: both branches carry the distilled guidance input, and the policy's
    output is the CFG formula on their velocities (with rescale)."""
    prepared = prepare(flux_dev, {"prompt": "a red circle", "steps": 3, "seed": 2, "policy": "cfg:scale=5,rescale=0.5"})
    assert prepared.conditions["cond"].added["guidance"].tolist() == [3.5]
    assert prepared.conditions["uncond"].added["guidance"].tolist() == [3.5]
    scheduler, timesteps = make_scheduler(flux_dev, prepared.params)
    sigma = float(scheduler.sigmas[1])
    info = StepInfo(1, len(timesteps), timesteps[1], NoiseLevel.flow(sigma), "flow", 2)
    x = prepared.noise

    def denoiser():
        return Denoiser(
            flux_dev.backbone, prepared.conditions, "flow", aliases=prepared.aliases, forward=flux_dev.family.forward
        )

    with torch.no_grad():
        ref = denoiser()(x, info, ["cond", "uncond"])
        c, u = ref["cond"].double().numpy(), ref["uncond"].double().numpy()
        counted = denoiser()
        out = prepared.policy.step(prepared.policy.start(context(3, 1)), x, info, counted).double().numpy()
    g = u + 5.0 * (c - u)
    expected = per_image(lambda gb, cb: 0.5 * gb * np.std(cb, ddof=1) / np.std(gb, ddof=1) + 0.5 * gb, g, c)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert counted.evaluations.tolist() == [2] and counted.unet_calls == 1


# ---------------------------------------------------------------- APG


def apg_on_x0_reference(sigmas, xs, conds, unconds, w, eta, beta, r):
    """Sadat et al. 2024, Algorithm 1 on D = x − σ·v, image by image, returned as velocities (x − D̂)/σ."""
    running, outputs, norms = None, [], []
    for sigma, x, vc, vu in zip(sigmas, xs, conds, unconds):
        dc, du = x - sigma * vc, x - sigma * vu
        diff = dc - du if running is None else dc - du + beta * running
        running = diff.copy()
        out = np.empty_like(dc)
        for b in range(len(dc)):
            d, cb = diff[b].ravel(), dc[b].ravel()
            norms.append(np.linalg.norm(d))
            if r > 0:
                d = d * min(1.0, r / np.linalg.norm(d))
            par = np.dot(d, cb) / np.dot(cb, cb) * cb
            out[b] = (cb + (w - 1) * (d - par + eta * par)).reshape(dc[b].shape)
        outputs.append((x - out) / sigma)
    return outputs, norms


def test_apg_works_on_x0_on_flow_models():
    sigmas = [1.0, 0.7, 0.4]  # σ = 1 included: x0 = x − v, and back v = x − x0
    xs = [rand(*SHAPE) for _ in sigmas]
    steps = [{"cond": rand(*SHAPE), "uncond": rand(*SHAPE)} for _ in sigmas]
    w, eta, beta = 6.0, 0.3, -0.5
    conds, unconds = [s["cond"] for s in steps], [s["uncond"] for s in steps]
    _, norms = apg_on_x0_reference(sigmas, xs, conds, unconds, w, eta, beta, 0.0)
    r = float(np.median(norms))  # the threshold acts at some steps and images, not at others
    expected, _ = apg_on_x0_reference(sigmas, xs, conds, unconds, w, eta, beta, r)
    stand_in = StandIn(steps)
    params = APGParams(scale=w, eta=eta, momentum=beta, norm_threshold=r)
    outs, _ = run_steps(APG(params), sigmas, xs, stand_in)
    for out, exp in zip(outs, expected):
        np.testing.assert_allclose(out, exp, rtol=1e-9, atol=1e-9)
    assert stand_in.evaluations.tolist() == [6, 6]


def diffusers_apg_reference(conds, unconds, w, eta, momentum, r):
    """diffusers' ``normalized_guidance`` (AdaptiveProjectedGuidance) on raw outputs, with its MomentumBuffer:
    running = diff + β·running; threshold; project onto normalize(cond); u + w·(Δ⊥ + η·Δ∥)."""
    running, outputs = None, []
    for c, u in zip(conds, unconds):
        diff = c - u
        running = diff if running is None else diff + momentum * running
        diff = running
        out = np.empty_like(c)
        for b in range(len(c)):
            d = diff[b].ravel()
            if r > 0:
                d = d * min(1.0, r / np.linalg.norm(d))
            unit = c[b].ravel() / np.linalg.norm(c[b].ravel())
            par = np.dot(d, unit) * unit
            out[b] = (u[b].ravel() + w * (d - par + eta * par)).reshape(c[b].shape)
        outputs.append(out)
    return outputs


def test_apg_output_space_is_diffusers_formula_on_the_velocity():
    sigmas = [1.0, 0.7, 0.4]
    steps = [{"cond": rand(*SHAPE), "uncond": rand(*SHAPE)} for _ in sigmas]
    w, eta, beta, r = 5.0, 0.25, -0.6, 9.0
    expected = diffusers_apg_reference([s["cond"] for s in steps], [s["uncond"] for s in steps], w, eta, beta, r)
    params = APGParams(scale=w, eta=eta, momentum=beta, norm_threshold=r, space="output")
    outs, _ = run_steps(APG(params), sigmas, [rand(*SHAPE) for _ in sigmas], StandIn(steps))
    for out, exp in zip(outs, expected):
        np.testing.assert_allclose(out, exp, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- AG and LinearAG


def test_adaptive_guidance_cosine_on_x0_and_per_image_switch():
    """Castillo et al. 2023: CFG while cos(x0_c, x0_u) < γ̄, from the first step where it is ≥ γ̄ on the
    conditional velocity alone (and no unconditional evaluation for that image)."""
    sigmas, w, gamma_bar = [1.0, 0.75, 0.5, 0.25], 4.0, 0.9
    xs = [3.0 * rand(*SHAPE) for _ in sigmas]
    steps = []
    for i in range(len(sigmas)):
        c = rand(*SHAPE)
        spread = np.array([0.2, 4.0 if i < 2 else 0.2]).reshape(-1, 1, 1, 1)  # image 1 agrees from step 2 on
        steps.append({"cond": c, "uncond": c + spread * rand(*SHAPE)})
    # the reference: per image, cosines on x0 = x − σ·v, switch, outputs, evaluations
    switched, switch_step, cosines, expected = [False, False], [None, None], [], []
    evaluations = np.zeros(2, dtype=int)
    for i, (sigma, x, st) in enumerate(zip(sigmas, xs, steps)):
        out, step_cos = st["cond"].copy(), [None, None]
        for b in range(2):
            evaluations[b] += 1
            if switched[b]:
                continue
            evaluations[b] += 1
            out[b] = st["uncond"][b] + w * (st["cond"][b] - st["uncond"][b])
            a, u = (x[b] - sigma * st["cond"][b]).ravel(), (x[b] - sigma * st["uncond"][b]).ravel()
            step_cos[b] = float(np.dot(a, u) / (np.linalg.norm(a) * np.linalg.norm(u)))
            if step_cos[b] >= gamma_bar:
                switched[b], switch_step[b] = True, i
        cosines.append(step_cos)
        expected.append(out)
    assert switch_step == [0, 2]  # the data do what the test means to check

    stand_in = StandIn(steps)
    outs, state = run_steps(AdaptiveGuidance(AGParams(scale=w, gamma_bar=gamma_bar)), sigmas, xs, stand_in)
    for out, exp in zip(outs, expected):
        np.testing.assert_allclose(out, exp, rtol=1e-12, atol=1e-12)
    assert state.trace["switch_step"] == switch_step
    for got, want in zip(state.trace["cosine"], cosines):
        assert got == pytest.approx(want, rel=1e-9)
    assert stand_in.evaluations.tolist() == evaluations.tolist() == [5, 7]


def test_adaptive_guidance_refuses_eps_cosines_on_flow_models(flux_dev):
    """ε = x + (1 − σ)·v is x for every condition at σ = 1 (the first step): the ε cosine would be 1 there."""
    with pytest.raises(InvalidInput) as e:
        generate(flux_dev, {"prompt": "x", "steps": 2, "policy": "ag:space=eps"})
    assert e.value.field == "policy.space" and "x0" in str(e.value)


def test_linear_ag_estimates_the_velocity_difference():
    """Δ = v_u − v_c at evaluated steps; at skipped steps Δ̂ = Δ_j + (i − j)/(j − k)·(Δ_j − Δ_k),
    v̂_u = v_c + Δ̂ and ṽ = v̂_u + w·(v_c − v̂_u)."""
    n, w = 6, 5.0
    sigmas = list(np.linspace(1.0, 1.0 / n, n))
    xs = [rand(*SHAPE) for _ in sigmas]
    steps = [{"cond": rand(*SHAPE), "uncond": rand(*SHAPE)} for _ in sigmas]
    evaluated = [0, 1, 3, 5]  # warm-up 1, then every second step
    history, expected = [], []
    for i, st in enumerate(steps):
        c = st["cond"]
        if i in evaluated:
            history.append((i, st["uncond"] - c))
            u = st["uncond"]
        else:
            (k, dk), (j, dj) = history[-2], history[-1]
            u = c + dj + (i - j) / (j - k) * (dj - dk)
        expected.append(u + w * (c - u))
    stand_in = StandIn(steps)
    outs, state = run_steps(LinearAG(LinearAGParams(scale=w, warmup_steps=1, period=2)), sigmas, xs, stand_in)
    for out, exp in zip(outs, expected):
        np.testing.assert_allclose(out, exp, rtol=1e-9, atol=1e-9)
    assert state.trace["estimated_steps"] == [2, 4]
    assert stand_in.counts["uncond"].tolist() == [4, 4] and stand_in.counts["cond"].tolist() == [6, 6]


def test_linear_ag_and_perp_neg_run_on_a_flow_model(flux_dev):
    """The first flow step is at σ = 1, where ε does not determine the velocity: both stay finite."""
    common = {"prompt": "a red circle", "steps": 4, "seed": 3}
    linear = generate(flux_dev, {**common, "policy": "linear_ag:scale=4,warmup_steps=1,period=2"})
    assert torch.isfinite(linear.pixels).all() and linear.nfe == [4 + 3]
    perp = generate(flux_dev, {**common, "negative_prompt": "blue", "policy": "perp_neg:scale=4"})
    assert torch.isfinite(perp.pixels).all() and perp.nfe == [3 * 4]
    # without a negative prompt, the negative condition is the empty one: CFG against the empty prompt
    no_negative = generate(flux_dev, {**common, "policy": "perp_neg:scale=4"})
    cfg = generate(flux_dev, {**common, "policy": "cfg:scale=4"})
    torch.testing.assert_close(no_negative.pixels, cfg.pixels, atol=2e-5, rtol=0)
    assert no_negative.nfe == cfg.nfe == [2 * 4]


# ---------------------------------------------------------------- CFG-Zero*


def test_cfg_zero_star_on_velocities():
    """Fan et al. 2025: s* = ⟨v_c, v_u⟩/‖v_u‖² per image; v̂ = (1 − w)·s*·v_u + w·v_c; zero-init: v = 0."""
    x, c, u = rand(*SHAPE), rand(*SHAPE), rand(*SHAPE)
    w = 4.0
    stand_in = StandIn({"cond": c, "uncond": u})
    outs, state = run_steps(CFGZeroStar(CFGZeroStarParams(scale=w, zero_init_steps=1)), [1.0, 0.6], [x, x], stand_in)
    assert np.array_equal(outs[0], np.zeros(SHAPE))
    s_star = [np.dot(c[b].ravel(), u[b].ravel()) / np.dot(u[b].ravel(), u[b].ravel()) for b in range(2)]
    expected = np.stack([(1 - w) * s_star[b] * u[b] + w * c[b] for b in range(2)])
    np.testing.assert_allclose(outs[1], expected, rtol=1e-10, atol=1e-12)
    assert state.trace["s_star"][0] == pytest.approx(s_star, rel=1e-10)
    assert stand_in.calls == 1 and stand_in.evaluations.tolist() == [2, 2]  # the zero-init step evaluates nothing


def test_cfg_zero_star_zero_init_leaves_the_flow_latent_in_place(flux_dev):
    """Euler on the flow: x_next = x + (σ_next − σ)·v, with v = 0 the latent does not move."""
    prepared = prepare(
        flux_dev, {"prompt": "x", "steps": 4, "seed": 1, "policy": "cfg_zero_star:scale=4,zero_init_steps=2"}
    )
    latents = []
    with torch.no_grad():
        run = prepared.run(callback=lambda event: latents.append(event.latents.clone()))
    assert torch.equal(latents[0], prepared.noise) and torch.equal(latents[1], prepared.noise)
    assert not torch.equal(latents[2], prepared.noise)
    assert run.denoiser.evaluations.tolist() == [2 * 2] and run.denoiser.unet_calls == 2


# ---------------------------------------------------------------- Perp-Neg


def perp_neg_reference(empty, pos, neg, w, w_neg):
    """Armandpour et al. 2023, eq. 10, image by image."""
    d_pos, d_neg = pos - empty, neg - empty
    perp = d_neg - np.dot(d_neg, d_pos) / np.dot(d_pos, d_pos) * d_pos
    return empty + w * d_pos - w_neg * perp


@pytest.mark.parametrize("sigma", [0.7, 1.0])
def test_perp_neg_is_the_paper_on_eps_and_defined_at_sigma_one(sigma):
    x = rand(*SHAPE)
    v = {"cond": rand(*SHAPE), "empty": rand(*SHAPE), "negative": rand(*SHAPE)}
    stand_in = StandIn(v)
    (out,), _ = run_steps(PerpNeg(PerpNegParams(scale=6.0, negative_scale=2.5)), [sigma], [x], stand_in)
    if sigma < 1:  # the paper's ε = x + (1 − σ)·v, and back
        eps = {k: x + (1 - sigma) * t for k, t in v.items()}
        guided = per_image(
            lambda e, p, n: perp_neg_reference(e, p, n, 6.0, 2.5), eps["empty"], eps["cond"], eps["negative"]
        )
        expected = (guided - x) / (1 - sigma)
    else:  # ε = x for every condition: the same equation on the velocities
        expected = per_image(
            lambda e, p, n: perp_neg_reference(e, p, n, 6.0, 2.5), v["empty"], v["cond"], v["negative"]
        )
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=1e-8, atol=1e-9)
    assert stand_in.evaluations.tolist() == [3, 3] and stand_in.calls == 1


# ---------------------------------------------------------------- dynamic CFG


def rms_contrast(pixels):
    """Standard deviation of the BT.601 luma of [B, 3, H, W] pixels, per image (the ``contrast`` reward)."""
    luma = np.tensordot(np.array([0.299, 0.587, 0.114]), pixels.double().numpy(), axes=([0], [1]))
    return luma.reshape(len(luma), -1).std(axis=1)


def test_dynamic_cfg_on_flow_picks_the_candidate_a_direct_computation_picks(flux_dev):
    """Step 0 at the initial scale, Euler to σ_1 (x_1 = x_0 + (σ_1 − σ_0)·v̂), then at step 1 the candidates
    x0_w = x_1 − σ_1·(v_u + w·(v_c − v_u)), decoded and scored here by −|contrast − target|: the policy's choice
    is their argmax. The target is image 0's contrast at w = 4, so that the choice rests on x0 being right."""
    candidates, initial = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0], 2.0
    prompts = ["a red circle", "a blue square"]
    policy = {"name": "dynamic_cfg", "candidates": candidates, "initial_scale": initial, "reward": "contrast:1"}
    params = {"prompt": prompts, "seeds": [1, 2], "steps": 3, "policy": {**policy, "start": 0.3}}

    prepared = prepare(flux_dev, params)
    scheduler, timesteps = make_scheduler(flux_dev, prepared.params)
    sigmas = [float(s) for s in scheduler.sigmas]
    denoiser = Denoiser(
        flux_dev.backbone, prepared.conditions, "flow", aliases=prepared.aliases, forward=flux_dev.family.forward
    )

    def velocities(x, i):
        info = StepInfo(i, len(timesteps), timesteps[i], NoiseLevel.flow(sigmas[i]), "flow", 2)
        out = denoiser(x, info, ["uncond", "cond"])
        return out["cond"], out["uncond"]

    with torch.no_grad():
        x = prepared.noise  # flow schedulers: init_noise_sigma 1, no input scaling
        c, u = velocities(x, 0)
        x = x + (sigmas[1] - sigmas[0]) * (u + initial * (c - u))
        c, u = velocities(x, 1)
        contrast = np.stack([rms_contrast(decode(flux_dev, x - sigmas[1] * (u + w * (c - u)))) for w in candidates])
    target = float(contrast[3, 0])
    expected = [candidates[int(np.argmax(-np.abs(contrast[:, b] - target)))] for b in range(2)]
    assert expected[0] == 4.0

    rewards = RewardModels({"contrast": {"target": target}})
    result = generate(flux_dev, params, rewards=rewards)
    assert result.trace["scale_schedule"][0] == [initial, initial]  # before the window (first index ⌈0.3·3⌉ = 1)
    assert result.trace["scale_schedule"][1] == expected
    assert result.nfe == [2 * 3, 2 * 3]  # choosing costs no backbone evaluation


def test_dynamic_cfg_native_latent_area_of_transformers_and_unets(flux_dev, sd_model):
    assert native_latent_area(flux_dev) == (32 // 2) ** 2
    assert native_latent_area(sd_model) == sd_model.unet.config.sample_size**2


# ---------------------------------------------------------------- ReNO


def test_reno_optimises_the_noise_of_flux_schnell(flux_schnell):
    """Through the flow sampler (one Euler step of the transformer, unguided as schnell is sampled) and the VAE:
    the noise moves, the best iterate's reward is at least the initial one and its noise is returned (rerunning
    from it gives that reward), and every sampling pass is counted."""
    steps, iterations = 1, 2
    params = {
        "prompt": "a red circle",
        "seeds": [1],
        "steps": steps,
        "policy": {"name": "reno", "reward": REWARD, "iterations": iterations},
    }
    prepared = prepare(flux_schnell, params)
    policy = prepared.policy
    assert isinstance(policy, ReNO)
    outer = policy.optimise_noise(prepared)
    trace = outer.trace["reno"]
    assert len({s[0] for s in trace["reward_curve"]}) > 1  # the noise moved
    assert trace["reward_best"][0] >= trace["reward_initial"][0]
    assert torch.equal(outer.noise, prepared.noise) == (trace["best_iteration"][0] == 0)
    assert outer.nfe == (iterations + 1) * steps
    with torch.no_grad():
        run = prepared.run(outer.noise)
        score = build_reward(REWARD).score(decode(flux_schnell, run.latents), [params["prompt"]])
    assert score.item() == pytest.approx(trace["reward_best"][0], abs=2e-4)
    assert run.denoiser.evaluations.tolist() == [steps]
