"""The shared trainer (training/trainer.py): runs that repeat bit for bit on the shipped model, exact resume after
SIGKILL, two processes (torchrun, gloo) that equal one process with the same global batch, LoRA α through
diffusers and the service, the pipeline export, several named modules/optimisers/EMA resumed exactly, and the
launch refusals. Few steps, tiny batches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from training_support import REPO, kill_after_checkpoint, read_adapter, start_training, training_env, wait_for_success

from diffsteer.guidance.errors import InvalidInput
from diffsteer.training.alignprop import AlignPropConfig, AlignPropTrainer
from diffsteer.training.trainer import Trainer, TrainerConfig

# The shipped default model, 2 sampling steps, one 64 px image per step: a few seconds per step on a CPU core.
PG = dict(
    model="builtin:proving-ground",
    prompts="pg-train:single",
    eval_prompts="",
    steps=2,
    batch_size=1,
    reward="saturation:1",
    threads=1,
    progress=False,
    tensorboard=False,
    learning_rate=0.005,
    truncation="uniform",
    truncation_k_min=1,
    truncation_k_max=2,
    checkpoint_every=100,
)


def _write_config(tmp_path: Path, name: str, **values) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**PG, "output_dir": str(tmp_path / name), **values}))
    return path


def _train_rows(folder: Path) -> list[tuple[int, str]]:
    rows = [line.split(",") for line in (folder / "metrics.csv").read_text().splitlines()[1:]]
    return [(int(r[0]), r[2]) for r in rows if r[1] == "train"]


# ----------------------------------------------------------------------------- same seed, same weights


def test_lora_initialisation_comes_from_the_seed_not_the_global_generator():
    from diffsteer.guidance.models import load_model
    from diffsteer.training.lora import add_lora, trainable_state

    states = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 5)):
        torch.manual_seed(global_seed)
        unet = load_model("builtin:tiny", device="cpu").unet
        add_lora(unet, 4, 4.0, seed=seed)
        states.append(trainable_state(unet))
    same, other = states[:2], states[2]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    a_keys = [k for k in other if ".lora_A." in k]
    assert a_keys and all(not torch.equal(other[k], same[0][k]) for k in a_keys)
    assert all(float(other[k].abs().max()) == 0 for k in other if ".lora_B." in k)  # B starts at zero


@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_bit_identical_adapters_on_the_shipped_model(tmp_path):
    adapters = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        AlignPropTrainer(
            AlignPropConfig(**{**PG, "output_dir": str(tmp_path / name), "max_steps": 2, "seed": seed})
        ).train()
        adapters.append(read_adapter(tmp_path / name))
    a, b, c = adapters
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # and the seed matters


@pytest.mark.slow
def test_sigkill_and_resume_on_the_shipped_model_equals_the_uninterrupted_run(tmp_path):
    common = dict(max_steps=4, checkpoint_every=1, keep_checkpoints=0, eta=1.0)
    module = "diffsteer.training.alignprop"
    whole = start_training(module, "--config", str(_write_config(tmp_path, "whole", **common)))
    cut = start_training(module, "--config", str(_write_config(tmp_path, "cut", **common)))
    kill_after_checkpoint(cut, tmp_path / "cut", step=2, timeout=400)
    resumed = start_training(module, "--config", str(tmp_path / "cut.yaml"), "--resume")
    wait_for_success(whole, resumed, timeout=400)
    a, b = read_adapter(tmp_path / "whole"), read_adapter(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted({s for s, _ in _train_rows(tmp_path / "cut")}) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- processes that agree


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """torchrun --nproc_per_node 2 with batch 1 per process, 3 steps, against one process with batch 1 x
    accumulation 2 (the same per-sample computations: equal to 1e-6) and with batch 2 (batched kernels round
    differently and the error grows through 3 Adam steps: within 2% of the largest update)."""
    two = _write_config(tmp_path, "two", max_steps=3)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "diffsteer.training.alignprop",
            "--config",
            str(two),
        ],
        cwd=REPO,
        env=training_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for name, values in (("accumulated", dict(gradient_accumulation_steps=2)), ("batched", dict(batch_size=2))):
        AlignPropTrainer(
            AlignPropConfig(**{**PG, "output_dir": str(tmp_path / name), "max_steps": 3, **values})
        ).train()
        runs[name] = read_adapter(tmp_path / name)
    distributed = read_adapter(tmp_path / "two")
    assert distributed.keys() == runs["batched"].keys()
    for key, value in distributed.items():
        torch.testing.assert_close(value, runs["accumulated"][key], rtol=0, atol=1e-6)
    # B ("lora.up") starts at zero, so its values are the update of the 3 steps
    update = max(float(v.abs().max()) for k, v in runs["batched"].items() if ".lora.up." in k)
    error = max(float((distributed[k] - runs["batched"][k]).abs().max()) for k in distributed)
    accumulated_error = max(float((distributed[k] - runs["accumulated"][k]).abs().max()) for k in distributed)
    print(
        f"2 processes x batch 1 vs 1 x batch 1 x accumulation 2: max |dw| {accumulated_error:.3g}; vs 1 x batch 2: "
        f"{error:.3g} (largest update {update:.3g})"
    )
    assert update > 1e-3 and error <= 0.02 * update, (error, update)
    # one row per step and metric (only rank 0 writes), the metrics averaged over the two processes
    rows = _train_rows(tmp_path / "two")
    assert len(rows) == len(set(rows)) and sorted({s for s, _ in rows}) == [1, 2, 3]
    assert sorted(rows) == sorted(_train_rows(tmp_path / "accumulated"))
    two_loss = dict((s, v) for s, m, v in _train_values(tmp_path / "two") if m == "loss")
    one_loss = dict((s, v) for s, m, v in _train_values(tmp_path / "accumulated") if m == "loss")
    assert two_loss.keys() == one_loss.keys() and all(abs(two_loss[s] - one_loss[s]) < 1e-5 for s in one_loss)


def _train_values(folder: Path) -> list[tuple[int, str, float]]:
    rows = [line.split(",") for line in (folder / "metrics.csv").read_text().splitlines()[1:]]
    return [(int(r[0]), r[2], float(r[3])) for r in rows if r[1] == "train"]


def test_devices_that_disagree_are_refused_naming_each_rank():
    from diffsteer.training.distributed import check_devices_agree

    check_devices_agree(["cuda:0", "cuda:1"])
    check_devices_agree(["cpu", "cpu"])
    with pytest.raises(InvalidInput, match=r"rank 0: cuda:0, rank 1: cpu") as info:
        check_devices_agree(["cuda:0", "cpu"])
    assert info.value.field == "device"


RANK_SCRIPT = """
import sys, torch
import diffsteer.training.distributed as d
from diffsteer.guidance.errors import InvalidInput
if d._env_int("RANK", 0) == 1:  # this rank resolves 'auto' to a GPU, as on a machine with one GPU for two ranks
    d.resolve_device = lambda requested, local_rank, world_size: torch.device("cuda", 0)
