"""With `cfg`, our sampler reproduces diffusers' pipelines on the same components, seeds and scheduler."""

import numpy as np
import pytest
import torch

from diffsteer.guidance.sampler import generate
from diffsteer.guidance.schedulers import build_scheduler

SEEDS = [11, 12]


def run_diffusers(model, scheduler_name, prompt, scale, steps, negative=None, rescale=0.0, eta=0.0):
    pipe = model.to_pipeline()
    pipe.scheduler = build_scheduler(scheduler_name, model.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    out = pipe(
        prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=scale,
        guidance_rescale=rescale,
        eta=eta,
        num_images_per_prompt=len(SEEDS),
        generator=generators,
        output_type="np",
        height=model.default_size,
        width=model.default_size,
    )
    return out.images


def run_ours(model, scheduler_name, prompt, scale, steps, negative=None, rescale=0.0, eta=0.0):
    result = generate(
        model,
        {
            "prompt": prompt,
            "negative_prompt": negative,
            "policy": {"name": "cfg", "scale": scale, "rescale": rescale},
            "steps": steps,
            "scheduler": scheduler_name,
            "seed": SEEDS[0],
            "num_images": len(SEEDS),
            "eta": eta,
        },
    )
    return result.pixels.permute(0, 2, 3, 1).numpy()


def assert_match(ours, theirs):
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs).max()
    assert diff <= 1e-4, diff
    # the comparison can fail: a different image is far away
    assert np.abs(ours[0] - theirs[1]).max() > 1e-3


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_sd_matches_pipeline(sd_model, scheduler):
    args = (sd_model, scheduler, "a red circle", 7.5, 6)
    assert_match(run_ours(*args), run_diffusers(*args))


def test_sd_negative_prompt_rescale_and_eta(sd_model):
    args = (sd_model, "ddim", "a red circle", 5.0, 5)
    kwargs = dict(negative="blue square", rescale=0.7, eta=0.5)
    assert_match(run_ours(*args, **kwargs), run_diffusers(*args, **kwargs))


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_v_prediction_matches_pipeline(vpred_model, scheduler):
    assert vpred_model.prediction_type == "v_prediction"
    args = (vpred_model, scheduler, "a blue square", 7.5, 6)
    assert_match(run_ours(*args), run_diffusers(*args))


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_sdxl_matches_pipeline(sdxl_model, scheduler):
    args = (sdxl_model, scheduler, "a green triangle", 6.0, 5)
    assert_match(run_ours(*args), run_diffusers(*args))


def test_sdxl_with_negative_prompt_matches_pipeline(sdxl_model):
    args = (sdxl_model, "euler", "a green triangle", 6.0, 4)
    assert_match(run_ours(*args, negative="red"), run_diffusers(*args, negative="red"))


def test_unguided_scale_one_matches_pipeline(sd_model):
    args = (sd_model, "ddim", "a red circle", 1.0, 4)
    assert_match(run_ours(*args), run_diffusers(*args))
