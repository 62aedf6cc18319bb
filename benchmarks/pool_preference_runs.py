"""Pool several runs of ``benchmarks/preference_proving_ground.py`` that differ only in the training seed.

One training run per method is one draw of the training's own randomness (LoRA initialisation, which pairs a
step meets, the noise), which can move a method's gain as much as the choice of method does (BENCHMARKS.md,
section Diffusion-DPO and SmPO).
Runs made with ``--seed 0``, ``--seed 1``, ... on the same pairs file and the same ``--eval-seed`` share their
evaluation items (the base arm's images are identical; checked here), so their arms can be pooled:

* per run: each arm's pass rate and its difference from ``base`` and from ``dpo``;
* across runs: the mean difference with a t interval over the training seeds (the training's variance);
* pooled: every run's images of an arm together, the paired difference with a 95% bootstrap CI over the
  evaluation prompts (``diffsteer.evaluation.stats.compare``; the variance of the items, with the seeds averaged).

    python benchmarks/pool_preference_runs.py RUN_SEED0 RUN_SEED1 RUN_SEED2 [--category single]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy import stats as scipy_stats  # noqa: E402

from diffsteer.evaluation.records import RecordStore  # noqa: E402
from diffsteer.evaluation.stats import compare  # noqa: E402


def read_run(folder: Path, category: str) -> dict[str, dict[tuple[str, int], float]]:
    """{arm: {(prompt_id, seed): verifier pass}} of one run's evaluation of ``category`` (its A/B records)."""
    arms: dict[str, dict[tuple[str, int], float]] = {}
    for (arm, prompt_id, seed), rec in RecordStore(folder / "eval" / category / "records.jsonl").records.items():
        arms.setdefault(arm, {})[(prompt_id, seed)] = float(rec["metrics"]["verifier.passed"])
    return arms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders of preference_proving_ground.py")
    ap.add_argument("--category", default="single")
    ap.add_argument("--bootstrap", type=int, default=5000)
    args = ap.parse_args(argv)

    runs = [read_run(Path(r), args.category) for r in args.runs]
    items = sorted(runs[0]["base"])
    if any(sorted(r["base"]) != items or r["base"] != runs[0]["base"] for r in runs):
        print(
            "pool_preference_runs: the runs do not share their evaluation items (same pairs, --eval-seed, "
            "--eval-seeds and base images needed)",
            file=sys.stderr,
        )
        return 2
    trained = [a for a in runs[0] if a != "base" and all(a in r for r in runs)]  # the arms every run has
    pids = [pid for pid, _ in items]

    print(
        f"### {len(runs)} training seeds, {args.category}: {len(set(pids))} prompts x "
        f"{len(items) // len(set(pids))} seeds per run\n"
    )
    print("| run | base | " + " | ".join(trained) + " |")
    print("| --- " * (2 + len(trained)) + "|")
    for path, run in zip(args.runs, runs):
        print(
            f"| {Path(path).name} | {np.mean(list(run['base'].values())):.3f} | "
            + " | ".join(f"{np.mean([run[a][k] for k in items]):.3f}" for a in trained)
            + " |"
        )

    pairs = [("base", a) for a in trained] + [("dpo", a) for a in trained if a != "dpo" and "dpo" in trained]
    print("\n| difference | per run | mean over runs [95% t interval over seeds] | pooled [95% CI over prompts] |")
    print("| --- | --- | --- | --- |")
    for a, b in pairs:
        per_run = np.array([np.mean([r[b][k] - r[a][k] for k in items]) for r in runs])
        half = (
            scipy_stats.t.ppf(0.975, len(runs) - 1) * per_run.std(ddof=1) / np.sqrt(len(runs))
            if len(runs) > 1
            else np.nan
        )
        pooled = compare(
            {
                a: {"pass": np.concatenate([[r[a][k] for k in items] for r in runs])},
                b: {"pass": np.concatenate([[r[b][k] for k in items] for r in runs])},
            },
            pids * len(runs),
            n_resamples=args.bootstrap,
        )[0].metrics["pass"]
        print(
            f"| {b} - {a} | "
            + ", ".join(f"{d:+.3f}" for d in per_run)
            + f" | {per_run.mean():+.3f} [{per_run.mean() - half:+.3f}, {per_run.mean() + half:+.3f}] | "
            f"{pooled.mean_diff:+.3f} [{pooled.ci_low:+.3f}, {pooled.ci_high:+.3f}] |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
