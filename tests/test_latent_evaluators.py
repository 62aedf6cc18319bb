"""Latent evaluators: the batched call against per-candidate calls, files, dynamic CFG's choice against a direct
computation, the executor units it uses, ReNO and the A/B metric on them. Random-weight evaluators on the tiny
model (the trained proving-ground ones are measured in benchmarks/dynamic_cfg_latent.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_reward_policies import first_step_candidate_x0

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.executor import DirectExecutor
from diffsteer.guidance.latent_evaluators import (
    EvaluatorSpec,
    LatentEvaluators,
    PromptInputs,
    evaluators_for,
    latent_reward,
    log_snr,
    parse_weights,
)
from diffsteer.guidance.sampler import generate, prepare

WEIGHTS = {"alignment": 1.0, "fidelity": 0.5}


def random_evaluators(latent_channels: int = 4, text_dim: int = 32, seed: int = 0) -> LatentEvaluators:
    torch.manual_seed(seed)
    specs = {
        "alignment": EvaluatorSpec("alignment", 16, 2, True, output_mean=3.0, output_std=2.0, target="saturation:1"),
        "fidelity": EvaluatorSpec("fidelity", 16, 1, False),
    }
    evaluators = LatentEvaluators(latent_channels, text_dim, specs, (-8.0, 8.0), WEIGHTS)
    for p in evaluators.parameters():  # spread the outputs so that candidates are told apart clearly
        p.data.mul_(3.0)
    return evaluators.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model_with_evaluators(sd_model, tmp_path_factory):
    folder = random_evaluators().save(tmp_path_factory.mktemp("ev") / "latent_evaluators")
    return dataclasses.replace(sd_model, extra={**sd_model.extra, "latent_evaluators": str(folder)})


def test_log_snr_is_the_formula_and_clamps_clean_latents():
    a = torch.tensor([0.5, 0.9, 1.0])
    lam = log_snr(a, (-5.0, 6.0))
    assert lam[0].item() == pytest.approx(0.0, abs=1e-6)
    assert lam[1].item() == pytest.approx(np.log(0.9 / 0.1), rel=1e-5)
    assert lam[2].item() == 6.0  # ᾱ = 1: the least noisy trained level


def test_one_batched_call_equals_per_candidate_calls():
    ev = random_evaluators()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(12, 4, 16, 16, generator=g)
    text = PromptInputs(states=torch.randn(12, 7, 32, generator=g))
    bars = torch.linspace(0.05, 0.99, 12)
    batched = ev.score(x0, bars, text)
    for i in range(12):
        single = {k: ev.evaluate(k, x0[i : i + 1], bars[i : i + 1], text.rows(slice(i, i + 1))) for k in WEIGHTS}
        expected = sum(WEIGHTS[k] * single[k] for k in WEIGHTS)
        torch.testing.assert_close(batched.total[i : i + 1], expected, atol=1e-5, rtol=1e-5)
        for k in WEIGHTS:
            torch.testing.assert_close(batched.parts[k][i : i + 1], single[k], atol=1e-5, rtol=1e-5)


def test_outputs_use_the_saved_affine_map():
    ev = random_evaluators()
    x0, text = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 32)
    raw = ev.nets["alignment"](x0, log_snr(torch.full((3,), 0.5, dtype=torch.float64), ev.log_snr_bounds), text)
    torch.testing.assert_close(ev.evaluate("alignment", x0, 0.5, PromptInputs(states=text)), 3.0 + 2.0 * raw)


def test_save_and_load_give_the_same_scores(tmp_path, sd_model):
    ev = random_evaluators()
    folder = ev.save(tmp_path / "latent_evaluators")
    loaded = LatentEvaluators.load(folder)
    x0, text = torch.randn(4, 4, 16, 16), PromptInputs(states=torch.randn(4, 7, 32))
    torch.testing.assert_close(loaded.score(x0, 0.3, text).total, ev.score(x0, 0.3, text).total)
    assert loaded.default_weights == WEIGHTS and loaded.specs["alignment"].target == "saturation:1"
    assert evaluators_for(sd_model) is None  # the tiny model has none
    pointed = dataclasses.replace(sd_model, extra={"latent_evaluators": str(folder)})
    assert evaluators_for(pointed) is evaluators_for(pointed)  # loaded once, shared
    with pytest.raises(InvalidInput, match="latent_evaluators"):
        LatentEvaluators.load(tmp_path / "missing")


def test_weights_parse_and_bad_names_are_errors_naming_the_field():
    assert parse_weights("alignment:2, fidelity:0.25", ["alignment", "fidelity"]) == {
        "alignment": 2.0,
        "fidelity": 0.25,
    }
    assert parse_weights("alignment", ["alignment"]) == {"alignment": 1.0}
    with pytest.raises(InvalidInput) as e:
        parse_weights("beauty:1", ["alignment", "fidelity"])
    assert e.value.field == "policy.latent_weights" and "alignment, fidelity" in str(e.value)
    with pytest.raises(InvalidInput, match="number"):
        parse_weights("alignment:x", ["alignment"])


# ------------------------------------------------------------------------------------------- dynamic CFG


def test_dynamic_cfg_picks_the_argmax_of_the_combined_latent_score(model_with_evaluators):
    model = model_with_evaluators
    candidates = [1.0, 4.0, 12.0]
    params = {
        "prompt": ["a red circle", "a blue square"],
        "seeds": [5, 6],
        "steps": 3,
        "scheduler": "ddim",
        "policy": {
            "name": "dynamic_cfg",
            "candidates": candidates,
            "evaluator": "latent",
            "latent_weights": "alignment:1,fidelity:0.5",
        },
    }
    result = generate(model, params)
    chosen = result.trace["scale_schedule"]

    ev = evaluators_for(model)
    prepared, ab, x0s = first_step_candidate_x0(model, params, candidates)
    text = PromptInputs(states=prepared.conditions["cond"].hidden_states)
    expected = []
    with torch.no_grad():
        for b, per_candidate in enumerate(x0s):
            scores = [
                float(
                    ev.evaluate("alignment", x0, ab, text.rows(slice(b, b + 1))) + 0.5 * ev.evaluate("fidelity", x0, ab)
                )
                for x0 in per_candidate
            ]
            ordered = sorted(scores)
            assert ordered[-1] - ordered[-2] > 1e-3  # a clear winner, so float noise cannot flip it
            expected.append(candidates[int(np.argmax(scores))])
    assert chosen[0] == expected


def test_dynamic_cfg_with_other_weights_follows_them(model_with_evaluators):
    base = {"prompt": ["a red circle", "a blue square"], "seeds": [5, 6], "steps": 3, "scheduler": "ddim"}
    policy = {"name": "dynamic_cfg", "candidates": [1.0, 4.0, 12.0], "evaluator": "latent"}
    only_fidelity = generate(model_with_evaluators, {**base, "policy": {**policy, "latent_weights": "fidelity:1"}})
    negated = generate(model_with_evaluators, {**base, "policy": {**policy, "latent_weights": "fidelity:-1"}})
    first, flipped = only_fidelity.trace["scale_schedule"][0], negated.trace["scale_schedule"][0]
    assert all(a != b for a, b in zip(first, flipped))  # the argmax of −F is never the argmax of F


class CountingExecutor(DirectExecutor):
    def __init__(self):
        self.costs: list[float] = []

    def run(self, fn, *, cost: float = 0.0):
        self.costs.append(cost)
        return fn()


def test_all_candidates_of_all_images_are_one_executor_unit_per_step(model_with_evaluators):
    from diffsteer.guidance.policies.dynamic import LATENT_SCORE_COST

    executor = CountingExecutor()
    steps = 4
    generate(
        model_with_evaluators,
        {
            "prompt": ["a", "b", "c"],
            "seed": 1,
            "steps": steps,
            "policy": {"name": "dynamic_cfg", "candidates": [1.0, 2.0, 3.0, 5.0], "evaluator": "latent"},
        },
        executor=executor,
    )
    scoring = executor.costs[1:-1]  # between the prompt encoding and the final decode
    assert len(scoring) == steps
    assert scoring == pytest.approx([LATENT_SCORE_COST * 4 * 3] * steps)


def test_auto_uses_latent_evaluators_only_where_the_model_has_them(sd_model, model_with_evaluators):
    params = {
        "prompt": "a red circle",
        "seed": 2,
        "steps": 2,
        "policy": {"name": "dynamic_cfg", "candidates": [1.0, 6.0], "reward": "saturation:1"},
    }
    pixel = generate(sd_model, params)
    latent = generate(model_with_evaluators, params)
    explicit = generate(model_with_evaluators, {**params, "policy": {**params["policy"], "evaluator": "latent"}})
    assert latent.trace["scale_schedule"] == explicit.trace["scale_schedule"]
    assert pixel.trace["scale_schedule"]  # the model without evaluators falls back to the pixel reward
    with pytest.raises(InvalidInput) as e:
        generate(sd_model, {**params, "policy": {**params["policy"], "evaluator": "latent"}})
    assert e.value.field == "policy.evaluator"
    with pytest.raises(InvalidInput) as e:
        generate(model_with_evaluators, {**params, "policy": {**params["policy"], "latent_weights": "beauty:1"}})
    assert e.value.field == "policy.latent_weights"


# ------------------------------------------------------------------------------------------- ReNO and A/B


def test_reno_with_the_latent_reward_scores_the_plain_latents_first(model_with_evaluators):
    model = model_with_evaluators
    params = {"prompt": ["a red circle", "a blue square"], "seeds": [3, 4], "steps": 2, "scheduler": "ddim"}
    result = generate(model, {**params, "policy": {"name": "reno", "reward": "latent", "iterations": 2, "lr": 1.0}})
    trace = result.trace["reno"]
    prepared = prepare(model, {**params, "policy": "cfg:scale=1"})
    with torch.no_grad():
        plain = prepared.run().latents
    expected = latent_reward(model, "latent").score(
        plain, PromptInputs(states=prepared.conditions["cond"].hidden_states)
    )
    np.testing.assert_allclose(trace["reward_initial"], expected.numpy(), rtol=1e-4, atol=1e-4)
    assert all(best >= initial for best, initial in zip(trace["reward_best"], trace["reward_initial"]))
    with pytest.raises(InvalidInput) as e:
        generate(model, {**params, "policy": {"name": "reno", "reward": "latent:beauty:1", "iterations": 1}})
    assert e.value.field == "policy.reward"


def test_latent_reward_gradient_is_that_of_the_negated_score():
    ev = random_evaluators()
    from diffsteer.guidance.latent_evaluators import LatentReward

    reward = LatentReward(ev, WEIGHTS)
    z, text = torch.randn(2, 4, 8, 8, dtype=torch.float64).float(), PromptInputs(states=torch.randn(2, 5, 32))
    score, grad = reward.score_and_gradient(z, text)
    eps = 1e-2
    direction = torch.randn_like(z)
    numeric = -(reward.score(z + eps * direction, text).sum() - reward.score(z - eps * direction, text).sum()) / (
        2 * eps
    )
    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=5e-2, abs=1e-3)
    torch.testing.assert_close(score, reward.score(z, text))


def test_ab_metric_latent_is_the_evaluators_on_the_encoded_image(model_with_evaluators):
    from diffsteer.evaluation.metrics import MetricScorer, columns_for, parse_metric_list

    model = model_with_evaluators
    images = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(2)]
    names = parse_metric_list("latent:alignment:1,fidelity:0.5,saturation")
    assert names == ["latent:alignment:1,fidelity:0.5", "saturation"]
    assert [c.direction for c in columns_for(names)] == ["higher", "lower"]
    rows = MetricScorer(names, model=model).score(images, ["a red circle", "a blue square"], [None, None])
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    expected = latent_reward(model, "latent").score_images(model, pixels, ["a red circle", "a blue square"])
    np.testing.assert_allclose([r[names[0]] for r in rows], expected.numpy(), rtol=1e-5)
    with pytest.raises(InvalidInput, match="needs a model"):
        MetricScorer(["latent"])


# ------------------------------------------------------------------------------------------- embedding form


def embedding_evaluators(probe: dict | None) -> LatentEvaluators:
    """A random embedding-form alignment evaluator of the proving-ground CLIP (128-d) and a fidelity one."""
    from diffsteer.guidance.reward_models import get_reward

    torch.manual_seed(3)
    factor = get_reward("clip:1", "cpu").similarity_term()[1]
    specs = {
        "alignment": EvaluatorSpec("alignment", 16, 2, False, output_std=factor, target="clip:1", embedding_dim=128),
        "fidelity": EvaluatorSpec("fidelity", 16, 1, False),
    }
    meta = {"text_probe": probe} if probe else {}
    return LatentEvaluators(4, 32, specs, (-8.0, 8.0), WEIGHTS, meta).eval().requires_grad_(False)


def test_embedding_form_scores_the_reward_formula_with_its_text_tower():
    from diffsteer.guidance.latent_evaluators import text_probe
    from diffsteer.guidance.reward_models import get_reward

    tower, factor = get_reward("clip:1", "cpu").similarity_term()
    ev = embedding_evaluators(text_probe(tower))
    prompts = ["a red circle", "two blue squares"]
    inputs = ev.prompt_inputs(None, prompts)
    x0 = torch.randn(2, 4, 16, 16)
    lam = log_snr(torch.full((2,), 0.4, dtype=torch.float64), ev.log_snr_bounds)
    image = ev.nets["alignment"](x0, lam)
    text = tower.text_embeddings(prompts)
    expected = factor * torch.nn.functional.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(ev.evaluate("alignment", x0, 0.4, inputs), expected, atol=1e-5, rtol=1e-5)


def test_dynamic_cfg_with_an_embedding_evaluator_picks_the_direct_argmax(sd_model, tmp_path):
    from diffsteer.guidance.latent_evaluators import text_probe
    from diffsteer.guidance.reward_models import get_reward

    tower, factor = get_reward("clip:1", "cpu").similarity_term()
    folder = embedding_evaluators(text_probe(tower)).save(tmp_path / "emb")
    model = dataclasses.replace(sd_model, extra={**sd_model.extra, "latent_evaluators": str(folder)})
    candidates = [1.0, 4.0, 12.0]
    prompts = ["a red circle", "a blue square"]
    params = {
        "prompt": prompts,
        "seeds": [5, 6],
        "steps": 3,
        "scheduler": "ddim",
        "policy": {
            "name": "dynamic_cfg",
            "candidates": candidates,
            "evaluator": "latent",
            "latent_weights": "alignment:1",
        },
    }
    chosen = generate(model, params).trace["scale_schedule"][0]
    ev = evaluators_for(model)
    _, ab, x0s = first_step_candidate_x0(model, params, candidates)
    text = tower.text_embeddings(prompts)
    expected = []
    with torch.no_grad():
        for b, per_candidate in enumerate(x0s):
            lam = log_snr(torch.tensor([ab], dtype=torch.float64), ev.log_snr_bounds)
            scores = [
                float(factor * torch.nn.functional.cosine_similarity(ev.nets["alignment"](x0, lam), text[b : b + 1]))
                for x0 in per_candidate
            ]
            ordered = sorted(scores)
            assert ordered[-1] - ordered[-2] > 1e-3
            expected.append(candidates[int(np.argmax(scores))])
    assert chosen == expected


def test_a_text_tower_that_is_not_the_trained_ones_is_refused_naming_the_field(sd_model, tmp_path):
    wrong = {"prompt": "a photo of a red cube and a blue sphere", "embedding": [1.0] + [0.0] * 127}
    folder = embedding_evaluators(wrong).save(tmp_path / "emb")
    model = dataclasses.replace(sd_model, extra={**sd_model.extra, "latent_evaluators": str(folder)})
    with pytest.raises(InvalidInput) as e:
        generate(
            model,
            {
                "prompt": "a red circle",
                "seed": 0,
                "steps": 2,
                "policy": {"name": "dynamic_cfg", "candidates": [1.0, 4.0], "evaluator": "latent"},
            },
        )
    assert e.value.field == "latent_evaluators" and "probe" in e.value.reason
    # weights that leave the alignment evaluator out never need (or check) its reward's text tower
    only_fidelity = generate(
        model,
        {
            "prompt": "a red circle",
            "seed": 0,
            "steps": 2,
            "policy": {
                "name": "dynamic_cfg",
                "candidates": [1.0, 4.0],
                "evaluator": "latent",
                "latent_weights": "fidelity:1",
            },
        },
    )
    assert len(only_fidelity.trace["scale_schedule"]) == 2
    with pytest.raises(InvalidInput) as e:
        generate(
            model,
            {
                "prompt": "a red circle",
                "seed": 0,
                "steps": 2,
                "policy": {"name": "reno", "reward": "latent", "iterations": 1},
            },
        )
    assert e.value.field == "latent_evaluators"


def test_the_shipped_proving_ground_evaluators_load_and_score_with_their_reward():
    """The folder shipped beside the proving-ground model loads, its text tower (if it reads one) is the shipped
    CLIP's, and dynamic CFG runs with it on the shipped model."""
    from pathlib import Path

    from diffsteer.guidance.models import load_model

    folder = Path(__file__).resolve().parents[1] / "proving_ground" / "assets" / "latent_evaluators"
    model = dataclasses.replace(load_model("builtin:proving-ground"), extra={"latent_evaluators": str(folder)})
    evaluators = evaluators_for(model)
    if evaluators.embedding_target is not None:
        evaluators.text_tower()  # the probe saved at training matches the default library's reward
    prompts = ["a red circle", "two blue squares"]
    result = generate(
        model,
        {"prompt": prompts, "seeds": [0, 1], "steps": 3, "policy": "dynamic_cfg:candidates=[2,3,4.5],evaluator=latent"},
    )
    assert len(result.trace["scale_schedule"]) == 3
    # ReNO and the A/B metric read them as a reward: Σ λ_j E_j on the clean latents, the formula worked out here
    reno = generate(
        model,
        {
            "prompt": prompts,
            "seeds": [0, 1],
            "steps": 2,
            "policy": {"name": "reno", "reward": "latent:alignment:1", "iterations": 1},
        },
    )
    plain = prepare(model, {"prompt": prompts, "seeds": [0, 1], "steps": 2, "policy": "cfg:scale=1"})
    with torch.no_grad():
        latents = plain.run().latents
        expected = evaluators.evaluate(
            "alignment", latents, 1.0, evaluators.prompt_inputs(plain.conditions["cond"].hidden_states, prompts)
        )
    np.testing.assert_allclose(reno.trace["reno"]["reward_initial"], expected.numpy(), rtol=1e-4, atol=1e-4)


