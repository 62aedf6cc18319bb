"""DiffusionNFT (training/nft.py): the loss on a hand-worked batch and against the paper's velocity form on a flow
model, the optimality weight and the old policy's decay by hand; runs on the tiny SD3 transformer and the tiny
UNet, same seed → bit-identical adapters, resume = the uninterrupted run (the old policy included), the exported
LoRA loads through StableDiffusion3Pipeline, bad fields refused naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from online_rl_support import TINY_FLOW, assert_lora_loads_in_pipeline, sigkill_and_resume
from test_trainer import _train_values
from training_support import read_adapter

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.parameterisation import NoiseLevel, add_noise, to_x0
from diffsteer.training.nft import (
    NFTConfig,
    NFTTrainer,
    implicit_policies,
    nft_loss,
    old_policy_decay,
    optimality_weight,
)


def _config(tmp_path, name="run", **values) -> NFTConfig:
    return NFTConfig(**{**TINY_FLOW, "output_dir": str(tmp_path / name), **values})


def test_the_nft_loss_on_a_hand_worked_batch():
    x0 = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    old = torch.tensor([[1.0, -1.0], [1.0, 2.0]])
    trained = torch.tensor([[2.0, 0.0], [1.0, -2.0]], requires_grad=True)
    positive, negative = implicit_policies(old, trained, beta=0.5)
    torch.testing.assert_close(positive, torch.tensor([[1.5, -0.5], [1.0, 0.0]]))
    torch.testing.assert_close(negative, torch.tensor([[0.5, -1.5], [1.0, 4.0]]))
    r = torch.as_tensor(optimality_weight(np.array([5.0, -2.5]), 5.0), dtype=torch.float32)
    torch.testing.assert_close(r, torch.tensor([1.0, 0.25]))
    # sample 0: errors (1.5, -0.5) and (0.5, -1.5): mean squared 1.25, mean |.| 1 -> 1.25 both ways, either weighting
    # sample 1: errors (0, -1) and (0, 3): mean squared 0.5 and 4.5, mean |.| 0.5 and 1.5 -> adaptive 1 and 3
    # adaptive: C/β · mean(1·1.25 + 0, 0.25·1 + 0.75·3) = 10 · 1.875;  uniform: 10 · mean(1.25, 0.25·0.5 + 0.75·4.5)
    adaptive, parts = nft_loss(positive, negative, x0, r, beta=0.5, adv_clip_max=5.0, weighting="adaptive")
    uniform, _ = nft_loss(positive, negative, x0, r, beta=0.5, adv_clip_max=5.0, weighting="uniform")
    assert float(adaptive.detach()) == pytest.approx(18.75) and float(uniform.detach()) == pytest.approx(23.75)
    assert parts["positive_error"] == pytest.approx((1.25 + 1.0) / 2)
    # the adaptive scales are constants: d/dθ of sample 1's negative term 10/2·0.75·mean((x⁻ − x0)²)/1.5, with
    # x⁻ = 1.5·old − 0.5·θ, is 10/2·0.75/1.5·(2·3/2)·(−0.5) = −3.75 on θ[1, 1] (+ the positive term's 10/2·0.25/0.5·
    # (2·(−1)/2)·0.5 = −1.25)
    adaptive.backward()
    assert float(trained.grad[1, 1]) == pytest.approx(-3.75 - 1.25)
    assert float(trained.grad[1, 0]) == 0.0


def test_on_a_flow_model_the_x0_loss_is_the_papers_velocity_loss_weighted_by_t_squared():
    """x0^± − x0 = t·(v* − v^±) with v* = ε − x0: the uniform x0 loss equals C/β·mean[t²(r‖v⁺ − v*‖² + (1 − r)‖v⁻ − v*‖²)]
    (per-element means), the paper's eq. 7 written on velocities."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    v_old, v_theta = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t, beta, c = 0.7, 0.3, 5.0
    level = NoiseLevel.flow(t)
    x_t = add_noise(x0, eps, level)
    r = torch.tensor([0.1, 0.5, 0.9])
    positive, negative = implicit_policies(to_x0(v_old, x_t, level, "flow"), to_x0(v_theta, x_t, level, "flow"), beta)
    loss, _ = nft_loss(positive, negative, x0, r, beta, c, weighting="uniform")
    v_pos, v_neg = (1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta
    target = eps - x0
    per = [((v - target) ** 2).flatten(1).mean(1) for v in (v_pos, v_neg)]
    expected = c / beta * (t**2 * (r * per[0] + (1 - r) * per[1])).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_the_old_policys_decay_by_hand():
    assert [old_policy_decay(s, 0.001, 0.5) for s in (0, 1, 250, 499, 500, 10_000)] == [0, 0.001, 0.25, 0.499, 0.5, 0.5]
    assert [old_policy_decay(s, 0.0075, 0.999, start=75) for s in (0, 74, 75, 76, 300)] == [0, 0, 0, 0.0075, 0.999]


def test_a_flow_run_keeps_the_old_policy_as_the_hand_computed_average_and_loads_through_the_sd3_pipeline(tmp_path):
    trainer = NFTTrainer(_config(tmp_path, max_steps=3, old_decay_rate=0.2, old_decay_max=0.9))
    snapshots = []
    for _ in range(3):
        trainer.train_step()
        snapshots.append(
            {k: p.detach().clone() for k, p in trainer.model.backbone.named_parameters() if p.requires_grad}
        )
    # old_0 = θ_0 (decay 0 after step 0), old_1 = 0.2·old_0 + 0.8·θ_1, old_2 = 0.4·old_1 + 0.6·θ_2
    key = next(k for k in snapshots[0] if ".lora_B." in k)
    expected = 0.4 * (0.2 * snapshots[0][key] + 0.8 * snapshots[1][key]) + 0.6 * snapshots[2][key]
    torch.testing.assert_close(trainer.old.state_dict()[key], expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(trainer.old.state_dict()[key], snapshots[2][key])
    folder = trainer.export_lora(tmp_path / "run" / "adapters" / "nft")
    assert_lora_loads_in_pipeline(trainer.model.backbone, folder.parent)


def test_same_seed_same_adapter_and_resume_equals_the_uninterrupted_run(tmp_path):
    config = dict(max_steps=3, old_decay_rate=0.3)
    for name in ("a", "b"):
        NFTTrainer(_config(tmp_path, name, **config)).train()
    NFTTrainer(_config(tmp_path, "cut", **{**config, "max_steps": 1, "checkpoint_every": 1})).train()
    NFTTrainer(_config(tmp_path, "cut", **config)).train(resume=True)
    NFTTrainer(_config(tmp_path, "c", **config, seed=5)).train()
    a, b, cut, c = (read_adapter(tmp_path / n, "nft") for n in ("a", "b", "cut", "c"))
    assert a.keys() == b.keys() == cut.keys() and a
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], cut[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    values = {(s, m): v for s, m, v in _train_values(tmp_path / "a")}
    assert all(np.isfinite(values[(s, m)]) for s in (1, 2, 3) for m in ("reward", "loss", "kl", "old_decay"))


def test_a_unet_model_trains_with_any_solver(tmp_path):
    trainer = NFTTrainer(_config(tmp_path, model="builtin:tiny", scheduler="dpmpp_2m", max_steps=1, kl_beta=0.0))
    trainer.train()
    assert any(
        float(p.detach().abs().max()) > 0 for k, p in trainer.model.backbone.named_parameters() if ".lora_B." in k
    )


def test_every_weight_trains_against_frozen_copies_of_the_base_and_the_old_policy(tmp_path):
    trainer = NFTTrainer(_config(tmp_path, trainable="full", export="pipeline", max_steps=2, old_decay_rate=0.5))
    base = {k: v.clone() for k, v in trainer.frozen_reference.state_dict().items()}
    trainer.train()
    trained, old = trainer.model.backbone.state_dict(), trainer.old.average.state_dict()
    assert trainer.frozen_reference is not trainer.model.backbone and trainer.old.average is not trainer.model.backbone
    assert all(torch.equal(base[k], v) for k, v in trainer.frozen_reference.state_dict().items())
    moved = [k for k in trained if not torch.equal(trained[k], base[k])]
    assert moved and any(not torch.equal(old[k], trained[k]) for k in moved)  # old = ½ old + ½ θ after step 1
    assert (tmp_path / "run" / "pipeline" / "model_index.json").exists()


@pytest.mark.slow
def test_sigkill_and_resume_equals_the_uninterrupted_run(tmp_path):
    whole, resumed = sigkill_and_resume(tmp_path, "diffsteer.training.nft", {**TINY_FLOW, "adapter_name": "nft"})
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_bad_fields_are_refused_naming_the_field(tmp_path):
    for field, value in (("beta", 0.0), ("train_timesteps", 4), ("old_decay_max", 1.0), ("adv_clip_max", 0.0)):
        with pytest.raises(InvalidInput, match=f"^{field}:"):
            _config(tmp_path, **{field: value})
    with pytest.raises(InvalidInput, match="^scheduler:"):
        NFTTrainer(_config(tmp_path, scheduler="ddim"))  # no flow form
