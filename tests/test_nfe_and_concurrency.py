"""UNet evaluations counted by a hook on the UNet itself (not by the policies' reports), concurrency, autograd."""

import threading
from contextlib import contextmanager

import diffusers
import pytest
import torch

from diffsteer.guidance.latents import decode
from diffsteer.guidance.sampler import generate, prepare


@contextmanager
def counting(unet):
    """Counts the rows (image evaluations) and calls the UNet actually receives."""
    counts = {"rows": 0, "calls": 0}

    def hook(module, args, kwargs):
        counts["rows"] += args[0].shape[0]
        counts["calls"] += 1

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


def run(model, policy, steps=8, num_images=2, **kw):
    params = {"prompt": "a red circle", "steps": steps, "seed": 5, "num_images": num_images, "policy": policy, **kw}
    with counting(model.unet) as counts:
        result = generate(model, params)
    return result, counts


def test_cfg_counts_two_evaluations_per_step(sd_model):
    result, counts = run(sd_model, "cfg:scale=5")
    assert counts == {"rows": 8 * 2 * 2, "calls": 8}
    assert result.nfe == [16, 16] and result.unet_calls == 8


def test_cfg_step_interval_skips_unconditional_evaluations(sd_model):
    steps = 10
    result, counts = run(sd_model, "cfg:scale=5,interval_start=0.2,interval_end=0.7", steps=steps)
    guided = [i for i in range(steps) if 0.2 <= i / steps < 0.7]
    assert guided == [2, 3, 4, 5, 6]
    assert counts["rows"] == 2 * (steps + len(guided))
    assert counts["calls"] == steps


def test_cfg_sigma_interval_counts_match_the_schedulers_sigmas(sd_model):
    steps, lo, hi = 12, 0.5, 4.0
    reference = diffusers.EulerDiscreteScheduler.from_config(sd_model.scheduler_config)
    reference.set_timesteps(steps)
    sigmas = [float(s) for s in reference.sigmas[:-1]]
    guided = [s for s in sigmas if lo < s <= hi]
    assert 0 < len(guided) < steps
    _, counts = run(sd_model, f"cfg:scale=5,sigma_low={lo},sigma_high={hi}", steps=steps, scheduler="euler")
    assert counts["rows"] == 2 * (steps + len(guided))


def test_ag_with_unreachable_threshold_equals_cfg(sd_model):
    cfg, _ = run(sd_model, "cfg:scale=6")
    ag, counts = run(sd_model, "ag:scale=6,gamma_bar=1.0")
    assert all(s is None for s in ag.trace["switch_step"])
    assert torch.equal(ag.pixels, cfg.pixels)
    assert counts["rows"] == 8 * 2 * 2


def test_ag_with_reachable_threshold_saves_evaluations(sd_model):
    probe, _ = run(sd_model, "ag:scale=6,gamma_bar=1.0")
    cosines = [c for step in probe.trace["cosine"][2:] for c in step]
    gamma_bar = sorted(cosines)[len(cosines) // 2]
    result, counts = run(sd_model, f"ag:scale=6,gamma_bar={gamma_bar}")
    assert counts["rows"] < 8 * 2 * 2
    switched = [s for s in result.trace["switch_step"] if s is not None]
    assert switched
    # every image: 2 evaluations up to and including its switch step, 1 after
    expected = sum(8 + (s + 1 if s is not None else 8) for s in result.trace["switch_step"])
    assert counts["rows"] == expected
    assert sum(result.nfe) == expected


def test_linear_ag_counts(sd_model):
    _, counts = run(sd_model, "linear_ag:scale=6,warmup_steps=3,period=2", steps=10)
    full = [0, 1, 2, 3, 5, 7, 9]
    assert counts["rows"] == 2 * (10 + len(full))


def test_perp_neg_evaluates_three_conditions_only_with_a_negative_prompt(sd_model):
    _, without = run(sd_model, "perp_neg:scale=5", steps=4)
    _, with_neg = run(sd_model, "perp_neg:scale=5", steps=4, negative_prompt="blue")
    assert without["rows"] == 4 * 2 * 2
    assert with_neg["rows"] == 4 * 2 * 3
    assert with_neg["calls"] == 4


def test_concurrent_generations_equal_sequential(sd_model):
    jobs = [
        {
            "prompt": "a red circle",
            "steps": 6,
            "seed": 1,
            "num_images": 2,
            "scheduler": "euler_a",
            "policy": "apg:scale=5",
        },
        {
            "prompt": "a blue square",
            "steps": 7,
            "seed": 9,
            "num_images": 1,
            "scheduler": "dpmpp_2m",
            "policy": "ag:scale=4,gamma_bar=0.9",
        },
    ]
    sequential = [generate(sd_model, job).pixels for job in jobs]
    results = [None, None]
    errors = []

    def work(i):
        try:
            results[i] = generate(sd_model, jobs[i]).pixels
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, expected in zip(results, sequential):
        assert torch.equal(got, expected)


def test_batch_members_are_independent_of_the_batch(sd_model):
    """Per-image seeds: image k of a batch equals a single generation with seed + k."""
    batch = generate(
        sd_model, {"prompt": "a red circle", "steps": 5, "seed": 20, "num_images": 3, "scheduler": "euler_a"}
    )
    single = generate(sd_model, {"prompt": "a red circle", "steps": 5, "seed": 22, "scheduler": "euler_a"})
    torch.testing.assert_close(batch.pixels[2:3], single.pixels, atol=1e-5, rtol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_autograd_through_the_sampler(sd_model, checkpointing):
    params = {"prompt": "a red circle", "steps": 3, "seed": 2, "scheduler": "ddim", "policy": "cfg:scale=4"}
    prepared = prepare(sd_model, params, gradient_checkpointing=checkpointing)
    noise = prepared.noise.clone().requires_grad_(True)
    loss = decode(sd_model, prepared.run(noise).latents).mean()
    loss.backward()
    assert noise.grad is not None and noise.grad.abs().sum() > 0
    reference = prepare(sd_model, params)
    noise_ref = reference.noise.clone().requires_grad_(True)
    decode(sd_model, reference.run(noise_ref).latents).mean().backward()
    torch.testing.assert_close(noise.grad, noise_ref.grad, atol=1e-6, rtol=1e-4)


def test_truncated_backpropagation_stops_at_the_first_recorded_step(sd_model):
    """Only the last step records: the trainable weight gets a gradient, the initial noise none."""
    weight = sd_model.unet.conv_out.weight
    params = {"prompt": "a red circle", "steps": 3, "seed": 2, "scheduler": "ddim"}
    prepared = prepare(sd_model, params)
    noise = prepared.noise.clone().requires_grad_(True)
    weight.requires_grad_(True)
    try:
        latents = prepared.run(noise, grad_at_step=lambda i: i >= 2).latents
        decode(sd_model, latents).mean().backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
        assert noise.grad is None  # steps 0 and 1 recorded nothing, so no path leads back to the noise
    finally:
        weight.requires_grad_(False)
        weight.grad = None
