"""f-distill: the f's and their weightings against independent computations (finite differences, quadrature of
the divergence itself, DMD's formula), the trainer (a few steps, exact resume, bad config), and the exported
one-step student through our sampler and diffusers. Tiny models only."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffsteer.guidance.errors import InvalidInput
from diffsteer.training.fdistill import (
    DIVERGENCES,
    FDistillConfig,
    FDistillTrainer,
    batch_normalised,
    density_ratio,
    distribution_matching_loss,
    dmd_gradient,
    normalise_by_time_bin,
    regression_loss,
    student_scheduler_config,
    student_timesteps,
    time_bin_totals,
    time_bins,
)

RATIOS = torch.tensor([0.05, 0.3, 0.7, 1.0, 1.6, 4.0, 15.0], dtype=torch.float64)


# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_h_is_f_second_derivative_times_r_squared(name):
    """h(r) = f''(r)·r², with f'' from central second differences of f itself."""
    f, h = DIVERGENCES[name]
    d = 1e-4 * RATIOS
    second = (f(RATIOS + d) - 2 * f(RATIOS) + f(RATIOS - d)) / d**2
    torch.testing.assert_close(h(RATIOS), second * RATIOS**2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_each_f_is_an_f_divergence_generator(name):
    """f(1) = 0 and f convex (h > 0), so D_f ≥ 0 with equality at p = q."""
    f, h = DIVERGENCES[name]
    assert abs(float(f(torch.tensor(1.0, dtype=torch.float64)))) < 1e-12
    assert bool((h(RATIOS) > 0).all())


def _gaussian(x, mean, std):
    return torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_weighted_score_difference_is_the_gradient_of_the_divergence(name):
    """Xu et al. eq. 7 on a 1-D case: q_μ = N(μ, 1) (x = μ + z), p = N(0.3, 1.3²). d/dμ D_f(p‖q_μ) by finite
    differences of the divergence (quadrature of ∫ q f(p/q)) equals E_z[h(r)(s_q − s_p)] (quadrature)."""
    f, h = DIVERGENCES[name]
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    dx = x[1] - x[0]
    p = _gaussian(x, 0.3, 1.3)

    def divergence(mu):
        q = _gaussian(x, mu, 1.0)
        return float((q * f(p / q)).sum() * dx)

    mu, d = 0.8, 1e-4
    numeric = (divergence(mu + d) - divergence(mu - d)) / (2 * d)
    q = _gaussian(x, mu, 1.0)
    score_q, score_p = -(x - mu), -(x - 0.3) / 1.3**2
    formula = float((q * h(p / q) * (score_q - score_p)).sum() * dx)
    assert abs(numeric) > 1e-3
    assert formula == pytest.approx(numeric, rel=1e-4)


def test_reverse_kl_reproduces_the_dmd_gradient_on_a_hand_built_case():
    """Two images of two pixels. DMD (Yin et al. 2024, eq. 8): ∇ = (x̂0_fake − x̂0_real) / mean|x − x̂0_real|; the
    surrogate's gradient per element is that over the number of elements. Reverse KL's h ≡ 1 changes nothing."""
    gen = torch.tensor([[1.0, -1.0], [0.5, 2.0]], requires_grad=True)
    real = torch.tensor([[0.0, 0.0], [1.5, 1.0]])
    fake = torch.tensor([[2.0, -3.0], [0.5, 4.0]])
    # by hand: image 0: mean|x − real| = 1, fake − real = (2, −3); image 1: mean = 1, fake − real = (−1, 3)
    expected = torch.tensor([[2.0, -3.0], [-1.0, 3.0]]) / 4
    _, h = DIVERGENCES["reverse_kl"]
    weights = batch_normalised(h(torch.tensor([0.2, 7.0])))
    distribution_matching_loss(gen, dmd_gradient(gen, real, fake, weights)).backward()
    torch.testing.assert_close(gen.grad, expected, rtol=1e-5, atol=1e-6)
    # forward KL weights the images by r / mean(r)
    gen.grad = None
    _, h = DIVERGENCES["forward_kl"]
    distribution_matching_loss(
        gen, dmd_gradient(gen, real, fake, batch_normalised(h(torch.tensor([1.0, 3.0]))))
    ).backward()
    torch.testing.assert_close(gen.grad, expected * torch.tensor([[0.5], [1.5]]), rtol=1e-5, atol=1e-6)


def test_regression_loss_by_hand():
    """Mean over images of each image's mean squared latent difference: images off by 1 and by 2 → (1 + 4) / 2."""
    gen = torch.zeros(2, 1, 2, 2, requires_grad=True)
    target = torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 2.0)])
    loss = regression_loss(gen, target)
    assert loss.item() == pytest.approx(2.5)
    loss.backward()  # d/dgen = 2 (gen − target) / (pixels per image · images)
    torch.testing.assert_close(gen.grad, -2 * target / 8)


