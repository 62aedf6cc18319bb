"""Training the latent evaluators of :mod:`diffsteer.guidance.latent_evaluators` for one model, on the shared trainer.

Papalampidi et al. 2025 (arXiv:2509.16131) score guidance candidates with small evaluators that read latents;
they publish no training recipe we can follow, so this is ours. Every optimizer step makes its own data from the
model, the way dynamic CFG will meet it:

1. B training prompts and seeds; each image's trajectory is sampled (``steps``, ``scheduler``) under CFG at a
   scale drawn from ``candidates``, and at ``records_per_image`` of its steps (drawn uniformly) the K candidate
   clean-latent predictions are recorded, ẑ0_k = x0(ε_u + w_k·(ε_c − ε_u)) for every w_k in ``candidates``: one
   group of K that share x_t, ᾱ and the prompt (exactly what the policy ranks).
2. **Alignment** targets: the pixel reward ``reward`` of :mod:`rewards` on the decoded candidates, R(D(ẑ0_k), c).
   Loss: ``level_weight`` times the mean squared error to the standardised target (mean and standard deviation of
   a calibration batch drawn at build time, kept as the evaluator's output map), plus ``within_weight`` times the
   squared error of the within-group deviations (prediction and target minus their group means, in units of the
   reward's within-group standard deviation, also from the calibration batch), plus ``rank_weight`` times a
   RankNet loss over the pairs of each group (Burges et al. 2005: −log σ(s_i − s_j) for every pair with
   t_i > t_j). The policy only uses the order within a group, and the spread within a group is a fraction of the
   spread between prompts, so the level term alone learns the prompt and not the candidates (see BENCHMARKS.md,
   section Dynamic CFG with latent evaluators).

   ``alignment_target: embedding`` (for a reward s·cos(f_img, f_txt): clip, hps, pickscore) records the reward's
   unit-norm image embedding e_k = f_img(D(ẑ0_k)) of every candidate and the prompt's text embedding u, and the
   network learns the image tower: g(ẑ0_k, λ), normalised, scored as s·⟨g, u⟩ (the reward exactly, were g = e_k).
   The level term is then 1 − ⟨g, e_k⟩, the within-group term also covers the embeddings' deviations from their
   group mean (in units of their within-group standard deviation), and RankNet reads the scores in units of the
   reward's within-group standard deviation. D targets per candidate instead of one, and the prompt enters through
   the exact text embedding; it ranks the candidates of a held-out group better than the score form (see
   BENCHMARKS.md, section Dynamic CFG with latent evaluators).
3. **Fidelity**: real-data latents (``real_images``: rendered proving-ground scenes, or a folder of images) encoded
   by the VAE, noised to each group's ᾱ, x_t = √ᾱ·z + √(1−ᾱ)·ε, and denoised by the model with their own caption:
   x0(ε_c(x_t)) is "real"; the model's own candidates ẑ0_k at that ᾱ are "model". Loss: class-balanced logistic
   loss of the discriminator's logit.

With ``recorded_batches`` the data is made once instead: that many batches, each from its own seed, saved under
``<output_dir>/groups/`` (a resumed run loads them; several processes record their shares in parallel), then the
steps walk shuffled passes over all recorded groups, ``groups_per_step`` per process. Decoding and scoring the
candidates is the cost of a batch, so many passes over recorded data train far more steps per CPU-hour than
fresh batches.

Held-out evaluation (``eval_every``) scores a fixed batch made the same way from held-out prompts (``eval_prompts``)
and logs the alignment evaluator's Spearman correlation with the reward within each group and overall, and the
fidelity discriminator's accuracy. The export writes the evaluator folder (``export_dir``; the model points to
``<model folder>/latent_evaluators`` by default).

    diffsteer train latent-evaluator --config training/configs/latent-evaluator-proving-ground.yaml
    torchrun --standalone --nproc_per_node 2 -m diffsteer.training.latent_evaluator \
        --config training/configs/latent-evaluator-embedding-proving-ground.yaml
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import spearmanr
from tqdm import tqdm

from diffsteer.evaluation.prompts import load_prompts
from diffsteer.guidance.conditioning import encode_conditions
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.latent_evaluators import KINDS, EvaluatorSpec, LatentEvaluators, PromptInputs, text_probe
from diffsteer.guidance.latents import decode, encode
from diffsteer.guidance.parameterisation import NoiseLevel, add_noise, to_x0
from diffsteer.guidance.policies.base import GuidancePolicy, PolicyParams, PolicyState, SamplingContext
from diffsteer.guidance.policies.cfg import cfg_combine
from diffsteer.guidance.request import GenerationParams, Limits
from diffsteer.guidance.reward_models import get_reward
from diffsteer.guidance.sampler import make_scheduler, prepare, step_levels
from diffsteer.guidance.schedulers import build_scheduler
from diffsteer.proving_ground import TrainingScenes
from diffsteer.training.checkpoints import atomic_torch_save
from diffsteer.training.cli import run_method
from diffsteer.training.config_io import to_plain
from diffsteer.training.prompts import load_training_prompts
from diffsteer.training.trainer import EvalResult, Trainer, TrainerConfig, with_default


@dataclass
class LatentEvaluatorConfig(TrainerConfig):
    """Latent evaluators (alignment distilled from a pixel reward, fidelity discriminator) for one model."""

    output_dir: str = field(
        default="runs/latent-evaluator",
        metadata={
            "help": "Run folder: checkpoints/, metrics.csv, tensorboard/, latent_evaluators/ (unless export_dir is set)."
        },
    )
    export_dir: str = field(
        default="",
        metadata={
            "help": "Where the trained evaluators are written ('': <output_dir>/latent_evaluators). A model uses them "
            "when they sit in <model folder>/latent_evaluators."
        },
    )
    prompts: str = field(
        default="pg-train:all",
        metadata={"help": "Training prompts: pg-train:all, pg-train:CATEGORY[,...], or a text / GenEval / Parti file."},
    )
    eval_prompts: str = field(
        default="pg:all",
        metadata={"help": "Held-out prompts of the agreement evaluation (pg:... or a prompt file); '' disables it."},
    )
    eval_max_prompts: int | None = with_default("eval_max_prompts", 4)
    eval_seeds: int = with_default("eval_seeds", 1)
    reward: str = field(
        default="clip:1",
        metadata={
            "help": "Pixel-space reward the alignment evaluator is distilled from, 'name:weight,...' (configured as for "
            "the service; the proving-ground clip needs none). Need not be differentiable."
        },
    )
    alignment_target: Literal["score", "embedding"] = field(
        default="score",
        metadata={
            "help": "What the alignment evaluator learns: score (the reward itself, reading the diffusion text states) or "
            "embedding (the image embedding of a reward s·cos(f_img, f_txt) — clip, hps, pickscore — scored "
            "against the reward's own text embedding at sampling time; ranks candidates better: see BENCHMARKS.md, "
            "section Dynamic CFG with latent evaluators)."
        },
    )
    kinds: tuple[str, ...] = field(
        default=("alignment", "fidelity"), metadata={"help": "Evaluators to train: alignment, fidelity."}
    )
    real_images: str = field(
        default="pg-scenes",
        metadata={
            "help": "Real data of the fidelity discriminator: pg-scenes (rendered proving-ground training scenes with "
            "their captions) or a folder of images (captions from NAME.txt beside each image, else empty)."
        },
    )
    candidates: tuple[float, ...] = field(
        default=(1.0, 1.5, 2.0, 3.0, 4.5, 6.0),
        metadata={"help": "Guidance scales of the recorded candidates (and of the trajectories)."},
    )
    records_per_image: int = field(
        default=3, metadata={"help": "Steps of each trajectory whose candidates are recorded."}
    )
    width_channels: int = field(default=32, metadata={"help": "Channels of each evaluator network."})
    stages: int = field(default=2, metadata={"help": "Residual stages (each halves the resolution after the stem)."})
    patch: int = field(default=2, metadata={"help": "Stem patch size (a patch x patch convolution of that stride)."})
    recorded_batches: int = field(
        default=0,
        metadata={
            "help": "0: train on freshly sampled batches (each reused batch_reuse steps). N > 0: sample N batches of "
            "batch_size trajectories once, before training (saved in <output_dir>/groups/, reused on resume; "
            "processes record their shares in parallel), then train on groups_per_step groups per step, drawn "
            "from all of them and reshuffled every pass."
        },
    )
    groups_per_step: int = field(
        default=64, metadata={"help": "Recorded groups per optimizer step and process (with recorded_batches)."}
    )
    batch_reuse: int = field(
        default=1,
        metadata={
            "help": "Optimizer steps trained on each generated batch (decoding and scoring the candidates is the cost; "
            "step s trains on the batch of step s - s mod batch_reuse)."
        },
    )
    rank_weight: float = field(default=1.0, metadata={"help": "Weight of the alignment's within-group ranking loss."})
    level_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the alignment's level term: the squared error to the reward itself (standardised over all "
            "candidates), the level that ReNO and the A/B metric compare across images; with the embedding "
            "target, 1 − cos between the predicted and the decoded candidate's image embedding."
        },
    )
    within_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the squared error of the within-group deviations (prediction and reward minus their group "
            "means, in units of the reward's within-group standard deviation): the differences between candidates "
            "that dynamic CFG ranks, which the level term under-weights (they are a fraction of the spread "
            "between prompts). With the embedding target, plus the same for the embeddings."
        },
    )
    default_weights: dict[str, float] = field(
        default_factory=lambda: {"alignment": 1.0, "fidelity": 0.5},
        metadata={"help": "Weights of the evaluators' combined score saved with them (dynamic_cfg's default)."},
    )
    calibration_batches: int = field(
        default=2,
        metadata={
            "help": "Batches drawn at build time to standardise the alignment target (mean and std of the reward)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Trajectories (prompts x seeds) per optimizer step."})
    learning_rate: float = with_default("learning_rate", 3e-4)
    steps: int = field(default=20, metadata={"help": "Denoising steps of the trajectories."})
    max_steps: int = with_default("max_steps", 200)
    checkpoint_every: int = with_default("checkpoint_every", 50)
    eval_every: int = field(default=50, metadata={"help": "Evaluate agreement on the held-out batch every N steps."})

    def __post_init__(self) -> None:
        super().__post_init__()

        if not self.kinds or any(k not in KINDS for k in self.kinds) or len(set(self.kinds)) != len(self.kinds):
            raise InvalidInput("kinds", f"expected distinct names among {', '.join(KINDS)}, got {list(self.kinds)}")
        if len(self.candidates) < 2 or any(not 0 <= w <= 100 for w in self.candidates):
            raise InvalidInput("candidates", f"expected at least two scales in [0, 100], got {list(self.candidates)}")
        for name in (
            "records_per_image",
            "width_channels",
            "stages",
            "calibration_batches",
            "patch",
            "batch_reuse",
            "groups_per_step",
        ):
            if getattr(self, name) < 1:
                raise InvalidInput(name, f"must be at least 1, got {getattr(self, name)}")
        if self.records_per_image > self.steps:
            raise InvalidInput(
                "records_per_image", f"must be at most steps ({self.steps}), got {self.records_per_image}"
            )
        if self.width_channels % 8:
            raise InvalidInput("width_channels", f"must be a multiple of 8 (group norm), got {self.width_channels}")
        for name in ("rank_weight", "level_weight", "within_weight"):
            if getattr(self, name) < 0:
                raise InvalidInput(name, f"must be non-negative, got {getattr(self, name)}")
        unknown = [k for k in self.default_weights if k not in self.kinds]
        if unknown:
            raise InvalidInput("default_weights", f"{unknown} not among the trained kinds {list(self.kinds)}")
        if self.recorded_batches < 0:
            raise InvalidInput(
                "recorded_batches", f"must be 0 (fresh batches) or a number of batches, got {self.recorded_batches}"
            )
        if self.alignment_target not in ("score", "embedding"):
            raise InvalidInput("alignment_target", f"expected score or embedding, got {self.alignment_target!r}")
        if "fidelity" in self.kinds and not self.real_images:
            raise InvalidInput("real_images", "the fidelity discriminator needs real images: pg-scenes or a folder")


# ---------------------------------------------------------------------------------------------- data


class _RecordingCFG(GuidancePolicy):
    """CFG at a per-image scale that records, at each image's chosen steps, the K candidate x̂0 (training only)."""

    name = "recording_cfg"
    Params = PolicyParams

    def __init__(self, scales: torch.Tensor, record: np.ndarray, candidates: tuple[float, ...]):
        super().__init__(PolicyParams())
        self.scales, self.record, self.candidates = scales, record, candidates

    def start(self, ctx: SamplingContext) -> PolicyState:
        return PolicyState(trace={"groups": []})

    def step(self, state: PolicyState, x: torch.Tensor, info, denoiser) -> torch.Tensor:
        out = denoiser(x, info, ["uncond", "cond"])
        cond, uncond = out["cond"], out["uncond"]
        rows = np.nonzero((self.record == info.index).any(axis=1))[0]
        if len(rows):
            idx = torch.as_tensor(rows)
            x0 = torch.stack(
                [
                    to_x0(cfg_combine(cond[idx], uncond[idx], w), x[idx], info.level, info.prediction_type)
                    for w in self.candidates
                ],
                dim=1,
            )  # [r, K, C, h, w]
            state.trace["groups"].append((rows, info.alpha_bar, x0.float()))
        w = self.scales.to(cond).view(-1, *([1] * (cond.ndim - 1)))
        return uncond + w * (cond - uncond)


