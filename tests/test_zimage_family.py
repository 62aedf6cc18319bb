"""Z-Image through our sampler equals diffusers' ``ZImagePipeline``.

On the tiny random-weight Z-Image (``builtin:tiny-zimage``), ``cfg`` through :func:`generate` gives the pipeline's
image for the same seed within one grey level: at its default guidance (``guidance_scale`` 5, which is our
``cfg:scale=6``), at a square and a non-square size, with a negative prompt, without guidance, for a batch of
prompts of different lengths (masked conditions, unpadded per image for the transformer's lists), and on a model
of another configuration with resolution-dependent shifting. A saved pipeline folder loads with its family.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from pipeline_reference import assert_same_image, pipeline_images

from diffsteer.guidance.families import FAMILIES, family_of_pipeline
from diffsteer.guidance.models import from_components, load_model, with_family_defaults
from diffsteer.guidance.sampler import generate
from diffsteer.guidance.tiny_transformers import tiny_zimage_components

PROMPT = "a red cat on a blue square"
SIZES = [(32, 32), (24, 40)]  # (height, width): multiples of VAE factor 2 × patch 2


def ours(model, height, width, steps, policy, seed=7, prompt=PROMPT, **extra):
    params = {"prompt": prompt, "steps": steps, "height": height, "width": width, "policy": policy}
    params.update({"seeds": seed} if isinstance(seed, list) else {"seed": seed})
    result = generate(model, {**params, **extra})
    return np.stack([np.asarray(im) for im in result.images]).astype(int), result


def reference(model, height, width, steps, seed=7, prompt=PROMPT, **kwargs):
    seeds = seed if isinstance(seed, list) else [seed]
    return pipeline_images(model.to_pipeline(), prompt, steps, seeds, height=height, width=width, **kwargs)


@pytest.fixture(scope="module")
def zimage():
    return load_model("builtin:tiny-zimage")


@pytest.mark.parametrize("height,width", SIZES)
def test_cfg_equals_zimage_pipeline_at_its_default_guidance(zimage, height, width):
    image, result = ours(zimage, height, width, 4, "cfg:scale=6")
    assert result.nfe == [8]  # the pipeline's CFG: the prompt and the (encoded) empty prompt
    assert_same_image(image, reference(zimage, height, width, 4))  # guidance_scale 5: c + 5(c − u)


def test_negative_prompt_and_no_guidance_equal_the_pipeline(zimage):
    image, _ = ours(zimage, 24, 40, 2, "cfg:scale=4", negative_prompt="a dog")
    assert_same_image(image, reference(zimage, 24, 40, 2, negative_prompt="a dog", guidance_scale=3.0))
    image, result = ours(zimage, 32, 32, 2, "cfg:scale=1")
    assert result.nfe == [2]
    assert_same_image(image, reference(zimage, 32, 32, 2, guidance_scale=0.0))  # 0: the pipeline's CFG is off


def test_batch_of_prompts_of_different_lengths_equals_the_pipeline(zimage):
    prompts = [PROMPT, "green"]
    image, result = ours(zimage, 24, 32, 2, "cfg:scale=6", seed=[7, 8], prompt=prompts)
    assert image.shape[0] == 2 and result.nfe == [4, 4]
    assert_same_image(image, reference(zimage, 24, 32, 2, seed=[7, 8], prompt=prompts))


def test_model_of_another_configuration_with_dynamic_shifting():
    components = tiny_zimage_components(seed=5, text_width=16, dim=48, n_heads=2, n_layers=2, axes_dims=[8, 8, 8])
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, max_shift=1.15)
    model = from_components("custom", components)
    model.defaults = with_family_defaults(model.defaults, model.family, dict(model.backbone.config), 32)
    image, _ = ours(model, 24, 32, 3, "cfg:scale=6", seed=3)
    assert_same_image(image, reference(model, 24, 32, 3, seed=3))


def test_family_and_defaults(zimage):
    assert zimage.family is FAMILIES["zimage"] is family_of_pipeline("ZImagePipeline", "x")
    assert zimage.defaults.policy == "cfg:scale=6" and zimage.defaults.steps == 50
    assert zimage.family.size_multiple(zimage) == 4 and zimage.family.latent_channels(zimage) == 4


def test_saved_zimage_folder_loads_with_its_family(tmp_path, zimage):
    zimage.to_pipeline().save_pretrained(tmp_path / "zimage")
    loaded = load_model(str(tmp_path / "zimage"))
    assert loaded.family.name == "zimage" and loaded.defaults.steps == 50
    a, _ = ours(zimage, 32, 32, 2, "cfg:scale=6")
    b, _ = ours(loaded, 32, 32, 2, "cfg:scale=6")
    assert_same_image(a, b)
