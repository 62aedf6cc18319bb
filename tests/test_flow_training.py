"""The shared trainer on flow-matching transformers (SD3, FLUX.1): AlignProp on ``builtin:tiny-sd3`` repeats bit
for bit, resumes exactly after SIGKILL, and two gloo processes equal one with the same global batch; the exported
LoRA (and the merged pipeline folder) loads through the family's diffusers pipeline and gives the image our sampler
gives with the adapter; the differentiable sampler recomputes every transformer call in the backward pass; the
training noise level of a flow model is its scheduler's own forward noising. Tiny models, 2 optimizer steps."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_reference import assert_same_image, pipeline_images
from training_support import REPO, read_adapter, training_env

from diffsteer.guidance.latents import decode
from diffsteer.guidance.models import load_model
from diffsteer.guidance.sampler import generate, prepare
from diffsteer.training.alignprop import AlignPropConfig, AlignPropTrainer
from diffsteer.training.lora import add_lora, save_lora_weights

# builtin:tiny-sd3 at its native 32 px, 2 Euler steps under CFG 3, full backpropagation; one image per micro-batch
# and two micro-batches per step, so that two processes with one image each draw the same global batch.
SD3 = dict(
    model="builtin:tiny-sd3",
    prompts="pg-train:single",
    eval_prompts="",
    steps=2,
    scheduler="euler",
    policy="cfg:scale=3",
    batch_size=1,
    gradient_accumulation_steps=2,
    max_steps=2,
    reward="saturation:1",
    truncation_k=2,
    learning_rate=0.05,
    threads=1,
    progress=False,
    tensorboard=False,
    checkpoint_every=1,
    keep_checkpoints=0,
    seed=5,
)
SAMPLE = {"prompt": "a red circle", "steps": 4, "seed": 3}


def _write_config(tmp_path: Path, name: str, **values) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**SD3, "output_dir": str(tmp_path / name), **values}))
    return path


def _ours(model, policy: str) -> np.ndarray:
    return np.asarray(generate(model, {**SAMPLE, "policy": policy}).images[0]).astype(int)


def _diffusers(pipe, **kwargs) -> np.ndarray:
    return pipeline_images(pipe, SAMPLE["prompt"], SAMPLE["steps"], [SAMPLE["seed"]], **kwargs)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two same-seed in-process runs (the first exports its LoRA and the merged pipeline), a CLI run killed by
    SIGKILL after its first checkpoint, and a two-process torchrun with one image per process; the subprocesses
    run beside the in-process training."""
    tmp = tmp_path_factory.mktemp("flow_training")
    cut = subprocess.Popen(
        [sys.executable, "-m", "diffsteer.training.alignprop", "--config", str(_write_config(tmp, "cut"))],
        cwd=REPO,
        env=training_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    trainers = {}
    for name, export in (("a", "both"), ("b", "lora")):
        trainers[name] = AlignPropTrainer(AlignPropConfig(**{**SD3, "output_dir": str(tmp / name), "export": export}))
        trainers[name].train()
        if name == "a":
            marker = tmp / "cut" / "checkpoints" / "step-00000001.pt"
            deadline = time.monotonic() + 120
            while not marker.exists() and cut.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            cut.send_signal(signal.SIGKILL)
            killed = cut.wait(), not (tmp / "cut" / "adapters").exists(), marker.exists(), cut.stderr.read()[-2000:]
            two = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                + ["-m", "diffsteer.training.alignprop", "--config"]
                + [str(_write_config(tmp, "two", gradient_accumulation_steps=1))],
                cwd=REPO,
                env=training_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
    _, err = two.communicate(timeout=300)
    return tmp, trainers, killed, (two.returncode, err[-3000:])


@pytest.mark.slow
def test_two_same_seed_runs_give_bit_identical_adapters(runs):
    tmp, trainers, _, _ = runs
    a, b = read_adapter(tmp / "a"), read_adapter(tmp / "b")
    assert a.keys() == b.keys() and any(".add_q_proj." in k for k in a)  # the text stream's projections train too
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-2  # B started at zero: it moved


@pytest.mark.slow
def test_sigkill_and_resume_equals_the_uninterrupted_run(runs):
    tmp, _, (returncode, no_adapter, checkpointed, err), _ = runs
    assert returncode == -signal.SIGKILL and no_adapter and checkpointed, err  # killed mid-run, after step 1
    AlignPropTrainer(AlignPropConfig(**{**SD3, "output_dir": str(tmp / "cut")})).train(resume=True)
    a, cut = read_adapter(tmp / "a"), read_adapter(tmp / "cut")
    assert a.keys() == cut.keys() and all(torch.equal(a[k], cut[k]) for k in a)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    """2 processes x batch 1 against 1 process x batch 1 x accumulation 2 (the same per-image computations, the
    gradients averaged by an all-reduce instead of summed over micro-batches): equal to 1e-6 after 2 Adam steps."""
    tmp, _, _, (returncode, err) = runs
    assert returncode == 0, err
    one, two = read_adapter(tmp / "a"), read_adapter(tmp / "two")
    assert one.keys() == two.keys()
    error = max(float((one[k] - two[k]).abs().max()) for k in one)
    update = max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k)
    print(f"2 processes vs 1 process x accumulation 2: max |dw| {error:.3g} (largest update {update:.3g})")
    assert error <= 1e-6 < update