@dataclass
class Groups:
    """Recorded candidate groups: G groups of K candidates."""

    x0: torch.Tensor  # [G, K, C, h, w]
    alpha_bar: torch.Tensor  # [G] float64
    text: torch.Tensor  # [G, L, D] the prompt's cond states
    prompts: list[str]
    reward: torch.Tensor | None = None  # [G, K]
    real_x0: torch.Tensor | None = None  # [G, C, h, w] the model's x̂0 from real latents at the same ᾱ
    image_embedding: torch.Tensor | None = None  # [G, K, E] the reward's unit-norm embeddings of the decoded candidates
    text_embedding: torch.Tensor | None = None  # [G, E] the reward's unit-norm embedding of the prompt

    def select(self, index: np.ndarray) -> Groups:
        """The groups at ``index``."""
        i = torch.as_tensor(index, dtype=torch.long)
        pick = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Groups(
            **{k: ([v[j] for j in index] if isinstance(v, list) else v if v is None else v[i]) for k, v in pick.items()}
        )

    @staticmethod
    def concatenate(parts: list[Groups]) -> Groups:
        fields = [f.name for f in dataclasses.fields(Groups)]
        return Groups(
            **{
                k: (
                    [x for p in parts for x in getattr(p, k)]
                    if k == "prompts"
                    else None
                    if getattr(parts[0], k) is None
                    else torch.cat([getattr(p, k) for p in parts])
                )
                for k in fields
            }
        )

    def prompt_inputs(self) -> Any:
        """What the evaluators read of each group's prompt (:class:`diffsteer.guidance.latent_evaluators.PromptInputs`)."""
        return PromptInputs(states=self.text, embedding=self.text_embedding)