def test_density_ratio_clamps_clips_and_averages_positions():
    logits = torch.tensor([[0.0, 2.0], [50.0, 50.0], [-50.0, -50.0], [-1.0, -1.0]])
    r = density_ratio(logits, 0.1, 20.0, logit_clamp=10.0)
    torch.testing.assert_close(r, torch.tensor([math.e, 20.0, 0.1, math.exp(-1)]))
    assert not r.requires_grad


def test_time_bin_normalisation_by_hand():
    t = torch.tensor([0, 99, 100, 999])
    assert time_bins(t, 10, 1000).tolist() == [0, 0, 1, 9]
    ratio = torch.tensor([1.0, 3.0, 4.0, 0.5], dtype=torch.float64)
    running = torch.ones(10, dtype=torch.float64)
    normalised, new = normalise_by_time_bin(ratio, time_bins(t, 10, 1000), running, rate=0.5)
    # bin 0: 0.5·1 + 0.5·2 = 1.5; bin 1: 0.5 + 2 = 2.5; bin 9: 0.5 + 0.25 = 0.75; others untouched
    assert new[[0, 1, 9]].tolist() == pytest.approx([1.5, 2.5, 0.75])
    assert new[2:9].tolist() == [1.0] * 7
    assert normalised.tolist() == pytest.approx([1 / 1.5, 3 / 1.5, 4 / 2.5, 0.5 / 0.75], rel=1e-5)
    assert running.tolist() == [1.0] * 10  # not modified in place


def test_bin_totals_summed_over_shares_equal_the_whole_batch():
    """The statistics are sums and counts, so summing those of any split of the batch (what the all-reduce does)
    gives the whole batch's normaliser, and the split's local means would not: the weights of a batch of 8 split
    in two and normalised per half are off by several percent."""
    generator = torch.Generator().manual_seed(0)
    ratio = torch.exp(torch.randn(8, generator=generator, dtype=torch.float64) * 1.5)
    bins = time_bins(torch.randint(0, 1000, (8,), generator=generator), 4, 1000)
    running = torch.ones(4, dtype=torch.float64)
    halves = (slice(0, 4), slice(4, 8))
    whole, whole_running = normalise_by_time_bin(ratio, bins, running, 0.5)
    for mine, other in (halves, halves[::-1]):  # the all-reduce adds the other process's sums and counts

        def add_bin_totals(totals, other=other):
            return totals + time_bin_totals(ratio[other], bins[other], 4)

        def add_h_total(totals, other=other):
            return totals + torch.stack([ratio[other].sum(), torch.tensor(4.0, dtype=torch.float64)])

        part, part_running = normalise_by_time_bin(ratio[mine], bins[mine], running, 0.5, add_bin_totals)
        torch.testing.assert_close(part, whole[mine], rtol=1e-12, atol=0)
        torch.testing.assert_close(part_running, whole_running, rtol=1e-12, atol=0)
        torch.testing.assert_close(batch_normalised(ratio[mine], reduce=add_h_total), batch_normalised(ratio)[mine])
    local = torch.cat([batch_normalised(ratio[h]) for h in halves])
    assert float((local - batch_normalised(ratio)).abs().max()) > 0.01


def test_student_schedule_starts_at_the_last_timestep_and_ends_at_x0():
    from diffsteer.guidance.models import load_model

    config = student_scheduler_config(load_model("builtin:tiny", device="cpu").scheduler_config)
    assert student_timesteps(config, 1) == [999]
    assert student_timesteps(config, 4) == [999, 749, 499, 249]
    assert config["set_alpha_to_one"] is True


