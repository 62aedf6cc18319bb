"""Diffusion-DPO and SmPO in flow form (training/dpo.py, training/smpo.py, training/renoise.py) on the tiny SD3
model built from its config, and gradient checkpointing in both (also on a tiny UNet): hand-computed losses,
same-seed repeatability, the LoRA in diffusers' StableDiffusion3Pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from preference_support import one_thread, trainer_config, write_pairs  # noqa: F401 (one_thread: autouse)

from diffsteer.training.dpo import DPOConfig, DPOTrainer
from diffsteer.training.smpo import SmPOConfig, SmPOTrainer


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"), size=32)


def config(cls, tmp_path: Path, pairs_file: Path, name: str, **overrides):
    """The tiny SD3 model, pairs decoded in the training process, no checkpoints but the last."""
    base = dict(model="builtin:tiny-sd3", checkpoint_every=10, data_workers=0)
    return trainer_config(cls, tmp_path, pairs_file, name, **{**base, **overrides})


def perturb_lora(backbone: torch.nn.Module, seed: int = 3) -> None:
    """Non-zero LoRA B matrices, so the trained model differs from the reference from the start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(backbone.named_parameters()):
            if ".lora_B." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def lora_state(trainer) -> dict[str, torch.Tensor]:
    from diffsteer.training.lora import trainable_state

    return trainable_state(trainer.model.backbone)


def test_flow_dpo_loss_equals_a_hand_computation(tmp_path, pairs_file):
    """σ from the logit-normal density shifted by SD3's shift 3, x_t = (1 − σ)x0 + σε with one ε per pair,
    velocity target ε − x0, the transformer called directly (adapter on, then off), Eq. 14 written out."""
    from diffsteer.guidance.conditioning import encode_conditions
    from diffsteer.guidance.latents import encode

    trainer = DPOTrainer(config(DPOConfig, tmp_path, pairs_file, "dpo"))
    model = trainer.model
    perturb_lora(model.backbone)
    batch = trainer.draw_batch(1, 0)
    # the timesteps: u = sigmoid(z), z ~ N(0, 1) first from the step's generator, then shifted by 3, times 1000
    z = np.random.default_rng([0, 1]).standard_normal(2)
    u = 1 / (1 + np.exp(-z))
    sigma = 3 * u / (1 + 2 * u)
    assert batch.timesteps.dtype == torch.float32
    torch.testing.assert_close(batch.timesteps, torch.from_numpy(sigma * 1000).float())
    loss, metrics = trainer.compute_loss(batch)

    with torch.no_grad():
        x0 = encode(model.vae, torch.cat([batch.pixels_0, batch.pixels_1]))
        cond = encode_conditions(model, batch.captions, None, ["cond"], height=32, width=32)[0]["cond"]
        text = torch.cat([cond.hidden_states, cond.hidden_states])
        pooled = torch.cat([cond.added["pooled_projections"]] * 2)
        eps = torch.stack(
            [torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(s)) for s in batch.noise_seeds]
        )
        eps = torch.cat([eps, eps])
        s = torch.cat([batch.timesteps, batch.timesteps]).view(-1, 1, 1, 1) / 1000
        x_t = (1 - s) * x0 + s * eps
        target = eps - x0

        def velocity():
            return model.backbone(
                hidden_states=x_t,
                timestep=torch.cat([batch.timesteps, batch.timesteps]),
                encoder_hidden_states=text,
                pooled_projections=pooled,
                return_dict=False,
            )[0]

        model_err = ((velocity() - target) ** 2).mean(dim=(1, 2, 3))
        model.backbone.disable_adapters()
        ref_err = ((velocity() - target) ** 2).mean(dim=(1, 2, 3))
        model.backbone.enable_adapters()
    expected = []
    for i, p in enumerate(batch.preference.tolist()):
        w, lo = (i, i + 2) if p == 1.0 else (i + 2, i)
        margin = (model_err[w] - model_err[lo]) - (ref_err[w] - ref_err[lo])
        expected.append(math.log1p(math.exp(0.5 * 500.0 * float(margin))))  # -log sigmoid(-β/2 · margin)
    assert float(loss.detach()) == pytest.approx(np.mean(expected), rel=1e-5, abs=1e-7)
    assert metrics["model_mse"] == pytest.approx(float(model_err.mean()), rel=1e-5)
    assert abs(float(model_err.mean() - ref_err.mean())) > 1e-4  # the perturbed adapter changes the prediction


