"""``diffsteer data pairs``: a preference dataset made by a model and a reward, in Pick-a-Pic v2's layout.

For every prompt, N images are sampled from the model (each with its own recorded seed, drawn from ``--seed``
and the prompt's index), scored by any reward of :mod:`rewards`, and written as pairs with both scores and
both seeds; the label prefers the higher-scored image (0.5/0.5 when the scores are equal). ``--pairing``
chooses which pairs of a prompt's N images are written: ``all`` (N(N-1)/2 rows), ``best-rest`` (each of the
``--best-k`` best-scored images against every image ranked below it; k = 1: N-1 rows) or ``best-worst`` (one
row). ``best-rest`` keeps only the reward's most confident winners: a reward can pick a prompt's best image far
more reliably than it orders two arbitrary images (on the proving ground's CLIP reward: see BENCHMARKS.md,
section Diffusion-DPO and SmPO).

    diffsteer data pairs -o pairs.parquet --prompts pg-train:single --images-per-prompt 4 --reward clip

On the proving ground the reward is the proving-ground CLIP (``clip``, the default), never the verifier: the
verifier stays the judge of what training on these pairs achieves. The file loads with
:func:`diffsteer.training.preference_data.load_preference_pairs` and trains ``diffsteer train dpo`` / ``smpo``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from diffsteer.evaluation.runner import Item, run_arm
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.images import encode_image
from diffsteer.guidance.models import load_model
from diffsteer.guidance.reward_models import get_reward
from diffsteer.training.preference_data import write_preference_pairs
from diffsteer.training.prompts import load_training_prompts

PAIRINGS = ("all", "best-rest", "best-worst")


@dataclass(frozen=True)
class PairsConfig:
    output: str
    model: str = "builtin:proving-ground"
    prompts: str = "pg-train:all"
    max_prompts: int | None = None
    images_per_prompt: int = 2
    pairing: Literal["all", "best-rest", "best-worst"] = "all"
    best_k: int = 1
    reward: str = "clip"
    policy: str = "cfg:scale=1.5"
    scheduler: str = "ddim"
    steps: int = 20
    seed: int = 0
    batch_size: int = 16
    device: str | None = None

    def __post_init__(self) -> None:
        if self.images_per_prompt < 2:
            raise InvalidInput("--images-per-prompt", f"must be at least 2, got {self.images_per_prompt}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"--{name.replace('_', '-')}", f"must be at least 1, got {getattr(self, name)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise InvalidInput("--max-prompts", f"must be at least 1, got {self.max_prompts}")
        if self.best_k < 1 or self.best_k >= self.images_per_prompt:
            raise InvalidInput(
                "--best-k",
                f"must be in [1, {self.images_per_prompt - 1}] (below --images-per-prompt), got {self.best_k}",
            )
        if self.pairing not in PAIRINGS:
            raise InvalidInput("--pairing", f"unknown value {self.pairing!r}; accepted values: {', '.join(PAIRINGS)}")


def image_seeds(seed: int, prompt_index: int, n: int) -> list[int]:
    """The seeds of one prompt's images: a function of (``seed``, prompt index) only, so runs repeat."""
    rng = np.random.default_rng([seed, prompt_index])
    return [int(s) for s in rng.integers(0, 2**31 - 1, n)]


def choose_prompts(prompts: list[str], max_prompts: int | None, seed: int) -> list[str]:
    """All prompts, or a seeded sample of ``max_prompts`` of them (kept in their source order)."""
    if max_prompts is None or max_prompts >= len(prompts):
        return prompts
    keep = np.random.default_rng([seed, 2**20]).choice(len(prompts), max_prompts, replace=False)
    return [prompts[i] for i in sorted(keep)]


def pair_indices(scores: list[float], pairing: str, best_k: int = 1) -> list[tuple[int, int]]:
    """Which images of one prompt form rows: every unordered pair; each of the ``best_k`` best (best first)
    against every image ranked below it (in image order); or (best, worst)."""
    if pairing == "best-worst":
        return [(int(np.argmax(scores)), int(np.argmin(scores)))]
    if pairing == "best-rest":
        rank = np.argsort(-np.asarray(scores), kind="stable")
        position = {int(i): r for r, i in enumerate(rank)}
        return [(int(w), i) for w in rank[:best_k] for i in range(len(scores)) if position[i] > position[int(w)]]
    return list(itertools.combinations(range(len(scores)), 2))


def preference_label(score_0: float, score_1: float) -> float:
    """label_0 of a pair scored by a reward: 1 if image 0 scores higher, 0 if lower, 0.5 on a tie."""
    return 1.0 if score_0 > score_1 else 0.0 if score_0 < score_1 else 0.5