# ----------------------------------------------------------------------------- the trainer

TINY = dict(
    model="builtin:tiny",
    eval_prompts="",
    batch_size=2,
    threads=1,
    progress=False,
    tensorboard=False,
    fake_updates_per_step=2,
    learning_rate=1e-3,
    fake_learning_rate=1e-3,
    checkpoint_every=1,
    ema_decay=0.5,
)


def tiny_config(tmp_path: Path, **overrides) -> FDistillConfig:
    return FDistillConfig(**{**TINY, "output_dir": str(tmp_path / "run"), **overrides})


def _states(trainer: FDistillTrainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in trainer.modules.items():
        out.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    for name, ema in trainer.emas.items():
        out.update({f"ema.{name}.{k}": v for k, v in ema.state_dict().items()})
    for name, slot in trainer.optimizers.items():
        for i, s in slot.optimizer.state_dict()["state"].items():
            out.update({f"opt.{name}.{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    out["ratio_running"] = trainer.ratio_running.clone()
    return out


@pytest.mark.slow
def test_training_moves_every_network_and_resumes_exactly(tmp_path):
    """Four steps straight equal two steps, a new process-like trainer, and two more after --resume: the
    student, fake score, discriminator, the EMA, all three optimisers and the ratio bins (with the regression
    loss, whose pairs the resumed trainer samples again)."""
    regression = dict(regression_weight=0.5, regression_pairs=3, teacher_steps=2)
    straight = FDistillTrainer(tiny_config(tmp_path / "a", max_steps=4, divergence="js", steps=2, **regression))
    before = _states(straight)
    straight.train()
    after = _states(straight)
    for prefix in ("student.", "fake_score.", "discriminator.", "ema.student."):
        keys = [k for k in after if k.startswith(prefix)]
        assert keys and any((after[k] - before[k]).abs().max() > 0 for k in keys), prefix
    assert (after["ratio_running"] != 1).any()

    first = FDistillTrainer(tiny_config(tmp_path / "b", max_steps=2, divergence="js", steps=2, **regression))
    first.train()
    resumed = FDistillTrainer(tiny_config(tmp_path / "b", max_steps=4, divergence="js", steps=2, **regression))
    resumed.train(resume=True)
    again = _states(resumed)
    assert set(again) == set(after)
    for k in after:
        torch.testing.assert_close(again[k], after[k], rtol=0, atol=0, msg=k)
    rows = (Path(resumed.config.output_dir) / "metrics.csv").read_text().splitlines()
    assert any(r.startswith("4,train,loss.matching,") for r in rows)
    assert any(r.startswith("4,train,h_max,") for r in rows)
    assert any(r.startswith("4,train,loss.regression,") for r in rows)


RANK_SCRIPT = """
import json, sys, torch
from diffsteer.training.fdistill import FDistillConfig, FDistillTrainer
trainer = FDistillTrainer(FDistillConfig(**json.loads(sys.argv[1])))
rank = trainer.processes.rank
generator = torch.Generator().manual_seed(0)  # a fixed global batch of 8 logits; this process holds its half
logits, t = torch.randn(8, 3, generator=generator) * 2, torch.randint(0, 1000, (8,), generator=generator)
share = slice(4 * rank, 4 * rank + 4)
weights = trainer.f_weights(logits[share], t[share])
probe = {"weights": weights.tolist(), "running": trainer.ratio_running.tolist()}
trainer.ratio_running = torch.ones_like(trainer.ratio_running)
trainer.train()
print(json.dumps({"probe": probe, "running": trainer.ratio_running.tolist()}))
trainer.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-sd3"])
def test_two_gloo_processes_normalise_over_the_global_batch_and_equal_one_process(tmp_path, model):
    """Two processes (gloo) with batch 2 each against one with batch 4, on a UNet and on a flow transformer: h(r)'s
    batch mean and the time bins' running means are of the global batch (the normaliser equals the direct computation on all 8 images), every
    process holds the same running means (the checkpoint's, which rank 0 writes, so a resume restores them for
    every process), and the trained networks equal the one-process run's to rounding (batched kernels)."""
    from test_service_support import free_port

    from diffsteer.training.checkpoints import latest_checkpoint, load_checkpoint

    common = dict(model=model, max_steps=2, divergence="js", ratio_bins=4, ratio_ema=0.5, ema_decay=0.0)
    two = {**TINY, **common, "output_dir": str(tmp_path / "two")}
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, json.dumps(two)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    seen = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        seen.append(json.loads(out.strip().splitlines()[-1]))

    one = FDistillTrainer(tiny_config(tmp_path / "one", **{**common, "batch_size": 4}))
    generator = torch.Generator().manual_seed(0)
    logits, t = torch.randn(8, 3, generator=generator) * 2, torch.randint(0, 1000, (8,), generator=generator)
    direct = one.f_weights(logits, t)  # one process, all 8 images
    weights = torch.tensor(seen[0]["probe"]["weights"] + seen[1]["probe"]["weights"])
    torch.testing.assert_close(weights, direct, rtol=1e-6, atol=0)
    for rank in (0, 1):
        torch.testing.assert_close(torch.tensor(seen[rank]["probe"]["running"], dtype=torch.float64), one.ratio_running)
    one.ratio_running = torch.ones_like(one.ratio_running)
    before = {name: module.state_dict() for name, module in one.modules.items()}
    one.train()

    saved = load_checkpoint(latest_checkpoint(tmp_path / "two" / "checkpoints"))
    assert seen[0]["running"] == seen[1]["running"] == saved["extra"]["ratio_running"].tolist()
    torch.testing.assert_close(saved["extra"]["ratio_running"], one.ratio_running, rtol=1e-4, atol=0)
    assert (one.ratio_running != 1).any()
    for name, module in one.modules.items():
        after = module.state_dict()
        update_keys = [k for k in after if after[k].is_floating_point()]
        update = torch.cat([(after[k] - before[name][k]).flatten() for k in update_keys])
        error = torch.cat([(saved["modules"][name][k] - after[k]).flatten() for k in update_keys])
        relative = float(error.norm() / update.norm())
        print(f"{name}: 2 processes vs 1, |dw| / |update| = {relative:.3g}")
        assert update.norm() > 0 and relative <= 2e-3, (name, relative)


def test_reverse_kl_without_gan_has_no_discriminator_and_lora_student(tmp_path):
    trainer = FDistillTrainer(
        tiny_config(
            tmp_path,
            max_steps=1,
            divergence="reverse_kl",
            gan_weight=0.0,
            trainable="lora",
            fake_trainable="lora",
            export="both",
            ema_decay=0.0,
        )
    )
    assert set(trainer.optimizers) == {"student", "fake_score"} and trainer.discriminator is None
    summary = trainer.train()
    assert Path(summary["adapter"]).is_file() and (Path(summary["pipeline"]) / "model_index.json").is_file()


def test_teacher_samples_as_real_data(tmp_path):
    """real_data: teacher draws the discriminator's real samples from the teacher under teacher_policy."""
    trainer = FDistillTrainer(
        tiny_config(
            tmp_path,
            max_steps=1,
            real_data="teacher",
            prompts="pg-train:single",
            teacher_steps=2,
            divergence="forward_kl",
            fake_updates_per_step=1,
        )
    )
    batch = trainer.draw_batch(0, 0, 0)
    assert batch.real_images is None and all(p in trainer.train_prompts for p in batch.prompts)
    conditions, _ = trainer._encode(batch.prompts)
    from diffsteer.guidance.sampler import prepare

    expected = prepare(trainer.model, trainer._teacher_params(batch.prompts, batch.real_seeds)).run().latents
    torch.testing.assert_close(trainer.real_latents(batch, conditions), expected.float())
    assert trainer.train()["steps"] == 1


def test_regression_pairs_are_the_teachers_samples_from_the_students_noise(tmp_path):
    """With regression_weight > 0 the run samples fixed (prompt, seed) pairs from the teacher once; the student's
    update adds the latent MSE between its one-step sample from that seed's noise and the teacher's sample."""
    trainer = FDistillTrainer(
        tiny_config(
            tmp_path, max_steps=1, regression_weight=0.5, regression_pairs=5, teacher_steps=2, fake_updates_per_step=1
        )
    )
    from diffsteer.guidance.sampler import prepare

    prompts, seeds = trainer.pair_prompts, trainer.pair_seeds
    assert len(prompts) == len(seeds) == 5 and len(set(seeds)) == 5
    expected = prepare(trainer.model, trainer._teacher_params(prompts, seeds)).run().latents.float()
    torch.testing.assert_close(trainer.pair_samples, expected)

    batch = trainer.draw_batch(0, 0, trainer.config.fake_updates_per_step)
    assert batch.pairs is not None and trainer.draw_batch(0, 0, 0).pairs is None
    with torch.no_grad():
        cond = trainer._encode([prompts[i] for i in batch.pairs])[0]["cond"]
        student = trainer._x0(
            trainer.student,
            trainer._gaussian([seeds[i] for i in batch.pairs]),
            torch.full((len(batch.pairs),), trainer.student_ts[0]),
            cond,
        )
        by_hand = ((student - expected[batch.pairs]) ** 2).mean(dim=(1, 2, 3)).mean()
        torch.testing.assert_close(trainer.pair_regression_loss(batch.pairs), by_hand)
    trainer.train()
    rows = (Path(trainer.config.output_dir) / "metrics.csv").read_text().splitlines()
    assert any(r.startswith("1,train,loss.regression,") for r in rows)
    again = FDistillTrainer(
        tiny_config(
            tmp_path / "again",
            max_steps=1,
            regression_weight=0.5,
            regression_pairs=5,
            teacher_steps=2,
            fake_updates_per_step=1,
        )
    )
    assert again.pair_seeds == seeds and torch.equal(again.pair_samples, trainer.pair_samples)


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(tmp_path):
    """The student's, the fake score's and the discriminator's losses and gradients on one batch are the same with
    and without gradient_checkpointing, and with it each backbone call that takes a gradient runs again in the
    backward pass (it was recomputed, not stored)."""
    trainer = FDistillTrainer(tiny_config(tmp_path, max_steps=1, divergence="js", ema_decay=0.0))
    networks = {"student": trainer.student, "fake_score": trainer.fake_score, "discriminator": trainer.discriminator}
    calls = dict.fromkeys(["student", "fake_score", "teacher_mid_block"], 0)

    def counter(name):  # a pre-hook: a recomputation stops as soon as it has what the backward pass needs
        def hook(module, inputs):
            calls[name] += 1

        return hook

    hooks = [trainer.student.register_forward_pre_hook(counter("student"))]
    hooks.append(trainer.fake_score.register_forward_pre_hook(counter("fake_score")))
    hooks.append(trainer.model.backbone.mid_block.register_forward_pre_hook(counter("teacher_mid_block")))
    runs, running = {}, trainer.ratio_running.clone()
    for checkpointing in (False, True):
        trainer.config.gradient_checkpointing = checkpointing
        trainer.ratio_running = running.clone()  # the generator's loss moves the ratio's running means
        calls.update(dict.fromkeys(calls, 0))
        fake_loss, disc_loss, _ = trainer.critic_loss(trainer.draw_batch(0, 0, 0))
        (fake_loss + disc_loss).backward()
        loss, _ = trainer.generator_loss(trainer.draw_batch(0, 0, trainer.config.fake_updates_per_step))
        loss.backward()
        grads = {f"{n}.{k}": p.grad.clone() for n, m in networks.items() for k, p in m.named_parameters()}
        for m in networks.values():
            m.zero_grad(set_to_none=True)
        runs[checkpointing] = (torch.stack([fake_loss, disc_loss, loss]).detach(), grads, dict(calls))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=0, atol=0)
    assert runs[True][1].keys() == runs[False][1].keys()
    for key, grad in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], grad, rtol=1e-5, atol=1e-7, msg=key)
    plain, checkpointed = runs[False][2], runs[True][2]
    # the student's sample in both updates (the critics' without gradient), the fake score's loss, and the teacher's
    # features under the generator's GAN loss each run once more
    assert checkpointed["fake_score"] == plain["fake_score"] + 1
    assert checkpointed["student"] == plain["student"] + 1
    assert checkpointed["teacher_mid_block"] == plain["teacher_mid_block"] + 1