def encode_prompts(model: Any, prompts: list[str]) -> torch.Tensor:
    """The model's ``cond`` text states [B, L, D] of ``prompts`` (float32)."""
    size = model.default_size
    conditions, _ = encode_conditions(model, prompts, None, ["cond"], height=size, width=size)
    return conditions["cond"].hidden_states.float()


@torch.no_grad()
def record_candidate_groups(
    model: Any,
    prompts: list[str],
    seeds: list[int],
    rng: np.random.Generator,
    params: dict[str, Any],
    candidates: tuple[float, ...],
    records_per_image: int,
    reward: Any = None,
    autocast: Any = None,
    embeddings: bool = False,
) -> Groups:
    """Sample one trajectory per prompt (``params``: steps, scheduler, ...) under CFG at a scale drawn from
    ``candidates``, record the K candidate x̂0 at ``records_per_image`` steps drawn per image, and score the decoded
    candidates with ``reward`` (if given; with ``embeddings``, a one-term embedding-similarity reward whose image
    and text embeddings are kept too). Every draw from ``rng``."""
    autocast = autocast or contextlib.nullcontext
    n, steps = len(prompts), int(params["steps"])
    scales = torch.tensor(np.asarray(candidates)[rng.integers(0, len(candidates), n)], dtype=torch.float32)
    record = np.stack([np.sort(rng.choice(steps, records_per_image, replace=False)) for _ in range(n)])
    limits = Limits(max_num_images=max(n, Limits.max_num_images))
    with autocast():
        # prepared as guided CFG, so that the unconditional prompt is encoded; the recording policy then runs
        guided = {**params, "policy": {"name": "cfg", "scale": max(2.0, *map(float, candidates))}}
        prepared = prepare(model, guided, limits=limits)
        prepared = dataclasses.replace(
            prepared, policy=_RecordingCFG(scales, record, tuple(candidates)), first_run=None
        )
        trajectory = prepared.run()
    rows, bars, x0 = [], [], []
    for r, a, z in trajectory.state.trace["groups"]:
        for i, row in enumerate(r):
            rows.append(int(row))
            bars.append(a)
            x0.append(z[i])
    order = np.argsort(rows, kind="stable")
    rows = [rows[i] for i in order]
    groups = Groups(
        x0=torch.stack([x0[i] for i in order]),
        alpha_bar=torch.tensor([bars[i] for i in order], dtype=torch.float64),
        text=encode_prompts(model, prompts)[torch.as_tensor(rows)],
        prompts=[prompts[r] for r in rows],
    )
    g, k = groups.x0.shape[:2]
    if reward is not None:
        flat = groups.x0.flatten(0, 1).to(model.device)
        texts = [p for p in groups.prompts for _ in range(k)]
        tower, factor = reward.similarity_term() if embeddings else (None, 1.0)
        scores = []
        for i in range(0, len(flat), 64):
            with autocast():
                images = decode(model, flat[i : i + 64]).float()
            scores.append(
                tower.image_embeddings(images).float().cpu()
                if embeddings
                else reward.evaluate(images, texts[i : i + 64]).total_score.float().cpu()
            )
        if embeddings:
            groups.image_embedding = torch.cat(scores).view(g, k, -1)
            groups.text_embedding = tower.text_embeddings(groups.prompts).float().cpu()
            groups.reward = factor * (groups.image_embedding * groups.text_embedding[:, None]).sum(-1)
        else:
            groups.reward = torch.cat(scores).view(g, k)
    return groups


