"""builtin:proving-ground-flow, the flow-matching proving-ground model: the shipped folder loads in our sampler and
in diffusers' StableDiffusion3Pipeline and gives the same image, its diffsteer.json is applied on every surface,
its builder runs end to end (smoke mode) and is deterministic, and the study command runs in smoke mode."""

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from pipeline_reference import assert_same_image, pipeline_images
from safetensors.torch import load_file

from diffsteer.guidance.models import BUILTIN_MODELS, load_model, model_defaults
from diffsteer.guidance.registry import parse_policy
from diffsteer.guidance.sampler import generate
from diffsteer.proving_ground import build_flow_model as builder
from diffsteer.proving_ground.shipped import FLOW_MODEL

SPEC = "builtin:proving-ground-flow"
RECOMMENDED = json.loads((FLOW_MODEL / "diffsteer.json").read_text())


@pytest.fixture(scope="module")
def flow_model():
    return load_model(SPEC, device="cpu")


def test_is_a_builtin_sd3_model_with_small_fp16_weights(flow_model):
    assert SPEC in BUILTIN_MODELS
    assert flow_model.family.name == "sd3" and flow_model.default_size == 64
    assert json.loads((FLOW_MODEL / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    weights = list(FLOW_MODEL.rglob("*.safetensors"))
    assert sum(p.stat().st_size for p in weights) <= 20 * 2**20
    assert next(iter(load_file(next((FLOW_MODEL / "transformer").glob("*.safetensors"))).values())).dtype == (
        torch.float16
    )


def test_loads_in_stable_diffusion_3_pipeline_and_matches_our_sampler(flow_model):
    from diffusers import StableDiffusion3Pipeline

    # no T5, as diffusers' documentation loads SD3 without it
    pipe = StableDiffusion3Pipeline.from_pretrained(str(FLOW_MODEL), text_encoder_3=None, tokenizer_3=None)
    seeds, steps, scale = [3, 4], 3, 4.0
    theirs = pipeline_images(pipe, ["two red circles"] * 2, steps, seeds, guidance_scale=scale, height=64, width=64)
    ours = generate(
        flow_model,
        {"prompt": "two red circles", "seeds": seeds, "steps": steps, "policy": f"cfg:scale={scale}"},
    )
    assert_same_image(np.stack([np.asarray(im, dtype=int) for im in ours.images]), theirs)


def test_recommends_its_measured_policy_and_steps_and_a_request_overrides_them(flow_model):
    from diffsteer.guidance.sampler import check_request

    defaults = model_defaults(SPEC)
    assert (defaults.policy, defaults.steps, defaults.native_size) == (
        RECOMMENDED["policy"],
        RECOMMENDED["steps"],
        64,
    )
    plain = check_request(flow_model, {"prompt": "a red circle", "seed": 1}).params
    assert (plain.policy.spec(), plain.steps) == (parse_policy(RECOMMENDED["policy"]).spec(), RECOMMENDED["steps"])
    named = check_request(flow_model, {"prompt": "a red circle", "seed": 1, "steps": 2, "policy": "cfg:scale=2"})
    assert (named.params.policy.spec(), named.params.steps) == ("cfg:scale=2.0", 2)


def test_the_service_plans_and_lists_its_defaults():
    from fastapi.testclient import TestClient
    from test_service_support import settings

    from diffsteer.service.app import create_app
    from diffsteer.service.schemas import GenerateRequest

    app = create_app(settings(model=SPEC, preload=False))
    plan = app.state.engine.plan(GenerateRequest(prompt="a red circle"))
    assert (plan.params.policy.spec(), plan.params.steps) == (
        parse_policy(RECOMMENDED["policy"]).spec(),
        RECOMMENDED["steps"],
    )
    with TestClient(app) as client:
        listed = {m["name"]: m.get("defaults") or {} for m in client.get("/models").json()["models"]}
    assert (listed[SPEC]["policy"], listed[SPEC]["steps"]) == (RECOMMENDED["policy"], RECOMMENDED["steps"])


@pytest.mark.slow
def test_the_cli_samples_with_its_defaults(tmp_path, capsys):
    from diffsteer.service.cli import main

    assert (
        main(
            [
                "generate",
                "a red circle",
                "--model",
                SPEC,
                "--device",
                "cpu",
                "--seed",
                "1",
                "-o",
                str(tmp_path / "a.png"),
            ]
        )
        == 0
    )
    nfe_per_step = 1 if parse_policy(RECOMMENDED["policy"]).spec() == "cfg:scale=1.0" else 2
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"nfe={nfe_per_step * RECOMMENDED['steps']}")


# ----------------------------------------------------------------------------- the builder

SMOKE = [
    "num_scenes=8",
    "batch=4",
    "steps=3",
    "warmup=1",
    "num_layers=1",
    "num_attention_heads=2",
    "attention_head_dim=16",
]


def _smoke_build(folder, *extra):
    builder.main(["--set", f"output={folder}", *SMOKE, *extra])
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_builder_runs_end_to_end_and_is_deterministic_from_its_seed(tmp_path):
    first = _smoke_build(tmp_path / "a")
    assert _same(first, _smoke_build(tmp_path / "b"))
    assert not _same(first, _smoke_build(tmp_path / "c", "seed=1"))
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert log["config"]["steps"] == 3 and math.isfinite(log["flow_mse_last_200"])
    model = load_model(str(tmp_path / "a"), device="cpu")
    assert model.family.name == "sd3"
    assert generate(model, {"prompt": "a red circle", "seed": 0, "steps": 2}).images[0].size == (64, 64)


def test_caption_noise_pairs_a_share_of_scenes_with_other_captions_before_dropout():
    captions = torch.arange(50)  # scene i has caption i (the empty caption is index 50)
    idx = torch.randint(0, 50, (20_000,), generator=torch.Generator().manual_seed(1))
    clean = builder.training_captions(captions, idx, 0.0, 1e-9, 50, torch.Generator().manual_seed(2))
    assert torch.equal(clean, idx)
    noisy = builder.training_captions(captions, idx, 0.3, 0.15, 50, torch.Generator().manual_seed(2))
    dropped = noisy == 50
    assert float(dropped.float().mean()) == pytest.approx(0.15, abs=0.01)
    # a mismatched scene keeps its own caption when the other scene drawn has it (1 in 50)
    assert float((noisy[~dropped] != idx[~dropped]).float().mean()) == pytest.approx(0.3 * 49 / 50, abs=0.015)
    with pytest.raises(ValueError, match="caption_noise"):
        builder.ProvingGroundFlowConfig(caption_noise=1.0)


def test_the_shipped_folder_is_what_its_recipe_builds():
    """The training log's config is the shipped recipe's (fields that do not touch the weights aside), and the
    folder's diffsteer.json and scheduler are the ones the recipe writes."""
    from diffsteer.training.config_io import load_config

    cfg = asdict(load_config(builder.ProvingGroundFlowConfig, "proving-ground-flow"))
    logged = json.loads((FLOW_MODEL / "training_log.json").read_text())["config"]
    not_weights = {"output", "source_model", "snapshot_steps", "recommended_policy", "recommended_steps", "shift"}
    assert {k: v for k, v in logged.items() if k not in not_weights} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k not in not_weights
    }
    assert RECOMMENDED == {
        "policy": cfg["recommended_policy"],
        "steps": cfg["recommended_steps"],
        "native_size": 64,
        "max_size": 256,
    }
    scheduler = json.loads((FLOW_MODEL / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == cfg["shift"]


def test_compressed_attention_equals_attention_over_the_256_zero_t5_tokens(flow_model):
    """Training runs on one token standing for the pipeline's 256 identical zero T5 tokens (log 256 added to its
    logits); the transformer's output equals the uncompressed call."""
    import copy

    transformer = copy.deepcopy(flow_model.backbone).float()
    conditions = flow_model.family.encode_prompts(flow_model, ["a red circle", ""], height=64, width=64)
    hidden = torch.cat([c.hidden_states for c in conditions]).float()
    pooled = torch.cat([c.added["pooled_projections"] for c in conditions]).float()
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([800.0, 300.0])

    def run(states):
        return transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=states, pooled_projections=pooled, return_dict=False
        )[0]

    full = run(hidden)
    clip_tokens = hidden.shape[1] - builder.T5_TOKENS
    builder.compressed_attention(transformer, clip_tokens)
    assert torch.allclose(run(hidden[:, : clip_tokens + 1]), full, atol=1e-4)


def test_flow_pair_and_logit_normal_t_follow_the_equations():
    x0, noise = torch.tensor([[[[2.0]]]]), torch.tensor([[[[-1.0]]]])
    x_t, target = builder.flow_pair(x0, noise, torch.tensor([0.25]))
    assert x_t.item() == pytest.approx(0.75 * 2.0 + 0.25 * -1.0) and target.item() == pytest.approx(-3.0)
    t = builder.logit_normal_t(20_000, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert float(torch.median(t)) == pytest.approx(0.5, abs=0.02)  # sigmoid of N(0, 1)'s median
    u = torch.logit(t)
    assert float(u.std()) == pytest.approx(1.0, abs=0.03)


# ----------------------------------------------------------------------------- the study command


def test_the_guidance_study_runs_in_smoke_mode(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.flow_guidance_study import main as study

    assert study(["-o", str(tmp_path), "--smoke", "--parts", "response,policies"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["scale"] for row in summary["response"]["rows"]] == [1.0, 3.0]
    assert set(summary["policies"]["rows"]) >= {"cfg", "apg_high", "cfg_zero_star", "ag", "linear_ag"}
    assert "| cfg scale |" in capsys.readouterr().out