@pytest.mark.parametrize(
    "field,value",
    [
        ("divergence", "pearson"),
        ("regression_weight", -0.1),
        ("ratio_min", 0.0),
        ("ratio_min", 50.0),
        ("gan_weight", -1.0),
        ("fake_updates_per_step", 0),
        ("ratio_ema", 1.0),
        ("ema_decay", 1.0),
        ("timestep_min", 990),
        ("fake_learning_rate", 0.0),
        ("eta", 0.5),
        ("ratio_bins", -1),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, field, value):
    with pytest.raises(InvalidInput, match=field):
        tiny_config(tmp_path, **{field: value})


def test_bad_teacher_policy_and_timestep_name_the_field(tmp_path):
    with pytest.raises(InvalidInput, match="teacher_policy"):
        FDistillTrainer(tiny_config(tmp_path, teacher_policy="cfg:scale=-3"))
    with pytest.raises(InvalidInput, match="teacher_policy"):
        FDistillTrainer(tiny_config(tmp_path, teacher_policy="reno"))
    with pytest.raises(InvalidInput, match="timestep_max"):
        FDistillTrainer(tiny_config(tmp_path, timestep_max=1000))


def test_config_loads_from_the_cli_surface(tmp_path):
    from diffsteer.training.config_io import load_config

    path = tmp_path / "c.yaml"
    path.write_text("divergence: forward_kl\nsteps: 2\n")
    config = load_config(FDistillConfig, path, ["gan_weight=0.5"])
    assert (config.divergence, config.steps, config.gan_weight, config.export) == ("forward_kl", 2, 0.5, "pipeline")
    with pytest.raises(InvalidInput, match="divergence"):
        load_config(FDistillConfig, None, ["divergence=tv"])


# ----------------------------------------------------------------------------- the exported student


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fdistill-export")
    trainer = FDistillTrainer(tiny_config(tmp, max_steps=1))
    trainer.train()
    return trainer, Path(trainer.config.output_dir) / "pipeline"


def test_export_is_a_one_step_pipeline_that_our_sampler_and_diffusers_agree_on(exported):
    """The folder's scheduler makes one DDIM step from noise the student's x̂0; our sampler, diffusers'
    StableDiffusionPipeline and the trainer's own generator give the same image."""
    trainer, folder = exported
    defaults = json.loads((folder / "diffsteer.json").read_text())
    assert defaults == {"policy": "cfg:scale=1", "steps": 1, "native_size": trainer.model.default_size}
    from diffsteer.guidance.models import model_defaults

    assert (model_defaults(str(folder)).steps, model_defaults(str(folder)).policy) == (1, "cfg:scale=1")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["timestep_spacing"], scheduler["set_alpha_to_one"]) == ("trailing", True)

    _assert_one_step_agreement(trainer, folder)


