"""f-distill / DMD2 to a few-step flow student (SD3 and FLUX families): the teacher's guided velocity and its
transformer features against direct calls, the student's k-step Euler chain, runs that repeat bit for bit and
resume exactly, and the exported pipeline folder, whose k steps are the student's sample in our sampler, in the
family's diffusers pipeline and in the trainer alike. Tiny random-weight transformers only."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from test_fdistill import TINY as UNET_TINY
from test_fdistill import _states, tiny_config
from training_support import kill_after_checkpoint, start_training, wait_for_success

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.parameterisation import NoiseLevel
from diffsteer.training.fdistill import (
    DistillBatch,
    FDistillConfig,
    FDistillTrainer,
    backbone_features,
    feature_block,
)

# the UNet tests' tiny settings on a tiny SD3 transformer, a 2-step student and a guided teacher
FLOW = dict(model="builtin:tiny-sd3", divergence="js", steps=2, teacher_policy="cfg:scale=2")
TINY = {**UNET_TINY, **FLOW}


def flow_config(tmp_path: Path, **overrides) -> FDistillConfig:
    return tiny_config(tmp_path, **{**FLOW, **overrides})


def _assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------- the pieces, against direct calls


@pytest.fixture(scope="module")
def sd3_trainer(tmp_path_factory):
    return FDistillTrainer(flow_config(tmp_path_factory.mktemp("fdistill-sd3"), max_steps=1))


def test_teacher_target_is_the_guided_velocity_read_as_x0(sd3_trainer):
    """The real score on a flow model: x̂0 = x_t − σ·v̂ with v̂ = v_u + s·(v_c − v_u) the teacher's CFG velocity
    (scale 2), each image at its own σ = t / T, from direct transformer calls."""
    trainer = sd3_trainer
    model = trainer.model
    prompts = ["a red circle", "two blue squares"]
    conditions, aliases = trainer._encode(prompts)
    x = torch.randn(
        2, *model.latent_shape(model.default_size, model.default_size), generator=torch.Generator().manual_seed(1)
    )
    t = torch.tensor([250, 700])
    got = trainer.teacher_x0(x, t, conditions, aliases)
    uncond = conditions[aliases.get("uncond", "uncond")]
    with torch.no_grad():
        for i in range(2):
            rows = torch.tensor([i])
            tt = t[i : i + 1].float()
            v_c = model.family.forward(model.backbone, x[rows], tt, conditions["cond"].rows(rows))
            v_u = model.family.forward(model.backbone, x[rows], tt, uncond.rows(rows))
            v = v_u + 2.0 * (v_c - v_u)
            sigma = float(t[i]) / 1000
            torch.testing.assert_close(got[rows], x[rows] - sigma * v, rtol=1e-5, atol=1e-5)


def test_fake_score_loss_is_flow_matching_on_the_students_samples(sd3_trainer):
    """The fake score's loss by hand: the student's sample x0, x_t = (1 − σ)·x0 + σ·ε at σ = t / 1000 with the
    batch's ε, and the mean squared error of the fake score's velocity against ε − x0."""
    trainer = sd3_trainer
    batch = trainer.draw_batch(0, 0, 0)
    fake_loss, _, _ = trainer.critic_loss(batch)
    cond = trainer._encode(batch.prompts)[0]["cond"]
    with torch.no_grad():
        x0 = trainer.generate(batch, cond)
        eps = torch.cat(
            [torch.randn((1, *x0.shape[1:]), generator=torch.Generator().manual_seed(s)) for s in batch.forward_seeds]
        )
        sigma = batch.timesteps.float().view(-1, 1, 1, 1) / 1000
        x_t = (1 - sigma) * x0 + sigma * eps
        v = trainer.model.family.forward(trainer.fake_score, x_t, batch.timesteps.float(), cond)
    torch.testing.assert_close(fake_loss.detach(), ((v - (eps - x0)) ** 2).mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spec", ["builtin:tiny-sd3", "builtin:tiny-flux"])
def test_features_are_the_middle_blocks_image_tokens_on_their_grid(spec):
    """backbone_features stops the transformer after its middle block and returns that block's image stream: the
    same tokens a full forward pass produces there, laid out [B, D, h/p, w/p]."""
    from diffsteer.guidance.conditioning import encode_conditions
    from diffsteer.guidance.models import load_model

    model = load_model(spec, device="cpu")
    size = model.default_size
    conditions, _ = encode_conditions(model, ["a red circle"], None, ["cond"], height=size, width=size)
    x = torch.randn(1, *model.latent_shape(size, size), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    seen = []
    handle = feature_block(model.backbone).register_forward_hook(lambda m, i, o: seen.append(o[1]))
    with torch.no_grad():
        model.family.forward(model.backbone, x, t, conditions["cond"])
        handle.remove()
        features = backbone_features(
            model.family, model.backbone, x, t, conditions["cond"], model.family.patch_size(model)
        )
    p = model.family.patch_size(model)
    h, w = x.shape[-2] // p, x.shape[-1] // p
    assert features.shape == (1, seen[0].shape[-1], h, w)
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), seen[0], rtol=0, atol=0)


def test_student_chain_is_euler_on_the_models_own_sigma_grid(sd3_trainer):
    """The k-step student samples from pure noise at σ = 1 through the σ's that k steps of the model's own scheduler
    take (what our sampler and diffusers use): each step x + (σ' − σ)·v, the last one's x̂0 = x − σ·v."""
    trainer = sd3_trainer
    scheduler = trainer.model.fresh_scheduler()
    scheduler.set_timesteps(2)
    assert [float(level.noise) for level in trainer.student_levels] == [float(s) for s in scheduler.sigmas[:2]]
    assert float(trainer.student_levels[0].noise) == 1.0
    cond = trainer._encode(["a red circle"])[0]["cond"]
    z = trainer._gaussian([5])
    sigmas = [float(s) for s in scheduler.sigmas]
    with torch.no_grad():
        got = trainer.generate_from(z, 1, cond)
        x = z
        for i, t in enumerate(trainer.student_ts):
            v = trainer.model.family.forward(trainer.student, x, torch.tensor([t]), cond)
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # the last step, to σ = 0, is x − σ·v = x̂0
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_the_shipped_configs_load():
    """Both proving-ground configs parse into valid configs: the UNet one-step and the flow 4-step student."""
    from diffsteer.training.config_io import load_config

    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    unet = load_config(FDistillConfig, configs / "fdistill-proving-ground.yaml")
    flow = load_config(FDistillConfig, configs / "fdistill-proving-ground-flow.yaml")
    assert (unet.model, unet.steps, unet.student_timestep) == ("builtin:proving-ground", 1, 399)
    assert (flow.model, flow.steps, flow.student_timestep) == ("builtin:proving-ground-flow", 4, None)


def test_teacher_samples_as_real_data_and_regression_pairs_on_a_flow_model(tmp_path):
    """real_data: teacher and the regression pairs sample the flow teacher with its own scheduler (flow-matching
    Euler, teacher_steps, teacher_policy), and a step trains with both."""
    from diffsteer.guidance.sampler import prepare

    trainer = FDistillTrainer(
        flow_config(
            tmp_path,
            max_steps=1,
            real_data="teacher",
            prompts="pg-train:single",
            teacher_steps=2,
            regression_weight=0.5,
            regression_pairs=2,
            fake_updates_per_step=1,
        )
    )
    params = trainer._teacher_params(trainer.pair_prompts, trainer.pair_seeds)
    assert params["scheduler"] == "default" and params["steps"] == 2
    torch.testing.assert_close(trainer.pair_samples, prepare(trainer.model, params).run().latents.float())
    batch = trainer.draw_batch(0, 0, 0)
    expected = prepare(trainer.model, trainer._teacher_params(batch.prompts, batch.real_seeds)).run().latents
    torch.testing.assert_close(trainer.real_latents(batch, None), expected.float())
    trainer.train()
    rows = (Path(trainer.config.output_dir) / "metrics.csv").read_text().splitlines()
    assert any(r.startswith("1,train,loss.regression,") for r in rows)


def test_flow_refusals_name_the_field(tmp_path):
    with pytest.raises(InvalidInput, match="student_timestep"):
        FDistillTrainer(flow_config(tmp_path / "a", student_timestep=399))
    with pytest.raises(InvalidInput, match="model"):
        FDistillTrainer(flow_config(tmp_path / "b", model="builtin:tiny-qwenimage"))


# ----------------------------------------------------------------------------- the trainer


@pytest.mark.slow
def test_same_seed_same_weights_and_resume_equals_the_uninterrupted_run(tmp_path):
    """Two same-seed runs of 3 steps give bit-identical students, fake scores, discriminators, EMA, optimiser
    states and ratio bins; 2 steps, a new trainer and --resume to 3 give the same again."""
    first = FDistillTrainer(flow_config(tmp_path / "a", max_steps=3))
    before = _states(first)
    first.train()
    after = _states(first)
    for prefix in ("student.", "fake_score.", "discriminator.", "ema.student."):
        keys = [k for k in after if k.startswith(prefix)]
        assert keys and any((after[k] - before[k]).abs().max() > 0 for k in keys), prefix
    second = FDistillTrainer(flow_config(tmp_path / "b", max_steps=3))
    second.train()
    _assert_equal_states(_states(second), after)

    FDistillTrainer(flow_config(tmp_path / "c", max_steps=2)).train()
    resumed = FDistillTrainer(flow_config(tmp_path / "c", max_steps=3))
    resumed.train(resume=True)
    _assert_equal_states(_states(resumed), after)


@pytest.mark.slow
def test_sigkill_and_resume_equals_the_uninterrupted_run(tmp_path):
    """A flow distillation killed (SIGKILL) after its second checkpoint and resumed with --resume ends with the
    same checkpoint, bit for bit, as the run that was never interrupted."""
    from diffsteer.training.checkpoints import load_checkpoint

    def cli(name: str, *extra: str) -> subprocess.Popen:
        config = tmp_path / f"{name}.yaml"
        values = {**TINY, "output_dir": str(tmp_path / name), "max_steps": 6, "keep_checkpoints": 0}
        config.write_text(yaml.safe_dump(values))
        return start_training("diffsteer.training.fdistill", "--config", str(config), *extra)

    whole = cli("whole")
    wait_for_success(whole, timeout=400)
    cut = cli("cut")
    kill_after_checkpoint(cut, tmp_path / "cut", step=2, timeout=400)
    wait_for_success(cli("cut", "--resume"), timeout=400)
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-00000006.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step-00000006.pt")
    for kind in ("modules", "ema"):
        assert a[kind].keys() == b[kind].keys()
        for name in a[kind]:
            for key, value in a[kind][name].items():
                assert torch.equal(value, b[kind][name][key]), f"{kind}.{name}.{key}"
    assert torch.equal(a["extra"]["ratio_running"], b["extra"]["ratio_running"])


def test_a_lora_student_and_fake_score_on_the_transformer(tmp_path):
    """trainable: lora puts the adapters on the transformer's attention projections (diffusers' names, the text
    stream's too), only adapter weights train, the student's EMA is an average of its adapter alone (no second copy
    of the transformer), and the exported pipeline holds the base weights with that average merged in."""
    from safetensors.torch import load_file

    from diffsteer.training.lora import merged_backbone

    trainer = FDistillTrainer(
        flow_config(tmp_path, max_steps=2, trainable="lora", fake_trainable="lora", export="both", ema_decay=0.5)
    )
    names = [n for n, p in trainer.student.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert any(".add_q_proj." in n for n in names) and any(".to_q." in n for n in names)
    assert trainer.student_ema is None and sorted(trainer.emas["student"].shadow) == sorted(names)
    summary = trainer.train()
    assert Path(summary["adapter"]).is_file()
    with trainer.averaged_weights():
        expected = merged_backbone(trainer.student).state_dict()
    exported = load_file(next((Path(summary["pipeline"]) / "transformer").glob("*.safetensors")))
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)
    live = merged_backbone(trainer.student).state_dict()  # the live adapter, not the average
    assert any(not torch.equal(live[k], expected[k]) for k in expected)


# ----------------------------------------------------------------------------- the exported student


@pytest.mark.parametrize("spec", ["builtin:tiny-sd3", "builtin:tiny-flux"])
def test_export_k_steps_are_the_students_sample_in_our_sampler_diffusers_and_training(tmp_path, spec):
    """The exported folder (the family's pipeline, the model's own flow scheduler, diffsteer.json: 2 steps, no
    guidance): our sampler at 2 steps, diffusers' pipeline at 2 steps from the same noise, and the trainer's own
    2-step student sample from that noise decode to the same images."""
    import diffusers

    from diffsteer.guidance.latents import decode
    from diffsteer.guidance.models import load_model
    from diffsteer.guidance.sampler import generate, initial_noise

    trainer = FDistillTrainer(flow_config(tmp_path, model=spec, max_steps=1))
    trainer.train()
    folder = Path(trainer.config.output_dir) / "pipeline"
    size = trainer.model.default_size
    defaults = json.loads((folder / "diffsteer.json").read_text())
    assert defaults == {"policy": "cfg:scale=1", "steps": 2, "native_size": size}
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"

    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    model = load_model(str(folder), device="cpu")
    ours = generate(model, {"prompt": prompts, "seeds": seeds})  # the folder's defaults: 2 steps, cfg:scale=1
    assert ours.nfe == [2, 2]

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    assert type(pipe).__name__ == model.family.pipeline_class(model)
    pipe.set_progress_bar_config(disable=True)
    noise, _ = initial_noise(seeds, model.latent_shape(size, size), torch.device("cpu"))
    latents = noise if model.family.name != "flux" else pipe._pack_latents(noise, 2, noise.shape[1], *noise.shape[2:])
    guidance = {"guidance_scale": 1.0} if model.family.name == "sd3" else {}
    theirs = pipe(
        prompts, num_inference_steps=2, latents=latents, height=size, width=size, output_type="np", **guidance
    ).images
    torch.testing.assert_close(ours.pixels.permute(0, 2, 3, 1), torch.as_tensor(theirs), rtol=0, atol=2e-3)

    conditions, _ = trainer._encode(prompts)
    batch = DistillBatch(
        prompts, seeds, torch.zeros(2), [0, 0], torch.zeros(2), [0, 0], None, len(trainer.student_ts) - 1
    )
    with torch.no_grad():
        own = decode(trainer.model, trainer.generate(batch, conditions["cond"], backbone=trainer.export_backbone()))
    torch.testing.assert_close(ours.pixels, own, rtol=0, atol=2e-3)
    assert isinstance(trainer.student_levels[-1], NoiseLevel)