@pytest.mark.slow
def test_the_lora_and_the_pipeline_export_load_in_diffusers_and_give_our_image(runs):
    """StableDiffusion3Pipeline.load_lora_weights on the base model, and the merged pipeline folder, each give
    the image our sampler gives with the trained adapter (within one grey level); the adapter changes it; the
    service serves it by name."""
    from diffusers import StableDiffusion3Pipeline

    tmp, trainers, _, _ = runs
    trained = _ours(trainers["a"].model, "cfg:scale=3")
    base = load_model("builtin:tiny-sd3")
    assert np.abs(_ours(base, "cfg:scale=3") - trained).max() > 10
    pipe = base.to_pipeline()
    pipe.load_lora_weights(str(tmp / "a" / "adapters" / "alignprop"))
    assert_same_image(_diffusers(pipe, guidance_scale=3.0), trained)
    exported = StableDiffusion3Pipeline.from_pretrained(str(tmp / "a" / "pipeline"))
    assert_same_image(_diffusers(exported, guidance_scale=3.0), trained)
    # and the service loads the adapter by name into the same model
    from test_service_support import assert_lora_served_like

    assert_lora_served_like(trainers["a"].model, tmp / "a" / "adapters", "alignprop", "builtin:tiny-sd3", "euler")


def test_a_flux_lora_loads_in_flux_pipeline_at_alpha_over_rank_and_gives_our_image(tmp_path):
    """The export of a FLUX.1 adapter (rank 4, α 8, packed latents): FluxPipeline.load_lora_weights gives our
    sampler's image with the adapter, which differs from the base model's."""
    model = load_model("builtin:tiny-flux")
    add_lora(model.backbone, 4, 8.0, seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    assert {"to_add_out", "add_q_proj", "to_out.0"} <= set(model.backbone.peft_config["default"].target_modules)
    save_lora_weights(model, tmp_path)
    trained = _ours(model, "cfg:scale=1")
    base = load_model("builtin:tiny-flux")
    assert np.abs(_ours(base, "cfg:scale=1") - trained).max() > 10
    pipe = base.to_pipeline()
    pipe.load_lora_weights(str(tmp_path))
    assert_same_image(_diffusers(pipe, height=32, width=32), trained)  # distilled guidance 3.5, the default


def test_gradient_checkpointing_recomputes_every_transformer_call_and_changes_no_gradient():
    """AlignProp's rollout through the flow sampler: with checkpointing, each of the K recorded steps' transformer
    calls runs again in the backward pass (the activations were not kept), and the LoRA gradient is the same."""
    model = load_model("builtin:tiny-sd3")
    params = add_lora(model.backbone, 4, 4.0, seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    calls = []
    # a pre-hook: checkpoint's recomputation stops once it has what the backward needs, before a forward hook runs
    model.backbone.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))

    def gradient(checkpointing: bool) -> tuple[torch.Tensor, int, int]:
        calls.clear()
        for p in params:
            p.grad = None
        prepared = prepare(
            model,
            {"prompt": ["a red circle"], "seeds": [1], "steps": 3, "scheduler": "euler", "policy": "cfg:scale=3"},
            gradient_checkpointing=checkpointing,
        )
        latents = prepared.run(grad_at_step=lambda i: i >= 1).latents  # the last K = 2 of 3 steps
        forward = len(calls)
        decode(model, latents, checkpoint=checkpointing).pow(2).mean().backward()
        return torch.cat([p.grad.flatten() for p in params]), forward, len(calls) - forward

    plain, forward, recomputed = gradient(False)
    assert (forward, recomputed) == (3, 0)  # one batched call (cond and uncond) per step
    checkpointed, forward, recomputed = gradient(True)
    assert (forward, recomputed) == (3, 2)
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-8)
    assert float(plain.abs().max()) > 0


