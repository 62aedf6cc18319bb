"""ReNO and dynamic CFG: their math against direct computations, and their behaviour on a tiny model.

A weight-free differentiable reward (saturation) stands in for the learned ones, so these tests need no
checkpoint; the proving-ground figures are in benchmarks/ and BENCHMARKS.md.
"""

import math

import numpy as np
import pytest
import torch

from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.events import GenerationCancelled
from diffsteer.guidance.latents import decode
from diffsteer.guidance.parameterisation import to_x0
from diffsteer.guidance.policies.cfg import cfg_combine
from diffsteer.guidance.policies.reno import clip_per_image, noise_norm_penalty
from diffsteer.guidance.sampler import generate, make_scheduler, prepare, step_levels
from diffsteer.rewards import build_reward

REWARD = "saturation:1"


def test_noise_norm_penalty_hand_worked():
    z = torch.tensor([[3.0, 4.0]])  # ‖z‖ = 5, d = 2: ½·25 − 1·log 5
    assert noise_norm_penalty(z).item() == pytest.approx(12.5 - math.log(5.0))


def test_noise_norm_penalty_in_float32_does_not_overflow_for_sdxl_sized_fp16_noise():
    z = torch.randn(1, 4, 136, 136, generator=torch.Generator().manual_seed(0)).half()  # SDXL at 1088²
    assert torch.isinf(z.flatten(1).norm(dim=1) ** 2).any()  # ‖z‖ ≈ 272: ‖z‖² > 65504 overflows fp16...
    value = noise_norm_penalty(z)
    assert torch.isfinite(value).all()  # ...the float32 one does not
    d = z.numel()
    norm = float(np.linalg.norm(z.float().numpy().ravel()))
    assert value.item() == pytest.approx(0.5 * norm**2 - (d - 1) * math.log(norm), rel=1e-5)


def test_clip_per_image():
    g = torch.tensor([[3.0, 4.0], [0.03, 0.04]])
    clip_per_image(g, 0.1)
    torch.testing.assert_close(g, torch.tensor([[0.06, 0.08], [0.03, 0.04]]))


def _reno(model, prompts, seeds, iterations, callback=None, **overrides):
    params = {
        "prompt": prompts,
        "seeds": seeds,
        "steps": 2,
        "policy": {"name": "reno", "reward": REWARD, "iterations": iterations},
    }
    return generate(model, {**params, **overrides}, callback=callback)


@pytest.mark.slow
def test_reno_improves_the_reward_and_returns_the_best_iterate(sd_model):
    result = _reno(sd_model, ["a red circle", "a blue square"], [1, 2], iterations=6)
    trace = result.trace["reno"]
    assert all(b >= i for b, i in zip(trace["reward_best"], trace["reward_initial"]))
    assert any(b > i + 1e-4 for b, i in zip(trace["reward_best"], trace["reward_initial"]))
    reward = build_reward(REWARD)
    rescored = reward.score(result.pixels, ["a red circle", "a blue square"])
    np.testing.assert_allclose(rescored.numpy(), trace["reward_best"], atol=2e-4)
    assert result.nfe[0] == 2 + (trace["iterations"] + 1) * 2  # final run + every scored iterate


