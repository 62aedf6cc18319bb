"""Helpers of the online-RL trainer tests (tests/test_grpo.py, tests/test_nft.py): tiny flow-model runs, the
SIGKILL-and-resume comparison and the check that an exported LoRA loads through the family's diffusers pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from training_support import kill_after_checkpoint, read_adapter, start_training, wait_for_success

from diffsteer.guidance.models import load_model

# the tiny SD3 transformer, 3 rollout steps, groups of 2 over a global batch of 4: well under a second a step
TINY_FLOW = dict(
    model="builtin:tiny-sd3",
    prompts="pg-train:single",
    eval_prompts="",
    reward="saturation:1",
    batch_size=4,
    group_size=2,
    sample_steps=3,
    steps=3,
    scheduler="euler",
    learning_rate=0.01,
    threads=1,
    progress=False,
    tensorboard=False,
    checkpoint_every=100,
)


def sigkill_and_resume(tmp_path: Path, module: str, config: dict, max_steps: int = 6) -> tuple[dict, dict]:
    """Run ``config`` uninterrupted and, in a second folder, SIGKILL it after its step-2 checkpoint and resume it;
    returns both runs' exported adapters."""

    def write(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        values = {**config, "output_dir": str(tmp_path / name), "max_steps": max_steps, "checkpoint_every": 1}
        path.write_text(yaml.safe_dump({**values, "keep_checkpoints": 0}))
        return path

    whole = start_training(module, "--config", str(write("whole")))
    cut = start_training(module, "--config", str(write("cut")))
    kill_after_checkpoint(cut, tmp_path / "cut", step=2)
    wait_for_success(whole, start_training(module, "--config", str(tmp_path / "cut.yaml"), "--resume"))
    name = config["adapter_name"]
    return read_adapter(tmp_path / "whole", name), read_adapter(tmp_path / "cut", name)


def transformer_output(transformer: torch.nn.Module) -> torch.Tensor:
    """The SD3 transformer on fixed random inputs."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    text = torch.randn(1, 5, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return transformer(
            hidden_states=x,
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            return_dict=False,
        )[0]


def assert_lora_loads_in_pipeline(trained_backbone: torch.nn.Module, adapter_folder: Path) -> None:
    """``StableDiffusion3Pipeline.load_lora_weights`` on the exported folder reproduces the trained transformer, and
    the adapter is not a no-op."""
    from diffusers import StableDiffusion3Pipeline

    pipe = load_model("builtin:tiny-sd3", device="cpu").to_pipeline()
    assert isinstance(pipe, StableDiffusion3Pipeline)
    base = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(adapter_folder))
    loaded, trained = transformer_output(pipe.transformer), transformer_output(trained_backbone)
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    assert (loaded - base).abs().max() > 1e-6
