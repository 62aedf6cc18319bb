"""Zero-shot attribute accuracy of the proving-ground CLIP (``diffsteer-pg-clip``) on held-out scenes.

Images are rendered fresh from the held-out suite (:func:`diffsteer.proving_ground.prompts.heldout_suite`: held-out
seeds, and held-out meanings for the combinatorial categories), so no image and, except for the 18 single-
object captions, no caption was seen in training. The model is loaded exactly as the ``clip`` reward loads
it (:func:`diffsteer.rewards.open_clip_loader.load_open_clip`: open_clip's factory, tokenizer and the reward's
differentiable preprocessing). For each image, the caption with the highest cosine similarity wins among:

* ``colour``: the true caption with one object group's colour set to each of the 6 colours (per group);
* ``shape``: the same with each of the 3 shapes;
* ``count`` (single / counting scenes): the count set to 1, 2, 3, 4;
* ``relation`` (position scenes): the relation set to each of left of / right of / above / below;
  ``relation_swap``: only the true relation and its opposite;
* ``binding_swap`` (two objects of different colours): the true caption and the one with the two colours
  (or, when they share a colour, the two shapes) exchanged -- the binding test of ARO (Yuksekgonul et al.
  2023, "When and why vision-language models behave like bags-of-words");
* ``retrieval_top1_of_32``: the exact caption among 32 (31 random captions of other meanings from every
  category; also top-5).

Candidates that are not valid prompts of the world (e.g. two identical objects in a relation) are left out;
``chance`` reports the mean of 1 / (number of candidates) per task. Prints one JSON object.

    python benchmarks/proving_ground_clip_eval.py                      # the shipped checkpoint, 200 per category
    python benchmarks/proving_ground_clip_eval.py --folder /tmp/run --n-per-category 100
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffsteer.proving_ground import shipped  # noqa: E402
from diffsteer.proving_ground.build_clip import DEFAULT_MODEL_NAME, OPPOSITE_RELATION, edit_spec  # noqa: E402
from diffsteer.proving_ground.prompts import heldout_suite  # noqa: E402
from diffsteer.proving_ground.render import render_prompt  # noqa: E402
from diffsteer.proving_ground.world import (  # noqa: E402
    CATEGORIES,
    COLOUR_NAMES,
    MAX_COUNT,
    RELATIONS,
    SHAPES,
    all_prompt_specs,
    canonical_key,
)

ASSET_FOLDER = shipped.CLIP
TASKS = ("colour", "shape", "count", "relation", "relation_swap", "binding_swap")


def load(folder: str | Path = ASSET_FOLDER, model_name: str = DEFAULT_MODEL_NAME):
    """The model as the ``clip`` reward loads it (a ``LoadedOpenClip``)."""
    from diffsteer.rewards.clip import ClipRewardConfig
    from diffsteer.rewards.open_clip_loader import load_open_clip

    folder = Path(folder)
    cfg = ClipRewardConfig(
        model_config_path=str(folder / f"{model_name}.json"),
        checkpoint=str(folder / "open_clip_model.safetensors"),
        gradient_checkpointing=False,
    )
    return load_open_clip(cfg, "clip", None, "cpu", torch.float32)


def task_candidates(spec) -> dict[str, list[list]]:
    """Per task, the candidate lists (true spec first) this scene is tested on (several for colour/shape)."""

    def with_truth(edits):
        cands = [spec] + [e for e in edits if e is not None]
        keys = [canonical_key(c) for c in cands]
        return [c for i, c in enumerate(cands) if keys[i] not in keys[:i]]

    n = len(spec.groups)
    out: dict[str, list[list]] = defaultdict(list)
    for g in range(n):
        out["colour"].append(with_truth(edit_spec(spec, "colour", c, g) for c in COLOUR_NAMES))
        out["shape"].append(with_truth(edit_spec(spec, "shape", s, g) for s in SHAPES))
    if n == 1:
        out["count"].append(with_truth(edit_spec(spec, "count", k) for k in range(1, MAX_COUNT + 1)))
    if spec.relation is not None:
        out["relation"].append(with_truth(edit_spec(spec, "relation", r) for r in RELATIONS))
        out["relation_swap"].append(with_truth([edit_spec(spec, "relation", OPPOSITE_RELATION[spec.relation])]))
    if n == 2:
        a, b = spec.groups
        swap = edit_spec(spec, "swap", "colour" if a.colour != b.colour else "shape")
        if swap is not None and a.colour != b.colour:
            out["binding_swap"].append(with_truth([swap]))
    return {k: [c for c in v if len(c) > 1] for k, v in out.items()}


@torch.no_grad()
def evaluate(loaded, n_per_category: int = 200, suite_seed: int = 0, retrieval_size: int = 32, seed: int = 0) -> dict:
    from diffsteer.rewards.open_clip_loader import encode_text
    from diffsteer.rewards.preprocess import clip_preprocess

    items = [item for c in CATEGORIES for item in heldout_suite(c, n_per_category, suite_seed)]
    images = np.stack([render_prompt(item.spec, item.seed)[0] for item in items])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    feats = []
    for i in range(0, len(pixels), 256):
        x = clip_preprocess(pixels[i : i + 256], loaded.preprocess)
        feats.append(loaded.model.encode_image(x, normalize=True).float())
    image_emb = torch.cat(feats)

    rng = np.random.default_rng(seed)
    pool = list({canonical_key(s): s.caption for c in CATEGORIES for s in all_prompt_specs(c)}.items())
    tests: list[tuple[int, str, list[str]]] = []  # (image index, task, candidate captions, true first)
    for i, item in enumerate(items):
        for task, lists in task_candidates(item.spec).items():
            tests.extend((i, task, [c.caption for c in cands]) for cands in lists)
        key = canonical_key(item.spec)
        others = [cap for k, cap in pool if k != key]
        picks = rng.choice(len(others), size=retrieval_size - 1, replace=False)
        tests.append((i, "retrieval", [item.spec.caption] + [others[j] for j in picks]))

    texts = sorted({t for _, _, cands in tests for t in cands})
    index = {t: j for j, t in enumerate(texts)}
    text_emb = torch.cat([encode_text(loaded, texts[j : j + 512]).float() for j in range(0, len(texts), 512)])
    sims = image_emb @ text_emb.t()

    hits: dict[str, list[float]] = defaultdict(list)
    chance: dict[str, list[float]] = defaultdict(list)
    by_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, task, cands in tests:
        s = sims[i, [index[c] for c in cands]]
        rank = int((s[1:] >= s[0]).sum())  # 0 = the true caption wins outright (a tie counts as a miss)
        if task == "retrieval":
            hits["retrieval_top1_of_32"].append(float(rank == 0))
            hits["retrieval_top5_of_32"].append(float(rank < 5))
            chance["retrieval_top1_of_32"].append(1 / len(cands))
            chance["retrieval_top5_of_32"].append(5 / len(cands))
            by_cat[items[i].category]["retrieval_top1_of_32"].append(float(rank == 0))
            continue
        hits[task].append(float(rank == 0))
        chance[task].append(1 / len(cands))
        by_cat[items[i].category][task].append(float(rank == 0))

    def mean(v):
        return round(float(np.mean(v)), 4)

    return {
        "accuracy": {k: mean(v) for k, v in hits.items()},
        "chance": {k: mean(v) for k, v in chance.items()},
        "trials": {k: len(v) for k, v in hits.items()},
        "by_category": {c: {k: mean(v) for k, v in by_cat[c].items()} for c in CATEGORIES},
        "n_images": len(items),
        "n_texts": len(texts),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--folder", default=str(ASSET_FOLDER), help="folder with <model-name>.json + open_clip_model.safetensors"
    )
    ap.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="architecture name (the config file's stem)")
    ap.add_argument("--n-per-category", type=int, default=200, help="held-out scenes per prompt category")
    ap.add_argument("--suite-seed", type=int, default=0, help="seed of heldout_suite")
    ap.add_argument("--retrieval-size", type=int, default=32, help="captions per retrieval trial")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load(args.folder, args.model_name)
    result = evaluate(loaded, args.n_per_category, args.suite_seed, args.retrieval_size)
    report = {
        "benchmark": "proving_ground_clip_eval",
        "model": args.model_name,
        "folder": str(args.folder),
        "n_per_category": args.n_per_category,
        "suite_seed": args.suite_seed,
        **result,
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
