"""img2img and inpainting through our sampler equal diffusers' pipelines (same seed, within one grey level).

On tiny random-weight models: ``StableDiffusionImg2ImgPipeline``, ``StableDiffusionInpaintPipeline`` with a
4-channel UNet (the unmasked part kept after every step) and with a 9-channel inpainting UNet (mask and masked
image as inputs), ``StableDiffusionXLImg2ImgPipeline``, and the flow families' ``FluxImg2ImgPipeline``,
``FluxInpaintPipeline`` and ``StableDiffusion3Img2ImgPipeline``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import base64
import io

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting
from PIL import Image
from pipeline_reference import assert_same_image, pipeline_images

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.models import from_components, load_model
from diffsteer.guidance.sampler import generate
from diffsteer.guidance.tiny import tiny_sd_components, tiny_unet

PROMPT = "a red cat on a blue square"


def picture(height=32, width=32, seed=0):
    rng = np.random.default_rng(seed)
    base = np.zeros((height, width, 3), dtype=np.float64)
    base[: height // 2, :, 0] = 220
    base[:, width // 3 :, 2] = 180
    noise = rng.normal(0, 20, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def square_mask(height=32, width=32):
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(mask)


def ours(model, steps, policy, **extra):
    result = generate(model, {"prompt": PROMPT, "steps": steps, "seed": 5, "policy": policy, **extra})
    return np.asarray(result.images[0]).astype(int), result


def theirs(pipe, steps, **kwargs):
    return pipeline_images(pipe, PROMPT, steps, [5], **kwargs)[0]


@pytest.fixture(scope="module")
def sd():
    return load_model("builtin:tiny")


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_sd_img2img_equals_diffusers(sd, strength):
    image = picture()
    mine, result = ours(sd, 5, "cfg:scale=7.5", init_image=image, strength=strength)
    pipe = AutoPipelineForImage2Image.from_pipe(sd.to_pipeline())
    assert_same_image(mine, theirs(pipe, 5, image=image, strength=strength, guidance_scale=7.5))
    assert result.nfe == [2 * int(5 * strength)]  # the last ⌊N·s⌋ steps, two evaluations each


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_sd_inpainting_with_a_4_channel_unet_equals_diffusers(sd, strength):
    image, mask = picture(), square_mask()
    mine, _ = ours(sd, 5, "cfg:scale=7.5", init_image=image, mask=mask, strength=strength)
    pipe = AutoPipelineForInpainting.from_pipe(sd.to_pipeline())
    assert_same_image(mine, theirs(pipe, 5, image=image, mask_image=mask, strength=strength, guidance_scale=7.5))


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_sd_inpainting_with_a_9_channel_unet_equals_diffusers(strength):
    components = tiny_sd_components(seed=4)
    base = components["unet"]
    components["unet"] = tiny_unet(cross_dim=32, seed=6)
    unet = components["unet"]
    unet.register_to_config(in_channels=9)
    unet.conv_in = torch.nn.Conv2d(9, base.conv_in.out_channels, 3, padding=1)
    torch.manual_seed(7)
    torch.nn.init.normal_(unet.conv_in.weight, std=0.1)
    model = from_components("inpaint-9", components)
    assert model.family.inpainting_inputs(model) and model.latent_channels == 4
    image, mask = picture(seed=2), square_mask()
    mine, _ = ours(model, 4, "cfg:scale=5", init_image=image, mask=mask, strength=strength)
    reference = theirs(model.to_pipeline(), 4, image=image, mask_image=mask, strength=strength, guidance_scale=5.0)
    assert_same_image(mine, reference)


def test_sdxl_img2img_equals_diffusers():
    sdxl = load_model("builtin:tiny-sdxl")
    image = picture()
    mine, _ = ours(sdxl, 5, "cfg:scale=6", init_image=image, strength=0.8)
    pipe = AutoPipelineForImage2Image.from_pipe(sdxl.to_pipeline())
    assert_same_image(mine, theirs(pipe, 5, image=image, strength=0.8, guidance_scale=6.0))


@pytest.mark.parametrize("strength", [0.6, 0.95])
def test_flux_img2img_equals_diffusers(strength):
    flux = load_model("builtin:tiny-flux")
    image = picture(24, 40)
    mine, _ = ours(flux, 5, "cfg:scale=1", init_image=image, strength=strength)
    pipe = AutoPipelineForImage2Image.from_pipe(flux.to_pipeline())
    # the Flux image pipelines default to distilled guidance 7; ours is FluxPipeline's 3.5 for every request
    assert_same_image(mine, theirs(pipe, 5, image=image, strength=strength, height=24, width=40, guidance_scale=3.5))


def test_flux_inpainting_equals_diffusers():
    flux = load_model("builtin:tiny-flux")
    image, mask = picture(), square_mask()
    mine, _ = ours(flux, 4, "cfg:scale=1", init_image=image, mask=mask, strength=0.8)
    pipe = AutoPipelineForInpainting.from_pipe(flux.to_pipeline())
    reference = theirs(pipe, 4, image=image, mask_image=mask, strength=0.8, height=32, width=32, guidance_scale=3.5)
    assert_same_image(mine, reference)


def test_sd3_img2img_equals_diffusers():
    sd3 = load_model("builtin:tiny-sd3")
    image = picture()
    mine, _ = ours(sd3, 5, "cfg:scale=7", init_image=image, strength=0.6)
    pipe = AutoPipelineForImage2Image.from_pipe(sd3.to_pipeline())
    assert_same_image(mine, theirs(pipe, 5, image=image, strength=0.6, guidance_scale=7.0))


def test_every_policy_runs_image_conditioned(sd):
    image, mask = picture(), square_mask()
    for policy in ("apg:scale=5", "ag:gamma_bar=0.9", "cfg_zero_star:scale=5", "perp_neg:scale=5", "linear_ag"):
        result = generate(
            sd, {"prompt": PROMPT, "steps": 4, "seed": 1, "policy": policy, "init_image": image, "mask": mask}
        )
        assert np.isfinite(result.pixels).all()


def test_image_fields_from_base64_and_sizes_from_the_image(sd):
    buffer = io.BytesIO()
    picture(40, 24).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    result = generate(sd, {"prompt": PROMPT, "steps": 2, "init_image": f"data:image/png;base64,{encoded}"})
    assert result.images[0].size == (24, 40)


def test_bad_image_inputs_name_their_field(sd):
    cases = [
        ({"init_image": "not base64!"}, "init_image"),
        ({"init_image": base64.b64encode(b"plain text").decode()}, "init_image"),
        ({"mask": base64.b64encode(b"x").decode()}, "mask"),
        ({"init_image": picture(), "strength": 0.1}, "strength"),
        ({"init_image": picture(), "mask": "%%%"}, "mask"),
    ]
    for extra, field in cases:
        with pytest.raises(InvalidInput) as e:
            generate(sd, {"prompt": PROMPT, "steps": 4, **extra})
        assert e.value.field == field, (extra, e.value)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_generate_and_jobs_routes_take_image_fields(sd):
    from test_service_jobs import wait_job
    from test_service_support import app_client, decode_image

    image, mask = picture(), square_mask()
    body = {
        "prompt": PROMPT,
        "steps": 4,
        "seed": 5,
        "policy": "cfg:scale=7.5",
        "init_image": png_base64(image),
        "mask": "data:image/png;base64," + png_base64(mask),
        "strength": 0.75,
        "model": "builtin:tiny",
    }
    library = {k: v for k, v in body.items() if k != "model"}
    expected = generate(sd, {**library, "init_image": image, "mask": mask})
    with app_client(model="builtin:tiny", batching=False) as client:
        response = client.post("/generate", json=body)
        assert response.status_code == 200, response.text
        served = decode_image(response.json()["images"][0])
        assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(expected.images[0]))
        assert "Denoising strength: 0.75" in served.text["parameters"]
        job = client.post("/jobs", json=body).json()
        done = wait_job(client, job["id"])
        assert done["status"] == "succeeded", done
        bad = client.post("/generate", json={**body, "init_image": "bm90IGFuIGltYWdl"})
        assert bad.status_code == 422 and "init_image" in bad.text


def test_cli_img2img_and_inpainting(tmp_path, sd):
    from diffsteer.service.cli import main

    image, mask = picture(), square_mask()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "--model", "builtin:tiny", "--steps", "4", "--seed", "5", "--policy", "cfg:scale=7.5"]
    files = ["--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--strength", "0.75"]
    assert main([*argv, *files, "-q", "-o", str(out)]) == 0
    expected = generate(
        sd,
        {
            "prompt": PROMPT,
            "steps": 4,
            "seed": 5,
            "policy": "cfg:scale=7.5",
            "init_image": image,
            "mask": mask,
            "strength": 0.75,
        },
    )
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected.images[0]))
    assert main([*argv, "--init-image", str(tmp_path / "missing.png"), "-q", "-o", str(out)]) == 2


def test_fill_paints_the_masked_area_with_the_surroundings():
    from diffsteer.guidance.image_inputs import fill_masked

    pixels = torch.zeros(1, 3, 32, 32)
    pixels[:, 0] = 0.8  # a red image ...
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    pixels[..., 8:24, 8:24] = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)  # ... with a blue square to repaint
    filled = fill_masked(pixels, mask)
    torch.testing.assert_close(
        filled[..., 8:24, 8:24], torch.tensor([0.8, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    )
    torch.testing.assert_close(filled * (1 - mask), pixels * (1 - mask))


@pytest.mark.parametrize("fill", ["fill", "latent_noise", "latent_nothing"])
def test_masked_content_options_change_only_the_start_of_the_masked_area(sd, fill):
    from diffsteer.guidance.sampler import prepare

    params = {"prompt": PROMPT, "steps": 4, "seed": 5, "init_image": picture(), "mask": square_mask(), "strength": 0.7}
    original = prepare(sd, params).image.init_latents
    changed = prepare(sd, {**params, "inpainting_fill": fill}).image
    outside = 1 - changed.mask
    if fill != "fill":  # the latent options leave the rest as it was (fill changes the pixels the VAE sees)
        torch.testing.assert_close(changed.init_latents * outside, original * outside, atol=1e-5, rtol=0)
    assert not torch.allclose(changed.init_latents * changed.mask, original * changed.mask)
    if fill == "latent_nothing":
        assert float((changed.init_latents * changed.mask).abs().max()) == 0.0


def test_reno_optimises_the_noise_added_to_the_init_latents(sd):
    """ReNO on an inpainting request: its noise is what the init latents are noised with, the masked area is what
    its reward sees change, and rerunning from the returned noise gives the best iterate."""
    from diffsteer.guidance.sampler import prepare

    reward = "saturation:1"  # weight-free: nothing to download
    params = {
        "prompt": PROMPT,
        "seeds": [3],
        "steps": 3,
        "init_image": picture(),
        "mask": square_mask(),
        "strength": 0.7,
        "policy": {"name": "reno", "reward": reward, "iterations": 2, "scale": 1.0},
    }
    prepared = prepare(sd, params)
    outer = prepared.policy.optimise_noise(prepared)
    trace = outer.trace["reno"]
    assert trace["reward_best"][0] >= trace["reward_initial"][0]
    assert len({s[0] for s in trace["reward_curve"]}) > 1
    result = generate(sd, params)
    assert result.nfe[0] == outer.nfe + 2  # the final run: ⌊3 × 0.7⌋ = 2 steps, one evaluation each (unguided)


def test_ab_runs_image_conditioned_arms(tmp_path, sd):
    """Every arm starts from the same init image (and mask); the images equal the library's for that request."""
    from diffsteer.evaluation.ab import run_ab

    image, mask = picture(40, 24), square_mask(40, 24)
    results = run_ab(
        {
            "arms": ["cfg=cfg:scale=7.5", "apg=apg:scale=7.5"],
            "model": "builtin:tiny",
            "prompts": [PROMPT],
            "seeds": 1,
            "seed": 5,
            "steps": 4,
            "metrics": ["nfe"],
            "init_image": png_base64(image),
            "mask": png_base64(mask),
            "strength": 0.75,
            "output_dir": str(tmp_path / "ab"),
            "report": False,
            "n_resamples": 200,
        }
    )
    assert [(a["width"], a["height"]) for a in results["arms"]] == [(24, 40)] * 2  # the image's size
    assert {name: arm["nfe"]["mean"] for name, arm in results["summary"].items()} == {"cfg": 6, "apg": 6}
    saved = Image.open(next((tmp_path / "ab" / "images" / "cfg").glob("*.png"))).convert("RGB")
    expected = generate(
        sd,
        {
            "prompt": PROMPT,
            "seeds": [5],
            "steps": 4,
            "policy": "cfg:scale=7.5",
            "init_image": image,
            "mask": mask,
            "strength": 0.75,
        },
    )
    assert np.array_equal(np.asarray(saved), np.asarray(expected.images[0]))


def test_ab_cli_and_service_take_the_image_fields(tmp_path):
    from test_service_support import app_client

    from diffsteer.service.cli import main

    picture().save(tmp_path / "in.png")
    argv = ["ab", "--arm", "a=cfg:scale=2", "--arm", "b=cfg:scale=4", "--prompts", str(tmp_path / "p.txt")]
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    common = ["--model", "builtin:tiny", "--steps", "2", "--no-report", "-q", "--metrics", "nfe"]
    assert main([*argv, *common, "--init-image", str(tmp_path / "in.png"), "-o", str(tmp_path / "out")]) == 0
    assert main([*argv, *common, "--init-image", str(tmp_path / "missing.png"), "-o", str(tmp_path / "x")]) == 2
    body = {
        "arms": ["a=cfg:scale=2", "b=cfg:scale=4"],
        "prompts": [PROMPT],
        "steps": 2,
        "metrics": ["nfe"],
        "report": False,
        "init_image": png_base64(picture()),
    }
    with app_client(model="builtin:tiny", ab_dir=str(tmp_path / "abs")) as client:
        assert client.post("/ab", json=body).status_code == 202
        bad = client.post("/ab", json={**body, "init_image": "bm90IGFuIGltYWdl"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "init_image"
