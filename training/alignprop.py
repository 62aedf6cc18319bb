"""AlignProp: reward fine-tuning of a text-to-image model by backpropagating the reward through sampling.

Prabhudesai, Goyal, Pathak & Fragkiadaki 2023, "Aligning Text-to-Image Diffusion Models with Reward
Backpropagation" (arXiv:2310.03739). With a LoRA adapter θ on the UNet, images are sampled by the full
reverse process x_T ~ N(0, I) → x_0 = f_θ(x_T, c), decoded by the VAE, and the model is trained to maximise
a differentiable reward by gradient ascent through the whole chain (Sec. 4.1):

    θ ← θ + η ∇_θ E_{c, x_T}[ r(D(f_θ(x_T, c)), c) ]

made affordable by (Sec. 4.2) LoRA, gradient checkpointing of every UNet call (memory independent of the
number of steps, at one extra forward each) and randomized truncated backpropagation (the gradient flows
through the last K steps only; see :mod:`training.truncation` for the strategies and how K is drawn). Here the
reward is any composite of :mod:`rewards` and the objective is its ReNO-style loss Σ_i w_i (o_i − r_i), whose
gradient is that of −Σ_i w_i r_i. Sampling is the project's own sampler under any guidance policy (CFG by
default; APG, schedules, ...) with any scheduler (DDIM with ``eta`` as in the paper).

Everything random in a step (prompts, seeds, truncation windows) is drawn from a generator seeded by
(``seed``, step, micro-batch, process), so a resumed run repeats the uninterrupted one exactly: a checkpoint
holds the adapter, the optimiser, the learning-rate schedule and the loss scaler, and nothing else is needed.

    diffsteer train alignprop --config alignprop.yaml [--resume] [--set max_steps=200]
    diffsteer train alignprop --print-config > alignprop.yaml
    accelerate launch -m training.alignprop --config alignprop.yaml      # several GPUs
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from guidance.errors import InvalidInput
from training.truncation import STRATEGIES, TruncationStrategy, draw_truncation, window_mask

# Fields a resumed run may change; any other difference between the checkpoint's config and the new one is an
# error, since it would silently make the resumed run a different experiment.
RESUMABLE_CHANGES = frozenset({
    "max_steps", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batch_size", "log_every",
    "tensorboard", "progress", "output_dir", "threads", "sample_grid_images",
})


@dataclass
class AlignPropConfig:
    """AlignProp: LoRA fine-tuning by reward backpropagation through the sampler (training/alignprop.py)."""

    # --- model and data
    model: str = field(default="builtin:proving-ground", metadata={
        "help": "Model to fine-tune: a diffusers folder, a .safetensors file, a hub id, or builtin:NAME."})
    output_dir: str = field(default="runs/alignprop", metadata={
        "help": "Run folder: checkpoints/, metrics.csv, tensorboard/, samples/, adapters/<adapter_name>/."})
    adapter_name: str = field(default="alignprop", metadata={
        "help": "Name of the exported LoRA (adapters/<name>/pytorch_lora_weights.safetensors; serve with "
                "--lora-dir <output_dir>/adapters and lora name <name>)."})
    prompts: str = field(default="pg-train:all", metadata={
        "help": "Training prompts: pg-train:all, pg-train:CATEGORY[,...], or a text / GenEval / Parti file."})
    eval_prompts: str = field(default="pg:all", metadata={
        "help": "Held-out evaluation prompts (pg:... adds the exact verifier), or a prompt file; '' disables."})
    eval_seeds: int = field(default=2, metadata={"help": "Seeds per evaluation prompt (fixed across the run)."})
    eval_max_prompts: int | None = field(default=6, metadata={
        "help": "Evaluation prompts kept (per category for pg:); null keeps all."})
    # --- objective
    reward: str = field(default="clip:1", metadata={
        "help": "Differentiable reward, 'name:weight[:offset],...' (e.g. 'hps:1', 'aesthetic:1,clip:0.01'); "
                "weights are configured as for the service (the proving-ground clip needs none)."})
    # --- sampling
    policy: str = field(default="cfg:scale=3", metadata={
        "help": "Guidance policy of the training rollouts (and the evaluation), e.g. 'cfg:scale=7.5', 'apg:scale=5'."})
    scheduler: str = field(default="ddim", metadata={"help": "Sampler of the rollouts (see `diffsteer generate --help`)."})
    steps: int = field(default=20, metadata={"help": "Denoising steps per rollout."})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta (0: deterministic; 1: DDPM-like noise)."})
    height: int | None = field(default=None, metadata={"help": "Image height (null: the model's native size)."})
    width: int | None = field(default=None, metadata={"help": "Image width (null: the model's native size)."})
    # --- truncated backpropagation
    truncation: TruncationStrategy = field(default="fixed", metadata={
        "help": f"How many final steps each trajectory backpropagates through: {', '.join(STRATEGIES)}."})
    truncation_k: int = field(default=1, metadata={"help": "fixed: K (K ≥ steps: full backpropagation)."})
    truncation_k_min: int = field(default=1, metadata={"help": "uniform: smallest K."})
    truncation_k_max: int = field(default=10, metadata={"help": "uniform: largest K."})
    truncation_k_mean: float = field(default=5.0, metadata={"help": "gaussian: mean of K."})
    truncation_k_std: float = field(default=2.0, metadata={"help": "gaussian: standard deviation of K."})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "Recompute every UNet call and the VAE decoder in the backward pass instead of storing activations."})
    # --- LoRA
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=4.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_targets: tuple[str, ...] = field(default=("to_q", "to_k", "to_v", "to_out.0"), metadata={
        "help": "UNet module names that get adapters (attention projections by default)."})
    # --- optimisation
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (after warm-up)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up, in optimizer steps."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW decoupled weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this (0: no clipping)."})
    batch_size: int = field(default=4, metadata={"help": "Images per rollout (per process)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Rollouts accumulated per optimizer step."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps of the run."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={
        "help": "no (fp32), fp16 (with loss scaling) or bf16: base weights and autocast in that dtype on GPU; "
                "the LoRA parameters stay fp32."})
    device: str = field(default="auto", metadata={"help": "auto (accelerate's choice), cpu, cuda, cuda:1."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (null: torch's default)."})
    seed: int = field(default=0, metadata={"help": "Seed of the prompts, noise and truncation draws."})
    # --- checkpoints, evaluation, logs
    checkpoint_every: int = field(default=25, metadata={"help": "Write an atomic checkpoint every N optimizer steps."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept (0: all)."})
    eval_every: int = field(default=25, metadata={
        "help": "Evaluate on the held-out prompts every N steps (and always before the first and after the last)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Images per evaluation batch."})
    sample_grid_images: int = field(default=16, metadata={"help": "Evaluation images saved as a grid in samples/."})
    log_every: int = field(default=1, metadata={"help": "Write training metrics every N steps."})
    tensorboard: bool = field(default=True, metadata={"help": "Also write TensorBoard events."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

    def __post_init__(self) -> None:
        positive = ("steps", "lora_rank", "batch_size", "gradient_accumulation_steps", "max_steps",
                    "checkpoint_every", "eval_every", "eval_batch_size", "log_every", "eval_seeds", "truncation_k")
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidInput(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("keep_checkpoints", "warmup_steps", "sample_grid_images", "max_grad_norm", "weight_decay",
                     "eta", "truncation_k_std"):
            if getattr(self, name) < 0:
                raise InvalidInput(name, f"must be non-negative, got {getattr(self, name)}")
        if not 0 < self.learning_rate < 1:
            raise InvalidInput("learning_rate", f"must be in (0, 1), got {self.learning_rate}")
        if self.truncation == "uniform" and not 1 <= self.truncation_k_min <= self.truncation_k_max:
            raise InvalidInput("truncation_k_min", "uniform truncation needs 1 ≤ truncation_k_min ≤ truncation_k_max")
        if not self.lora_targets:
            raise InvalidInput("lora_targets", "at least one module name is required")
        if not self.adapter_name or "/" in self.adapter_name or self.adapter_name.startswith("."):
            raise InvalidInput("adapter_name", f"must be a plain file name, got {self.adapter_name!r}")


@dataclass
class EvalResult:
    step: int
    metrics: dict[str, float]
    images: list[np.ndarray]


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the trainer wrote a checkpoint of the last complete step before raising this."""


