"""Flow-GRPO (training/grpo.py) on the tiny SD3 transformer: the importance ratio is exactly 1 before the first
update (and moves after it), the clipped surrogate by hand, a run learns and logs, same seed → bit-identical
adapters, SIGKILL + resume = the uninterrupted run, N processes' draws = one process's, the exported LoRA loads
through StableDiffusion3Pipeline, and UNet models and bad fields are refused naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from online_rl_support import TINY_FLOW, assert_lora_loads_in_pipeline, sigkill_and_resume
from test_trainer import _train_values
from training_support import REPO, read_adapter, training_env

from diffsteer.guidance.errors import InvalidInput
from diffsteer.training.distributed import Processes
from diffsteer.training.flow_sde import gaussian_log_prob
from diffsteer.training.grpo import GRPOConfig, GRPOTrainer, clipped_surrogate


def _config(tmp_path, name="run", **values) -> GRPOConfig:
    return GRPOConfig(**{**TINY_FLOW, "output_dir": str(tmp_path / name), **values})


def test_the_clipped_surrogate_by_hand():
    log_prob = torch.log(torch.tensor([1.5, 0.5, 1.05, 0.9]))
    advantages = torch.tensor([1.0, 1.0, -2.0, -2.0])
    loss, ratio = clipped_surrogate(log_prob, torch.zeros(4), advantages, clip_range=0.2)
    torch.testing.assert_close(ratio, torch.tensor([1.5, 0.5, 1.05, 0.9]))
    # A > 0: max(−1.5, −1.2) = −1.2; max(−0.5, −0.8) = −0.5.  A < 0: max(2.1, 2.1) = 2.1; max(1.8, 1.8) = 1.8
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 2.1 + 1.8) / 4, rel=1e-6)


def test_the_importance_ratio_is_exactly_one_before_the_first_update(tmp_path):
    trainer = GRPOTrainer(_config(tmp_path))
    rollout = trainer.rollout(trainer.draw_batch(0, 0))
    assert sorted(rollout.log_probs) == [0, 1, 2]  # every step stochastic without a window
    for i, old in rollout.log_probs.items():
        mean, std = trainer.transition(rollout, i)  # with autograd on, as in training
        assert mean.requires_grad
        new = gaussian_log_prob(rollout.latents[i + 1], mean, std)
        assert torch.equal(new.detach(), old)
        _, ratio = clipped_surrogate(new, old, torch.ones(len(old)), 1e-4)
        assert torch.equal(ratio.detach(), torch.ones_like(ratio))


def test_a_run_logs_ratio_one_on_policy_and_moves_off_policy_and_trains_only_the_window(tmp_path):
    trainer = GRPOTrainer(_config(tmp_path, max_steps=2, sde_window=1, export="lora"))
    batch = trainer.draw_batch(0, 0)
    assert len(trainer.rollout(batch).log_probs) == 1  # MixGRPO-style: one stochastic step, the rest ODE
    trainer.train()
    values = {(s, m): v for s, m, v in _train_values(tmp_path / "run")}
    for step in (1, 2):
        assert values[(step, "ratio_dev.first")] == 0.0
        assert values[(step, "ratio_dev")] > 0  # the second update is off-policy
        assert np.isfinite(values[(step, "reward")]) and values[(step, "kl")] >= 0
    assert (tmp_path / "run" / "adapters" / "grpo" / "pytorch_lora_weights.safetensors").exists()


def test_same_seed_same_adapter_and_the_exported_lora_loads_through_the_sd3_pipeline(tmp_path):
    adapters = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        trainer = GRPOTrainer(_config(tmp_path, name, max_steps=2, seed=seed))
        trainer.train()
        adapters.append(read_adapter(tmp_path / name, "grpo"))
    a, b, c = adapters
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert_lora_loads_in_pipeline(trainer.model.backbone, tmp_path / "c" / "adapters" / "grpo")


def test_a_resumed_run_equals_the_uninterrupted_run(tmp_path):
    GRPOTrainer(_config(tmp_path, "whole", max_steps=3)).train()
    GRPOTrainer(_config(tmp_path, "cut", max_steps=1, checkpoint_every=1)).train()
    GRPOTrainer(_config(tmp_path, "cut", max_steps=3)).train(resume=True)
    whole, resumed = read_adapter(tmp_path / "whole", "grpo"), read_adapter(tmp_path / "cut", "grpo")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.slow
def test_sigkill_and_resume_equals_the_uninterrupted_run(tmp_path):
    whole, resumed = sigkill_and_resume(tmp_path, "diffsteer.training.grpo", {**TINY_FLOW, "adapter_name": "grpo"})
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_two_processes_draw_what_one_process_with_twice_the_batch_draws(tmp_path):
    """Groups split over processes: each process's share of prompts, seeds and window concatenates to the
    single process's batch of twice the size (the rewards are then gathered, tests/test_flow_sde.py)."""
    one = GRPOTrainer(_config(tmp_path, "one", batch_size=4, sde_window=2))
    whole = one.draw_batch(3, 0)
    two = GRPOTrainer(_config(tmp_path, "two", batch_size=2, sde_window=2))
    shares = []
    for rank in (0, 1):
        two.processes = Processes(rank=rank, world_size=2)
        shares.append(two.draw_batch(3, 0))
    assert [p for s in shares for p in s.prompts] == whole.prompts
    assert [x for s in shares for x in s.seeds] == whole.seeds
    assert [s.start for s in shares] == [0, 2]
    assert all(s.shared == whole.shared for s in shares)
    assert whole.prompts[0] == whole.prompts[1] and whole.prompts[2] == whole.prompts[3]  # groups of 2


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """torchrun --nproc_per_node 2, batch 2 each, groups of 4 (each group split over the two processes, its rewards
    gathered), against one process with batch 2 × accumulation 2: the same images in the same
    backbone batches, so the adapters agree to float rounding."""
    import subprocess
    import sys

    import yaml

    config = {**TINY_FLOW, "output_dir": str(tmp_path / "two"), "batch_size": 2, "group_size": 4, "max_steps": 2}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*command, "-m", "diffsteer.training.grpo", "--config", str(tmp_path / "two.yaml")],
        cwd=REPO,
        env=training_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    GRPOTrainer(
        _config(tmp_path, "one", batch_size=2, group_size=4, max_steps=2, gradient_accumulation_steps=2)
    ).train()
    two, one = read_adapter(tmp_path / "two", "grpo"), read_adapter(tmp_path / "one", "grpo")
    assert two.keys() == one.keys() and two
    for key in two:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6)
    rewards = {s: v for s, m, v in _train_values(tmp_path / "two") if m == "reward"}
    assert rewards == pytest.approx({s: v for s, m, v in _train_values(tmp_path / "one") if m == "reward"}, abs=1e-6)


def test_unet_models_and_bad_fields_are_refused_naming_the_field(tmp_path):
    with pytest.raises(InvalidInput, match="^model:.*flow-matching"):
        GRPOTrainer(_config(tmp_path, model="builtin:tiny", scheduler="ddim"))
    with pytest.raises(InvalidInput, match="^group_size:.*divide"):
        GRPOTrainer(_config(tmp_path, group_size=3))
    for field, value in (("sde_window", 4), ("clip_range", 0.0), ("noise_level", -1.0), ("group_size", 1)):
        with pytest.raises(InvalidInput, match=f"^{field}:"):
            _config(tmp_path, **{field: value})
    with pytest.raises(InvalidInput, match="^reward:"):
        GRPOTrainer(_config(tmp_path, reward="nonsense:1"))
