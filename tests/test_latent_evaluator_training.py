"""`diffsteer train latent-evaluator`: a few steps on the shipped model, exact resume, the export a model loads,
the ranking loss against a hand-worked case, and bad configs naming the field."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from diffsteer.guidance.errors import InvalidInput
from diffsteer.training.latent_evaluator import (
    LatentEvaluatorConfig,
    LatentEvaluatorTrainer,
    ranknet_loss,
    within_group_mse,
)

SMALL = dict(
    model="builtin:proving-ground",
    prompts="pg-train:single",
    eval_prompts="",
    batch_size=2,
    steps=3,
    records_per_image=1,
    candidates=(1.0, 4.0),
    calibration_batches=1,
    reward="saturation:1",
    width_channels=8,
    stages=1,
    threads=1,
    progress=False,
    tensorboard=False,
    learning_rate=1e-2,
    checkpoint_every=1,
    max_steps=2,
)


def small_config(tmp_path, **overrides) -> LatentEvaluatorConfig:
    return LatentEvaluatorConfig(**{**SMALL, "output_dir": str(tmp_path / "run"), **overrides})


def test_ranknet_loss_hand_worked():
    pred = torch.tensor([[2.0, 0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0, 0.0]])  # pairs with t_i > t_j: (0, 1) and (0, 2)
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    assert ranknet_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    assert ranknet_loss(pred, torch.zeros(1, 3)).item() == 0.0  # ties only: no pair


def test_within_group_mse_hand_worked_and_blind_to_each_groups_level():
    pred = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    target = torch.tensor([[10.0, 11.0], [5.0, 7.0]])
    # deviations: pred [[-1, 1], [0, 0]], target [[-0.5, 0.5], [-1, 1]]; squared errors 0.25, 0.25, 1, 1
    assert within_group_mse(pred, target, 1.0).item() == pytest.approx(2.5 / 4)
    assert within_group_mse(pred, target, 0.5).item() == pytest.approx(2.5 / 4 / 0.25)
    shifted = pred + torch.tensor([[100.0], [-3.0]])  # a level per group changes nothing
    assert within_group_mse(shifted, target, 1.0).item() == pytest.approx(2.5 / 4)


def test_a_few_steps_train_export_and_the_model_uses_them(tmp_path):
    from diffsteer.guidance.latent_evaluators import evaluators_for
    from diffsteer.guidance.models import load_model
    from diffsteer.guidance.sampler import generate

    trainer = LatentEvaluatorTrainer(
        small_config(tmp_path, eval_prompts="pg:single", eval_max_prompts=1, within_weight=1.0, level_weight=0.1)
    )
    summary = trainer.train()
    folder = tmp_path / "run" / "latent_evaluators"
    assert summary["latent_evaluators"] == str(folder)
    rows = (tmp_path / "run" / "metrics.csv").read_text()
    assert "alignment.rank" in rows and "alignment.within_mse" in rows and "fidelity.bce" in rows
    assert "eval,alignment.rank_corr" in rows and "eval,alignment.rank_loss" in rows
    model = dataclasses.replace(load_model("builtin:proving-ground"), extra={"latent_evaluators": str(folder)})
    evaluators = evaluators_for(model)
    assert evaluators.kinds == ["alignment", "fidelity"] and evaluators.specs["alignment"].target == "saturation:1"
    result = generate(
        model,
        {"prompt": "a red circle", "seed": 0, "steps": 3, "policy": "dynamic_cfg:candidates=[1,4],evaluator=latent"},
    )
    assert len(result.trace["scale_schedule"]) == 3


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    straight = LatentEvaluatorTrainer(
        small_config(
            tmp_path / "a", kinds=("alignment",), default_weights={"alignment": 1.0}, batch_reuse=2, within_weight=1.0
        )
    )
    straight.train()
    first = LatentEvaluatorTrainer(
        small_config(
            tmp_path / "b",
            kinds=("alignment",),
            default_weights={"alignment": 1.0},
            batch_reuse=2,
            within_weight=1.0,
            max_steps=1,
        )
    )
    first.train()
    resumed = LatentEvaluatorTrainer(
        small_config(
            tmp_path / "b", kinds=("alignment",), default_weights={"alignment": 1.0}, batch_reuse=2, within_weight=1.0
        )
    )
    resumed.train(resume=True)
    for (name, a), (_, b) in zip(straight.evaluators.state_dict().items(), resumed.evaluators.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert resumed.evaluators.specs == straight.evaluators.specs  # the same calibration


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"kinds": ("alignment", "beauty")}, "kinds"),
        ({"candidates": (2.0,)}, "candidates"),
        ({"records_per_image": 9}, "records_per_image"),
        ({"width_channels": 12}, "width_channels"),
        ({"default_weights": {"fidelity": 1.0}, "kinds": ("alignment",)}, "default_weights"),
        ({"real_images": ""}, "real_images"),
        ({"within_weight": -1.0}, "within_weight"),
        ({"level_weight": -0.5}, "level_weight"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"recorded_batches": -1}, "recorded_batches"),
        ({"groups_per_step": 0}, "groups_per_step"),
        ({"alignment_target": "pixels"}, "alignment_target"),
    ],
)
def test_bad_config_names_the_field(tmp_path, overrides, field):
    with pytest.raises(InvalidInput) as e:
        small_config(tmp_path, **overrides)
    assert e.value.field == field


def test_cli_reports_a_bad_field_and_a_missing_image_folder(tmp_path, capsys):
    from diffsteer.training.cli import run_method

    assert run_method("latent-evaluator", ["--set", "kinds=alignment,beauty"]) == 2
    assert "kinds" in capsys.readouterr().err
    config = small_config(tmp_path, real_images=str(tmp_path / "nothing"))
    with pytest.raises(InvalidInput) as e:
        LatentEvaluatorTrainer(config)
    assert e.value.field == "real_images"


def test_groups_hold_the_candidates_of_the_recorded_steps(tmp_path):
    """The recorded x̂0 of candidate w equals the direct formula at that step (an independent recomputation)."""
    from diffsteer.guidance.denoiser import Denoiser, StepInfo
    from diffsteer.guidance.models import load_model
    from diffsteer.guidance.parameterisation import to_x0
    from diffsteer.guidance.sampler import make_scheduler, prepare, step_levels
    from diffsteer.training.latent_evaluator import record_candidate_groups

    model = load_model("builtin:proving-ground")
    params = {"prompt": ["a red circle"], "seeds": [7], "steps": 3, "scheduler": "ddim", "policy": "cfg:scale=4"}
    rng = np.random.default_rng(0)
    groups = record_candidate_groups(
        model, params["prompt"], params["seeds"], np.random.default_rng(0), params, (1.0, 4.0), 1
    )
    scale = (1.0, 4.0)[rng.integers(0, 2, 1)[0]]
    step = int(np.sort(rng.choice(3, 1, replace=False))[0])
    prepared = prepare(model, params)
    scheduler, timesteps = make_scheduler(model, prepared.params)
    levels = step_levels(scheduler, timesteps)
    denoiser = Denoiser(model.unet, prepared.conditions, model.prediction_type, aliases=prepared.aliases)
    latents = prepared.noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            x = scheduler.scale_model_input(latents, t)
            out = denoiser(x, StepInfo(i, 3, t, levels[i], model.prediction_type), ["uncond", "cond"])
            if i == step:
                for k, w in enumerate((1.0, 4.0)):
                    expected = to_x0(
                        out["uncond"] + w * (out["cond"] - out["uncond"]), x, levels[i], model.prediction_type
                    )
                    torch.testing.assert_close(groups.x0[0, k], expected[0], atol=1e-5, rtol=1e-5)
                assert float(groups.alpha_bar[0]) == pytest.approx(float(levels[i].alpha_bar))
                break
            guided = out["uncond"] + scale * (out["cond"] - out["uncond"])
            latents = scheduler.step(guided, t, latents, return_dict=False)[0]


# ------------------------------------------------------------------------------- embedding target, recorded batches

EMBEDDING = dict(
    reward="clip:1",
    alignment_target="embedding",
    kinds=("alignment",),
    default_weights={"alignment": 1.0},
    recorded_batches=2,
    groups_per_step=2,
    max_steps=3,
    ema_decay=0.5,
)


def test_recorded_embedding_groups_reproduce_the_reward_of_the_decoded_candidates(tmp_path):
    """The stored image and text embeddings give back the composite reward of each decoded candidate, and the export
    is an embedding-form evaluator in the reward's units with the text tower's probe."""
    from diffsteer.guidance.latents import decode
    from diffsteer.guidance.models import load_model
    from diffsteer.guidance.reward_models import get_reward

    trainer = LatentEvaluatorTrainer(small_config(tmp_path, **EMBEDDING))
    pool = trainer.pool
    assert pool.image_embedding.shape[:2] == pool.reward.shape and len(pool.alpha_bar) == 2 * 2  # 2 batches x 2 groups
    model, reward = load_model("builtin:proving-ground"), get_reward("clip:1", "cpu")
    g, k = pool.reward.shape
    with torch.no_grad():
        direct = reward.evaluate(
            decode(model, pool.x0.flatten(0, 1)).float(), [p for p in pool.prompts for _ in range(k)]
        ).total_score.view(g, k)
    torch.testing.assert_close(pool.reward, direct, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pool.image_embedding.norm(dim=-1), torch.ones(g, k))
    summary = trainer.train()
    from diffsteer.guidance.latent_evaluators import LatentEvaluators

    saved = LatentEvaluators.load(summary["latent_evaluators"])
    spec = saved.specs["alignment"]
    assert spec.embedding_dim == pool.image_embedding.shape[-1] and not spec.use_text
    assert spec.output_std == pytest.approx(reward.similarity_term()[1]) and spec.output_mean == 0.0
    assert saved.meta["text_probe"]["prompt"] and len(saved.meta["text_probe"]["embedding"]) == spec.embedding_dim


def test_the_embedding_level_term_is_one_minus_the_cosine(tmp_path):
    trainer = LatentEvaluatorTrainer(
        small_config(tmp_path, **EMBEDDING, level_weight=1.0, within_weight=0.0, rank_weight=0.0)
    )
    batch = trainer.draw_batch(0, 0)
    loss, _ = trainer.compute_loss(batch)
    g, k = batch.reward.shape
    net = trainer.evaluators.nets["alignment"]
    lam = trainer.evaluators._log_snr(batch.alpha_bar.repeat_interleave(k), batch.x0.flatten(0, 1))
    with torch.no_grad():
        raw = net(batch.x0.flatten(0, 1), lam).view(g, k, -1)
    cos = torch.nn.functional.cosine_similarity(raw, batch.image_embedding, dim=-1)
    assert float(loss.detach()) == pytest.approx(float((1 - cos).mean()), rel=1e-5)


def test_recorded_batches_are_walked_once_per_pass_and_a_resume_reuses_them_exactly(tmp_path):
    straight = LatentEvaluatorTrainer(small_config(tmp_path / "a", **EMBEDDING))
    n = len(straight.pool.alpha_bar)
    seen = np.concatenate([straight.epoch_indices(s, 0, n, 2) for s in range(2)])
    assert sorted(seen.tolist()) == list(range(n))  # one pass: every group once
    straight.train()
    first = LatentEvaluatorTrainer(small_config(tmp_path / "b", **{**EMBEDDING, "max_steps": 1}))
    first.train()
    files = sorted((tmp_path / "b" / "run" / "groups").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    resumed = LatentEvaluatorTrainer(small_config(tmp_path / "b", **EMBEDDING))
    resumed.train(resume=True)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # loaded, not recorded again
    with pytest.raises(InvalidInput) as e:  # groups recorded under other settings are never reused
        LatentEvaluatorTrainer(small_config(tmp_path / "b", **{**EMBEDDING, "candidates": (1.0, 3.0)}))
    assert e.value.field == "output_dir" and "candidates" in e.value.reason
    for (name, a), (_, b) in zip(straight.evaluators.state_dict().items(), resumed.evaluators.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_the_embedding_target_needs_a_similarity_reward(tmp_path):
    with pytest.raises(InvalidInput) as e:
        LatentEvaluatorTrainer(small_config(tmp_path, **{**EMBEDDING, "reward": "saturation:1"}))
    assert e.value.field == "alignment_target" and "clip" in e.value.reason


@pytest.mark.parametrize("name", ["latent-evaluator-proving-ground", "latent-evaluator-embedding-proving-ground"])
def test_the_shipped_configs_load(name):
    from pathlib import Path

    from diffsteer.training.config_io import load_config

    config = load_config(
        LatentEvaluatorConfig, Path(__file__).resolve().parents[1] / "training" / "configs" / f"{name}.yaml"
    )
    assert config.model == "builtin:proving-ground"
    assert config.alignment_target == ("embedding" if "embedding" in name else "score")