def test_shipped_evaluators_are_opt_in_from_the_cli(tmp_path, capsys):
    from diffsteer.service.cli import main

    argv = ["generate", "a red circle", "--steps", "3", "--seed", "1", "-q", "--trace", "-o", str(tmp_path / "a.png")]
    policy = ["--policy", "dynamic_cfg:evaluator=latent,candidates=[1.5,3]"]
    assert main([*argv, *policy]) == 2  # the default model's evaluators are not used unless asked for
    assert "latent" in capsys.readouterr().err
    assert main([*argv, *policy, "--latent-evaluators", "shipped"]) == 0
    assert "scale_schedule" in capsys.readouterr().out
    assert main([*argv, "--model", "builtin:tiny", "--latent-evaluators", "shipped"]) == 2
    assert "latent_evaluators" in capsys.readouterr().err
    assert main([*argv, "--latent-evaluators", str(tmp_path)]) == 2


def test_shipped_evaluators_are_opt_in_in_the_service():
    from test_service_support import app_client

    body = {
        "prompt": "a red circle",
        "steps": 3,
        "seed": 1,
        "policy": "dynamic_cfg:evaluator=latent,candidates=[1.5,3]",
    }
    with app_client(model="builtin:proving-ground", latent_evaluators={"builtin:proving-ground": "shipped"}) as client:
        response = client.post("/generate", json=body)
        assert response.status_code == 200, response.text
    with app_client(model="builtin:proving-ground") as client:
        response = client.post("/generate", json=body)
        assert response.status_code == 422 and "latent" in response.text