class RealImages:
    """Real images with captions, by index: rendered proving-ground scenes or a folder."""

    def __init__(self, source: str, seed: int, size: int):
        self.size = size
        self.files: list[Path] = []
        self.scenes = None
        if source == "pg-scenes":
            self.scenes = TrainingScenes(seed=seed, resolution=size)
        else:
            folder = Path(source).expanduser()
            if not folder.is_dir():
                raise InvalidInput("real_images", f"expected pg-scenes or a folder of images, got {source!r}")
            self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
            if not self.files:
                raise InvalidInput("real_images", f"no .png/.jpg/.webp image in {str(folder)!r}")

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, list[str]]:
        """Images [n, 3, size, size] in [0, 1] and captions."""
        arrays, captions = [], []
        for i in indices:
            if self.scenes is not None:
                example = self.scenes[int(i)]
                arrays.append(example.image)
                captions.append(example.caption)
            else:
                path = self.files[int(i) % len(self.files)]
                image = Image.open(path).convert("RGB").resize((self.size, self.size), Image.BICUBIC)
                arrays.append(np.asarray(image))
                text = path.with_suffix(".txt")
                captions.append(text.read_text().strip() if text.is_file() else "")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0, captions


# ---------------------------------------------------------------------------------------------- trainer


# the fields that decide what a recorded batch holds: recorded groups are reused only under the same ones
RECORDING_FIELDS = (
    "model",
    "prompts",
    "reward",
    "alignment_target",
    "kinds",
    "real_images",
    "candidates",
    "records_per_image",
    "batch_size",
    "steps",
    "scheduler",
    "eta",
    "height",
    "width",
    "seed",
)


