"""Online RL on the proving ground: Flow-GRPO and DiffusionNFT against AlignProp, SmPO and the base model at equal
wall time, judged by the verifier on held-out seeds.

1. **Training at equal wall time.** AlignProp, SmPO, Flow-GRPO and DiffusionNFT (LoRA, the same training prompts,
   reward, seed, rank and learning rate; each method's own recipe: AlignProp samples at the evaluation's steps with
   truncated backpropagation; SmPO trains on best-against-rest pairs of the base model's images scored by the
   reward, made first and counted in its time, with the recipe of its own benchmark (β 20000, τ 0.3, no inversion,
   an EMA of the adapter); Flow-GRPO and NFT roll out at ``--sample-steps``) take optimizer steps in turn, one
   each, until each has spent ``--budget-s`` seconds, so machine load hits all alike and the comparison is per
   unit of training time, not per step.
2. **The reward-vs-verifier curve.** At ``--curve-points`` evenly spaced moments of each method's budget (and at
   0), its current weights are evaluated by the trainer's own held-out evaluation (``pg:`` prompts at fixed
   seeds): the training reward and the verifier's pass rate, so reward hacking shows as a reward that climbs while
   the verifier does not (``curve.png``, ``summary.json``).
3. **Held-out evaluation.** ``diffsteer.evaluation.ab.run_ab`` per category on the held-out suite at
   ``--eval-seed`` (instances no recipe choice saw): arms ``base`` and each method's exported pipeline, every arm
   at its method's guidance (NFT CFG-free at scale 1, the others at ``--policy``; the base also at scale 1 as
   ``base_cfg1``), verifier pass rates per category and the paired differences against the base with 95%
   prompt-bootstrap CIs.

    python benchmarks/online_rl_proving_ground.py -o bench-online-rl            # the recorded run (flow model)
    python benchmarks/online_rl_proving_ground.py -o /tmp/online-rl-smoke --smoke   # seconds: tiny SD3, CI

Prints a Markdown summary for BENCHMARKS.md and writes ``summary.json`` and ``curve.png``.
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

METHODS = ("alignprop", "smpo", "grpo", "nft")
CFG_FREE = {"nft"}  # methods evaluated at guidance 1

SMOKE = dict(
    model="builtin:tiny-sd3",
    reward="saturation:1",
    budget_s=1.0,
    curve_points=1,
    train_categories="single",
    eval_categories="single",
    curve_prompts=1,
    eval_prompts=1,
    other_eval_prompts=1,
    eval_seeds=1,
    sample_steps=2,
    eval_steps=2,
    batch=4,
    group_size=2,
    bootstrap=200,
    pairs_prompts=1,
    pairs_images=2,
)


def method_policy(args, method: str) -> str:
    return "cfg:scale=1" if method in CFG_FREE else args.policy


def smpo_pairs(args, out: Path) -> Path:
    """SmPO's offline data, made from the base model: the reward's best of ``--pairs-images`` images per training
    prompt against each other one (``best-rest``, the recipe of BENCHMARKS.md's Diffusion-DPO and SmPO section)."""
    from diffsteer.training.pairs import PairsConfig, build_pairs
    from diffsteer.training.preference_data import write_preference_pairs

    config = PairsConfig(
        output=str(out / "pairs.parquet"),
        model=args.model,
        prompts=f"pg-train:{args.train_categories}",
        max_prompts=args.pairs_prompts,
        images_per_prompt=args.pairs_images,
        pairing="best-rest",
        reward=args.reward,
        policy=args.policy,
        scheduler="euler",
        steps=args.eval_steps,
        seed=args.seed,
        batch_size=args.batch_eval,
    )
    return write_preference_pairs(config.output, build_pairs(config, progress=False))


def build_trainers(args, out: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """The trainers, and the seconds each method spent before its first step (SmPO: making its pairs), which count
    in its budget."""
    from diffsteer.training.alignprop import AlignPropConfig, AlignPropTrainer
    from diffsteer.training.grpo import GRPOConfig, GRPOTrainer
    from diffsteer.training.nft import NFTConfig, NFTTrainer
    from diffsteer.training.smpo import SmPOConfig, SmPOTrainer

    common = dict(
        model=args.model,
        prompts=f"pg-train:{args.train_categories}",
        reward=args.reward,
        eval_prompts=f"pg:{args.train_categories}",
        eval_max_prompts=args.curve_prompts,
        eval_seeds=args.eval_seeds,
        scheduler="euler",
        steps=args.eval_steps,
        batch_size=args.batch,
        learning_rate=args.lr,
        lora_rank=args.lora_rank,
        lora_alpha=float(args.lora_rank),
        seed=args.seed,
        threads=args.threads,
        progress=False,
        tensorboard=False,
        export="pipeline",
        checkpoint_every=10**6,
        eval_every=10**6,
        max_steps=10**6,
    )
    online = dict(group_size=args.group_size, sample_steps=args.sample_steps)
    preference = dict(
        beta=20000.0, preference_temperature=0.3, inversion=False, ema_decay=0.97, eval_reward=args.reward
    )
    configs = {
        "alignprop": (AlignPropConfig, AlignPropTrainer, dict(truncation="uniform", truncation_k_max=args.eval_steps)),
        "smpo": (SmPOConfig, SmPOTrainer, preference),
        "grpo": (
            GRPOConfig,
            GRPOTrainer,
            dict(online, rollout_cfg=float(args.policy_scale), sde_window=args.sde_window),
        ),
        "nft": (NFTConfig, NFTTrainer, dict(online, rollout_cfg=1.0)),
    }
    trainers, setup = {}, {}
    for method in args.methods.split(","):
        config_cls, trainer_cls, extra = configs[method]
        values = {**common, **extra, "policy": method_policy(args, method), "output_dir": str(out / method)}
        t0 = time.perf_counter()
        if method == "smpo":
            values = {k: v for k, v in values.items() if k not in ("prompts", "reward")}
            values["data"] = str(smpo_pairs(args, out))
        setup[method] = time.perf_counter() - t0
        trainers[method] = trainer_cls(config_cls(**values))
    return trainers, setup


def train_at_equal_wall_time(args, trainers: dict[str, Any], setup: dict[str, float]) -> dict[str, Any]:
    """Round-robin optimizer steps until every method has spent ``budget_s`` in its setup (SmPO's pairs) and its
    own steps; curve points at evenly spaced fractions of the budget (evaluation time not counted)."""
    spent = dict(setup)
    curve: dict[str, list[dict[str, float]]] = {m: [] for m in trainers}
    marks = [args.budget_s * (k + 1) / args.curve_points for k in range(args.curve_points)]
    next_mark = dict.fromkeys(trainers, 0)
    step_times: dict[str, list[float]] = {m: [] for m in trainers}
    rewards: dict[str, list[float]] = {m: [] for m in trainers}

    def point(method: str) -> None:
        trainer = trainers[method]
        with trainer.averaged_weights():
            metrics = trainer.evaluate().metrics
        curve[method].append({"train_s": spent[method], "step": trainer.step, **metrics})
        print(f"{method}: {spent[method]:.0f} s, step {trainer.step}: {metrics}", file=sys.stderr, flush=True)

    def catch_up(method: str) -> None:
        while next_mark[method] < len(marks) and spent[method] >= marks[next_mark[method]]:
            next_mark[method] += 1
            point(method)

    def running(method: str) -> bool:  # every method takes at least one step, even after a setup over budget
        return spent[method] < args.budget_s or trainers[method].step == 0

    for method in trainers:
        point(method)
    while any(running(m) for m in trainers):
        for method, trainer in trainers.items():
            if not running(method):
                continue
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            step_times[method].append(time.perf_counter() - t0)
            spent[method] += step_times[method][-1]
            rewards[method].append(metrics.get("reward", np.nan))  # SmPO trains on pairs: no rollout reward
            catch_up(method)
    exported = {}
    for method, trainer in trainers.items():
        exported[method] = trainer.export()["pipeline"]
    return {
        "train_s": spent,
        "steps": {m: t.step for m, t in trainers.items()},
        "step_s_median": {m: float(np.median(v)) for m, v in step_times.items()},
        "train_reward_first_last": {
            m: [v[0], float(np.mean(v[-5:]))] for m, v in rewards.items() if v and not np.isnan(v[0])
        },
        "curve": curve,
        "exported": exported,
    }


def evaluate(args, out: Path, exported: dict[str, str]) -> dict[str, Any]:
    from diffsteer.evaluation.ab import run_ab

    arms = [f"base={args.policy}", "base_cfg1=cfg:scale=1"]
    arms += [f"{m}={method_policy(args, m)}@{path}" for m, path in exported.items()]
    results = {}
    trained = args.train_categories.split(",")
    for category in args.eval_categories.split(","):
        in_training = args.train_categories == "all" or category in trained
        run = run_ab(
            {
                "model": args.model,
                "arms": arms,
                "prompts": f"pg:{category}",
                "seed": args.eval_seed,
                "seeds": args.eval_seeds,
                "max_prompts": args.eval_prompts if in_training else args.other_eval_prompts,
                "steps": args.eval_steps,
                "scheduler": "euler",
                "metrics": ["verifier", f"reward:{args.reward}"],
                "batch_size": args.batch_eval,
                "n_resamples": args.bootstrap,
                "output_dir": str(out / "eval" / category),
                "report": False,
            },
            progress=ab_progress_printer(f"eval {category}"),
        )
        names = ["base", "base_cfg1", *exported]
        results[category] = {
            "trained": in_training,
            "n": run["prompts"]["n_prompts"],
            "pass": {arm: run["summary"][arm]["verifier.passed"]["mean"] for arm in names},
            "reward": {arm: run["summary"][arm][f"reward:{args.reward}"]["mean"] for arm in names},
            **{f"{m}_vs_base": ab_pair(run, "base", m)["verifier.passed"] for m in exported},
            **{f"{m}_vs_base_cfg1": ab_pair(run, "base_cfg1", m)["verifier.passed"] for m in exported if m in CFG_FREE},
        }
    return results


def plot_curve(curve: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for method, points in curve.items():
        seconds = [p["train_s"] for p in points]
        for ax, key in zip(axes, ("reward", "verifier.passed")):
            ax.plot(seconds, [p.get(key, np.nan) for p in points], marker="o", label=method)
            ax.set_title(f"held-out {key}", fontsize=9)
            ax.set_xlabel("training seconds")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(args, summary: dict[str, Any]) -> str:
    tr, ev = summary["training"], summary["evaluation"]
    methods = list(tr["steps"])
    lines = [
        f"### Online RL on the proving ground ({args.model}, reward {args.reward}, {args.budget_s:g} s of training "
        f"per method, trained on pg-train:{args.train_categories}; held-out suite seed {args.eval_seed})\n",
        "| method | steps | s/step | train reward first → last |",
        "|---|---|---|---|",
    ]
    for m in methods:
        first_last = tr["train_reward_first_last"].get(m)
        rewards = f"{first_last[0]:.4f} → {first_last[1]:.4f}" if first_last else "—"
        lines.append(f"| {m} | {tr['steps'][m]} | {tr['step_s_median'][m]:.2f} | {rewards} |")
    lines += [
        "",
        "| category | n | base | base cfg 1 | " + " | ".join(f"{m} (Δ vs base, 95% CI)" for m in methods) + " |",
    ]
    lines.append("|---" * (3 + len(methods) + 1) + "|")
    for category, r in ev.items():
        cells = [f"{r['pass'][m]:.3f} ({ci_text(r[f'{m}_vs_base'], tests=False)})" for m in methods]
        cells = [
            cell + (f"; vs base cfg 1 {ci_text(r[f'{m}_vs_base_cfg1'], tests=False)}" if m in CFG_FREE else "")
            for m, cell in zip(methods, cells)
        ]
        mark = " (trained)" if r["trained"] else ""
        lines.append(
            f"| {category}{mark} | {r['n']} | {r['pass']['base']:.3f} | {r['pass']['base_cfg1']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-o", "--output", required=True, help="run folder")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on the tiny SD3 transformer (CI)")
    ap.add_argument("--model", default="builtin:proving-ground-flow")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument(
        "--reward",
        default="clip:1",
        help="training reward: the proving-ground CLIP, or 'verifier' (the verifier's partial score on the training "
        "prompts, as Flow-GRPO trains on GenEval's rule reward; AlignProp needs a differentiable one)",
    )
    ap.add_argument("--budget-s", type=float, default=1800.0, help="training seconds per method")
    ap.add_argument("--curve-points", type=int, default=6, help="held-out evaluations per method during training")
    ap.add_argument("--curve-prompts", type=int, default=4, help="held-out prompts per category of the curve")
    ap.add_argument("--train-categories", default="all", help="pg categories of the training prompts")
    ap.add_argument("--policy-scale", type=float, default=3.0, help="CFG scale of the base, AlignProp and GRPO")
    ap.add_argument("--sample-steps", type=int, default=10, help="rollout steps of Flow-GRPO and NFT")
    ap.add_argument("--eval-steps", type=int, default=20, help="Euler steps of the evaluation (and of AlignProp)")
    ap.add_argument("--sde-window", type=int, default=0, help="Flow-GRPO's stochastic steps per rollout (0: all)")
    ap.add_argument("--batch", type=int, default=8, help="images per step (each method)")
    ap.add_argument("--group-size", type=int, default=4, help="images per prompt of GRPO and NFT")
    ap.add_argument("--pairs-prompts", type=int, default=24, help="SmPO: training prompts its pairs are made from")
    ap.add_argument("--pairs-images", type=int, default=12, help="SmPO: images per prompt (best against the rest)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--eval-categories", default="single,two_objects,counting,position,colour_binding")
    ap.add_argument("--eval-prompts", type=int, default=18, help="held-out prompts per trained category")
    ap.add_argument("--other-eval-prompts", type=int, default=6, help="held-out prompts per other category")
    ap.add_argument("--eval-seeds", type=int, default=4, help="held-out seeds per prompt")
    ap.add_argument("--eval-seed", type=int, default=1, help="the held-out suite's seed (0 is the curve's)")
    ap.add_argument("--batch-eval", type=int, default=16)
    ap.add_argument("--bootstrap", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    args.policy = f"cfg:scale={args.policy_scale:g}"
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; accepted: {', '.join(METHODS)}")

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        trainers, setup = build_trainers(args, out)
        training = train_at_equal_wall_time(args, trainers, setup)
        training["setup_s"] = setup
        evaluation = evaluate(args, out, training["exported"])
    except InvalidInput as e:
        print(f"online_rl_proving_ground: error: {e}", file=sys.stderr)
        return 2
    summary = {"args": vars(args), "training": training, "evaluation": evaluation}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_curve(training["curve"], out / "curve.png")
    print(markdown(args, summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