def test_the_training_noise_level_of_a_flow_model_is_its_schedulers_forward_noising(tmp_path):
    """``Trainer.noise_level(t)`` at timesteps σ·T gives FlowMatchEulerDiscreteScheduler.scale_noise's x_t, and
    ``Trainer.backbone_call`` on FLUX (packed inside) is the backbone call the sampler makes."""
    from diffsteer.guidance.parameterisation import add_noise

    trainer = AlignPropTrainer(
        AlignPropConfig(**{**SD3, "model": "builtin:tiny-flux", "output_dir": str(tmp_path), "policy": "cfg:scale=1"})
    )
    scheduler = trainer.model.fresh_scheduler()
    scheduler.set_timesteps(5, mu=1.0)
    t = scheduler.timesteps[[0, 2, 4]]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    ours = add_noise(x0, eps, trainer.noise_level(t))
    theirs = torch.cat([scheduler.scale_noise(x0[i : i + 1], t[i : i + 1], eps[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)

    prepared = prepare(trainer.model, {"prompt": ["a red circle"] * 3, "seeds": [1, 2, 3], "policy": "cfg:scale=1"})
    condition = prepared.conditions["cond"]
    with torch.no_grad():
        out = trainer.backbone_call(trainer.model.backbone, ours, t, condition)
        direct = [
            trainer.model.family.forward(
                trainer.model.backbone, ours[i : i + 1], t[i], condition.rows(torch.tensor([i]))
            )
            for i in range(3)
        ]
    assert out.shape == x0.shape
    torch.testing.assert_close(out, torch.cat(direct), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- sharded full fine-tuning (FSDP2)

FSDP_SCRIPT = """
import sys
from diffsteer.training.alignprop import AlignPropConfig, AlignPropTrainer
values = eval(sys.argv[1])
AlignPropTrainer(AlignPropConfig(**values, output_dir=sys.argv[2] + "/whole")).train()
AlignPropTrainer(AlignPropConfig(**{**values, "max_steps": 1}, output_dir=sys.argv[2] + "/cut")).train()
trainer = AlignPropTrainer(AlignPropConfig(**values, output_dir=sys.argv[2] + "/cut"))
trainer.train(resume=True)
trainer.close()
"""
FULL = dict(SD3, trainable="full", export="pipeline", learning_rate=5e-4)


def _backbone_state(folder: Path, step: int) -> dict[str, torch.Tensor]:
    from diffsteer.training.checkpoints import load_checkpoint

    return load_checkpoint(folder / "checkpoints" / f"step-{step:08d}.pt")["modules"]["backbone"]


@pytest.mark.slow
def test_fsdp_over_two_processes_repeats_resumes_and_equals_one_process(tmp_path):
    """sharding: fsdp, trainable: full, 2 gloo processes with one image each (FSDP2 on CPU): a run stopped after
    step 1 and resumed from its gathered checkpoint ends bit-identical to an uninterrupted run of the same seed;
    both equal one unsharded process with accumulation 2 (same per-image computations; FSDP's reduce-scatter
    averages as the all-reduce does) to 1e-6; the pipeline export holds the gathered weights."""
    from diffusers import StableDiffusion3Pipeline

    script = tmp_path / "fsdp_runs.py"
    script.write_text(FSDP_SCRIPT)
    sharded = {**FULL, "sharding": "fsdp", "gradient_accumulation_steps": 1}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
        + [repr(sharded), str(tmp_path)],
        cwd=REPO,
        env=training_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    AlignPropTrainer(AlignPropConfig(**FULL, output_dir=str(tmp_path / "one"))).train()
    whole, cut, one = (_backbone_state(tmp_path / name, 2) for name in ("whole", "cut", "one"))
    assert whole.keys() == cut.keys() == one.keys() and len(whole) > 10
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    start = _backbone_state(tmp_path / "one", 1)  # the update of step 2 alone is what the tolerance is against
    error = max(float((whole[k] - one[k]).abs().max()) for k in whole)
    update = max(float((one[k] - start[k]).abs().max()) for k in whole)
    print(f"FSDP over 2 processes vs 1 process x accumulation 2: max |dw| {error:.3g} (step-2 update {update:.3g})")
    assert error <= 1e-6 < update
    exported = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "whole" / "pipeline")).transformer.state_dict()
    assert all(torch.equal(exported[k], whole[k]) for k in whole)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        (dict(sharding="fsdp"), "sharding"),  # a LoRA run
        (dict(sharding="fsdp", trainable="full", export="pipeline", mixed_precision="fp16"), "mixed_precision"),
        (dict(sharding="fsdp", trainable="full", export="pipeline", truncation="uniform"), "truncation"),
        (dict(sharding="zero3"), "sharding"),
        (dict(lora_targets=("no_such_projection",)), "lora_targets"),
    ],
)
def test_bad_sharding_and_target_settings_name_the_field(tmp_path, values, field):
    from diffsteer.guidance.errors import InvalidInput
    from diffsteer.training.config_io import load_config

    with pytest.raises(InvalidInput) as info:
        overrides = [f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in {**SD3, **values}.items()]
        config = load_config(AlignPropConfig, None, [*overrides, f"output_dir={tmp_path}"])
        AlignPropTrainer(config)  # one process: fsdp is refused here too
    assert info.value.field == field


def test_fsdp_in_one_process_equals_the_unsharded_run(tmp_path):
    """sharding: fsdp without a launcher shards over a group of one (the same code as on several devices): the
    weights of sharding: none after one step, to 1e-6 (the gradient norm is summed in another order)."""
    from diffsteer.guidance.models import load_model

    runs = {}
    for sharding in ("none", "fsdp"):
        values = {**FULL, "sharding": sharding, "max_steps": 1, "output_dir": str(tmp_path / sharding)}
        trainer = AlignPropTrainer(AlignPropConfig(**values))
        trainer.train()
        trainer.close()  # leave the group of one (a live group at exit can abort the interpreter)
        runs[sharding] = _backbone_state(tmp_path / sharding, 1)
    base = load_model("builtin:tiny-sd3").backbone.state_dict()
    assert runs["none"].keys() == runs["fsdp"].keys()
    error = max(float((runs["none"][k] - runs["fsdp"][k]).abs().max()) for k in runs["none"])
    update = max(float((runs["none"][k] - base[k]).abs().max()) for k in runs["none"])
    assert error <= 1e-6 < update, (error, update)
