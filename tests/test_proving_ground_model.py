"""The shipped proving-ground model: loads in diffusers and in our sampler, is small, and has learned the world."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsteer.guidance.models import load_model
from diffsteer.guidance.sampler import generate
from diffsteer.proving_ground.shipped import MODEL as PROVING_GROUND_MODEL
from diffsteer.proving_ground.shipped import ONE_STEP_MODEL as PROVING_GROUND_1STEP_MODEL


@pytest.fixture(scope="module")
def pg_model():
    return load_model("builtin:proving-ground", device="cpu")


def test_default_model_is_the_proving_ground(pg_model):
    model = load_model(None, device="cpu")
    assert model.name == "builtin:proving-ground"
    assert model.default_size == 64 and model.family.name == "sd"


@pytest.mark.parametrize("folder", [PROVING_GROUND_MODEL, PROVING_GROUND_1STEP_MODEL], ids=["model", "model-1step"])
def test_shipped_files_are_small_fp16_safetensors(folder):
    weights = list(folder.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert sum(p.stat().st_size for p in weights) <= 25 * 2**20
    from safetensors import safe_open

    for part in ("unet", "vae"):
        with safe_open(str(next((folder / part).glob("*.safetensors"))), "pt") as f:
            assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16


def test_loads_in_stable_diffusion_pipeline_and_matches_our_sampler(pg_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(PROVING_GROUND_MODEL))
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in (7, 8)]
    theirs = pipe(
        "a red circle",
        num_inference_steps=8,
        guidance_scale=3.0,
        num_images_per_prompt=2,
        generator=generators,
        output_type="np",
    ).images
    ours = (
        generate(pg_model, {"prompt": "a red circle", "seed": 7, "num_images": 2, "steps": 8, "policy": "cfg:scale=3"})
        .pixels.permute(0, 2, 3, 1)
        .numpy()
    )
    assert theirs.shape == (2, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.slow
def test_the_model_draws_the_requested_colours(pg_model):
    """A loose bar at the best scale, 1.5, on held-out seeds (the full evaluation is benchmarks/proving_ground_eval.py)."""
    from diffsteer.proving_ground import heldout_suite, verify

    items = heldout_suite("single", 12, seed=0)
    result = generate(
        pg_model,
        {
            "prompt": [i.prompt for i in items],
            "seeds": [i.seed for i in items],
            "steps": 20,
            "scheduler": "ddim",
            "policy": "cfg:scale=1.5",
        },
    )
    reports = [verify(np.asarray(img), item.spec) for img, item in zip(result.images, items)]
    assert sum(r.colour_correct for r in reports) >= 9  # 11 of 12 when written; 0.87 over 216 items


def test_training_log_documents_the_run():
    log = json.loads((PROVING_GROUND_MODEL / "training_log.json").read_text())
    assert log["total_s"] <= 90 * 60
    assert log["denoiser_mse_last_200"] < log["denoiser_mse_first_200"]


@pytest.mark.slow
def test_trainer_smoke_run_writes_a_loadable_pipeline(tmp_path, capsys):
    from diffsteer.proving_ground.build_model import main

    main(
        [
            "--output",
            str(tmp_path / "m"),
            "--num-scenes",
            "64",
            "--vae-steps",
            "2",
            "--vae-batch",
            "4",
            "--vae-whole-steps",
            "2",
            "--vae-whole-batch",
            "2",
            "--vae-eval-images",
            "4",
            "--unet-steps",
            "2",
            "--unet-batch",
            "4",
            "--unet-channels",
            "32",
            "32",
            "--category-weights",
            '{"single": 1.0}',
        ]
    )
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    log = json.loads((out / "training_log.json").read_text())
    assert log["config"]["unet_channels"] == [32, 32] and log["config"]["category_weights"] == {"single": 1.0}
    assert set(log["vae_roundtrip_heldout"]) == {"mae_255", "colour_correct", "shape_correct", "passed"}
    model = load_model(str(out), device="cpu")
    result = generate(model, {"prompt": "a red circle", "seed": 1, "steps": 2})
    assert result.images[0].size == (64, 64)
    assert Path(out, "training_log.json").is_file()


# ----------------------------------------------------------------------------- builtin:proving-ground-1step


def test_one_step_student_defaults_to_one_unguided_step_and_matches_diffusers():
    """The shipped f-distill student: its diffsteer.json makes one unguided step the default; our sampler with
    those defaults and StableDiffusionPipeline at one step (the folder's trailing DDIM schedule) agree."""
    from diffusers import StableDiffusionPipeline

    from diffsteer.guidance.models import model_defaults
    from diffsteer.guidance.sampler import initial_noise

    defaults = model_defaults("builtin:proving-ground-1step")
    assert (defaults.steps, defaults.policy) == (1, "cfg:scale=1")
    model = load_model("builtin:proving-ground-1step", device="cpu")
    prompts = ["a red circle", "two blue squares"]
    ours = generate(
        model, {"prompt": prompts, "seeds": [3, 4], "scheduler": "default"}
    )  # the Python API fills them too
    assert ours.nfe == [1, 1] and (ours.params.steps, ours.params.policy.spec()) == (1, "cfg:scale=1.0")
    named = generate(
        model, {"prompt": prompts[:1], "seeds": [3], "scheduler": "default", "steps": 2, "policy": "cfg:scale=2"}
    )
    assert named.nfe == [4] and named.params.policy.spec() == "cfg:scale=2.0"  # what a request names wins
    from diffsteer.guidance.request import GenerationParams

    assert generate(model, GenerationParams(prompt="a red circle", seed=3)).nfe == [1]  # a params object alike
    pipe = StableDiffusionPipeline.from_pretrained(str(PROVING_GROUND_1STEP_MODEL))
    pipe.set_progress_bar_config(disable=True)
    latents, _ = initial_noise([3, 4], (4, 16, 16), torch.device("cpu"))
    theirs = pipe(prompts, num_inference_steps=1, guidance_scale=0.0, latents=latents, output_type="np").images
    assert np.abs(ours.pixels.permute(0, 2, 3, 1).numpy() - theirs).max() <= 1e-4


def test_one_step_student_draws_better_than_the_teacher_in_one_step():
    """A loose bar on held-out seeds: the student's single step gets more colours right than the teacher's
    (the full comparison, against the teacher at 1, 4 and 30 steps, is benchmarks/fdistill_proving_ground.py)."""
    from diffsteer.proving_ground import heldout_suite, verify

    items = heldout_suite("single", 12, seed=0)
    request = {
        "prompt": [i.prompt for i in items],
        "seeds": [i.seed for i in items],
        "steps": 1,
        "scheduler": "default",
        "policy": "cfg:scale=1",
    }
    correct = {}
    for spec in ("builtin:proving-ground", "builtin:proving-ground-1step"):
        result = generate(load_model(spec, device="cpu"), request)
        correct[spec] = sum(
            verify(np.asarray(img), item.spec).colour_correct for img, item in zip(result.images, items)
        )
    assert correct["builtin:proving-ground-1step"] >= correct["builtin:proving-ground"] + 3, correct


def test_the_service_serves_the_one_step_student_with_its_defaults():
    """``diffsteer serve --model builtin:proving-ground-1step``: a request naming no steps or policy gets one step."""
    from test_service_support import app_client, decode_image, pixels

    model = load_model("builtin:proving-ground-1step", device="cpu")
    ours = generate(model, {"prompt": "a red circle", "seed": 7, "steps": 1, "policy": "cfg:scale=1"}).pixels[0]
    with app_client(model="builtin:proving-ground-1step") as client:
        r = client.post("/generate", json={"prompt": "a red circle", "seed": 7})
        assert r.status_code == 200, r.text
        served = pixels(decode_image(r.json()["images"][0]))
    assert (served - ours.permute(1, 2, 0).reshape(-1, 3)).abs().max() <= 1.5 / 255


@pytest.mark.slow
def test_the_cli_samples_the_one_step_student_with_its_defaults(tmp_path, capsys):
    """``diffsteer generate --model builtin:proving-ground-1step``: one step unless the command names others."""
    from diffsteer.service.cli import main

    common = ["generate", "a red circle", "--model", "builtin:proving-ground-1step", "--device", "cpu", "--seed", "1"]
    assert main([*common, "-o", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--steps", "2", "--policy", "cfg:scale=2", "-o", str(tmp_path / "b.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].endswith("nfe=1") and lines[-1].endswith("nfe=4"), lines