try:
    d.init_processes("auto")
except InvalidInput as e:
    print(e)
    sys.exit(2)
"""


@pytest.mark.slow
def test_two_processes_that_resolve_different_devices_both_refuse(tmp_path):
    from test_service_support import free_port

    env = {**training_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT],
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-2000:]
        assert "device: the processes disagree on the device (rank 0: cpu, rank 1: cuda:0)" in out


SHARE_SCRIPT = """
import json, torch
import diffsteer.training.distributed as d
p = d.init_processes("cpu")
done = []
def compute(i):
    done.append(i)
    return {"item": i, "by": p.rank, "latents": torch.full((2, 3), float(i))}
results = p.share_work(5, compute)
print(json.dumps({"done": done, "items": [r["item"] for r in results], "by": [r["by"] for r in results],
                  "values": [float(r["latents"].sum()) for r in results]}))
p.close()
"""


def test_share_work_computes_each_item_once_and_gives_every_process_all_of_them(tmp_path):
    import json

    from test_service_support import free_port

    env = {**training_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARE_SCRIPT],
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        seen = json.loads(out.strip().splitlines()[-1])
        assert seen["done"] == [i for i in range(5) if i % 2 == rank]
        assert seen["items"] == [0, 1, 2, 3, 4] and seen["by"] == [0, 1, 0, 1, 0]
        assert seen["values"] == [6.0 * i for i in range(5)]
    from diffsteer.training.distributed import Processes

    assert Processes().share_work(3, lambda i: i * i) == [0, 1, 4]


@pytest.mark.slow
def test_accelerate_single_process_cpu_launch_is_refused(tmp_path):
    """`accelerate launch --num_processes 2 --cpu` starts one process: the trainer says so instead of training."""
    config = _write_config(tmp_path, "acc", max_steps=1)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "2",
            "--cpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "diffsteer.training.alignprop",
            "--config",
            str(config),
        ],
        cwd=REPO,
        env=training_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "launcher: `accelerate launch --num_processes N --cpu` starts a single process" in proc.stderr
    assert "torchrun --nproc_per_node N" in proc.stderr
    assert not (tmp_path / "acc").exists()


# ----------------------------------------------------------------------------- exports


TINY = dict(
    model="builtin:tiny",
    prompts="pg-train:single",
    eval_prompts="",
    steps=4,
    batch_size=2,
    reward="saturation:1",
    threads=1,
    progress=False,
    tensorboard=False,
    learning_rate=0.05,
)


def test_an_adapter_with_alpha_8_rank_4_reproduces_the_trained_model_in_diffusers_and_the_service(tmp_path):
    from diffusers import StableDiffusionPipeline
    from test_service_support import assert_lora_served_like

    from diffsteer.guidance.models import load_model

    config = AlignPropConfig(
        **{
            **TINY,
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "lora_rank": 4,
            "lora_alpha": 8.0,
            "export": "both",
        }
    )
    trainer = AlignPropTrainer(config)
    summary = trainer.train()
    folder = Path(summary["adapter"]).parent
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 8, trainer.model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))

    def unet_out(unet):
        with torch.no_grad():
            return unet(x, 500, encoder_hidden_states=text).sample

    trained = unet_out(trainer.model.unet)
    pipe = load_model("builtin:tiny", device="cpu").to_pipeline()
    pipe.load_lora_weights(str(folder))
    torch.testing.assert_close(unet_out(pipe.unet), trained, rtol=1e-4, atol=1e-5)
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[0.5])  # scale 1 instead of α/r = 2: not the model
    assert (unet_out(pipe.unet) - trained).abs().max() > 1e-4

    # the whole pipeline folder: the LoRA merged into the UNet, loadable by diffusers and as a diffsteer model
    exported = StableDiffusionPipeline.from_pretrained(summary["pipeline"])
    torch.testing.assert_close(unet_out(exported.unet), trained, rtol=1e-4, atol=1e-5)
    assert not getattr(exported.unet, "peft_config", None)
    as_model = load_model(summary["pipeline"], device="cpu")
    torch.testing.assert_close(unet_out(as_model.unet), trained, rtol=1e-4, atol=1e-5)

    assert_lora_served_like(trainer.model, folder.parent, "alignprop")


def test_an_ema_of_the_lora_is_a_hand_computed_average_that_is_evaluated_exported_and_resumed_exactly(tmp_path):
    """``ema_decay`` on the default build: an average of the adapter only (no second UNet), e_k = d·e_(k−1) +
    (1 − d)·w_k from e_0 = w_0, swapped in for evaluation and export and back out for training."""
    from diffusers import StableDiffusionPipeline

    decay = 0.6
    config = dict(TINY, max_steps=3, ema_decay=decay, export="both", checkpoint_every=1)
    trainer = AlignPropTrainer(AlignPropConfig(**config, output_dir=str(tmp_path / "probe")))
    unet = trainer.model.unet

    def weights() -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in unet.named_parameters() if p.requires_grad}

    expected = weights()
    for _ in range(3):
        trainer.train_step()
        expected = {k: decay * expected[k] + (1 - decay) * w for k, w in weights().items()}
    ema = trainer.emas["backbone"]
    assert ema.average is None and set(ema.shadow) == set(expected) and all("lora" in k for k in expected)
    for k in expected:
        torch.testing.assert_close(ema.shadow[k], expected[k], rtol=1e-6, atol=1e-7)
    live = weights()
    assert max(float((live[k] - expected[k]).abs().max()) for k in live) > 1e-4  # the average is not the weights

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 8, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))

    def unet_out(module):
        with torch.no_grad():
            return module(x, 500, encoder_hidden_states=text).sample

    with trainer.averaged_weights():
        assert all(torch.equal(p, ema.shadow[k]) for k, p in weights().items())
        averaged = unet_out(unet)
    assert all(torch.equal(p, live[k]) for k, p in weights().items())  # training goes on from its own weights
    summary = trainer.export()
    pipe = StableDiffusionPipeline.from_pretrained(summary["pipeline"])
    torch.testing.assert_close(unet_out(pipe.unet), averaged, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, live[k]) for k, p in weights().items())

    whole = AlignPropTrainer(AlignPropConfig(**config, output_dir=str(tmp_path / "whole")))
    whole.train()
    AlignPropTrainer(AlignPropConfig(**{**config, "max_steps": 2}, output_dir=str(tmp_path / "cut"))).train()
    resumed = AlignPropTrainer(AlignPropConfig(**config, output_dir=str(tmp_path / "cut")))
    resumed.train(resume=True)
    a, b = whole.checkpoint_state()["ema"]["backbone"], resumed.checkpoint_state()["ema"]["backbone"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for k in expected:  # the same three steps as the probe
        torch.testing.assert_close(a[k], expected[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(InvalidInput, match="ema_decay"):
        TrainerConfig(ema_decay=1.0)


# ----------------------------------------------------------------------------- several modules, one checkpoint


class TwoOptimiserTrainer(Trainer):
    """A toy method with the shape of a distiller: the UNet's LoRA and a critic at different learning rates and
    update rates, an EMA of the critic, and an extra counter in the checkpoint."""

    name = "toy"

    def build(self) -> None:
        super().build()
        g = torch.Generator().manual_seed(self.config.seed)
        self.critic = torch.nn.Linear(4, 1)
        with torch.no_grad():
            for p in self.critic.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.register_module("critic", self.critic, "full")
        self.register_optimizer("critic", self.critic.parameters(), lr=0.1, max_grad_norm=0)
        self.critic_ema = self.register_ema("critic", self.critic, decay=0.5)
        self.critic_updates = 0

    def draw_batch(self, step, micro):
        seeds = self.step_rng(step).integers(0, 2**31 - 1, self.global_batch_size)[self.shard(micro)]
        return torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def training_step(self):
        x = self.draw_batch(self.step, 0)
        text = torch.zeros(len(x), 8, self.model.unet.config.cross_attention_dim)
        features = self.model.unet(x, 500, encoder_hidden_states=text).sample.mean(dim=(2, 3))
        critic_loss = (self.critic(features.detach()) - 1).pow(2).mean()
        self.backward(critic_loss, "critic")
        metrics = self.optimizer_step("critic")
        self.update_ema("critic")
        self.critic_updates += 1
        if self.step % 2 == 0:  # the UNet every second step
            self.backward(-self.critic(features).mean(), "backbone")
            metrics.update(self.optimizer_step("backbone"))
        return {"critic_loss": float(critic_loss.detach()), **{k: v for k, v in metrics.items() if k.startswith("lr")}}

    def extra_state(self):
        return {"critic_updates": self.critic_updates}

    def load_extra_state(self, state):
        self.critic_updates = int(state["critic_updates"])


def _toy(tmp_path: Path, name: str, **values) -> TwoOptimiserTrainer:
    config = TrainerConfig(
        **{
            "model": "builtin:tiny",
            "output_dir": str(tmp_path / name),
            "eval_prompts": "",
            "batch_size": 2,
            "threads": 1,
            "progress": False,
            "tensorboard": False,
            "learning_rate": 0.01,
            "warmup_steps": 2,
            **values,
        }
    )
    return TwoOptimiserTrainer(config)


def test_several_named_modules_optimisers_and_an_ema_checkpoint_and_resume_exactly(tmp_path):
    probe = _toy(tmp_path, "probe", max_steps=5)
    before = [p.detach().clone() for p in probe.critic_ema.parameters()]
    assert all(torch.equal(b, p) for b, p in zip(before, probe.critic.parameters()))
    probe.train_step()
    expected = [0.5 * b + 0.5 * p.detach() for b, p in zip(before, probe.critic.parameters())]
    assert all(torch.allclose(e, a) for e, a in zip(expected, probe.critic_ema.parameters()))

    whole = _toy(tmp_path, "whole", max_steps=5)
    whole.train()
    rows = {(s, m): v for s, m, v in _train_values(tmp_path / "whole")}
    assert rows[(1, "lr.critic")] == pytest.approx(0.05) and rows[(2, "lr.critic")] == pytest.approx(0.1)
    assert rows[(1, "lr.backbone")] == pytest.approx(0.005) and rows[(5, "lr.backbone")] == pytest.approx(0.01)
    assert (3, "lr.backbone") in rows and (2, "lr.backbone") not in rows  # the UNet stepped on steps 1, 3, 5 only

    _toy(tmp_path, "cut", max_steps=2).train()
    resumed = _toy(tmp_path, "cut", max_steps=5)
    resumed.train(resume=True)
    assert resumed.critic_updates == whole.critic_updates == 5
    for a, b in ((whole.checkpoint_state(), resumed.checkpoint_state()),):
        for group in ("modules", "ema"):
            for name in a[group]:
                assert all(torch.equal(a[group][name][k], b[group][name][k]) for k in a[group][name]), (group, name)
        for name in a["optimizers"]:
            sa, sb = a["optimizers"][name]["optimizer"]["state"], b["optimizers"][name]["optimizer"]["state"]
            assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    with pytest.raises(InvalidInput, match="export"):
        TrainerConfig(trainable="full")


def test_epoch_indices_visit_every_sample_once_per_epoch_whatever_the_split():
    """The dataset walk of a global batch of 6 is the same for 1 process x 6, 2 x 3, and 1 x 3 x accumulation 2."""
    from diffsteer.training.distributed import Processes

    def walk(world: int, batch: int, accumulation: int, steps: int, n: int) -> list[int]:
        out = []
        for step in range(steps):
            for micro in range(accumulation):
                for rank in range(world):
                    trainer = Trainer.__new__(Trainer)
                    trainer.config = TrainerConfig(batch_size=batch, gradient_accumulation_steps=accumulation, seed=9)
                    trainer.processes = Processes(rank=rank, world_size=world)
                    out += trainer.epoch_indices(step, micro, n).tolist()
        return out

    reference = walk(1, 6, 1, 5, 10)
    assert walk(2, 3, 1, 5, 10) == reference == walk(1, 3, 2, 5, 10)
    assert sorted(reference[:10]) == list(range(10)) and sorted(reference[10:20]) == list(range(10))
    assert reference[:10] != reference[10:20]  # a new order each epoch
    assert np.unique(reference[20:30]).size == 10
