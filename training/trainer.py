"""The shared trainer: one loop, one base config, and the hooks a training method fills in.

A method is one module, ``training/<method>.py`` (trl's pairing of ``<method>_config`` and ``<method>_trainer``):

* ``<Method>Config(TrainerConfig)``: its own fields, each with ``metadata={"help": ...}``; its ``__post_init__``
  calls ``super().__post_init__()`` and checks its fields (InvalidInput naming the field). A method may
  give a base field another default, keeping its help, with :func:`with_default`
  (a distiller: ``export: str = with_default("export", "pipeline")``).
* ``<Method>Trainer(Trainer)`` with ``name = "<method>"`` and these hooks:

  ``build()``            create what trains, and register it (default: a LoRA on ``self.model.backbone``, the
                         UNet or the flow transformer, or the whole backbone with ``trainable: full``, as module
                         ``"backbone"`` with optimiser ``"backbone"``; a checkpoint of an older run that named them
                         ``"unet"`` resumes under the new name):
                           ``self.register_module(name, module, state="trainable" | "full")``
                           ``self.register_optimizer(name, params, lr=..., **adamw)``  (AdamW + linear warm-up,
                             its own loss scaler; several, at different learning rates, are fine)
                           ``self.register_ema(name, module, decay)``  (an EMA copy to sample from, or with
                             ``trainable_only=True`` an average of the trainable parameters that is swapped
                             into the module for evaluation and export; moved by ``self.update_ema(name)``,
                             which the default ``training_step`` calls for every EMA after each step)
                         The default build keeps such an average of the LoRA (or backbone) when ``ema_decay`` > 0.
                         Everything registered is checkpointed, resumed exactly and (trainable parameters)
                         broadcast from rank 0 at start. Check rollout/data settings here too: it runs
                         before any training work.
  ``draw_batch(step, micro)``  this process's share of micro-batch ``micro`` of optimizer step ``step``. Draw the
                         global batch from ``self.step_rng(step)`` and keep ``self.shard(micro)`` of it, or use
                         ``self.epoch_indices(step, micro, n)`` for a dataset; per-sample noise from per-sample
                         seeds. Then N processes with batch B draw exactly what one process with batch N·B does.
  ``compute_loss(batch)`` -> ``(loss, metrics)``: the scalar loss of this process's batch (a mean over it) and
                         float metrics (averaged over micro-batches and processes before logging). It runs
                         outside autocast: wrap the model calls in ``with self.autocast():``. Call a backbone
                         (the trained one, a reference or teacher copy, a student) with
                         ``self.backbone_call(module, x, t, condition, checkpoint=...)``: the family's forward
                         on latents [B, C, h, w] (FLUX's packing inside), at scheduler timesteps ``t`` (VP: the
                         integer step; flow: σ·``self.num_train_timesteps``), whose noise level is
                         ``self.noise_level(t)``; targets from :mod:`diffsteer.guidance.parameterisation`.
  ``training_step()``    one optimizer step; the default accumulates ``compute_loss`` over
                         ``gradient_accumulation_steps`` micro-batches into every optimiser. Methods with several
                         losses (a generator and a critic at different rates) override it with the building
                         blocks ``self.backward(loss, optimizer)`` and ``self.optimizer_step(optimizer)``
                         (gradients averaged over processes, unscaled, clipped, stepped, scheduled, zeroed).
  ``eval_model()``       the DiffusionModel the held-out evaluation samples from (default ``self.model``).
  ``eval_reward()``      reward spec scored on evaluation images besides the verifier (default ``eval_reward``).
  ``export_backbone()``  the backbone written by a pipeline export and whose LoRA a LoRA export writes (default:
                         ``self.model.backbone``; a distiller returns its EMA student).
  ``extra_state()`` / ``load_extra_state(state)``  anything else a resumed run needs (tensors, numbers, strings).
  ``progress_postfix(metrics)`` what the progress bar shows.

* An entry in :data:`diffsteer.training.cli.METHODS` (``diffsteer train <method>``) and a ``main()`` calling
  ``diffsteer.training.cli.run_method("<method>", argv)`` (``python -m training.<method>``, ``torchrun ... -m training.<method>``).

How the export is chosen: ``config.export`` is ``lora`` (the backbone's adapter in diffusers format with its α,
``adapters/<adapter_name>/``, written through the family's pipeline class: ``unet_lora_layers`` or
``transformer_lora_layers``), ``pipeline`` (the family's whole diffusers pipeline folder, ``pipeline/``, the LoRA
merged into the weights: loads with that pipeline's ``from_pretrained`` and as a ``diffsteer`` model) or
``both``; :meth:`Trainer.export` may be overridden.

What the loop owns: device and precision (base weights in fp16/bf16 on GPU under autocast, ``auto``: bf16 for
the flow transformers, fp16 for UNets; trained parameters fp32, fp16 loss scaling), seeding
(``torch``/numpy/``random`` global generators from ``seed`` before ``build``, so even library initialisers repeat), accumulation, clipping, atomic checkpoints of every registered
module, optimiser, schedule, scaler and EMA with the config (resume refuses a config that changes the
experiment), SIGINT/SIGTERM (stop after the current step with a checkpoint, agreed by all processes),
held-out evaluation with the verifier on ``pg:`` prompts, ``metrics.csv``/TensorBoard/``reward_curve.png``,
and several processes (``torchrun --nproc_per_node N -m training.<method> --config ...``): the parameters
broadcast from rank 0, gradients and metrics averaged, only rank 0 writes files (see
:mod:`diffsteer.training.distributed`). One log row per step and metric whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from tqdm import tqdm

from diffsteer.evaluation.metrics import MetricScorer
from diffsteer.evaluation.prompts import load_prompts
from diffsteer.evaluation.runner import run_arm
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.families import Condition
from diffsteer.guidance.files import atomic_directory
from diffsteer.guidance.models import load_model
from diffsteer.guidance.parameterisation import NoiseLevel
from diffsteer.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from diffsteer.training.config_io import plain_defaults, to_plain
from diffsteer.training.distributed import (
    full_tensor,
    gathered_optimizer_state,
    gathered_state,
    init_processes,
    is_sharded,
    load_gathered_optimizer_state,
    load_gathered_state,
    shard_like,
    shard_module,
)
from diffsteer.training.logs import TrainingLog
from diffsteer.training.lora import (
    add_lora,
    has_lora,
    load_trainable_state,
    merged_backbone,
    resolve_targets,
    save_lora_weights,
    trainable_state,
)

# Fields a resumed run may change; any other difference between the checkpoint's config and the new one is an
# error, since it would silently make the resumed run a different experiment. A method adds its own with
# ``Trainer.resumable_changes``.
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "checkpoint_every",
        "keep_checkpoints",
        "eval_every",
        "eval_batch_size",
        "log_every",
        "tensorboard",
        "progress",
        "output_dir",
        "threads",
        "sample_grid_images",
        "export",
        "adapter_name",
        "export_dtype",
    }
)


@dataclass
class TrainerConfig:
    """Fields every training method shares (training/trainer.py); a method's config extends this."""

    # --- model and run folder
    model: str = field(
        default="builtin:proving-ground",
        metadata={"help": "Model to fine-tune: a diffusers folder, a .safetensors file, a hub id, or builtin:NAME."},
    )
    output_dir: str = field(
        default="runs/train",
        metadata={
            "help": "Run folder: checkpoints/, metrics.csv, tensorboard/, samples/, adapters/<adapter_name>/, pipeline/."
        },
    )
    adapter_name: str = field(
        default="adapter",
        metadata={
            "help": "Name of the exported LoRA (adapters/<name>/pytorch_lora_weights.safetensors; serve with "
            "--lora-dir <output_dir>/adapters and lora name <name>)."
        },
    )
    export: Literal["lora", "pipeline", "both"] = field(
        default="lora",
        metadata={
            "help": "What the run writes at the end: lora (adapters/<adapter_name>/, diffusers format with its alpha), "
            "pipeline (pipeline/: the family's whole diffusers pipeline with the trained backbone, LoRA merged), "
            "or both."
        },
    )
    export_dtype: Literal["fp32", "fp16", "bf16"] = field(
        default="fp32",
        metadata={
            "help": "Weights of the exported pipeline's backbone and VAE: fp32, fp16 (half the size, as the shipped "
            "proving-ground models; the text encoder stays fp32, which keeps diffusers' latents fp32) or bf16 "
            "(the flow transformers' own dtype)."
        },
    )
    # --- held-out evaluation (and the sampling of methods that sample while training)
    eval_prompts: str = field(
        default="pg:all",
        metadata={
            "help": "Held-out evaluation prompts (pg:... adds the exact verifier), or a prompt file; '' disables."
        },
    )
    eval_seeds: int = field(default=2, metadata={"help": "Seeds per evaluation prompt (fixed across the run)."})
    eval_max_prompts: int | None = field(
        default=6, metadata={"help": "Evaluation prompts kept (per category for pg:); null keeps all."}
    )
    eval_reward: str = field(
        default="",
        metadata={
            "help": "Reward scored on the evaluation images besides the verifier, 'name:weight,...' "
            "('': the method's own reward where it has one, else none)."
        },
    )
    policy: str = field(
        default="cfg:scale=3",
        metadata={
            "help": "Guidance policy of the evaluation samples (and of a method's rollouts), e.g. 'cfg:scale=7.5'."
        },
    )
    scheduler: str = field(
        default="ddim", metadata={"help": "Sampler of the evaluation (see `diffsteer generate --help`)."}
    )
    steps: int = field(default=20, metadata={"help": "Denoising steps per sample."})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta (0: deterministic; 1: DDPM-like noise)."})
    height: int | None = field(default=None, metadata={"help": "Image height (null: the model's native size)."})
    width: int | None = field(default=None, metadata={"help": "Image width (null: the model's native size)."})
    # --- what trains (the default build)
    trainable: Literal["lora", "full"] = field(
        default="lora",
        metadata={
            "help": "lora: a LoRA adapter on the backbone, UNet or transformer (lora_* fields); full: every backbone "
            "weight (kept in fp32)."
        },
    )
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=4.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_targets: tuple[str, ...] = field(
        default=("attention",),
        metadata={
            "help": "Backbone module names that get adapters, matched as suffixes of module paths; 'attention' is the "
            "attention projections under diffusers' names: to_q, to_k, to_v, to_out.0, and on SD3/FLUX/Qwen-Image "
            "transformers also add_q_proj, add_k_proj, add_v_proj, to_add_out where present."
        },
    )
    # --- optimisation
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (after warm-up)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up, in optimizer steps."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW decoupled weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this (0: no clipping)."})
    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "Exponential moving average of the trained weights, ema <- d * ema + (1 - d) * weights after every "
            "optimizer step (0: none). With d > 0 the held-out evaluation and the export use the average; its "
            "time constant is about 1 / (1 - d) steps (0.97: the last ~33 steps)."
        },
    )
    batch_size: int = field(
        default=4,
        metadata={
            "help": "Samples per micro-batch per process (the global batch is batch_size x processes x accumulation)."
        },
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches accumulated per optimizer step."}
    )
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps of the run."})
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = field(
        default="no",
        metadata={
            "help": "no (fp32), fp16 (with loss scaling), bf16, or auto (bf16 for the flow transformers, whose "
            "activations overflow fp16; fp16 for UNets): base weights and autocast in that dtype on GPU; trained "
            "parameters stay fp32. CPU runs are fp32."
        },
    )
    sharding: Literal["none", "fsdp"] = field(
        default="none",
        metadata={
            "help": "none: every process holds the whole model (gradients all-reduced); fsdp: torch's FSDP2 "
            "(fully_shard) shards the backbone's parameters, gradients and AdamW state over the processes block by "
            "block, for full fine-tuning of a model too large for one device (trainable: full; checkpoints and "
            "exports hold the gathered weights; one process shards over a group of one)."
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "auto (cuda:LOCAL_RANK where that GPU exists, else cpu), cpu, cuda (cuda:LOCAL_RANK), cuda:N "
            "(one process only). All processes must agree."
        },
    )
    threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads per process (null: torch's default)."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of every random draw: the adapter's initialisation, the data, the noise."}
    )
    # --- checkpoints, evaluation, logs
    checkpoint_every: int = field(default=25, metadata={"help": "Write an atomic checkpoint every N optimizer steps."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept (0: all)."})
    eval_every: int = field(
        default=25,
        metadata={
            "help": "Evaluate on the held-out prompts every N steps (and always before the first and after the last)."
        },
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Images per evaluation batch."})
    sample_grid_images: int = field(default=16, metadata={"help": "Evaluation images saved as a grid in samples/."})
    log_every: int = field(default=1, metadata={"help": "Write training metrics every N steps."})
    tensorboard: bool = field(default=True, metadata={"help": "Also write TensorBoard events."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

    def __post_init__(self) -> None:
        positive = (
            "steps",
            "lora_rank",
            "batch_size",
            "gradient_accumulation_steps",
            "max_steps",
            "checkpoint_every",
            "eval_every",
            "eval_batch_size",
            "log_every",
            "eval_seeds",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidInput(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("keep_checkpoints", "warmup_steps", "sample_grid_images", "max_grad_norm", "weight_decay", "eta"):
            if getattr(self, name) < 0:
                raise InvalidInput(name, f"must be non-negative, got {getattr(self, name)}")
        if not 0 < self.learning_rate < 1:
            raise InvalidInput("learning_rate", f"must be in (0, 1), got {self.learning_rate}")
        if not 0 <= self.ema_decay < 1:
            raise InvalidInput("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.lora_alpha <= 0:
            raise InvalidInput("lora_alpha", f"must be positive, got {self.lora_alpha}")
        if not self.lora_targets:
            raise InvalidInput("lora_targets", "at least one module name is required")
        if not self.adapter_name or "/" in self.adapter_name or self.adapter_name.startswith("."):
            raise InvalidInput("adapter_name", f"must be a plain file name, got {self.adapter_name!r}")
        if self.threads is not None and self.threads < 1:
            raise InvalidInput("threads", f"must be at least 1 or null, got {self.threads}")
        if self.trainable == "full" and self.export in ("lora", "both"):
            raise InvalidInput("export", "trainable: full has no LoRA to export; use export: pipeline")
        if self.sharding == "fsdp" and self.trainable != "full":
            raise InvalidInput(
                "sharding", "fsdp shards a full fine-tune (trainable: full); a LoRA run keeps its frozen base whole"
            )
        if self.sharding == "fsdp" and self.mixed_precision == "fp16":
            raise InvalidInput("mixed_precision", "fp16 loss scaling is not sharded; use bf16 with sharding: fsdp")


def with_default(name: str, default: Any) -> Any:
    """A :class:`TrainerConfig` field with another default and the same help, for a method's config:
    ``output_dir: str = with_default("output_dir", "runs/mymethod")``."""
    return field(default=default, metadata=TrainerConfig.__dataclass_fields__[name].metadata)


@dataclass
class EvalResult:
    step: int
    metrics: dict[str, float]
    images: list[np.ndarray]


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the trainer wrote a checkpoint of the last complete step before raising this."""


@dataclass
class RegisteredModule:
    module: torch.nn.Module
    state: Literal["trainable", "full"]  # what a checkpoint holds: trainable parameters, or the whole state_dict
    sharded: bool = False  # FSDP2: the state is gathered (every process calls state_dict; rank 0 gets it)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.sharded:
            return gathered_state(self.module)
        if self.state == "trainable":
            return trainable_state(self.module)
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.sharded:
            load_gathered_state(self.module, state)
        elif self.state == "trainable":
            load_trainable_state(self.module, state)
        else:
            self.module.load_state_dict(state)

    def synced_tensors(self) -> list[torch.Tensor]:
        """What rank 0 broadcasts at start (a sharded module was made rank 0's before it was sharded)."""
        if self.sharded:
            return []
        if self.state == "trainable":
            return [p for _, p in sorted(self.module.named_parameters()) if p.requires_grad]
        return [t for _, t in sorted(self.module.state_dict(keep_vars=True).items())]


@dataclass
class RegisteredOptimizer:
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]
    max_grad_norm: float
    sharded_module: torch.nn.Module | None = None  # FSDP2: the module whose sharded parameters it steps

    def state_dict(self) -> dict[str, Any]:
        if self.sharded_module is not None:  # every process calls it; rank 0 gets the gathered state
            optimizer = gathered_optimizer_state(self.sharded_module, self.optimizer)
        else:
            optimizer = self.optimizer.state_dict()
        return {"optimizer": optimizer, "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sharded_module is not None:
            load_gathered_optimizer_state(self.sharded_module, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])


@dataclass
class RegisteredEMA:
    """ema <- decay * ema + (1 - decay) * weights: of a whole module (``average``, a frozen copy a method samples
    from) or, where ``average`` is None, of the module's trainable parameters only (``shadow``, swapped into the
    module by :meth:`swapped_in` for evaluation and export: a LoRA's average costs the adapter, not a second UNet)."""

    source: torch.nn.Module
    average: torch.nn.Module | None
    decay: float
    shadow: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def reset(self) -> None:
        """The average := the current weights."""
        if self.average is None:
            self.shadow = {k: p.detach().clone() for k, p in self.source.named_parameters() if p.requires_grad}
        else:
            self.average.load_state_dict(self.source.state_dict())

    @torch.no_grad()
    def update(self) -> None:
        weights = dict(self.source.named_parameters())
        averages = self.shadow.items() if self.average is None else self.average.named_parameters()
        for key, avg in averages:
            avg.lerp_(weights[key].detach().to(avg.dtype), 1 - self.decay)
        if self.average is not None:
            for (_, avg), (_, buf) in zip(self.average.named_buffers(), self.source.named_buffers()):
                avg.copy_(buf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages (gathered where the module is sharded: every process calls it)."""
        items = self.shadow.items() if self.average is None else self.average.state_dict().items()
        return {k: full_tensor(v.detach()).cpu().clone() for k, v in items}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.average is not None:
            self.average.load_state_dict(state)
            return
        if set(state) != set(self.shadow):
            raise ValueError(f"the averaged parameters differ: {sorted(set(state) ^ set(self.shadow))[:4]}")
        for key, value in state.items():
            self.shadow[key].copy_(shard_like(value, self.shadow[key]))

    @contextlib.contextmanager
    def swapped_in(self):
        """For the duration, the module's trainable parameters hold their averages (nothing to do for a copy)."""
        if self.average is not None:
            yield
            return
        params = dict(self.source.named_parameters())
        live = {k: params[k].detach().clone() for k in self.shadow}
        with torch.no_grad():
            for key, avg in self.shadow.items():
                params[key].copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for key, value in live.items():
                    params[key].copy_(value)


class Trainer:
    """Runs one training job; subclasses fill in the hooks listed in the module docstring."""

    name = "train"
    resumable_changes: frozenset[str] = frozenset()
    eval_summary_metrics: tuple[str, ...] = ("reward", "verifier.passed")

    def __init__(self, config: TrainerConfig, model: Any = None):
        """``model``: an already loaded :class:`~diffsteer.guidance.models.DiffusionModel` to train in place of
        ``config.model`` (benchmarks, notebooks); it must be on the device the config asks for."""
        self.config = c = config
        self.out = Path(c.output_dir)
        if c.threads is not None:
            torch.set_num_threads(c.threads)
        self.processes = init_processes(c.device, group_for_one=c.sharding == "fsdp")
        try:
            self._start(model)
        except BaseException:  # a refused start leaves the group it made (a live group at exit can abort Python)
            self.processes.close()
            raise

    def _start(self, model: Any) -> None:
        """Everything of ``__init__`` after joining the processes: the model, what trains, rank 0's weights."""
        c = self.config
        self.device = device = self.processes.device
        on_gpu = device.type == "cuda"
        dtypes = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "auto": "auto"}
        requested = dtypes[c.mixed_precision] if on_gpu else torch.float32
        seed_everything(c.seed)
        if model is None:
            model = load_model(c.model, device=device, dtype=requested)
        self.model = model
        self.weight_dtype = model.dtype if requested == "auto" else requested
        self.autocast_dtype = self.weight_dtype if on_gpu and self.weight_dtype != torch.float32 else None
        for module in (self.model.vae, *self.model.text_encoders, self.model.backbone):
            module.requires_grad_(False)
        # the scheduler's training timesteps T: VP timesteps are the integers 0 … T − 1; a flow model at σ ∈ [0, 1]
        # is called at timestep σ·T, as its diffusers scheduler does
        self.num_train_timesteps = int(model.scheduler_config.get("num_train_timesteps", 1000))
        self.modules: dict[str, RegisteredModule] = {}
        self.optimizers: dict[str, RegisteredOptimizer] = {}
        self.emas: dict[str, RegisteredEMA] = {}
        self.step = 0
        self.eval_items = self._load_eval_items()
        self.build()
        if not self.optimizers:
            raise TypeError(f"{type(self).__name__}.build registered no optimizer")
        if (
            c.export in ("lora", "both")
            and type(self).export is Trainer.export
            and not has_lora(self.export_backbone())
        ):
            raise InvalidInput(
                "export", f"{c.export!r} needs a LoRA on the backbone and this run trains none; use export: pipeline"
            )
        self.processes.broadcast_([t for m in self.modules.values() for t in m.synced_tensors()])
        for ema in self.emas.values():
            ema.reset()

    # ------------------------------------------------------------------ registration (called from build)

    def register_module(
        self, name: str, module: torch.nn.Module, state: Literal["trainable", "full"] = "trainable"
    ) -> None:
        """Checkpoint ``module`` under ``name``: its trainable parameters (``trainable``) or its whole state."""
        if name in self.modules:
            raise ValueError(f"module {name!r} is registered twice")
        self.modules[name] = RegisteredModule(module, state, is_sharded(module))

    def register_optimizer(
        self,
        name: str,
        params: list[torch.nn.Parameter],
        *,
        lr: float | None = None,
        warmup_steps: int | None = None,
        max_grad_norm: float | None = None,
        betas: tuple[float, float] | None = None,
        weight_decay: float | None = None,
    ) -> None:
        """An AdamW over ``params`` with a linear warm-up and its own fp16 loss scaler; unset arguments take
        the config's values."""
        c = self.config
        if name in self.optimizers:
            raise ValueError(f"optimizer {name!r} is registered twice")
        params = list(params)
        if not params:
            raise ValueError(f"optimizer {name!r} has no parameters")
        warmup = c.warmup_steps if warmup_steps is None else warmup_steps
        optimizer = torch.optim.AdamW(
            params,
            lr=c.learning_rate if lr is None else lr,
            betas=betas or (c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
            weight_decay=c.weight_decay if weight_decay is None else weight_decay,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        owner = self._sharded_owner(params)
        self.optimizers[name] = RegisteredOptimizer(
            optimizer, schedule, scaler, params, c.max_grad_norm if max_grad_norm is None else max_grad_norm, owner
        )

    def _sharded_owner(self, params: list[torch.nn.Parameter]) -> torch.nn.Module | None:
        """The registered sharded module whose parameters ``params`` are (None for unsharded parameters)."""
        if not any(isinstance(p, DTensor) for p in params):
            return None
        wanted = {id(p) for p in params}
        for slot in self.modules.values():
            if slot.sharded and wanted <= {id(p) for p in slot.module.parameters()}:
                return slot.module
        raise ValueError("sharded parameters must belong to one registered module (register it before its optimizer)")

    def register_ema(
        self, name: str, module: torch.nn.Module, decay: float, trainable_only: bool = False
    ) -> torch.nn.Module | None:
        """An exponential moving average of ``module``'s weights, ema ← decay·ema + (1 − decay)·weights at each
        ``update_ema(name)``: a frozen copy (returned), or with ``trainable_only`` an average of the parameters that
        require grad (None returned), which :meth:`averaged_weights` swaps into ``module``."""
        if name in self.emas:
            raise ValueError(f"EMA {name!r} is registered twice")
        if not 0 <= decay < 1:
            raise InvalidInput("ema_decay", f"must be in [0, 1), got {decay}")
        if is_sharded(module) and not trainable_only:
            raise ValueError(f"EMA {name!r}: a sharded module's average is kept with trainable_only=True")
        average = None if trainable_only else copy.deepcopy(module).requires_grad_(False).eval()
        self.emas[name] = RegisteredEMA(module, average, decay)  # set from the weights once they are broadcast
        return average

    def update_ema(self, name: str) -> None:
        self.emas[name].update()

    @contextlib.contextmanager
    def averaged_weights(self):
        """Every ``trainable_only`` EMA swapped into its module for the duration (evaluation and export)."""
        with contextlib.ExitStack() as stack:
            for ema in self.emas.values():
                stack.enter_context(ema.swapped_in())
            yield

    # ------------------------------------------------------------------ hooks

    def build(self) -> None:
        """Default: train ``self.model.backbone`` (a LoRA, or every weight with ``trainable: full``) with one AdamW,
        registered as module, optimiser (and EMA) ``"backbone"``."""
        c = self.config
        backbone = self.model.backbone
        if c.trainable == "lora":
            try:
                params = add_lora(backbone, c.lora_rank, c.lora_alpha, c.lora_targets, seed=c.seed)
            except ValueError as e:
                raise InvalidInput("lora_targets", str(e)) from None
            self.register_module("backbone", backbone, "trainable")
        else:
            backbone.float().requires_grad_(True)
            if c.sharding == "fsdp":
                shard_module(backbone, self.processes)
            params = list(backbone.parameters())
            self.register_module("backbone", backbone, "full")
        self.register_optimizer("backbone", params)
        if c.ema_decay > 0:
            self.register_ema("backbone", backbone, c.ema_decay, trainable_only=True)

    def draw_batch(self, step: int, micro: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement draw_batch(step, micro)")

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss(batch)")

    def training_step(self) -> dict[str, float]:
        """One optimizer step of every optimiser over ``gradient_accumulation_steps`` micro-batches, then every
        registered EMA moves."""
        c = self.config
        totals: dict[str, float] = {}
        for micro in range(c.gradient_accumulation_steps):
            loss, metrics = self.compute_loss(self.draw_batch(self.step, micro))
            self.backward(loss / c.gradient_accumulation_steps)
            metrics["loss"] = float(loss.detach())
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / c.gradient_accumulation_steps
        totals.update(self.optimizer_step())
        for name in self.emas:
            self.update_ema(name)
        return totals

    def eval_model(self):
        return self.model

    def eval_reward(self) -> str:
        return self.config.eval_reward

    def export_backbone(self) -> torch.nn.Module:
        return self.model.backbone

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics.get('loss', float('nan')):.4g}"}

    # ------------------------------------------------------------------ building blocks of a step

    def noise_level(self, timesteps: torch.Tensor) -> NoiseLevel:
        """The :class:`NoiseLevel` of each sample's training timestep [N] (see :attr:`num_train_timesteps`),
        broadcasting over latents [N, C, h, w]: VP ᾱ from the scheduler's table, flow σ = t / T."""
        t = timesteps.to(self.device)
        if self.model.family.schedule == "flow":
            return NoiseLevel.flow((t.float() / self.num_train_timesteps).view(-1, 1, 1, 1))
        if not hasattr(self, "_alpha_bars"):
            self._alpha_bars = self.model.fresh_scheduler().alphas_cumprod.float().to(self.device)
        return NoiseLevel.vp(self._alpha_bars[t.long()].view(-1, 1, 1, 1))

    def backbone_call(
        self,
        module: torch.nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        condition: Condition,
        *,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """One training call of ``module`` (the model's backbone, or a copy of it: reference, teacher, student,
        critic) on latents ``x`` [B, C, h, w] at scheduler timesteps ``t`` (a scalar or [B]; see
        :meth:`noise_level`) through the family's forward (FLUX packs and unpacks inside), in the module's dtype;
        the output in ``x``'s layout and dtype, in the model's prediction space (``self.model.prediction_type``).
        ``checkpoint``: recompute the call in the backward pass instead of storing its activations (when grad is
        on). Call it inside ``self.autocast()`` as any model call."""
        forward = self.model.family.forward
        dtype = next(module.parameters()).dtype
        x_in, t_in = x.to(dtype), t.to(x.device)
        if checkpoint and torch.is_grad_enabled():
            out = activation_checkpoint(forward, module, x_in, t_in, condition, use_reentrant=False)
        else:
            out = forward(module, x_in, t_in, condition)
        return out.to(x.dtype)

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor, optimizer: str | None = None) -> None:
        """``loss.backward()`` through the loss scaler of ``optimizer`` (None: the first registered)."""
        name = optimizer or next(iter(self.optimizers))
        self.optimizers[name].scaler.scale(loss).backward()

    def optimizer_step(self, *names: str) -> dict[str, float]:
        """Step the named optimisers (none named: all): average the gradients over processes, unscale, clip,
        step, advance the warm-up, zero the gradients. Returns ``grad_norm`` and ``lr`` (suffixed ``.<name>``
        when there are several optimisers)."""
        metrics: dict[str, float] = {}
        names = names or tuple(self.optimizers)
        for name in names:
            slot = self.optimizers[name]
            lr = slot.optimizer.param_groups[0]["lr"]  # the rate this step uses (warm-up included)
            if slot.sharded_module is None:  # FSDP has reduce-scattered (averaged) a sharded module's gradients
                self.processes.average_gradients_(slot.params)
            slot.scaler.unscale_(slot.optimizer)
            limit = slot.max_grad_norm if slot.max_grad_norm > 0 else math.inf
            norm = full_tensor(torch.nn.utils.clip_grad_norm_(slot.params, limit))
            slot.scaler.step(slot.optimizer)
            slot.scaler.update()
            slot.schedule.step()
            slot.optimizer.zero_grad(set_to_none=True)
            suffix = "" if len(self.optimizers) == 1 else f".{name}"
            metrics[f"grad_norm{suffix}"] = float(norm)
            metrics[f"lr{suffix}"] = lr
        return metrics

    def train_step(self) -> dict[str, float]:
        """:meth:`training_step`, then the step counter advances; the metrics (with ``step_s``) averaged over the
        processes, as logged."""
        t0 = time.perf_counter()
        metrics = self.training_step()
        self.step += 1
        metrics["step_s"] = time.perf_counter() - t0
        return self.processes.mean_metrics(metrics)

    # ------------------------------------------------------------------ deterministic data

    @property
    def global_batch_size(self) -> int:
        return self.global_size(self.config.batch_size)

    def global_size(self, per_process: int) -> int:
        """Items of one optimizer step over all processes and micro-batches, ``per_process`` per micro-batch each."""
        return per_process * self.processes.world_size * self.config.gradient_accumulation_steps

    def step_rng(self, step: int) -> np.random.Generator:
        """The generator of optimizer step ``step``'s global batch (the same in every process)."""
        return np.random.default_rng([self.config.seed, step])

    def shard(self, micro: int, batch: int | None = None) -> slice:
        """This process's positions in the global batch for micro-batch ``micro``: the global batch is laid out
        micro-batch by micro-batch, process by process, ``batch`` (default ``batch_size``) each."""
        b = batch or self.config.batch_size
        start = (micro * self.processes.world_size + self.processes.rank) * b
        return slice(start, start + b)

    def epoch_indices(self, step: int, micro: int, n: int, batch: int | None = None) -> np.ndarray:
        """Dataset indices of this process's share of a micro-batch (``batch`` items, default ``batch_size``),
        walking each epoch's permutation of ``range(n)`` (seeded by ``seed`` and the epoch) in global-batch order:
        every sample once per epoch."""
        per_step = self.global_size(batch or self.config.batch_size)
        positions = step * per_step + np.arange(per_step)[self.shard(micro, batch)]
        out = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(positions // n):
            mask = positions // n == epoch
            out[mask] = np.random.default_rng([self.config.seed, int(epoch), 1]).permutation(n)[positions[mask] % n]
        return out

    # ------------------------------------------------------------------ evaluation

    def _load_eval_items(self) -> list[Any]:
        c = self.config
        if not c.eval_prompts:
            return []

        try:
            return load_prompts(c.eval_prompts, seeds=c.eval_seeds, seed=0, max_prompts=c.eval_max_prompts).items
        except InvalidInput as e:
            raise InvalidInput("eval_prompts", e.reason) from None

    def generation_params(self, prompts: list[str], seeds: list[int]) -> dict[str, Any]:
        """Sampling parameters of the evaluation (and of a method's rollouts) for ``prompts`` at ``seeds``."""
        c = self.config
        params = {
            "prompt": prompts,
            "seeds": seeds,
            "steps": c.steps,
            "scheduler": c.scheduler,
            "eta": c.eta,
            "policy": c.policy,
        }
        params.update({k: v for k, v in (("height", c.height), ("width", c.width)) if v is not None})
        return params

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """The held-out prompts at fixed seeds under the current weights: the verifier's rates on ``pg:`` prompts
        and the mean of :meth:`eval_reward` (metric ``reward``)."""
        c = self.config
        if not self.eval_items:
            return EvalResult(self.step, {}, [])
        model = self.eval_model()
        extra = {k: v for k, v in self.generation_params([], []).items() if k in ("eta", "height", "width")}
        with self.autocast():
            records = run_arm(
                model,
                self.eval_items,
                c.policy,
                steps=c.steps,
                scheduler=c.scheduler,
                batch_size=c.eval_batch_size,
                extra=extra,
            )
        specs = [r.item.meta.spec for r in records]  # meta: the prompt's PromptEntry; spec: pg: prompts only
        reward = self.eval_reward()
        names = ([f"reward:{reward}"] if reward else []) + (["verifier"] if all(s is not None for s in specs) else [])
        metrics: dict[str, float] = {}
        if names:
            rows = MetricScorer(names, device=model.device).score(
                [r.image for r in records], [r.item.prompt for r in records], specs
            )
            if reward:
                metrics["reward"] = float(np.mean([row[f"reward:{reward}"] for row in rows]))
            for key in (
                "verifier.passed",
                "verifier.colour_correct",
                "verifier.shape_correct",
                "verifier.count_correct",
            ):
                values = [row[key] for row in rows if row.get(key) is not None]
                if values:
                    metrics[key] = float(np.mean(values))
        return EvalResult(self.step, metrics, [r.image for r in records])

    def save_grid(self, result: EvalResult) -> Path | None:
        images = result.images[: self.config.sample_grid_images]
        if not images:
            return None
        columns = self.config.eval_seeds if len(images) % self.config.eval_seeds == 0 else min(4, len(images))
        columns = max(columns, math.ceil(math.sqrt(len(images))))
        rows = math.ceil(len(images) / columns)
        h, w = images[0].shape[:2]
        grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
        for i, image in enumerate(images):
            grid.paste(Image.fromarray(image), ((i % columns) * w, (i // columns) * h))
        path = self.out / "samples" / f"step-{result.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": json.dumps(to_plain(self.config)),
            "modules": {n: m.state_dict() for n, m in self.modules.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "ema": {n: e.state_dict() for n, e in self.emas.items()},
            "extra": self.extra_state(),
        }

    @property
    def sharded(self) -> bool:
        """Whether a registered module is sharded (FSDP2): then every process takes part in gathering the
        checkpoint, in the evaluation and in the export."""
        return any(m.sharded for m in self.modules.values())

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes the checkpoint of the current step atomically (the others wait for it, or, where modules
        are sharded, gather it with rank 0 first)."""
        path = None
        state = self.checkpoint_state() if self.processes.is_main or self.sharded else None
        if self.processes.is_main:
            path = save_checkpoint(self.out / "checkpoints", self.step, state, self.config.keep_checkpoints)
        self.processes.barrier()
        return path

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        if "modules" not in state:
            raise InvalidInput(
                "--resume",
                f"{path} was written before the shared trainer (no named modules); "
                "it cannot be resumed: start a new run in another output_dir",
            )
        # a field the checkpoint's version did not have yet (ema_decay, ...) is read at its default
        saved, current = {**plain_defaults(self.config), **json.loads(state["config"])}, to_plain(self.config)
        # targets are compared by the modules they name ('attention' or its names, as older runs wrote them)
        for config in (saved, current):
            config["lora_targets"] = list(resolve_targets(self.model.backbone, config["lora_targets"]))
        state = with_legacy_names(state)
        resumable = RESUMABLE_CHANGES | self.resumable_changes
        changed = sorted(k for k in current if k not in resumable and saved.get(k) != current[k])
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise InvalidInput(
                "--resume", f"the config differs from the checkpoint's in fields that change the run: {details}"
            )
        for kind, mine, theirs in (
            ("modules", self.modules, state["modules"]),
            ("optimizers", self.optimizers, state["optimizers"]),
            ("ema", self.emas, state["ema"]),
        ):
            if set(mine) != set(theirs):
                raise InvalidInput(
                    "--resume", f"the checkpoint holds {kind} {sorted(theirs)}, this run has {sorted(mine)}"
                )
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        for name, slot in self.optimizers.items():
            slot.load_state_dict(state["optimizers"][name])
        for name, ema in self.emas.items():
            ema.load_state_dict(state["ema"][name])
        self.load_extra_state(state["extra"])
        self.step = int(state["step"])

    # ------------------------------------------------------------------ export

    def export(self) -> dict[str, str]:
        """Write what ``config.export`` asks for (the averaged weights where there is an EMA); returns
        {"adapter": path, "pipeline": path}. Rank 0 writes; where the backbone is sharded every process calls this
        and takes part in gathering it first."""
        written: dict[str, str] = {}
        with self.averaged_weights():
            exported = self.export_backbone()
            whole = self.unsharded(exported)
            if not self.processes.is_main:
                return written
            if self.config.export in ("lora", "both"):
                written["adapter"] = str(self.export_lora(self.out / "adapters" / self.config.adapter_name))
            if self.config.export in ("pipeline", "both"):
                gathered = () if whole is exported else (whole,)  # a method's override takes the directory alone
                written["pipeline"] = str(self.export_pipeline(self.out / "pipeline", *gathered))
        return written

    def unsharded(self, module: torch.nn.Module) -> torch.nn.Module | None:
        """``module`` itself, or for a sharded diffusers model a whole copy of it on the CPU of rank 0 (None on
        the others) built from its config and the gathered weights (every process must call this)."""
        if not is_sharded(module):
            return module
        state = gathered_state(module)
        if not self.processes.is_main:
            return None
        whole = type(module).from_config(module.config).to(next(iter(state.values())).dtype)
        whole.load_state_dict(state)
        return whole.eval()

    def export_lora(self, directory: Path) -> Path:
        backbone = self.export_backbone()
        if not has_lora(backbone):
            raise InvalidInput("export", "the trained backbone has no LoRA adapter; use export: pipeline")
        return save_lora_weights(dataclasses.replace(self.model, backbone=backbone), directory)

    def export_pipeline(self, directory: Path, backbone: torch.nn.Module | None = None) -> Path:
        """The family's whole diffusers pipeline (``save_pretrained``, safetensors) whose backbone is ``backbone``
        (default :meth:`export_backbone`) with any LoRA merged; written beside ``directory`` and renamed into
        place, replacing an older export."""
        backbone, vae = merged_backbone(backbone or self.export_backbone()), self.model.vae
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.config.export_dtype)
        if dtype is not None:  # copies: the run's own modules stay as they are
            backbone, vae = copy.deepcopy(backbone).to(dtype), copy.deepcopy(vae).to(dtype)
        pipe = dataclasses.replace(self.model, backbone=backbone, vae=vae).to_pipeline()
        with atomic_directory(directory) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        return directory

    # ------------------------------------------------------------------ the run

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run (or resume) the job to ``max_steps``; returns the summary also written to ``summary.json``."""
        c = self.config
        main = self.processes.is_main
        latest = latest_checkpoint(self.out / "checkpoints") if resume else None
        if latest is not None:
            self.restore(latest)
        elif not resume and (self.out / "checkpoints").is_dir() and any((self.out / "checkpoints").iterdir()):
            raise InvalidInput(
                "output_dir", f"{self.out} already holds checkpoints; pass --resume or choose another folder"
            )
        self.processes.barrier()  # every process has checked the folder before rank 0 writes to it
        log = (
            TrainingLog(self.out, resume_step=self.step if latest is not None else None, tensorboard=c.tensorboard)
            if main
            else None
        )
        stop = _StopSignals()
        try:
            if self.step == 0:
                self._evaluate_and_log(log)
            bar = tqdm(
                total=c.max_steps,
                initial=self.step,
                desc=self.name,
                disable=not (c.progress and main),
                dynamic_ncols=True,
            )
            while self.step < c.max_steps:
                metrics = self.train_step()
                bar.update(1)
                bar.set_postfix(self.progress_postfix(metrics))
                if main and self.step % c.log_every == 0:
                    log.log(self.step, "train", metrics)
                last = self.step == c.max_steps
                if self.step % c.eval_every == 0 or last:
                    self._evaluate_and_log(log)
                stopping = self.processes.any(stop.requested is not None)
                if self.step % c.checkpoint_every == 0 or last or stopping:
                    self.save_checkpoint()
                if stopping:
                    raise TrainingInterrupted(
                        f"stopped by {stop.requested or 'a signal to another process'} after "
                        f"step {self.step}; resume with --resume"
                    )
            bar.close()
            summary: dict[str, Any] = {"steps": self.step}
            if main or self.sharded:
                summary.update(self.export())
            if main:
                log.plot(self.out / "reward_curve.png", eval_metrics=self.eval_summary_metrics)
                evals = {m: dict(zip(*map(list, log.series("eval", m)))) for m in self.eval_summary_metrics}
                summary["eval"] = {m: {str(k): v for k, v in s.items()} for m, s in evals.items() if s}
                (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            self.processes.barrier()
        finally:
            stop.restore()
            if log is not None:
                log.close()
        return summary

    def _evaluate_and_log(self, log) -> None:
        """Rank 0 evaluates and logs; the others wait (or, where modules are sharded, evaluate alongside: every
        process takes part in each backbone call)."""
        if self.processes.is_main or self.sharded:
            with self.averaged_weights():
                result = self.evaluate()
        if self.processes.is_main:
            if result.metrics:
                log.log(self.step, "eval", result.metrics)
                self.save_grid(result)
        self.processes.barrier()

    def close(self) -> None:
        """Leave the process group (if this trainer joined one)."""
        self.processes.close()


def with_legacy_names(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of a run from before the default build trained any backbone (module, optimiser and EMA
    ``"unet"``) under the current name ``"backbone"``."""
    renamed = dict(state)
    for kind in ("modules", "optimizers", "ema"):
        group = state[kind]
        if "unet" in group and "backbone" not in group:
            renamed[kind] = {("backbone" if k == "unet" else k): v for k, v in group.items()}
    return renamed


def seed_everything(seed: int) -> None:
    """Seed the global generators (torch on every device, numpy, random) that library code draws from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (with a checkpoint), in the main thread."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