def _assert_one_step_agreement(trainer: FDistillTrainer, folder: Path) -> None:
    """Our sampler on the exported folder, diffusers' StableDiffusionPipeline at one step, and the trainer's own
    generator give the same images."""
    from diffusers import StableDiffusionPipeline

    from diffsteer.guidance.latents import decode
    from diffsteer.guidance.models import load_model
    from diffsteer.guidance.sampler import generate, initial_noise

    model = load_model(str(folder), device="cpu")
    ours = generate(
        model,
        {
            "prompt": ["a red circle", "two blue squares"],
            "seeds": [3, 4],
            "steps": 1,
            "policy": "cfg:scale=1",
            "scheduler": "default",
        },
    )
    assert ours.nfe == [1, 1]
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    latents, _ = initial_noise(
        [3, 4], (4, model.unet.config.sample_size, model.unet.config.sample_size), torch.device("cpu")
    )
    theirs = pipe(
        ["a red circle", "two blue squares"],
        num_inference_steps=1,
        guidance_scale=0.0,
        latents=latents,
        output_type="np",
    ).images
    torch.testing.assert_close(ours.pixels.permute(0, 2, 3, 1), torch.as_tensor(theirs), rtol=0, atol=2e-3)

    from diffsteer.training.fdistill import DistillBatch

    conditions, _ = trainer._encode(["a red circle", "two blue squares"])
    batch = DistillBatch(
        ["a red circle", "two blue squares"],
        [3, 4],
        torch.zeros(2, dtype=torch.long),
        [0, 0],
        torch.zeros(2, dtype=torch.long),
        [0, 0],
        None,
        0,
    )
    with torch.no_grad():
        own = decode(trainer.model, trainer.generate(batch, conditions["cond"], backbone=trainer.export_backbone()))
    torch.testing.assert_close(ours.pixels, own, rtol=0, atol=2e-3)


