"""Diffusion-DPO and SmPO on the proving ground: pairs from the shipped model, trained at equal steps, judged
by the verifier on held-out seeds with the A/B machinery.

1. **Pairs.** ``diffsteer data pairs``' builder: ``--images-per-prompt`` images per training prompt of the
   ``--train-categories`` from the shipped model, scored by the proving-ground CLIP reward (never the verifier),
   the pairs chosen by ``--pairing`` (every pair of a prompt's images, or its best image against each other one)
   written with both scores (``pairs.parquet``; reused when present).
2. **Training.** Diffusion-DPO and SmPO (LoRA, same data, seed, batch, learning rate, number of steps and
   ``--ema-decay``), their optimizer steps interleaved one by one so machine load hits both alike: the step-time
   ratio SmPO / DPO is the cost of the inversion. SmPO's β is set so that its mean effective strength over the data,
   β_SmPO · mean|2p − 1|, equals Diffusion-DPO's β (``--smpo-beta`` overrides). ``--smpo-inversion`` chooses the
   SmPO arms: ``smpo`` (ReNoise inversion, the paper's method), ``smpo_noinv`` (its smoothed preference on
   Diffusion-DPO's forward-noised latents), or both.
3. **Evaluation.** ``diffsteer.evaluation.ab.run_ab`` per category: arms ``base``, ``dpo`` and the SmPO arms (the exported
   pipelines) at the same policy, on the held-out suite's prompts and seeds; verifier pass rates and the paired
   differences with 95% prompt-bootstrap CIs.

    python benchmarks/preference_proving_ground.py -o bench-pref                       # the recorded run
    python benchmarks/preference_proving_ground.py -o /tmp/pref-smoke --train-steps 2 --images-per-prompt 2 \\
        --max-train-prompts 2 --eval-prompts 1 --eval-seeds 1 --eval-categories single  # smoke test

Prints a Markdown summary for BENCHMARKS.md and writes ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import ab_pair, ab_progress_printer, ci_text  # noqa: E402
from diffsteer.guidance.errors import InvalidInput  # noqa: E402


def make_pairs(args, out: Path) -> Path:
    from diffsteer.training.pairs import PairsConfig, build_pairs
    from diffsteer.training.preference_data import write_preference_pairs

    path = out / "pairs.parquet"
    if path.is_file():
        return path
    config = PairsConfig(
        output=str(path),
        prompts=f"pg-train:{args.train_categories}",
        max_prompts=args.max_train_prompts,
        images_per_prompt=args.images_per_prompt,
        pairing=args.pairing,
        best_k=args.best_k,
        reward="clip",
        policy=args.policy,
        scheduler="ddim",
        steps=args.sample_steps,
        seed=args.seed,
        batch_size=args.batch_eval,
    )
    return write_preference_pairs(path, build_pairs(config, progress=True))


def smpo_arms(args) -> list[str]:
    """The SmPO arms: ``smpo`` (ReNoise inversion, the paper's method) and/or ``smpo_noinv`` (its smoothed
    preference alone, on Diffusion-DPO's forward-noised latents)."""
    return {"on": ["smpo"], "off": ["smpo_noinv"], "both": ["smpo", "smpo_noinv"]}[args.smpo_inversion]


def train_both(args, out: Path, pairs: Path) -> dict[str, Any]:
    from diffsteer.training.dpo import DPOConfig, DPOTrainer
    from diffsteer.training.preference_data import load_preference_pairs
    from diffsteer.training.smpo import SmPOConfig, SmPOTrainer, pairs_preference

    common = dict(
        data=str(pairs),
        eval_prompts="",
        batch_size=args.batch,
        max_steps=args.train_steps,
        learning_rate=args.lr,
        lora_rank=4,
        lora_alpha=4.0,
        seed=args.seed,
        threads=args.threads,
        progress=False,
        tensorboard=False,
        export="both",
        checkpoint_every=10**6,
        policy=args.policy,
        steps=args.sample_steps,
        ema_decay=args.ema_decay,
    )
    data = load_preference_pairs(pairs)
    low, high = data.score_range()
    p = pairs_preference(data.scores, (low, high), args.temperature)
    strength = float((2 * p - 1).abs().mean())
    smpo_beta = args.smpo_beta or args.beta / strength
    smpo_common = dict(
        common,
        beta=smpo_beta,
        preference_temperature=args.temperature,
        inversion_steps=args.inversion_steps,
        renoise_iterations=args.renoise_iterations,
    )
    trainers = {"dpo": DPOTrainer(DPOConfig(**common, output_dir=str(out / "dpo"), beta=args.beta))}
    for arm in smpo_arms(args):
        trainers[arm] = SmPOTrainer(SmPOConfig(**smpo_common, output_dir=str(out / arm), inversion=arm == "smpo"))
    times: dict[str, list[float]] = {k: [] for k in trainers}
    losses: dict[str, list[float]] = {k: [] for k in trainers}
    t_start = time.perf_counter()
    for step in range(args.train_steps):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            metrics = trainer.training_step()
            trainer.step += 1
            times[name].append(time.perf_counter() - t0)
            losses[name].append(metrics["loss"])
        if (step + 1) % 10 == 0 or step + 1 == args.train_steps:
            print(
                f"train step {step + 1}/{args.train_steps}: "
                + ", ".join(
                    f"{k} loss {np.mean(losses[k][-10:]):.4f} ({np.median(times[k]):.2f} s/step)" for k in trainers
                ),
                file=sys.stderr,
                flush=True,
            )
    exported = {name: trainer.export() for name, trainer in trainers.items()}
    return {
        "pairs": len(data),
        "ties": int((data.label_0 == 0.5).sum()),
        "score_range": [low, high],
        "mean_abs_2p_minus_1": strength,
        "dpo_beta": args.beta,
        "smpo_beta": smpo_beta,
        "step_s_median": {k: float(np.median(v)) for k, v in times.items()},
        "step_time_ratio_over_dpo": {
            k: float(np.median(np.array(v) / np.array(times["dpo"]))) for k, v in times.items() if k != "dpo"
        },
        "final_loss": {k: float(np.mean(v[-10:])) for k, v in losses.items()},
        "exported": exported,
        "train_seconds": round(time.perf_counter() - t_start, 1),
    }


def evaluate(args, out: Path) -> dict[str, Any]:
    from diffsteer.evaluation.ab import run_ab

    trained = ["dpo", *smpo_arms(args)]
    arms = [f"base={args.policy}"] + [f"{arm}={args.policy}@{out / arm / 'pipeline'}" for arm in trained]
    results = {}
    for category in args.eval_categories.split(","):
        in_training = category in args.train_categories.split(",") or args.train_categories == "all"
        run = run_ab(
            {
                "model": "builtin:proving-ground",
                "arms": arms,
                "prompts": f"pg:{category}",
                "seed": args.eval_seed,
                "seeds": args.eval_seeds,
                "max_prompts": args.eval_prompts if in_training else args.other_eval_prompts,
                "steps": args.sample_steps,
                "scheduler": "ddim",
                "metrics": ["verifier"],
                "batch_size": args.batch_eval,
                "n_resamples": args.bootstrap,
                "output_dir": str(out / "eval" / category),
                "report": False,
            },
            progress=ab_progress_printer(f"eval {category}"),
        )
        results[category] = {
            "trained": in_training,
            "n": run["prompts"],
            "pass": {arm: run["summary"][arm]["verifier.passed"]["mean"] for arm in ("base", *trained)},
            **{f"{arm}_vs_base": ab_pair(run, "base", arm)["verifier.passed"] for arm in trained},
            **{f"{arm}_vs_dpo": ab_pair(run, "dpo", arm)["verifier.passed"] for arm in trained if arm != "dpo"},
        }
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-o", "--output", required=True, help="run folder (pairs are reused when present)")
    ap.add_argument("--train-categories", default="single", help="pg categories of the training prompts")
    ap.add_argument("--max-train-prompts", type=int, default=None, help="training prompts kept (default: all)")
    ap.add_argument("--images-per-prompt", type=int, default=6, help="images sampled per training prompt")
    ap.add_argument(
        "--pairing", default="all", help="which pairs of a prompt's images (diffsteer data pairs --pairing)"
    )
    ap.add_argument("--best-k", type=int, default=1, help="with --pairing best-rest: how many best images per prompt")
    ap.add_argument("--policy", default="cfg:scale=1.5", help="guidance of the pair sampling and the evaluation")
    ap.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the sampling and the evaluation")
    ap.add_argument("--train-steps", type=int, default=100, help="optimizer steps of each method")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="EMA of each method's LoRA, evaluated and exported (the trainers' ema_decay; 0: none)",
    )
    ap.add_argument("--beta", type=float, default=5000.0, help="Diffusion-DPO's beta")
    ap.add_argument("--smpo-beta", type=float, default=None, help="SmPO's beta (default: matched strength, see above)")
    ap.add_argument("--temperature", type=float, default=1.0, help="SmPO's preference temperature")
    ap.add_argument(
        "--smpo-inversion",
        choices=("on", "off", "both"),
        default="on",
        help="SmPO arms: with ReNoise inversion (smpo), without (smpo_noinv: the smoothed preference alone), or both",
    )
    ap.add_argument("--inversion-steps", type=int, default=5)
    ap.add_argument("--renoise-iterations", type=int, default=1)
    ap.add_argument("--eval-categories", default="single,two_objects,counting,position,colour_binding")
    ap.add_argument("--eval-prompts", type=int, default=18, help="held-out prompts per trained category")
    ap.add_argument("--other-eval-prompts", type=int, default=6, help="held-out prompts per other category")
    ap.add_argument("--eval-seeds", type=int, default=4, help="held-out seeds per prompt")
    ap.add_argument(
        "--eval-seed",
        type=int,
        default=0,
        help="which held-out instances (the suite's seed): a new value gives seeds no tuning has seen",
    )
    ap.add_argument("--batch-eval", type=int, default=16)
    ap.add_argument("--bootstrap", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        pairs = make_pairs(args, out)
        t_pairs = time.perf_counter() - t0
        training = train_both(args, out, pairs)
        evaluation = evaluate(args, out)
    except InvalidInput as e:
        print(f"preference_proving_ground: error: {e}", file=sys.stderr)
        return 2
    summary = {
        "args": vars(args),
        "pairs_seconds": round(t_pairs, 1),
        "training": training,
        "evaluation": evaluation,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    tr = training
    print(
        f"### Diffusion-DPO and SmPO on the proving ground ({tr['pairs']} pairs from "
        f"{args.train_categories} prompts, {args.train_steps} steps x {args.batch} pairs each, "
        f"{summary['seconds'] / 60:.1f} min)\n"
    )
    smpo = smpo_arms(args)
    print(
        "step time (median of interleaved steps): DPO "
        + f"{tr['step_s_median']['dpo']:.2f} s, "
        + ", ".join(
            f"{arm} {tr['step_s_median'][arm]:.2f} s (x{tr['step_time_ratio_over_dpo'][arm]:.2f} of DPO)"
            for arm in smpo
        )
        + f"; beta DPO {tr['dpo_beta']:g}, SmPO {tr['smpo_beta']:.4g} (mean |2p-1| {tr['mean_abs_2p_minus_1']:.3f})\n"
    )
    columns = [("dpo", "base")] + [(arm, ref) for arm in smpo for ref in ("base", "dpo")]
    print(
        "| category | trained | prompts x seeds | base | dpo | "
        + " | ".join(smpo)
        + " | "
        + " | ".join(f"{arm} - {ref} [95% CI]" for arm, ref in columns)
        + " |"
    )
    print("| --- " * (5 + len(smpo) + len(columns)) + "|")
    for category, r in evaluation.items():
        n = r["n"]
        cells = [f"{r['pass'][arm]:.3f}" for arm in ("base", "dpo", *smpo)]
        cells += [ci_text(r[f"{arm}_vs_{ref}"], tests=False) for arm, ref in columns]
        print(
            f"| {category} | {'yes' if r['trained'] else 'no'} | {n['n_prompts']} x {n['seeds_per_prompt']} | "
            + " | ".join(cells)
            + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
