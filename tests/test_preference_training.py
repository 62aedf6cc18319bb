"""Diffusion-DPO and SmPO trainers (training/dpo.py, training/smpo.py) and ReNoise inversion (training/renoise.py)
on the shipped proving-ground model: a handful of steps each, one torch thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from preference_support import one_thread, shape_png, trainer_config, write_pairs  # noqa: F401 (one_thread: autouse)

from diffsteer.guidance.errors import InvalidInput
from diffsteer.training.dpo import DPOConfig, DPOTrainer
from diffsteer.training.preference_data import write_preference_pairs
from diffsteer.training.smpo import SmPOConfig, SmPOTrainer


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


config = trainer_config


def adapter(trainer) -> dict[str, torch.Tensor]:
    from diffsteer.training.lora import trainable_state

    return trainable_state(trainer.model.backbone)


def probe(unet) -> torch.Tensor:
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(x, torch.tensor([300, 700]), encoder_hidden_states=text).sample


def test_smpo_with_binary_labels_and_no_inversion_is_diffusion_dpo(tmp_path, pairs_file):
    dpo = DPOTrainer(config(DPOConfig, tmp_path, pairs_file, "dpo"))
    smpo = SmPOTrainer(config(SmPOConfig, tmp_path, pairs_file, "smpo", smoothed_preference=False, inversion=False))
    batch = dpo.draw_batch(0, 0)
    assert batch.preference.tolist() == smpo.draw_batch(0, 0).preference.tolist()
    dpo_loss, _ = dpo.compute_loss(batch)
    smpo_loss, _ = smpo.compute_loss(batch)
    torch.testing.assert_close(smpo_loss, dpo_loss, rtol=0, atol=0)
    a, b = dpo.train()["steps"], smpo.train()["steps"]
    assert a == b == 2
    for k, v in adapter(dpo).items():
        torch.testing.assert_close(adapter(smpo)[k], v, rtol=0, atol=0)


def test_reference_is_the_base_unet_with_the_adapter_switched_off(tmp_path, pairs_file):
    from diffsteer.guidance.models import load_model

    trainer = DPOTrainer(config(DPOConfig, tmp_path, pairs_file, "ref", learning_rate=0.05))
    trainer.train()
    base = load_model("builtin:proving-ground", device="cpu").unet
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, base.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    from diffsteer.guidance.denoiser import Condition

    t = torch.tensor([300, 700])
    reference = trainer.reference_prediction(x, t, Condition(text))
    with torch.no_grad():
        torch.testing.assert_close(reference, base(x, t, encoder_hidden_states=text).sample, rtol=1e-5, atol=1e-6)
        trained = trainer.model.unet(x, t, encoder_hidden_states=text).sample  # the adapter is back on
    assert (trained - reference).abs().max() > 1e-4
    assert trainer.reference_backbone is None and sum(p.requires_grad for p in trainer.model.unet.parameters()) > 0


def test_full_unet_training_keeps_a_frozen_reference_copy(tmp_path, pairs_file):
    from diffsteer.guidance.models import load_model

    trainer = DPOTrainer(
        config(
            DPOConfig,
            tmp_path,
            pairs_file,
            "full",
            trainable="full",
            export="pipeline",
            max_steps=1,
            learning_rate=1e-3,
        )
    )
    summary = trainer.train()
    base = probe(load_model("builtin:proving-ground", device="cpu").unet)
    torch.testing.assert_close(probe(trainer.reference_backbone), base)
    assert (probe(trainer.model.unet) - base).abs().max() > 1e-5
    assert (Path(summary["pipeline"]) / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_smpo_resume_repeats_the_uninterrupted_run(tmp_path, pairs_file):
    small = dict(inversion_steps=2, renoise_iterations=1, batch_size=1, preference_temperature=0.5)
    whole = SmPOTrainer(config(SmPOConfig, tmp_path, pairs_file, "whole", **small))
    whole.train()
    cut = config(SmPOConfig, tmp_path, pairs_file, "cut", **{**small, "max_steps": 1})
    SmPOTrainer(cut).train()
    resumed = SmPOTrainer(config(SmPOConfig, tmp_path, pairs_file, "cut", **small))
    resumed.train(resume=True)
    for k, v in adapter(whole).items():
        torch.testing.assert_close(adapter(resumed)[k], v, rtol=0, atol=0)
    rows = (tmp_path / "whole" / "metrics.csv").read_text()
    assert "2,train,preference," in rows and "2,train,implicit_acc," in rows


def test_smoothed_preferences_come_from_the_scores(tmp_path, pairs_file):
    from diffsteer.training.smpo import smoothed_preference

    trainer = SmPOTrainer(
        config(SmPOConfig, tmp_path, pairs_file, "p", preference_score_min=10.0, preference_score_max=30.0)
    )
    batch = trainer.draw_batch(0, 0)
    chosen = trainer.dataset.read_pairs(trainer.rows[trainer.epoch_indices(0, 0, len(trainer.rows))])
    assert [p.caption for p in chosen] == batch.captions
    for pair, p in zip(chosen, batch.preference):
        expected = smoothed_preference(torch.tensor(pair.score_0), torch.tensor(pair.score_1), 10.0, 30.0)
        assert float(p) == pytest.approx(float(expected))
    assert trainer.score_bounds == (10.0, 30.0)
    assert SmPOTrainer(config(SmPOConfig, tmp_path, pairs_file, "p2")).score_bounds == (12.0, 25.0)  # the data's range


@pytest.mark.slow
def test_lora_loads_with_load_lora_weights_and_in_the_service(tmp_path, pairs_file):
    from test_service_support import assert_lora_served_like

    from diffsteer.guidance.models import load_model

    trainer = SmPOTrainer(
        config(
            SmPOConfig, tmp_path, pairs_file, "lora", lora_rank=4, lora_alpha=8.0, inversion_steps=2, learning_rate=0.05
        )
    )
    folder = Path(trainer.train()["adapter"]).parent
    pipe = load_model("builtin:proving-ground", device="cpu").to_pipeline()
    plain = probe(pipe.unet)
    pipe.load_lora_weights(str(folder))
    trained = probe(trainer.model.unet)
    torch.testing.assert_close(probe(pipe.unet), trained, rtol=1e-4, atol=1e-5)
    assert (trained - plain).abs().max() > 1e-4
    assert_lora_served_like(trainer.model, folder.parent, "smpo", spec="builtin:proving-ground")


@pytest.mark.parametrize(
    "cls, overrides, field",
    [
        (DPOConfig, {"beta": 0.0}, "beta"),
        (DPOConfig, {"score_fields": ("a",)}, "score_fields"),
        (SmPOConfig, {"inversion_steps": 0}, "inversion_steps"),
        (SmPOConfig, {"renoise_iterations": -1}, "renoise_iterations"),
        (SmPOConfig, {"preference_temperature": 0.0}, "preference_temperature"),
        (SmPOConfig, {"preference_score_min": 2.0, "preference_score_max": 1.0}, "preference_score_max"),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, cls, overrides, field):
    with pytest.raises(InvalidInput) as e:
        cls(data="x.parquet", **overrides)
    assert e.value.field == field


def test_bad_data_is_refused_before_training(tmp_path, pairs_file):
    with pytest.raises(InvalidInput, match="data: required"):
        DPOTrainer(DPOConfig(output_dir=str(tmp_path / "a"), eval_prompts=""))
    unscored = write_preference_pairs(
        tmp_path / "u.jsonl",
        [
            {
                "caption": "a red circle",
                "jpg_0": shape_png("red"),
                "jpg_1": shape_png("blue"),
                "label_0": 0.5,
                "label_1": 0.5,
            }
        ],
    )
    with pytest.raises(InvalidInput, match="score_0/score_1"):
        SmPOTrainer(config(SmPOConfig, tmp_path, unscored, "b"))
    with pytest.raises(InvalidInput, match="every pair is a tie"):
        DPOTrainer(config(DPOConfig, tmp_path, unscored, "c"))


def test_renoise_inversion_reconstructs_better_than_plain_ddim_inversion():
    """Invert clean latents of the shipped model to t = 500 and denoise back with DDIM on the same grid."""
    import diffusers

    from diffsteer.guidance.conditioning import encode_conditions
    from diffsteer.guidance.denoiser import call_unet
    from diffsteer.guidance.models import load_model
    from diffsteer.guidance.sampler import prepare
    from diffsteer.training.renoise import inversion_grid, reconstruct, renoise_invert, vp_levels

    model = load_model("builtin:proving-ground", device="cpu")
    prompts = ["a red circle", "two blue squares"]
    x0 = (
        prepare(
            model, {"prompt": prompts, "seeds": [1, 2], "steps": 10, "scheduler": "ddim", "policy": "cfg:scale=1.5"}
        )
        .run()
        .latents
    )
    cond = encode_conditions(model, prompts, None, ["cond"], height=64, width=64)[0]["cond"]
    levels = vp_levels(diffusers.DDIMScheduler.from_config(model.scheduler_config).alphas_cumprod)

    def eps(x, t):
        return call_unet(model.unet, x, t, cond)

    grid = inversion_grid(torch.tensor([500, 500]), 4)
    assert grid.tolist() == [[125, 250, 375, 500]] * 2
    assert inversion_grid(torch.tensor([0, 3]), 4).tolist() == [[0, 0, 0, 0], [1, 2, 2, 3]]
    small = torch.tensor([0, 3])
    z = renoise_invert(eps, x0, inversion_grid(small, 4), levels, 1)
    one_step = renoise_invert(eps, x0, inversion_grid(small, 1), levels, 1)
    assert z.shape == x0.shape and torch.isfinite(z).all() and (z - one_step).abs().max() < 0.05
    errors = {}
    for r in (0, 1):
        z = renoise_invert(eps, x0, grid, levels, r)
        errors[r] = float((reconstruct(eps, z, grid, levels) - x0).pow(2).mean())
    print(
        f"\nreconstruction MSE after inverting to t=500 (4 steps): DDIM inversion {errors[0]:.5f}, "
        f"ReNoise (1 iteration) {errors[1]:.5f}"
    )
    assert errors[1] < 0.75 * errors[0]


@pytest.mark.parametrize("method", ["dpo", "smpo"])
def test_print_config_round_trips_and_the_cli_names_bad_fields(tmp_path, capsys, method):
    import dataclasses

    from diffsteer.training.cli import METHODS, run_method
    from diffsteer.training.config_io import load_config, render_yaml

    cls = {"dpo": DPOConfig, "smpo": SmPOConfig}[method]
    assert METHODS[method][1] == cls.__name__
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls))
    assert run_method(method, ["--print-config", "--set", "data=pairs.parquet"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(cls, tmp_path / "c.yaml") == cls(data="pairs.parquet")
    assert render_yaml(cls(data="pairs.parquet")) == text
    assert run_method(method, ["--set", "beta=-1", "--set", "data=x.parquet"]) == 2
    assert "beta" in capsys.readouterr().err
    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    assert load_config(cls, configs / f"{method}-proving-ground.yaml").model == "builtin:proving-ground"
    flow = load_config(cls, configs / f"{method}-proving-ground-flow.yaml")
    assert (flow.model, flow.scheduler, flow.timestep_density) == (
        "builtin:proving-ground-flow",
        "euler",
        "logit_normal",
    )