def test_a_student_read_at_a_lower_timestep_exports_that_step(tmp_path):
    """student_timestep: the one step is at that timestep in training and in the exported scheduler (a schedule cut
    after it, every ᾱ the teacher's), so in our sampler and in diffusers; k steps trail below it."""
    from diffusers import DDIMScheduler

    trainer = FDistillTrainer(tiny_config(tmp_path, max_steps=1, student_timestep=399))
    assert trainer.student_ts == [399]
    trainer.train()
    folder = Path(trainer.config.output_dir) / "pipeline"
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    teacher = DDIMScheduler.from_config(trainer.model.scheduler_config)
    torch.testing.assert_close(scheduler.alphas_cumprod, teacher.alphas_cumprod[:400], rtol=0, atol=0)
    _assert_one_step_agreement(trainer, folder)
    assert FDistillTrainer(tiny_config(tmp_path / "two", student_timestep=399, steps=2)).student_ts == [399, 199]
    with pytest.raises(InvalidInput, match="student_timestep"):
        FDistillTrainer(tiny_config(tmp_path / "far", student_timestep=1000))


def test_reno_runs_on_the_exported_student(exported):
    from diffsteer.guidance.models import load_model
    from diffsteer.guidance.sampler import generate

    _, folder = exported
    model = load_model(str(folder), device="cpu")
    result = generate(
        model,
        {
            "prompt": "a red circle",
            "seed": 1,
            "steps": 1,
            "scheduler": "default",
            "policy": {"name": "reno", "reward": "saturation:1", "iterations": 2},
        },
    )
    assert result.images and result.nfe[0] >= 2