class LatentEvaluatorTrainer(Trainer):
    """Runs one latent-evaluator job described by a :class:`LatentEvaluatorConfig` (see the module docstring)."""

    name = "latent-evaluator"
    config: LatentEvaluatorConfig
    # where the export goes and what the held-out agreement is measured on do not change the training
    resumable_changes = frozenset({"export_dir", "eval_prompts", "eval_max_prompts", "eval_seeds"})
    eval_summary_metrics = ("alignment.rank_corr_within", "alignment.rank_corr", "fidelity.accuracy")

    def build(self) -> None:
        c = self.config
        self.train_prompts = load_training_prompts(c.prompts)
        self.reward = (
            get_reward(c.reward, self.device, torch.float32, field="reward") if "alignment" in c.kinds else None
        )
        self.real = RealImages(c.real_images, c.seed, self.model.default_size) if "fidelity" in c.kinds else None

        params = GenerationParams.parse(self.generation_params(self.train_prompts[:1], [0]))
        scheduler, timesteps = make_scheduler(self.model, params)

        levels = step_levels(scheduler, timesteps, self.model.family.schedule)
        bars = torch.tensor([float(level.alpha_bar) for level in levels], dtype=torch.float64)
        lam = torch.log(bars) - torch.log1p(-bars)
        bounds = (float(lam.min()) - 1.0, float(lam.max()) + 1.0)
        text_dim = int(encode_prompts(self.model, ["x"]).shape[-1])
        embedding = c.alignment_target == "embedding" and "alignment" in c.kinds
        if embedding and self.reward.similarity_term() is None:
            raise InvalidInput(
                "alignment_target",
                f"embedding needs a reward of one embedding-similarity term (clip, "
                f"hps or pickscore with a weight), got reward {c.reward!r}",
            )
        self.pool = self._record_pool() if c.recorded_batches else None
        specs = {
            k: EvaluatorSpec(
                k,
                c.width_channels,
                c.stages,
                use_text=(k == "alignment" and not embedding),
                patch=c.patch,
                target=c.reward if k == "alignment" else c.real_images,
            )
            for k in c.kinds
        }
        if "alignment" in c.kinds:
            calibration = (
                self.pool
                if self.pool is not None
                else Groups.concatenate(
                    [
                        self.make_groups(np.random.default_rng([c.seed, 2**20, b]), real=False)
                        for b in range(c.calibration_batches)
                    ]
                )
            )
            rewards = calibration.reward
            # the reward's spread within a group: the unit of the within-group terms (and of RankNet's for embeddings)
            self.reward_within_std = float((rewards - rewards.mean(dim=1, keepdim=True)).std().clamp_min(1e-6))
            if embedding:
                factor = self.reward.similarity_term()[1]
                dim = calibration.image_embedding.shape[-1]
                specs["alignment"] = dataclasses.replace(
                    specs["alignment"], output_mean=0.0, output_std=factor, embedding_dim=dim
                )
                e = calibration.image_embedding
                self.embedding_within_std = float((e - e.mean(dim=1, keepdim=True)).std().clamp_min(1e-6))
                self.rank_unit = self.reward_within_std
            else:
                specs["alignment"] = dataclasses.replace(
                    specs["alignment"],
                    output_mean=float(rewards.mean()),
                    output_std=float(rewards.std().clamp_min(1e-6)),
                )
                self.rank_unit = specs["alignment"].output_std
        weights = {k: w for k, w in c.default_weights.items() if k in c.kinds} or {k: 1.0 for k in c.kinds}
        self.evaluators = LatentEvaluators(
            int(self.model.unet.config.in_channels),
            text_dim,
            specs,
            bounds,
            weights,
            meta={"model": str(c.model), "steps": c.steps, "scheduler": c.scheduler, "candidates": list(c.candidates)},
        ).to(self.device)
        self.register_module("evaluators", self.evaluators, "full")
        self.register_optimizer("evaluators", list(self.evaluators.parameters()))
        if c.ema_decay:
            self.register_ema("evaluators", self.evaluators, c.ema_decay, trainable_only=True)
        self.eval_groups = self._make_eval_groups()

    def _record_pool(self) -> Groups:
        """The ``recorded_batches`` batches of groups, each sampled once from its own seed and saved in
        ``<output_dir>/groups/`` (atomically), so that a resumed run loads them; each process records its share."""
        c = self.config
        folder = self.out / "groups"
        folder.mkdir(parents=True, exist_ok=True)
        settings = {name: value for name, value in to_plain(c).items() if name in RECORDING_FIELDS}
        record = folder / "recording.json"
        self.processes.barrier()  # every process reads the folder before the main one writes its record
        if record.is_file():
            saved = json.loads(record.read_text())
            changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
            if changed:
                raise InvalidInput(
                    "output_dir",
                    f"{folder} holds groups recorded with other settings ({'; '.join(changed)}); "
                    "remove it or choose another output_dir",
                )
        self.processes.barrier()
        if self.processes.is_main and not record.is_file():
            record.write_text(json.dumps(settings, indent=2))
        rank, world = self.processes.rank, self.processes.world_size
        mine = [b for b in range(c.recorded_batches) if b % world == rank]
        for b in tqdm(mine, desc="recording groups", disable=not c.progress, dynamic_ncols=True):
            path = folder / f"batch-{b:05d}.pt"
            if not path.is_file():
                groups = self.make_groups(np.random.default_rng([c.seed, 2**22, b]))
                atomic_torch_save(dataclasses.asdict(groups), path)
        self.processes.barrier()
        return Groups.concatenate(
            [Groups(**torch.load(folder / f"batch-{b:05d}.pt", weights_only=True)) for b in range(c.recorded_batches)]
        )

    def _load_eval_items(self) -> list[Any]:
        return []  # the base evaluation samples images; this method evaluates agreement instead (evaluate)

    def _make_eval_groups(self) -> Groups | None:
        c = self.config
        if not c.eval_prompts:
            return None

        try:
            items = load_prompts(c.eval_prompts, seeds=c.eval_seeds, seed=0, max_prompts=c.eval_max_prompts).items
        except InvalidInput as e:
            raise InvalidInput("eval_prompts", e.reason) from None
        rng = np.random.default_rng([c.seed, 2**21])
        return self.make_groups(rng, prompts=[i.prompt for i in items], seeds=[int(i.seed) for i in items])

    @torch.no_grad()
    def make_groups(
        self,
        rng: np.random.Generator,
        prompts: list[str] | None = None,
        seeds: list[int] | None = None,
        real: bool = True,
    ) -> Groups:
        """Sample trajectories, record candidate groups, score them with the reward and pair them with real x̂0
        (every draw from ``rng``)."""
        c = self.config
        n = c.batch_size if prompts is None else len(prompts)
        if prompts is None:
            prompts = [self.train_prompts[i] for i in rng.integers(0, len(self.train_prompts), n)]
        if seeds is None:
            seeds = [int(s) for s in rng.integers(0, 2**31 - 1, n)]
        groups = record_candidate_groups(
            self.model,
            prompts,
            seeds,
            rng,
            self.generation_params(prompts, seeds),
            c.candidates,
            c.records_per_image,
            self.reward,
            self.autocast,
            embeddings=c.alignment_target == "embedding",
        )
        g = groups.x0.shape[0]
        if real and self.real is not None:
            pixels, captions = self.real.get(rng.integers(0, 2**31 - 1, g))
            z = encode(self.model.vae, pixels)
            eps = torch.from_numpy(rng.standard_normal(z.shape)).to(z)
            x_t = add_noise(z, eps, NoiseLevel.vp(groups.alpha_bar.to(z).view(-1, 1, 1, 1)))
            hidden = encode_prompts(self.model, captions).to(self.model.dtype)
            t = torch.stack([self._timestep(float(a)) for a in groups.alpha_bar])  # one timestep per row
            with self.autocast():
                out = self.model.unet(x_t.to(self.model.dtype), t, encoder_hidden_states=hidden, return_dict=False)[0]
            groups.real_x0 = torch.cat(
                [
                    to_x0(
                        out[i : i + 1].float(),
                        x_t[i : i + 1],
                        NoiseLevel.vp(float(groups.alpha_bar[i])),
                        self.model.prediction_type,
                    )
                    for i in range(g)
                ]
            )
        return groups

    def _timestep(self, alpha_bar: float) -> torch.Tensor:
        """The training timestep whose ᾱ is nearest ``alpha_bar``."""
        if not hasattr(self, "_acp"):
            self._acp = build_scheduler("ddim", self.model.scheduler_config).alphas_cumprod.double()
        return torch.tensor(int((self._acp - alpha_bar).abs().argmin()), device=self.device)

    # ------------------------------------------------------------------ hooks

    def draw_batch(self, step: int, micro: int) -> Groups:
        """With recorded batches: ``groups_per_step`` groups of this pass's shuffle of all of them. Else the groups of
        step ``step - step mod batch_reuse`` (kept while they are reused; remade on resume)."""
        c = self.config
        if self.pool is not None:
            return self.pool.select(self.epoch_indices(step, micro, len(self.pool.alpha_bar), c.groups_per_step))
        key = (step - step % c.batch_reuse, micro)
        cached = getattr(self, "_batch", None)
        if cached is None or cached[0] != key:
            rng = np.random.default_rng([c.seed, key[0], micro, self.processes.rank])
            self._batch = cached = (key, self.make_groups(rng))
        return cached[1]

    def compute_loss(self, batch: Groups) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        ev = self.evaluators
        g, k = batch.x0.shape[:2]
        flat = batch.x0.flatten(0, 1).to(self.device)
        bars = batch.alpha_bar.repeat_interleave(k)
        loss = torch.zeros((), device=self.device)
        metrics: dict[str, float] = {}
        if "alignment" in c.kinds:
            spec = ev.specs["alignment"]
            reward = batch.reward.to(self.device)
            if spec.embedding_dim:
                image = ev.embed("alignment", flat, bars).view(g, k, -1)
                target = batch.image_embedding.to(self.device)
                score = ev.embedding_score("alignment", image, batch.text_embedding.to(self.device)[:, None])
                level = (1 - (image * target).sum(dim=-1)).mean()
                within = within_group_mse(image, target, self.embedding_within_std)
            else:
                text = batch.prompt_inputs().repeat_interleave(k).to(self.device)
                score = ev.evaluate("alignment", flat, bars, text).view(g, k)
                level = F.mse_loss(
                    (score - spec.output_mean) / spec.output_std, (reward - spec.output_mean) / spec.output_std
                )
                within = torch.zeros((), device=self.device)
            within = within + within_group_mse(score, reward, self.reward_within_std)
            rank = ranknet_loss(score / self.rank_unit, reward / self.rank_unit)
            loss = loss + c.level_weight * level + c.within_weight * within + c.rank_weight * rank
            metrics.update(
                {
                    "alignment.level": float(level.detach()),
                    "alignment.within_mse": float(within.detach()),
                    "alignment.rank": float(rank.detach()),
                }
            )
        if "fidelity" in c.kinds:
            fake = ev.evaluate("fidelity", flat, bars)
            real = ev.evaluate("fidelity", batch.real_x0.to(self.device), batch.alpha_bar)
            bce = 0.5 * (
                F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
            )
            loss = loss + bce
            metrics.update(
                {
                    "fidelity.bce": float(bce.detach()),
                    "fidelity.accuracy": 0.5 * float((real > 0).float().mean() + (fake < 0).float().mean()),
                }
            )
        return loss, metrics

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Agreement on the held-out groups: Spearman of the alignment evaluator with the reward (within groups,
        averaged, and over all candidates), the fidelity discriminator's balanced accuracy."""
        b = self.eval_groups
        if b is None:
            return EvalResult(self.step, {}, [])
        metrics = agreement(self.evaluators, b)
        return EvalResult(self.step, metrics, [])

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {k: f"{metrics[k]:.3g}" for k in ("loss", "alignment.rank", "fidelity.accuracy") if k in metrics}

    def export(self) -> dict[str, str]:
        c = self.config
        target = Path(c.export_dir) if c.export_dir else self.out / "latent_evaluators"
        meta: dict[str, Any] = {"trained_steps": self.step, "seed": c.seed}
        if self.evaluators.embedding_target is not None:
            meta["text_probe"] = text_probe(self.reward.similarity_term()[0])
        with self.averaged_weights():
            self.evaluators.save(target, extra_meta=meta)
        return {"latent_evaluators": str(target)}


