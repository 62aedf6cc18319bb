"""AlignProp: truncated backpropagation through the sampler, the trainer, exact resume after SIGKILL, the LoRA
export (diffusers' load_lora_weights and the service), and the config/CLI surface. Tiny models only."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from training_support import kill_after_checkpoint, read_adapter, start_training, wait_for_success

from diffsteer.guidance.errors import InvalidInput
from diffsteer.training.alignprop import AlignPropConfig, AlignPropTrainer
from diffsteer.training.config_io import load_config, render_yaml
from diffsteer.training.truncation import draw_truncation, window_mask

TINY = dict(
    model="builtin:tiny",
    prompts="pg-train:single",
    eval_prompts="",
    steps=4,
    batch_size=2,
    reward="saturation:1",
    policy="cfg:scale=3",
    scheduler="ddim",
    threads=1,
    progress=False,
    tensorboard=False,
    learning_rate=0.05,
)


def tiny_config(tmp_path: Path, **overrides) -> AlignPropConfig:
    return AlignPropConfig(**{**TINY, "output_dir": str(tmp_path / "run"), **overrides})


# ----------------------------------------------------------------------------- truncation


def test_truncation_draws_stay_in_range_and_follow_the_strategy():
    rng = np.random.default_rng(0)
    assert draw_truncation("fixed", rng, 3, 20, k=5).tolist() == [5, 5, 5]
    assert draw_truncation("fixed", rng, 2, 20, k=50).tolist() == [20, 20]  # K ≥ T: full backpropagation
    uniform = draw_truncation("uniform", rng, 4000, 20, k_min=3, k_max=7)
    assert set(uniform.tolist()) == {3, 4, 5, 6, 7}
    gaussian = draw_truncation("gaussian", rng, 4000, 20, k_mean=5, k_std=2)
    assert gaussian.min() >= 1 and gaussian.max() <= 20 and abs(gaussian.mean() - 5) < 0.15
    with pytest.raises(InvalidInput, match="truncation"):
        draw_truncation("per-step", rng, 1, 20)


def test_window_mask_marks_the_last_k_steps_of_each_image():
    mask = window_mask(np.array([1, 3, 5]), 5)
    table = torch.stack([mask(i) for i in range(5)]).T.int().tolist()
    assert table == [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def _lora_grads(model, prompts, seeds, grad_at_step):
    from diffsteer.guidance.latents import decode
    from diffsteer.guidance.sampler import prepare

    params = [p for p in model.unet.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    prepared = prepare(
        model,
        {"prompt": prompts, "seeds": seeds, "steps": 5, "scheduler": "ddim", "policy": "cfg:scale=3"},
        gradient_checkpointing=True,
    )
    images = decode(model, prepared.run(grad_at_step=grad_at_step).latents, checkpoint=True)
    images.pow(2).sum().backward()
    return torch.cat([p.grad.flatten() for p in params])


@pytest.fixture(scope="module")
def lora_model():
    from diffsteer.guidance.models import load_model
    from diffsteer.training.lora import add_lora

    model = load_model("builtin:tiny", device="cpu")
    params = add_lora(model.unet, 4, 4.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; give the adapter an effect so the gradients differ by window
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    assert params
    return model


def test_per_image_windows_give_the_sum_of_separate_truncated_runs(lora_model):
    """A batch with K = (1, 3) differentiates each image exactly as a run of that image alone with its own K."""
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    batched = _lora_grads(lora_model, prompts, seeds, window_mask(np.array([1, 3]), 5))
    alone = [_lora_grads(lora_model, [p], [s], lambda i, k=k: i >= 5 - k) for p, s, k in zip(prompts, seeds, (1, 3))]
    torch.testing.assert_close(batched, alone[0] + alone[1], rtol=1e-4, atol=1e-6)
    # and the windows matter: K = 1 for both images is a different gradient
    other = _lora_grads(lora_model, prompts, seeds, window_mask(np.array([1, 1]), 5))
    assert (other - batched).abs().max() > 1e-3 * batched.abs().max()


def test_full_window_equals_untruncated_backpropagation(lora_model):
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    full = _lora_grads(lora_model, prompts, seeds, window_mask(np.array([5, 5]), 5))
    ambient = _lora_grads(lora_model, prompts, seeds, None)
    torch.testing.assert_close(full, ambient, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- the trainer


def test_training_raises_the_reward_and_writes_every_artefact(tmp_path):
    """A few steps of the saturation reward on the tiny model: the reward rises; logs, grid, plot, adapter."""
    config = tiny_config(
        tmp_path,
        max_steps=6,
        checkpoint_every=3,
        eval_every=3,
        eval_prompts="pg:single",
        eval_max_prompts=2,
        eval_seeds=2,
        tensorboard=True,
        truncation="uniform",
        truncation_k_min=1,
        truncation_k_max=4,
    )
    summary = AlignPropTrainer(config).train()
    out = Path(config.output_dir)
    rewards = summary["eval"]["reward"]
    assert list(rewards) == ["0", "3", "6"]
    assert rewards["6"] > rewards["0"] + 0.01, rewards
    assert set(summary["eval"]["verifier.passed"]) == {"0", "3", "6"}
    for path in (
        "metrics.csv",
        "reward_curve.png",
        "samples/step-00000000.png",
        "samples/step-00000006.png",
        "checkpoints/step-00000006.pt",
        "adapters/alignprop/pytorch_lora_weights.safetensors",
    ):
        assert (out / path).is_file(), path
    assert not (out / "checkpoints" / "step-00000000.pt").exists()
    assert list((out / "tensorboard").iterdir())
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,phase,metric,value" and any(r.startswith("6,train,k_mean,") for r in rows)


def test_lora_export_loads_in_diffusers_and_in_the_service(tmp_path):
    """The exported adapter reproduces the trained UNet through diffusers' load_lora_weights and the service."""
    from diffusers import StableDiffusionPipeline
    from test_service_support import assert_lora_served_like

    from diffsteer.guidance.models import load_model

    trainer = AlignPropTrainer(tiny_config(tmp_path, max_steps=2, checkpoint_every=2))
    trainer.train()
    folder = Path(trainer.config.output_dir) / "adapters" / "alignprop"

    base = load_model("builtin:tiny", device="cpu")
    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoders[0],
        tokenizer=base.tokenizers[0],
        unet=base.unet,
        scheduler=_ddim(base),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(folder))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 8, base.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = trainer.model.unet(x, 500, encoder_hidden_states=text).sample
        loaded = pipe.unet(x, 500, encoder_hidden_states=text).sample
        plain = load_model("builtin:tiny", device="cpu").unet(x, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    assert (trained - plain).abs().max() > 1e-4  # the adapter changed something

    assert_lora_served_like(trainer.model, folder.parent, "alignprop")


def _ddim(model):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(model.scheduler_config)


def _write_config(tmp_path: Path, name: str, **overrides) -> Path:
    path = tmp_path / f"{name}.yaml"
    values = {
        **TINY,
        "output_dir": str(tmp_path / name),
        "max_steps": 6,
        "checkpoint_every": 1,
        "keep_checkpoints": 0,
        "truncation": "gaussian",
        "truncation_k_mean": 2.0,
        "eta": 1.0,
        **overrides,
    }
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.slow
def test_sigkill_and_resume_ends_with_the_same_adapter_as_an_uninterrupted_run(tmp_path):
    module = "diffsteer.training.alignprop"
    whole = start_training(module, "--config", str(_write_config(tmp_path, "whole")))
    interrupted = start_training(module, "--config", str(_write_config(tmp_path, "cut")))
    kill_after_checkpoint(interrupted, tmp_path / "cut", step=3)
    wait_for_success(whole, start_training(module, "--config", str(tmp_path / "cut.yaml"), "--resume"))
    a, b = read_adapter(tmp_path / "whole"), read_adapter(tmp_path / "cut")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    assert any((a[k] != 0).any() for k in a if "lora_B" in k or "lora.up" in k)
    # the resumed run's log has each training step once
    rows = [r for r in (tmp_path / "cut" / "metrics.csv").read_text().splitlines() if ",train,reward," in r]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigterm_stops_after_a_checkpoint_and_the_run_resumes(tmp_path):
    config = _write_config(tmp_path, "term", max_steps=200, checkpoint_every=1000)
    proc = start_training("diffsteer.training.alignprop", "--config", str(config))
    csv = tmp_path / "term" / "metrics.csv"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if csv.exists() and ",train,reward," in csv.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "resume with --resume" in err
    checkpoints = sorted((tmp_path / "term" / "checkpoints").glob("step-*.pt"))
    assert len(checkpoints) == 1 and int(checkpoints[0].stem.split("-")[1]) >= 1


# ----------------------------------------------------------------------------- config and CLI


def test_print_config_round_trips_and_every_field_has_help(tmp_path):
    config = AlignPropConfig(lora_targets=("to_q", "to_v"), height=64, eval_max_prompts=None)
    text = render_yaml(config)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_config(AlignPropConfig, path) == config
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(AlignPropConfig))
    assert load_config(AlignPropConfig, path, ["lora_rank=8", "lora_targets=[to_k]"]).lora_rank == 8


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["lora_rank=0"], "lora_rank"),
        (["truncation=per_step"], "truncation"),
        (["mixed_precision=fp8"], "mixed_precision"),
        (["learning_rate=abc"], "learning_rate"),
        (["no_such_field=1"], "no_such_field"),
        (["truncation=uniform", "truncation_k_min=5", "truncation_k_max=2"], "truncation_k_min"),
        (["adapter_name=../x"], "adapter_name"),
        (["nonsense"], "--set"),
    ],
)
def test_bad_config_values_name_the_field(overrides, field):
    with pytest.raises(InvalidInput) as info:
        load_config(AlignPropConfig, None, overrides)
    assert info.value.field == field