def test_the_service_serves_the_exported_student(exported):
    """``diffsteer serve --model OUT``: the service's one-step image is our sampler's."""
    from test_service_support import app_client, decode_image, pixels

    from diffsteer.guidance.models import load_model
    from diffsteer.guidance.sampler import generate

    _, folder = exported
    body = {"prompt": "a red circle", "steps": 1, "seed": 7, "scheduler": "default", "policy": "cfg:scale=1"}
    ours = generate(load_model(str(folder), device="cpu"), body).pixels[0]
    with app_client(model=str(folder)) as client:
        r = client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        served = pixels(decode_image(r.json()["images"][0]))
    assert (served - ours.permute(1, 2, 0).reshape(-1, 3)).abs().max() <= 1.5 / 255


def test_fp16_export_halves_unet_and_vae_and_leaves_the_run_fp32(exported):
    """``export_dtype: fp16`` (how the shipped students are stored): UNet and VAE weights fp16, the text encoder
    fp32, the folder readable by others, and the trainer's own modules untouched."""
    from safetensors import safe_open

    trainer, _ = exported
    folder = Path(trainer.config.output_dir) / "pipeline-fp16"
    trainer.config.export_dtype = "fp16"
    try:
        trainer.export_pipeline(folder)
    finally:
        trainer.config.export_dtype = "fp32"
    for part, dtype in (("unet", torch.float16), ("vae", torch.float16), ("text_encoder", torch.float32)):
        with safe_open(str(next((folder / part).glob("*.safetensors"))), "pt") as f:
            assert f.get_tensor(next(iter(f.keys()))).dtype == dtype, part
    from diffsteer.guidance.files import current_umask

    assert folder.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # not mkdtemp's private 0700
    assert next(trainer.model.vae.parameters()).dtype == torch.float32
    assert next(trainer.export_backbone().parameters()).dtype == torch.float32