def ranknet_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the ordered pairs (i, j) of each row with target_i > target_j of softplus(−(pred_i − pred_j)),
    i.e. −log σ(pred_i − pred_j) (Burges et al. 2005); 0 where a row has no such pair."""
    diff = pred[:, :, None] - pred[:, None, :]
    better = (target[:, :, None] > target[:, None, :]).float()
    count = better.sum()
    if count == 0:
        return pred.sum() * 0.0
    return (F.softplus(-diff) * better).sum() / count


def within_group_mse(pred: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean squared error between the within-group deviations of ``pred`` and ``target`` [G, K] (each minus its
    row mean), divided by ``scale``²: blind to each group's level, only the differences between its candidates."""
    return F.mse_loss(pred - pred.mean(dim=1, keepdim=True), target - target.mean(dim=1, keepdim=True)) / scale**2


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); nan for fewer than 2 distinct values."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def agreement(evaluators: Any, groups: Groups) -> dict[str, float]:
    g, k = groups.x0.shape[:2]
    device = next(evaluators.parameters()).device
    flat = groups.x0.flatten(0, 1).to(device)
    bars = groups.alpha_bar.repeat_interleave(k)
    metrics: dict[str, float] = {}
    if "alignment" in evaluators.kinds and groups.reward is not None:
        text = groups.prompt_inputs().repeat_interleave(k).to(device)
        pred = evaluators.evaluate("alignment", flat, bars, text).view(g, k).cpu().numpy()
        target = groups.reward.numpy()
        within = [spearman(pred[i], target[i]) for i in range(g)]
        metrics["alignment.rank_corr_within"] = (
            float(np.nanmean(within)) if not np.all(np.isnan(within)) else float("nan")
        )
        metrics["alignment.rank_corr"] = spearman(pred.ravel(), target.ravel())
        metrics["alignment.top1_agreement"] = float(np.mean(pred.argmax(1) == target.argmax(1)))
        # the training loss's RankNet term on held-out groups (scores standardised as in training): ln 2 is chance
        standardised = torch.from_numpy(pred) / evaluators.specs["alignment"].output_std
        metrics["alignment.rank_loss"] = float(ranknet_loss(standardised, torch.from_numpy(target)))
    if "fidelity" in evaluators.kinds and groups.real_x0 is not None:
        fake = evaluators.evaluate("fidelity", flat, bars).cpu()
        real = evaluators.evaluate("fidelity", groups.real_x0.to(device), groups.alpha_bar).cpu()
        metrics["fidelity.accuracy"] = 0.5 * float((real > 0).float().mean() + (fake < 0).float().mean())
    return metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m diffsteer.training.latent_evaluator``: the same as ``diffsteer train latent-evaluator``."""
    return run_method("latent-evaluator", argv)


if __name__ == "__main__":
    raise SystemExit(main())