def test_reno_without_iterations_is_plain_sampling(sd_model):
    reno = _reno(sd_model, "a red circle", [4], iterations=0)
    plain = generate(sd_model, {"prompt": "a red circle", "seeds": [4], "steps": 2, "policy": "cfg:scale=1"})
    torch.testing.assert_close(reno.pixels, plain.pixels, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_reno_images_are_independent_of_their_batch(sd_model):
    batch = _reno(sd_model, ["a red circle", "a blue square"], [1, 2], iterations=3)
    single = _reno(sd_model, ["a blue square"], [2], iterations=3)
    torch.testing.assert_close(batch.pixels[1:], single.pixels, atol=1e-4, rtol=0)


def test_reno_reports_progress_and_can_be_cancelled(sd_model):
    events = []

    def callback(event):
        events.append(event.phase)
        if event.phase == "reno" and event.step == 3:
            raise GenerationCancelled()

    with pytest.raises(GenerationCancelled):
        _reno(sd_model, "a red circle", [1], iterations=10, callback=callback)
    assert events == ["reno", "reno", "reno"]


def test_reno_rejects_an_unknown_reward(sd_model):
    from diffsteer.guidance.errors import InvalidInput

    with pytest.raises(InvalidInput) as e:
        _reno(sd_model, "x", [1], iterations=1, policy={"name": "reno", "reward": "nosuchreward:1"})
    assert e.value.field == "policy.reward" and "saturation" in str(e.value)


@pytest.mark.parametrize("reward", ["verifier:1", "saturation:1,jpeg_compressibility:0.1"])
def test_reno_refuses_a_non_differentiable_reward_before_sampling(sd_model, reward):
    from diffsteer.guidance.errors import InvalidInput

    with pytest.raises(InvalidInput) as e:
        _reno(sd_model, "a red circle", [1], iterations=1, policy={"name": "reno", "reward": reward})
    assert e.value.field == "policy.reward" and "non-differentiable" in str(e.value)


def test_dynamic_cfg_with_one_candidate_is_cfg(sd_model):
    common = {"prompt": "a red circle", "seeds": [3, 4], "steps": 4}
    dynamic = generate(
        sd_model,
        {**common, "policy": {"name": "dynamic_cfg", "candidates": [5.0], "initial_scale": 5.0, "reward": REWARD}},
    )
    cfg = generate(sd_model, {**common, "policy": "cfg:scale=5"})
    torch.testing.assert_close(dynamic.pixels, cfg.pixels, atol=1e-5, rtol=0)
    assert dynamic.nfe == cfg.nfe  # choosing costs no UNet evaluation


def first_step_candidate_x0(model, params: dict, candidates: list[float]):
    """Computed directly, outside the policy: (prepared, ᾱ of step 0, per image the x̂0 of each candidate scale at
    the first step), for checking which candidate dynamic CFG picks."""
    prepared = prepare(model, params)
    scheduler, timesteps = make_scheduler(model, prepared.params)
    level = step_levels(scheduler, timesteps)[0]
    x = scheduler.scale_model_input(prepared.noise * scheduler.init_noise_sigma, timesteps[0])
    denoiser = Denoiser(model.unet, prepared.conditions, model.prediction_type, aliases=prepared.aliases)
    info = StepInfo(0, len(timesteps), timesteps[0], level, model.prediction_type)
    with torch.no_grad():
        out = denoiser(x, info, ["uncond", "cond"])
        x0s = [
            [
                to_x0(cfg_combine(out["cond"][b : b + 1], out["uncond"][b : b + 1], w), x[b : b + 1], level, "epsilon")
                for w in candidates
            ]
            for b in range(x.shape[0])
        ]
    return prepared, level.alpha_bar, x0s


def test_dynamic_cfg_picks_the_candidate_a_direct_computation_picks(sd_model):
    candidates = [1.0, 4.0, 12.0]
    params = {
        "prompt": ["a red circle", "a blue square"],
        "seeds": [5, 6],
        "steps": 3,
        "scheduler": "ddim",
        "policy": {"name": "dynamic_cfg", "candidates": candidates, "reward": REWARD},
    }
    result = generate(sd_model, params)
    chosen_first_step = result.trace["scale_schedule"][0]

    prepared, ab, x0s = first_step_candidate_x0(sd_model, params, candidates)
    reward = build_reward(REWARD)
    with torch.no_grad():
        expected = []
        for b, per_candidate in enumerate(x0s):
            scores = [reward.score(decode(sd_model, x0), [params["prompt"][b]]).item() for x0 in per_candidate]
            expected.append(candidates[int(np.argmax(scores))])
    assert chosen_first_step == expected


def test_dynamic_cfg_combines_on_the_model_device():
    """Its per-image scales live on the CPU; the combination must follow the predictions' device. ``meta``
    stands in for a GPU (the same rule: a CPU tensor with elements cannot meet another device's tensor)."""
    from diffsteer.guidance.policies.dynamic import DynamicCFG, DynamicCFGParams, DynamicCFGState

    class Info:  # a step outside the evaluation window, so no decode or reward is involved
        fraction, index, num_steps = 0.0, 0, 4

    def denoiser(x, info, conditions):
        return {"cond": torch.ones_like(x), "uncond": torch.zeros_like(x)}

    policy = DynamicCFG(DynamicCFGParams(start=1.0))
    out = policy.step(
        DynamicCFGState(current=torch.full((2,), 4.5)), torch.zeros(2, 4, 8, 8, device="meta"), Info, denoiser
    )
    assert out.device.type == "meta" and out.shape == (2, 4, 8, 8)
