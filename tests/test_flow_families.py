"""Flow-matching families (SD3, FLUX.1 dev/schnell, Qwen-Image) through our sampler equal diffusers' own pipelines.

For each family, on tiny random-weight models, ``cfg`` through :func:`generate` gives the image of the family's
diffusers pipeline for the same seed and its default settings (distilled guidance, max sequence length, shift,
dynamic shifting), within one grey level, at a square and a non-square size; and with true CFG on a negative
prompt. One model of each family is built here with another configuration than the shipped tiny ones.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from pipeline_reference import assert_same_image, pipeline_images

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.models import from_components, load_model, with_family_defaults
from diffsteer.guidance.sampler import generate, make_scheduler, step_levels
from diffsteer.guidance.tiny_transformers import tiny_flux_components, tiny_qwenimage_components, tiny_sd3_components

PROMPT = "a red cat on a blue square"
SIZES = [(32, 32), (24, 40)]  # (height, width): square and non-square, multiples of VAE factor × patch


def ours(model, height, width, steps, policy, seed=7, **extra):
    params = {"prompt": PROMPT, "steps": steps, "seed": seed, "height": height, "width": width, "policy": policy}
    result = generate(model, {**params, **extra})
    return np.asarray(result.images[0]).astype(int), result


def reference(model, height, width, steps, seed=7, **kwargs):
    return pipeline_images(model.to_pipeline(), PROMPT, steps, [seed], height=height, width=width, **kwargs)[0]


@pytest.fixture(scope="module")
def sd3():
    return load_model("builtin:tiny-sd3")


@pytest.fixture(scope="module")
def flux_dev():
    return load_model("builtin:tiny-flux")


@pytest.fixture(scope="module")
def flux_schnell():
    return load_model("builtin:tiny-flux-schnell")


@pytest.fixture(scope="module")
def qwen():
    return load_model("builtin:tiny-qwenimage")


@pytest.mark.parametrize("height,width", SIZES)
def test_sd3_cfg_equals_stable_diffusion3_pipeline(sd3, height, width):
    image, result = ours(sd3, height, width, 4, "cfg:scale=7")
    assert result.nfe == [8]
    assert_same_image(image, reference(sd3, height, width, 4))  # guidance_scale 7.0, shift 3.0, T5 256 tokens


@pytest.mark.parametrize("height,width", SIZES)
def test_flux_dev_equals_flux_pipeline_with_distilled_guidance(flux_dev, height, width):
    image, result = ours(flux_dev, height, width, 4, "cfg:scale=1")
    assert result.nfe == [4]  # guidance-distilled: one pass per step
    assert_same_image(image, reference(flux_dev, height, width, 4))  # guidance_scale 3.5, dynamic shift, 512 tokens
    image, _ = ours(flux_dev, height, width, 4, "cfg:scale=1", distilled_guidance=6.0)
    assert_same_image(image, reference(flux_dev, height, width, 4, guidance_scale=6.0))


def test_flux_dev_true_cfg_on_top_of_distilled_guidance(flux_dev):
    image, result = ours(flux_dev, 32, 32, 3, "cfg:scale=4", negative_prompt="green")
    assert result.nfe == [6]
    expected = reference(flux_dev, 32, 32, 3, negative_prompt="green", true_cfg_scale=4.0)
    assert_same_image(image, expected)


@pytest.mark.parametrize("height,width", SIZES)
def test_flux_schnell_equals_flux_pipeline(flux_schnell, height, width):
    image, _ = ours(flux_schnell, height, width, 4, "cfg:scale=1")
    assert_same_image(image, reference(flux_schnell, height, width, 4))


@pytest.mark.parametrize("height,width", SIZES)
def test_qwenimage_equals_qwenimage_pipeline(qwen, height, width):
    image, _ = ours(qwen, height, width, 4, "cfg:scale=1")
    assert_same_image(image, reference(qwen, height, width, 4))  # no negative prompt: no CFG (the default)


def test_qwenimage_true_cfg_with_renorm_equals_pipeline(qwen):
    image, result = ours(qwen, 24, 40, 3, "cfg:scale=4,renorm=true", negative_prompt="a dog")
    assert result.nfe == [6]
    assert_same_image(image, reference(qwen, 24, 40, 3, negative_prompt="a dog", true_cfg_scale=4.0))


def test_models_built_here_with_other_configurations():
    """Another depth, width, seed and layout than the shipped tiny models, for each family."""
    cases = [
        (tiny_sd3_components(seed=11, num_layers=2, joint_attention_dim=48, dual_attention_layers=(0,)), 7.0, {}),
        (tiny_flux_components(seed=12, num_layers=2, num_single_layers=2, axes_dims_rope=(8, 4, 4)), 1.0, {}),
        (tiny_flux_components(seed=13, guidance_embeds=False, num_single_layers=3), 1.0, {}),
        (tiny_qwenimage_components(seed=14, num_layers=2), 1.0, {}),
    ]
    for components, scale, kwargs in cases:
        model = from_components("custom", components)
        model.defaults = with_family_defaults(model.defaults, model.family, dict(model.backbone.config), 32)
        image, _ = ours(model, 24, 32, 3, f"cfg:scale={scale:g}", seed=3)
        assert_same_image(image, reference(model, 24, 32, 3, seed=3, **kwargs))


def test_flow_step_levels_follow_the_shifted_sigmas(flux_dev):
    from diffsteer.guidance.request import GenerationParams

    params = GenerationParams(prompt="x", steps=5, height=64, width=64)
    scheduler, timesteps = make_scheduler(flux_dev, params)
    levels = step_levels(scheduler, timesteps, "flow")
    sigmas = scheduler.sigmas[:-1].tolist()
    assert [float(lv.sigma) for lv in levels] == pytest.approx(sigmas)
    assert sigmas[0] == pytest.approx(1.0) and all(a > b for a, b in zip(sigmas, sigmas[1:]))
    # the resolution shift: 64×64 px at VAE factor 2 is 256 packed tokens, so μ = base_shift = 0.5
    shifted = np.exp(0.5) / (np.exp(0.5) + (1 / np.linspace(1, 1 / 5, 5) - 1))
    np.testing.assert_allclose(sigmas, shifted, rtol=1e-5)


@pytest.mark.parametrize("scheduler", ["euler", "heun", "dpmpp_2m", "unipc", "default"])
def test_flow_schedulers_run_on_every_family(sd3, flux_dev, qwen, scheduler):
    for model in (sd3, flux_dev, qwen):
        result = generate(model, {"prompt": PROMPT, "steps": 3, "seed": 1, "scheduler": scheduler, "policy": "cfg"})
        pixels = np.asarray(result.images[0])
        assert pixels.shape == (32, 32, 3) and np.isfinite(result.pixels).all()
        assert result.sampler[1] == "Simple"


def test_flow_models_refuse_schedulers_without_a_flow_form(flux_dev):
    with pytest.raises(InvalidInput) as e:
        generate(flux_dev, {"prompt": PROMPT, "steps": 2, "scheduler": "ddim"})
    assert e.value.field == "scheduler" and "euler" in str(e.value) and "unipc" in str(e.value)


@pytest.mark.parametrize(
    "field,size", [("width", {"width": 40, "height": 32}), ("height", {"width": 32, "height": 40})]
)
def test_sizes_off_the_patch_grid_are_refused(field, size):
    model = from_components("patch-8", tiny_sd3_components(patch_size=8))  # VAE factor 2 × patch 8: multiples of 16
    with pytest.raises(InvalidInput) as e:
        generate(model, {"prompt": PROMPT, "steps": 1, **size})
    assert e.value.field == field and "not a multiple of 16" in str(e.value)


def test_distilled_guidance_is_refused_by_models_without_the_input(flux_schnell, sd3):
    for model in (flux_schnell, sd3):
        with pytest.raises(InvalidInput) as e:
            generate(model, {"prompt": PROMPT, "steps": 1, "distilled_guidance": 3.5})
        assert e.value.field == "distilled_guidance"


def test_family_defaults_fill_what_a_request_leaves_out(flux_schnell, qwen):
    result = generate(flux_schnell, {"prompt": PROMPT, "seed": 1})
    assert result.params.steps == 4 and result.params.policy.spec() == "cfg:scale=1.0"
    assert result.nfe == [4]
    assert qwen.defaults.policy == "cfg:scale=4,renorm=true" and qwen.defaults.steps == 50


def test_unsupported_family_folder_is_refused_naming_it(tmp_path):
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "HunyuanDiTPipeline", "transformer": ["diffusers", "X"]}'
    )
    with pytest.raises(InvalidInput) as e:
        load_model(str(tmp_path))
    message = str(e.value)
    assert e.value.field == "model" and "HunyuanDiTPipeline" in message
    for family in ("Stable Diffusion 3/3.5", "FLUX.1", "Qwen-Image", "Stable Diffusion XL"):
        assert family in message


def test_saved_flow_folder_loads_with_its_family(tmp_path, flux_dev):
    flux_dev.to_pipeline().save_pretrained(tmp_path / "flux")
    loaded = load_model(str(tmp_path / "flux"))
    assert loaded.family.name == "flux" and loaded.defaults.steps == 28
    a, _ = ours(flux_dev, 32, 32, 2, "cfg:scale=1")
    b, _ = ours(loaded, 32, 32, 2, "cfg:scale=1")
    assert_same_image(a, b)


def test_transformer_cost_grows_with_image_and_text_tokens(flux_dev, sd_model):
    from diffsteer.guidance.sampler import check_request

    # tiny FLUX: width d = 2 heads × 16 = 32; 32 px native = 8×8 packed tokens, 64 px = 16×16; T5 text 512 tokens
    def cost(length):
        return length * (1 + length / (6 * 32))

    checked = check_request(
        flux_dev, {"prompt": PROMPT, "width": 64, "height": 64, "steps": 10, "policy": "cfg:scale=3"}
    )
    assert checked.cost.evaluation_factor == pytest.approx(cost(256 + 512) / cost(64 + 512))
    assert checked.cost.total == pytest.approx(checked.cost.evaluation_factor * 10 * 2)
    unet = check_request(sd_model, {"prompt": PROMPT, "width": 64, "height": 64, "steps": 10})
    assert unet.cost.evaluation_factor == pytest.approx(4.0)  # UNets: the area ratio


def test_ab_run_compares_policies_on_a_flow_model(tmp_path):
    from diffsteer.evaluation.ab import run_ab

    results = run_ab(
        {
            "arms": ["plain=cfg:scale=1", "true_cfg=cfg:scale=4", "apg=apg:scale=4@builtin:tiny-flux-schnell"],
            "model": "builtin:tiny-flux",
            "prompts": ["a red cat", "a blue dog", "a green tree"],
            "seeds": 2,
            "steps": 3,
            "metrics": ["saturation", "nfe"],
            "output_dir": str(tmp_path / "ab"),
            "report": False,
            "n_resamples": 200,
        }
    )
    assert {name: arm["nfe"]["mean"] for name, arm in results["summary"].items()} == {
        "plain": 3,
        "true_cfg": 6,
        "apg": 6,
    }
    assert [arm["model"] for arm in results["arms"]] == ["builtin:tiny-flux"] * 2 + ["builtin:tiny-flux-schnell"]
    assert (tmp_path / "ab" / "results.json").is_file()