def build_pairs(config: PairsConfig, model: Any = None, progress: bool = True) -> list[dict[str, Any]]:
    """Sample, score and pair; returns the rows (image bytes inline)."""
    prompts = choose_prompts(load_training_prompts(config.prompts, field="--prompts"), config.max_prompts, config.seed)
    if model is None:
        model = load_model(config.model, device=config.device)
    reward = get_reward(config.reward, model.device, torch.float32, field="--reward")
    n = config.images_per_prompt
    items = [Item(p, s, str(i)) for i, p in enumerate(prompts) for s in image_seeds(config.seed, i, n)]
    with tqdm(total=len(items), desc="pairs: sampling", disable=not progress, dynamic_ncols=True) as bar:
        records = run_arm(
            model,
            items,
            config.policy,
            steps=config.steps,
            scheduler=config.scheduler,
            batch_size=config.batch_size,
            progress=bar.update,
        )
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(records), config.batch_size):
            chunk = records[start : start + config.batch_size]
            pixels = torch.from_numpy(np.stack([r.image for r in chunk])).permute(0, 3, 1, 2).float() / 255
            result = reward.evaluate(pixels.to(model.device), [r.item.prompt for r in chunk])
            scores.extend(float(s) for s in result.total_score.cpu())

    rows: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        own = records[i * n : (i + 1) * n]
        own_scores = scores[i * n : (i + 1) * n]
        encoded = [encode_image(Image.fromarray(r.image), "png", r.metadata) for r in own]
        for a, b in pair_indices(own_scores, config.pairing, config.best_k):
            label = preference_label(own_scores[a], own_scores[b])
            rows.append(
                {
                    "caption": prompt,
                    "jpg_0": encoded[a],
                    "jpg_1": encoded[b],
                    "label_0": label,
                    "label_1": 1.0 - label,
                    "score_0": own_scores[a],
                    "score_1": own_scores[b],
                    "seed_0": own[a].item.seed,
                    "seed_1": own[b].item.seed,
                    "model_0": model.name,
                    "model_1": model.name,
                    "policy": config.policy,
                    "steps": config.steps,
                    "reward": config.reward,
                }
            )
    return rows


def cmd_pairs(args: argparse.Namespace) -> int:
    config = PairsConfig(
        output=args.output,
        model=args.model,
        prompts=args.prompts,
        max_prompts=args.max_prompts,
        images_per_prompt=args.images_per_prompt,
        pairing=args.pairing,
        best_k=args.best_k,
        reward=args.reward,
        policy=args.policy,
        scheduler=args.scheduler,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
    )
    if not config.output.endswith((".parquet", ".jsonl")):
        raise InvalidInput("--output", f"must end in .parquet or .jsonl, got {config.output!r}")
    rows = build_pairs(config, progress=not args.quiet)
    path = write_preference_pairs(config.output, rows)
    ties = sum(r["label_0"] == 0.5 for r in rows)
    print(f"{path}  {len(rows)} pairs ({ties} ties)", file=sys.stderr if args.quiet else sys.stdout)
    return 0


def add_data_parser(subparsers) -> None:
    """``diffsteer data pairs``."""
    data = subparsers.add_parser("data", help="build training data (preference pairs)")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser(
        "pairs",
        help="sample N images per prompt, score them with a reward, write preference pairs",
        description=__doc__.split("\n\n")[0],
    )
    d = PairsConfig(output="")
    p.add_argument(
        "-o", "--output", required=True, help="pairs file: .parquet (images inline) or .jsonl (images beside it)"
    )
    p.add_argument("--model", default=d.model, help="diffusers folder, .safetensors file, hub id, or builtin:NAME")
    p.add_argument("--prompts", default=d.prompts, help="pg-train:all, pg-train:CATEGORY[,...], or a prompt file")
    p.add_argument("--max-prompts", type=int, default=None, help="a seeded sample of this many prompts (default: all)")
    p.add_argument("--images-per-prompt", type=int, default=d.images_per_prompt, help="N images sampled per prompt")
    p.add_argument("--pairing", default=d.pairing, help=f"which pairs of a prompt's images: {', '.join(PAIRINGS)}")
    p.add_argument(
        "--best-k",
        type=int,
        default=d.best_k,
        help="with --pairing best-rest: how many of the best images each face every image ranked below them",
    )
    p.add_argument("--reward", default=d.reward, help="reward of rewards/ that scores the images, e.g. clip, 'hps:1'")
    p.add_argument("--policy", default=d.policy, help="guidance policy of the sampling")
    p.add_argument("--scheduler", default=d.scheduler)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the image seeds (recorded per image)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_pairs)
