"""Verifier scores of a proving-ground model under several guidance policies, on held-out prompts.

For each arm (cfg at several scales, guidance off, apg and ag at their defaults) every held-out item
(prompt, seed) is generated with the same seed, scored by the exact verifier, and summarised per category;
the pass-rate difference of each arm against guidance off gets a bootstrap 95% CI resampled over prompts.

    python benchmarks/proving_ground_eval.py --single 216 --other 48 --steps 30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffsteer.evaluation.runner import Item, run_arm  # noqa: E402
from diffsteer.evaluation.stats import cluster_bootstrap_ci  # noqa: E402
from diffsteer.guidance.models import load_model  # noqa: E402
from diffsteer.proving_ground import heldout_suite, summarise, verify  # noqa: E402

DEFAULT_ARMS = [
    "cfg:scale=1",
    "cfg:scale=2",
    "cfg:scale=3",
    "cfg:scale=4.5",
    "cfg:scale=6",
    "cfg:scale=9",
    "apg:scale=6",
    "ag:scale=3",
]


def items_for(category: str, n: int, seed: int) -> list[Item]:
    return [Item(s.prompt, s.seed, s.prompt, s.spec) for s in heldout_suite(category, n, seed)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS)
    ap.add_argument("--single", type=int, default=216, help="held-out single-object items")
    ap.add_argument("--other", type=int, default=48, help="items per other category (0: skip)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--batch", type=int, default=36)
    ap.add_argument("--seed", type=int, default=0, help="suite seed")
    ap.add_argument("--out", default=None, help="write the JSON report here too")
    args = ap.parse_args()

    model = load_model(args.model, device="cpu")
    items = items_for("single", args.single, args.seed)
    if args.other:
        for category in ("two_objects", "counting", "position", "colour_binding"):
            items += items_for(category, args.other, args.seed)
    report: dict = {"model": model.name, "steps": args.steps, "scheduler": args.scheduler, "arms": {}}
    passed: dict[str, np.ndarray] = {}
    for arm in args.arms:
        t0 = time.perf_counter()
        records = run_arm(model, items, arm, steps=args.steps, scheduler=args.scheduler, batch_size=args.batch)
        reports = [verify(r.image, r.item.meta) for r in records]
        passed[arm] = np.array([r.passed for r in reports], dtype=float)
        report["arms"][arm] = {
            "summary": summarise(reports),
            "mean_nfe": float(np.mean([r.nfe for r in records])),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps({arm: report["arms"][arm]["summary"].get("single")}), file=sys.stderr)
    baseline = next((a for a in args.arms if a in ("cfg:scale=1", "cfg:scale=1.0")), None)
    if baseline is not None:
        single = np.array([it.meta.category == "single" for it in items])
        prompt_ids = [it.prompt_id for it, s in zip(items, single) if s]
        for arm in args.arms:
            diff = passed[arm][single] - passed[baseline][single]
            low, high = cluster_bootstrap_ci(diff, prompt_ids, n_resamples=10_000, seed=0)
            report["arms"][arm]["single_pass_vs_guidance_off"] = {
                "diff": float(diff.mean()),
                "ci95": [float(low), float(high)],
            }
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