def test_flow_timestep_densities_and_bad_values():
    from diffsteer.guidance.errors import InvalidInput
    from diffsteer.training.dpo import draw_flow_u, flow_training_sigmas, scheduler_training_shift

    rng = np.random.default_rng(0)
    u = draw_flow_u(rng, 20000, "uniform", 0.0, 1.0)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    ln = draw_flow_u(np.random.default_rng(1), 20000, "logit_normal", 0.5, 1.0)
    logits = np.log(ln / (1 - ln))
    assert abs(logits.mean() - 0.5) < 0.03 and abs(logits.std() - 1.0) < 0.03
    assert flow_training_sigmas(np.array([0.0, 0.5, 1.0]), 3.0).tolist() == [0.0, 0.75, 1.0]
    assert scheduler_training_shift({"shift": 3.0}) == 3.0
    assert scheduler_training_shift({"shift": 3.0, "use_dynamic_shifting": True}) == 1.0
    for field, value in (("timestep_density", "beta"), ("logit_std", 0.0), ("data_workers", -1)):
        with pytest.raises(InvalidInput) as e:
            DPOConfig(data="x.parquet", **{field: value})
        assert e.value.field == field


@pytest.mark.parametrize(
    "cls, model, extra",
    [
        (DPOConfig, "builtin:tiny-sd3", {}),
        (SmPOConfig, "builtin:tiny-sd3", {"inversion_steps": 2}),
        (DPOConfig, "builtin:tiny", {}),
    ],
)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, pairs_file, cls, model, extra):
    trainer = (DPOTrainer if cls is DPOConfig else SmPOTrainer)(
        config(cls, tmp_path, pairs_file, "gc", model=model, **extra)
    )
    perturb_lora(trainer.model.backbone)
    batch = trainer.draw_batch(0, 0)
    results = []
    for checkpointing in (False, True):
        trainer.config.gradient_checkpointing = checkpointing
        loss, _ = trainer.compute_loss(batch)
        loss.backward()
        params = [p for _, p in sorted(trainer.model.backbone.named_parameters()) if p.requires_grad]
        results.append((loss.detach(), [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    assert any(float(g.abs().max()) > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_flow_smpo_inverts_with_euler_steps_of_the_trained_model(tmp_path, pairs_file):
    """SmPO's noisy latents on a flow model: inverse Euler steps x + (σ_k − σ_{k−1})·mean(u_0, u_1) of the
    trained transformer, written out; the noise target is the ε with x_t = (1 − σ)x0 + σε."""
    from diffsteer.guidance.families.base import concat_conditions

    trainer = SmPOTrainer(config(SmPOConfig, tmp_path, pairs_file, "inv", inversion_steps=2, renoise_iterations=1))
    perturb_lora(trainer.model.backbone)
    model = trainer.model
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    from diffsteer.guidance.conditioning import encode_conditions

    cond = encode_conditions(model, ["a red circle", "a blue circle"], None, ["cond"], height=32, width=32)[0]["cond"]
    condition = concat_conditions([cond])
    t = torch.tensor([600.0, 250.0])
    with torch.no_grad():
        x_t, eps = trainer.noisy_latents(x0, t, torch.zeros_like(x0), condition)

        def u(x, timesteps):
            return model.backbone(
                hidden_states=x,
                timestep=timesteps,
                encoder_hidden_states=cond.hidden_states,
                pooled_projections=cond.added["pooled_projections"],
                return_dict=False,
            )[0]

        z, previous = x0, torch.zeros(2)
        for k in (1, 2):
            tk = t * k / 2
            step = ((tk - previous) / 1000).view(-1, 1, 1, 1)
            first = u(z, tk)
            again = u(z + step * first, tk)
            z, previous = z + step * (first + again) / 2, tk
    torch.testing.assert_close(x_t, z, rtol=1e-5, atol=1e-6)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close((1 - sigma) * x0 + sigma * eps, x_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls, extra", [(DPOConfig, {}), (SmPOConfig, {"inversion_steps": 2})])
def test_same_seed_flow_runs_give_identical_weights(tmp_path, pairs_file, cls, extra):
    trainer_cls = DPOTrainer if cls is DPOConfig else SmPOTrainer
    a = trainer_cls(config(cls, tmp_path, pairs_file, "a", **extra))
    a.train()
    b = trainer_cls(config(cls, tmp_path, pairs_file, "b", data_workers=2, **extra))  # workers change nothing
    b.train()
    b.close()
    state_a, state_b = lora_state(a), lora_state(b)
    assert state_a.keys() == state_b.keys() and any(".lora_B." in k for k in state_a)
    assert any(float(v.abs().max()) > 0 for k, v in state_a.items() if ".lora_B." in k)  # it trained
    for k, v in state_a.items():
        torch.testing.assert_close(state_b[k], v, rtol=0, atol=0)


def test_flow_lora_loads_in_the_sd3_pipeline(tmp_path, pairs_file):
    from diffusers import StableDiffusion3Pipeline

    from diffsteer.guidance.models import load_model

    trainer = DPOTrainer(config(DPOConfig, tmp_path, pairs_file, "lora", learning_rate=0.05, lora_alpha=8.0))
    folder = Path(trainer.train()["adapter"]).parent
    pipe = load_model("builtin:tiny-sd3", device="cpu").to_pipeline()
    assert isinstance(pipe, StableDiffusion3Pipeline)

    def probe(transformer) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 16, 16, generator=g)
        text = torch.randn(2, 7, transformer.config.joint_attention_dim, generator=g)
        pooled = torch.randn(2, transformer.config.pooled_projection_dim, generator=g)
        with torch.no_grad():
            return transformer(
                hidden_states=x,
                timestep=torch.tensor([300.0, 700.0]),
                encoder_hidden_states=text,
                pooled_projections=pooled,
                return_dict=False,
            )[0]

    plain = probe(pipe.transformer)
    pipe.load_lora_weights(str(folder))
    trained = probe(trainer.model.backbone)
    torch.testing.assert_close(probe(pipe.transformer), trained, rtol=1e-4, atol=1e-5)
    assert (trained - plain).abs().max() > 1e-4


def test_two_processes_draw_what_one_process_with_twice_the_batch_draws(tmp_path, pairs_file):
    """Rows, flips, timesteps and noise seeds of each process's share, concatenated over 2 processes of batch 2,
    are one process's batch of 4 (the plan the data workers decode is a function of the step only)."""
    import dataclasses

    trainer = DPOTrainer(config(DPOConfig, tmp_path, pairs_file, "shares", batch_size=4, random_flip=True))
    whole = {step: (trainer.plan(step, 0), trainer.draws(step, 0)) for step in range(4)}
    assert any(f for plan, _ in whole.values() for _, f in plan) and not all(
        f for plan, _ in whole.values() for _, f in plan
    )
    trainer.config.batch_size = 2
    one = trainer.processes
    for step, (plan, draws) in whole.items():
        shares = []
        for rank in (0, 1):
            trainer.processes = dataclasses.replace(one, rank=rank, world_size=2)
            shares.append((trainer.plan(step, 0), trainer.draws(step, 0)))
        assert shares[0][0] + shares[1][0] == plan
        for key in ("timesteps", "noise_seeds", "flips"):
            joined = np.concatenate([getattr(d, key) for _, d in shares])
            assert np.array_equal(joined, getattr(draws, key))
    trainer.processes = one
    # the flip is the pair's own and the same for both of its images
    trainer.config.batch_size = 4
    batch = trainer.draw_batch(0, 0)
    trainer.config.random_flip = False
    plain = trainer.draw_batch(0, 0)
    for i, flipped in enumerate(batch.flipped):
        for a, b in ((batch.pixels_0, plain.pixels_0), (batch.pixels_1, plain.pixels_1)):
            assert torch.equal(a[i], b[i].flip(-1) if flipped else b[i]) and not torch.equal(b[i], b[i].flip(-1))


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_in_flow_form(tmp_path, pairs_file):
    """torchrun --nproc_per_node 2 (batch 1 each, the pairs decoded by 2 DataLoader workers per process) against one
    process with batch 1 × accumulation 2: the same per-pair computations, equal to 1e-6 after 3 steps."""
    import os
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    values = dict(
        model="builtin:tiny-sd3",
        data=str(pairs_file),
        eval_prompts="",
        batch_size=1,
        max_steps=3,
        threads=1,
        progress=False,
        tensorboard=False,
        learning_rate=0.01,
        beta=500.0,
        random_flip=True,
    )
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({**values, "output_dir": str(tmp_path / "two")}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "diffsteer.training.dpo", "--config", str(tmp_path / "two.yaml")]
    proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    DPOTrainer(
        DPOConfig(
            **{**values, "output_dir": str(tmp_path / "one"), "gradient_accumulation_steps": 2, "data_workers": 0}
        )
    ).train()
    two, one = (
        load_file(tmp_path / n / "adapters" / "dpo" / "pytorch_lora_weights.safetensors") for n in ("two", "one")
    )
    assert two.keys() == one.keys()
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-3
    for key, value in two.items():
        torch.testing.assert_close(value, one[key], rtol=0, atol=1e-6)


def test_flow_smpo_resume_repeats_the_uninterrupted_run(tmp_path, pairs_file):
    """Stopped after step 1 (its checkpoint) and resumed to step 2: the same LoRA as 2 steps in one go; the data
    plan restarts at the resumed step."""
    small = dict(inversion_steps=2, renoise_iterations=1, batch_size=1, checkpoint_every=1, random_flip=True)
    whole = SmPOTrainer(config(SmPOConfig, tmp_path, pairs_file, "whole", **small))
    whole.train()
    SmPOTrainer(config(SmPOConfig, tmp_path, pairs_file, "cut", **{**small, "max_steps": 1})).train()
    resumed = SmPOTrainer(config(SmPOConfig, tmp_path, pairs_file, "cut", **{**small, "data_workers": 2}))
    resumed.train(resume=True)
    resumed.close()
    state = lora_state(whole)
    for k, v in lora_state(resumed).items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