class AlignPropTrainer:
    """Runs one AlignProp job described by an :class:`AlignPropConfig` (see the module docstring)."""

    def __init__(self, config: AlignPropConfig, model: Any = None):
        """``model``: an already loaded :class:`~guidance.models.DiffusionModel` to fine-tune in place of
        ``config.model`` (benchmarks, notebooks); it must be on the device the config asks for."""
        from accelerate import Accelerator

        from guidance.models import load_model
        from guidance.reward_models import get_reward
        from training.lora import add_lora
        from training.prompts import load_training_prompts

        self.config = c = config
        self.out = Path(c.output_dir)
        if c.threads is not None:
            torch.set_num_threads(c.threads)
        self.accelerator = Accelerator(mixed_precision=c.mixed_precision, cpu=c.device == "cpu")
        device = self.accelerator.device if c.device in ("auto", "cpu") else torch.device(c.device)
        on_gpu = device.type == "cuda"
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(c.mixed_precision, torch.float32)
        self.autocast_dtype = weight_dtype if on_gpu and c.mixed_precision != "no" else None
        if model is None:
            model = load_model(c.model, device=device, dtype=weight_dtype if on_gpu else torch.float32)
        self.model = model
        for module in (self.model.vae, *self.model.text_encoders):
            module.requires_grad_(False)
        try:
            self.params = add_lora(self.model.unet, c.lora_rank, c.lora_alpha, c.lora_targets)
        except ValueError as e:
            raise InvalidInput("lora_targets", str(e)) from None
        self.reward = get_reward(c.reward, device, torch.float32, field="reward")
        if not self.reward.differentiable:
            raise InvalidInput("reward", f"{c.reward!r} has a non-differentiable term; AlignProp needs gradients")
        self.train_prompts = load_training_prompts(c.prompts)
        self.eval_items = self._load_eval_items()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon,
            weight_decay=c.weight_decay,
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        self.step = 0
        self._check_rollout()

    # ------------------------------------------------------------------ setup

    def _load_eval_items(self) -> list[Any]:
        c = self.config
        if not c.eval_prompts:
            return []
        from evaluation.prompts import load_prompts

        try:
            return load_prompts(c.eval_prompts, seeds=c.eval_seeds, seed=0, max_prompts=c.eval_max_prompts).items
        except InvalidInput as e:
            raise InvalidInput("eval_prompts", e.reason) from None

    def generation_params(self, prompts: list[str], seeds: list[int]) -> dict[str, Any]:
        c = self.config
        params = {"prompt": prompts, "seeds": seeds, "steps": c.steps, "scheduler": c.scheduler, "eta": c.eta,
                  "policy": c.policy}
        params.update({k: v for k, v in (("height", c.height), ("width", c.width)) if v is not None})
        return params

    def _check_rollout(self) -> None:
        """Validate the sampling fields (policy, scheduler, size...) before any training work."""
        from guidance.sampler import prepare

        prepare(self.model, self.generation_params(self.train_prompts[:1], [0]), limits=self._limits())

    def _limits(self):
        from guidance.request import Limits

        n = max(self.config.batch_size, self.config.eval_batch_size)
        return Limits(max_num_images=max(n, Limits.max_num_images))

    # ------------------------------------------------------------------ one optimizer step

    def draw_batch(self, step: int, micro: int) -> tuple[list[str], list[int], np.ndarray]:
        c = self.config
        rng = np.random.default_rng([c.seed, step, micro, self.accelerator.process_index])
        prompts = [self.train_prompts[i] for i in rng.integers(0, len(self.train_prompts), c.batch_size)]
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, c.batch_size)]
        ks = draw_truncation(
            c.truncation, rng, c.batch_size, c.steps, k=c.truncation_k, k_min=c.truncation_k_min,
            k_max=c.truncation_k_max, k_mean=c.truncation_k_mean, k_std=c.truncation_k_std,
        )
        return prompts, seeds, ks

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(self.model.device.type, dtype=self.autocast_dtype)

    def rollout_loss(self, prompts: list[str], seeds: list[int], ks: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        """Sample with gradients through each image's last K steps, decode, score; the loss and its metrics."""
        from guidance.sampler import decode, prepare

        c = self.config
        with self._autocast():
            prepared = prepare(self.model, self.generation_params(prompts, seeds), limits=self._limits(),
                               gradient_checkpointing=c.gradient_checkpointing)
            trajectory = prepared.run(grad_at_step=window_mask(ks, c.steps))
            images = decode(self.model, trajectory.latents, checkpoint=c.gradient_checkpointing)
        result = self.reward.evaluate(images.float(), prompts)
        metrics = {"reward": float(result.total_score.detach().mean())}
        if len(result.scores) > 1:
            metrics.update({f"reward.{n}": float(s.detach().mean()) for n, s in result.scores.items()})
        metrics["k_mean"] = float(np.mean(ks))
        return result.loss, metrics

    def train_step(self) -> dict[str, float]:
        """One optimizer step (``gradient_accumulation_steps`` rollouts); returns its metrics."""
        c = self.config
        t0 = time.perf_counter()
        totals: dict[str, float] = {}
        for micro in range(c.gradient_accumulation_steps):
            loss, metrics = self.rollout_loss(*self.draw_batch(self.step, micro))
            self.scaler.scale(loss / c.gradient_accumulation_steps).backward()
            metrics["loss"] = float(loss.detach())
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / c.gradient_accumulation_steps
        self.scaler.unscale_(self.optimizer)
        if self.accelerator.num_processes > 1:
            # The adapter is updated by hand rather than through DDP, which does not support the partial graphs
            # of truncated backpropagation with checkpointing: average the gradients across processes here.
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm if c.max_grad_norm > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        totals.update(grad_norm=float(norm), lr=self.lr_schedule.get_last_lr()[0], step_s=time.perf_counter() - t0)
        return totals

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """The held-out prompts at fixed seeds under the current adapter: mean reward (and the verifier's rates)."""
        from evaluation.metrics import MetricScorer
        from evaluation.runner import run_arm

        c = self.config
        if not self.eval_items:
            return EvalResult(self.step, {}, [])
        extra = {k: v for k, v in self.generation_params([], []).items() if k in ("eta", "height", "width")}
        with self._autocast():
            records = run_arm(self.model, self.eval_items, c.policy, steps=c.steps, scheduler=c.scheduler,
                              batch_size=c.eval_batch_size, extra=extra)
        specs = [r.item.meta.spec for r in records]  # meta: the prompt's PromptEntry; spec: pg: prompts only
        names = [f"reward:{c.reward}"] + (["verifier"] if all(s is not None for s in specs) else [])
        rows = MetricScorer(names, device=self.model.device).score(
            [r.image for r in records], [r.item.prompt for r in records], specs
        )
        metrics: dict[str, float] = {"reward": float(np.mean([row[f"reward:{c.reward}"] for row in rows]))}
        for key in ("verifier.passed", "verifier.colour_correct", "verifier.shape_correct", "verifier.count_correct"):
            values = [row[key] for row in rows if row.get(key) is not None]
            if values:
                metrics[key] = float(np.mean(values))
        return EvalResult(self.step, metrics, [r.image for r in records])

    def save_grid(self, result: EvalResult) -> Path | None:
        from PIL import Image

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
        from training.config_io import to_plain
        from training.lora import trainable_state

        return {
            "step": self.step,
            "adapter": trainable_state(self.model.unet),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": json.dumps(to_plain(self.config)),
        }

    def save_checkpoint(self) -> Path | None:
        from training.checkpoints import save_checkpoint

        if not self.accelerator.is_main_process:
            return None
        return save_checkpoint(self.out / "checkpoints", self.step, self.checkpoint_state(), self.config.keep_checkpoints)

    def restore(self, path: Path) -> None:
        from training.checkpoints import load_checkpoint
        from training.config_io import to_plain
        from training.lora import load_trainable_state

        state = load_checkpoint(path)
        saved, current = json.loads(state["config"]), to_plain(self.config)
        changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise InvalidInput("--resume", f"the config differs from the checkpoint's in fields that change the run: {details}")
        load_trainable_state(self.model.unet, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])

    # ------------------------------------------------------------------ the run

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run (or resume) the job to ``max_steps``; returns the summary also written to ``summary.json``."""
        from tqdm import tqdm

        from training.checkpoints import latest_checkpoint
        from training.logs import TrainingLog
        from training.lora import save_lora_weights

        c = self.config
        main = self.accelerator.is_main_process
        latest = latest_checkpoint(self.out / "checkpoints") if resume else None
        if latest is not None:
            self.restore(latest)
        elif not resume and main and (self.out / "checkpoints").is_dir() and any((self.out / "checkpoints").iterdir()):
            raise InvalidInput("output_dir", f"{self.out} already holds checkpoints; pass --resume or choose another folder")
        log = TrainingLog(self.out, resume_step=self.step if latest is not None else None, tensorboard=c.tensorboard) if main else None
        eval_names = ("reward", "verifier.passed")
        stop = _StopSignals()
        try:
            if self.step == 0 and main:
                self._evaluate_and_log(log)
            bar = tqdm(total=c.max_steps, initial=self.step, desc="alignprop", disable=not (c.progress and main),
                       dynamic_ncols=True)
            while self.step < c.max_steps:
                metrics = self.train_step()
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.4g}", k=f"{metrics['k_mean']:.3g}")
                if main and self.step % c.log_every == 0:
                    log.log(self.step, "train", metrics)
                last = self.step == c.max_steps
                if main and (self.step % c.eval_every == 0 or last):
                    self._evaluate_and_log(log)
                if self.step % c.checkpoint_every == 0 or last or stop.requested:
                    self.save_checkpoint()
                if stop.requested:
                    raise TrainingInterrupted(f"stopped by {stop.requested} after step {self.step}; resume with --resume")
                self.accelerator.wait_for_everyone()
            bar.close()
            summary: dict[str, Any] = {"steps": self.step}
            if main:
                adapter = save_lora_weights(self.model, self.out / "adapters" / c.adapter_name)
                log.plot(self.out / "reward_curve.png", eval_metrics=eval_names)
                evals = {m: dict(zip(*map(list, log.series("eval", m)))) for m in eval_names}
                summary.update(adapter=str(adapter), eval={m: {str(k): v for k, v in s.items()} for m, s in evals.items() if s})
                (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        finally:
            stop.restore()
            if log is not None:
                log.close()
        return summary

    def _evaluate_and_log(self, log) -> None:
        result = self.evaluate()
        if result.metrics:
            log.log(self.step, "eval", result.metrics)
            self.save_grid(result)


class _StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (with a checkpoint), in the main thread."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        import threading

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


def main(argv: list[str] | None = None) -> int:
    """``python -m training.alignprop`` (and ``accelerate launch -m training.alignprop``): the same as
    ``diffsteer train alignprop``."""
    from training.cli import run_method

    return run_method("alignprop", argv)


if __name__ == "__main__":
    raise SystemExit(main())
