"""Composite rewards (ReNO's weighted loss), spec parsing, the registry and the factory."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may download

import math

import pytest
import torch

from diffsteer.rewards import (
    CompositeReward,
    HpsRewardConfig,
    NonDifferentiableRewardError,
    TermSpec,
    available_rewards,
    build_reward,
    parse_reward_spec,
    reward_config_help,
    reward_config_schema,
)
from tests.test_rewards_support import make_open_clip_model, make_tiny_hf_clip, write_open_clip_config


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("composite")
    cfg = str(write_open_clip_config(d))
    model = make_open_clip_model(seed=4)
    torch.save({"state_dict": model.state_dict()}, d / "hps.pt")
    torch.save(make_open_clip_model(seed=5).state_dict(), d / "clip.pt")
    make_tiny_hf_clip(d / "pick", d / "proc")
    return {
        "hps": {"model_config_path": cfg, "checkpoint": str(d / "hps.pt")},
        "clip": {"model_config_path": cfg, "checkpoint": str(d / "clip.pt")},
        "pickscore": {"model_path": str(d / "pick"), "processor_path": str(d / "proc")},
    }


def test_parse_reward_spec():
    assert parse_reward_spec("hps:5,pickscore:0.05,clip:0.01") == [
        TermSpec("hps", 5.0),
        TermSpec("pickscore", 0.05),
        TermSpec("clip", 0.01),
    ]
    assert parse_reward_spec(" Saturation : 2 : 0.8 , brightness") == [
        TermSpec("saturation", 2.0, 0.8),
        TermSpec("brightness", 1.0),
    ]
    assert parse_reward_spec("contrast:-1") == [TermSpec("contrast", -1.0)]
    for bad, msg in [
        ("hps:abc", "weight in 'hps:abc'"),
        ("hps:nan", "finite"),
        ("hps:0", "non-zero"),
        ("hps:1:x", "offset"),
        ("hps:1,,clip", "empty entry"),
        ("hps:1,hps:2", "twice"),
        ("hps:1:2:3", "name\\[:weight"),
        ("", "reward spec"),
        (":3", "missing reward name"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_reward_spec(bad)


def test_reno_objective_equals_hand_computed_sum(paths):
    reward = build_reward("hps:5,pickscore:0.05,clip:0.01,saturation:2:0.9", configs=paths)
    assert isinstance(reward, CompositeReward) and reward.differentiable and reward.uses_prompts
    # ReNO's offsets (Eyring et al. 2024, rewards/*.py): 1 - HPS, 30 - PickScore, 100 - CLIP.
    assert reward.offsets == {"hps": 1.0, "pickscore": 30.0, "clip": 100.0, "saturation": 0.9}
    assert reward.weights == {"hps": 5.0, "pickscore": 0.05, "clip": 0.01, "saturation": 2.0}

    torch.manual_seed(0)
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    prompts = ["a red cat", "a dog"]
    result = reward.evaluate(images, prompts)
    singles = {n: r.score(images.detach(), prompts if r.uses_prompts else None) for n, r in reward.rewards.items()}
    for n in singles:
        assert torch.allclose(result.scores[n].detach(), singles[n], atol=1e-6)
    expected = (
        5 * (1 - singles["hps"])
        + 0.05 * (30 - singles["pickscore"])
        + 0.01 * (100 - singles["clip"])
        + 2 * (0.9 - singles["saturation"])
    )
    assert torch.allclose(result.loss_per_sample.detach(), expected, atol=1e-5)
    assert math.isclose(result.loss.item(), expected.mean().item(), rel_tol=1e-5)
    total = 5 * singles["hps"] + 0.05 * singles["pickscore"] + 0.01 * singles["clip"] + 2 * singles["saturation"]
    assert torch.allclose(reward.score(images.detach(), prompts), total, atol=1e-5)
    assert torch.allclose(reward.loss(images.detach(), prompts), expected, atol=1e-5)

    result.loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # The spec round-trips.
    assert parse_reward_spec(reward.spec) == [TermSpec(n, reward.weights[n], reward.offsets[n]) for n in reward.rewards]


def test_composite_gradient_is_the_weighted_sum_of_gradients():
    reward = build_reward("saturation:2,brightness:-0.5:0.1")
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    reward.evaluate(x).loss.backward()
    grads = []
    for name in ("saturation", "brightness"):
        y = x.detach().clone().requires_grad_(True)
        reward.rewards[name].score(y).sum().backward()
        grads.append(y.grad)
    # loss = 2 (1 - sat) - 0.5 (0.1 - bright)  =>  dL/dx = -2 dsat + 0.5 dbright
    assert torch.allclose(x.grad, -2 * grads[0] + 0.5 * grads[1], atol=1e-6)


def test_non_differentiable_terms_are_for_evaluation_only():
    reward = build_reward("saturation:1,jpeg_compressibility:0.1")
    assert reward.differentiable is False and reward.uses_prompts is False
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    with pytest.raises(NonDifferentiableRewardError, match="jpeg_compressibility"):
        reward.evaluate(x)
    with torch.no_grad():
        res = reward.evaluate(x)
    assert res.loss_per_sample.shape == (2,) and torch.isfinite(res.loss)


def test_factory_forms_and_errors(paths):
    hps_cfg = HpsRewardConfig(**paths["hps"])
    assert build_reward(hps_cfg).name == "hps"
    assert build_reward("hps", configs={"hps": paths["hps"]}).name == "hps"
    terms = build_reward(
        [{"reward": {"name": "hps", **paths["hps"]}, "weight": 2.0}, {"name": "saturation", "offset": 0.5}]
    )
    assert terms.weights == {"hps": 2.0, "saturation": 1.0} and terms.offsets == {"hps": 1.0, "saturation": 0.5}
    assert build_reward({"terms": [{"name": "contrast", "weight": 3}]}).weights == {"contrast": 3.0}
    # Term options override the `configs` table field by field.
    merged = build_reward([{"reward": {"name": "hps", "resize_mode": "shortest"}, "weight": 5}], configs=paths)
    assert merged.rewards["hps"].preprocess_cfg.resize_mode == "shortest"
    assert merged.rewards["hps"].config.checkpoint == paths["hps"]["checkpoint"]

    with pytest.raises(ValueError, match="unknown reward 'imagereward'; accepted: aesthetic, brightness, clip"):
        build_reward("hps:5,imagereward:1", configs=paths)
    with pytest.raises(ValueError, match="weight in 'hps:x'"):
        build_reward("hps:x")
    # A server-wide table of options may cover rewards the spec does not use, but no unknown names.
    assert build_reward("hps:1", configs=paths).weights == {"hps": 1.0}
    with pytest.raises(ValueError, match=r"configs: unknown reward names \['hsp'\]"):
        build_reward("hps:1", configs={**paths, "hsp": paths["hps"]})
    with pytest.raises(ValueError, match=r"hps\.checkpoint: file not found"):
        build_reward("hps:1", configs={"hps": {**paths["hps"], "checkpoint": "/nonexistent/hps.pt"}})
    with pytest.raises(ValueError, match=r"hps\.checkpoint: required"):
        build_reward("hps:5,saturation:1", configs={"hps": {"model_config_path": paths["hps"]["model_config_path"]}})
    with pytest.raises(ValueError, match=r"hps\.chekpoint: unknown field; accepted: .*checkpoint"):
        build_reward("hps:1", configs={"hps": {"chekpoint": "x"}})
    with pytest.raises(ValueError, match="must be a HpsRewardConfig"):
        build_reward("hps:1", configs={"hps": reward_cfg_of("clip", paths)})
    with pytest.raises(ValueError, match="weight must be a finite non-zero number"):
        build_reward([{"name": "saturation", "weight": float("inf")}])
    with pytest.raises(ValueError, match="unknown keys"):
        build_reward([{"name": "saturation", "wieght": 2}])
    with pytest.raises(ValueError, match="needs a 'name'"):
        build_reward({"checkpoint": "x"})


def reward_cfg_of(name, paths):
    from diffsteer.rewards import make_reward_config

    return make_reward_config(name, paths[name])


def test_registry_documents_every_field():
    import diffsteer.guidance.reward_models  # noqa: F401  (registers the proving ground's verifier)

    assert available_rewards() == sorted(
        [
            "aesthetic",
            "brightness",
            "clip",
            "contrast",
            "hps",
            "jpeg_compressibility",
            "pickscore",
            "saturation",
            "verifier",
        ]
    )
    for name in available_rewards():
        help_ = reward_config_help(name)
        assert all(text.strip() for text in help_.values()), name
        schema = reward_config_schema(name)
        assert schema["properties"]["name"]["const"] == name or schema["properties"]["name"]["default"] == name
    assert "checkpoint" in reward_config_help("hps") and "head_checkpoint" in reward_config_help("aesthetic")