def test_bad_rollout_settings_fail_before_training(tmp_path):
    with pytest.raises(InvalidInput, match="policy"):
        AlignPropTrainer(tiny_config(tmp_path, policy="nope:scale=1"))
    with pytest.raises(InvalidInput, match="reward"):
        AlignPropTrainer(tiny_config(tmp_path, reward="jpeg_compressibility:1"))
    with pytest.raises(InvalidInput, match="prompts"):
        AlignPropTrainer(tiny_config(tmp_path, prompts="pg-train:nope"))


def test_resume_refuses_a_changed_experiment_and_fresh_runs_refuse_old_checkpoints(tmp_path):
    AlignPropTrainer(tiny_config(tmp_path, max_steps=1)).train()
    with pytest.raises(InvalidInput, match="output_dir"):
        AlignPropTrainer(tiny_config(tmp_path, max_steps=2)).train()
    with pytest.raises(InvalidInput, match="lora_rank"):
        AlignPropTrainer(tiny_config(tmp_path, max_steps=2, lora_rank=8)).train(resume=True)

    # a checkpoint written before a field existed (here ema_decay) resumes as the field's default, and only so;
    # and one from before the default build trained any backbone (module and optimiser "unet", the attention
    # projections named one by one) resumes under the current names
    from diffsteer.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint

    path = latest_checkpoint(tmp_path / "run" / "checkpoints")
    state = load_checkpoint(path)
    config = json.loads(state["config"])
    del config["ema_decay"]
    assert config["lora_targets"] == ["attention"] and set(state["modules"]) == {"backbone"}
    config["lora_targets"] = ["to_q", "to_k", "to_v", "to_out.0"]
    state = {**state, **{kind: {"unet": state[kind]["backbone"]} for kind in ("modules", "optimizers")}}
    save_checkpoint(path.parent, state["step"], {**state, "config": json.dumps(config)})
    with pytest.raises(InvalidInput, match="ema_decay: 0.0 -> 0.5"):
        AlignPropTrainer(tiny_config(tmp_path, max_steps=2, ema_decay=0.5)).train(resume=True)
    assert AlignPropTrainer(tiny_config(tmp_path, max_steps=2)).train(resume=True)["steps"] == 2


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    from diffsteer.service.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: -1\n")
    assert main(["train", "alignprop", "--config", str(bad)]) == 2
    assert capsys.readouterr().err == "diffsteer: error: lora_rank: must be at least 1, got -1\n"
    assert main(["train", "alignprop", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config" in capsys.readouterr().err
