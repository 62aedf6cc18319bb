"""Which guidance scales ``dynamic_cfg`` chooses, step by step, on the proving ground's held-out prompts.

Generates each category's held-out items with one dynamic_cfg setting and prints the mean chosen scale at every
step (from the policy's ``scale_schedule`` trace), and its means over the first, middle and last third of the
steps where the evaluators choose: the "guidance pattern" the online feedback settles on.

    python benchmarks/dynamic_cfg_schedule.py
    python benchmarks/dynamic_cfg_schedule.py --policy "dynamic_cfg:candidates=[1,2,4.5,9]" --categories single
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffsteer.guidance.models import load_model
from diffsteer.guidance.request import Limits
from diffsteer.guidance.sampler import generate
from diffsteer.proving_ground import heldout_suite


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="dynamic_cfg:candidates=[1,1.5,2,3,4.5,6],start=0.2,initial_scale=1")
    ap.add_argument("--categories", default="single,colour_binding")
    ap.add_argument("--items", type=int, default=24, help="held-out items per category")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    model = load_model(args.model, device="cpu")
    report = {"policy": args.policy, "steps": args.steps, "categories": {}}
    for category in args.categories.split(","):
        suite = heldout_suite(category, args.items, 0)
        result = generate(
            model,
            {
                "prompt": [s.prompt for s in suite],
                "seeds": [s.seed for s in suite],
                "steps": args.steps,
                "scheduler": args.scheduler,
                "policy": args.policy,
            },
            limits=Limits(max_num_images=max(len(suite), Limits.max_num_images)),
        )
        per_step = np.asarray(result.trace["scale_schedule"], dtype=float).mean(axis=1)
        start = getattr(result.params.policy, "start", 0.0)
        chosen = per_step[math.ceil(start * args.steps) :]
        thirds = [float(part.mean()) for part in np.array_split(chosen, 3)]
        report["categories"][category] = {
            "mean_scale_per_step": [round(float(v), 2) for v in per_step],
            "mean_scale_by_third": [round(v, 2) for v in thirds],
        }
        print(
            f"{category}: by third {' / '.join(f'{v:.2f}' for v in thirds)}; per step "
            + " ".join(f"{v:.1f}" for v in per_step),
            file=sys.stderr,
        )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
