"""The guidance study on the flow-matching proving ground (issue 31), each part a paired A/B run
(``diffsteer.evaluation.ab.run_ab``: every arm draws every held-out item with the item's seed; 95% CIs resample
prompts with all their seeds).

1. **response**: the verifier pass rate of plain CFG at each scale (default 1, 2, 3, 5, 7; scale 1 is the
   conditional prediction alone) on held-out single-object, two-object and colour-binding items, each with its
   CI, and each scale's paired difference to the best one. The bar of issue 31: the best scale is 3 or more,
   and scales 5 and 7 stay within 5 points of it.
2. **compare**: the flow model against the UNet model, each at its recommended policy and steps (its
   ``diffsteer.json``), on every held-out category: the paired pass-rate difference with its CI.
3. **policies**: the best fixed scale (chosen on a tuning split: other instance seeds of the held-out suite)
   against APG at a high scale, CFG-Zero*, interval guidance, a linear schedule, AG and LinearAG, with each arm's
   NFE, time, HSV saturation and clipped-pixel fraction beside its pass rate.

    python benchmarks/flow_guidance_study.py -o bench-flow                     # all parts, CPU
    python benchmarks/flow_guidance_study.py -o /tmp/flow-smoke --smoke        # a few images, tiny models

Every run is resumable (rerun the same command). Prints Markdown tables for BENCHMARKS.md and writes
``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    ab_pair,
    ab_progress_printer,
    best_scale,
    cfg_scale_arms,
    ci_text,
    scale_arm,
    scale_text,
    tune_cfg_scale,
)
from diffsteer.evaluation.ab import run_ab  # noqa: E402
from diffsteer.guidance.errors import InvalidInput  # noqa: E402
from diffsteer.guidance.models import model_defaults  # noqa: E402

FLOW_MODEL = "builtin:proving-ground-flow"
UNET_MODEL = "builtin:proving-ground"
RESPONSE_CATEGORIES = "single,two_objects,colour_binding"
BAR_POINTS = 0.05  # scales 5 and 7 within 5 points of the best


def response_bar(rates: dict[float, float]) -> dict[str, Any]:
    """Issue 31's bar on a guidance response (point estimates): the best scale is ≥ 3, and each of scales 5
    and 7 is within 5 points of the best."""
    best = best_scale(rates)
    within = {s: rates[best] - rates[s] <= BAR_POINTS + 1e-12 for s in (5.0, 7.0) if s in rates}
    return {
        "best_scale": best,
        "best_at_least_3": best >= 3,
        "within_5_points": within,
        "met": best >= 3 and len(within) == 2 and all(within.values()),
    }


def guidance_response(out: Path, common: dict[str, Any], args) -> dict[str, Any]:
    scales = [float(s) for s in args.scales.split(",")]
    names = {s: scale_arm(s) for s in scales}
    results = run_ab(
        {
            **common,
            "model": args.model,
            "arms": cfg_scale_arms(scales),
            "prompts": f"pg:{args.response_categories}",
            "seed": args.seed,
            "seeds": args.seeds,
            "max_prompts": args.prompts_per_category,
            "metrics": ["verifier", "nfe", "latency", "saturation", "oversaturation"],
            "output_dir": str(out / "response"),
        },
        progress=ab_progress_printer("response"),
    )
    summary = results["summary"]
    rates = {s: summary[names[s]]["verifier.passed"]["mean"] for s in scales}
    best = best_scale(rates)
    rows = []
    for s in scales:
        row = {"scale": s, **{k: summary[names[s]]["verifier.passed"][k] for k in ("mean", "ci_low", "ci_high")}}
        row["saturation"] = summary[names[s]]["saturation"]["mean"]
        row["clipped"] = summary[names[s]]["oversaturation"]["mean"]
        if s != best:
            pair = _pair(results, names[best], names[s])
            row["vs_best"] = {k: pair["verifier.passed"][k] for k in ("mean_diff", "ci_low", "ci_high")}
        rows.append(row)
    n = results["prompts"]
    return {
        "rows": rows,
        "bar": response_bar(rates),
        "n_prompts": n["n_prompts"],
        "seeds": n["seeds_per_prompt"],
        "n_images": n["n_prompts"] * n["seeds_per_prompt"],
    }


def _pair(results: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """The statistics of b - a, whichever order the run stored the pair in."""
    try:
        return ab_pair(results, a, b)
    except KeyError:
        flipped = ab_pair(results, b, a)
        return {
            k: {**m, "mean_diff": -m["mean_diff"], "ci_low": -m["ci_high"], "ci_high": -m["ci_low"]}
            for k, m in flipped.items()
        }


def recommended(spec: str) -> tuple[str, int]:
    defaults = model_defaults(spec)
    if defaults.policy is None or defaults.steps is None:
        raise InvalidInput("model", f"{spec} recommends no policy and steps (diffsteer.json)")
    return defaults.policy, defaults.steps


def compare_models(out: Path, common: dict[str, Any], args) -> dict[str, Any]:
    (policy_a, steps_a), (policy_b, steps_b) = recommended(args.unet_model), recommended(args.model)
    if steps_a != steps_b:
        raise InvalidInput("steps", f"the models recommend {steps_a} and {steps_b} steps; one run has one")
    results = run_ab(
        {
            **common,
            "steps": steps_a,
            "arms": [
                {"name": "unet", "policy": policy_a, "model": args.unet_model},
                {"name": "flow", "policy": policy_b, "model": args.model},
            ],
            "prompts": "pg:all",
            "seed": args.seed,
            "seeds": args.seeds,
            "max_prompts": args.prompts_per_category,
            "metrics": ["verifier", "nfe", "latency", "saturation"],
            "output_dir": str(out / "compare"),
        },
        progress=ab_progress_printer("compare"),
    )
    return {
        "unet": {"model": args.unet_model, "policy": policy_a, "steps": steps_a},
        "flow": {"model": args.model, "policy": policy_b, "steps": steps_b},
        "summary": {arm: results["summary"][arm]["verifier.passed"] for arm in ("unet", "flow")},
        "flow_minus_unet": ab_pair(results, "unet", "flow"),
        "n_prompts": results["prompts"]["n_prompts"],
        "seeds": results["prompts"]["seeds_per_prompt"],
    }


def policy_arms(best: float, high: float) -> list[str]:
    b = scale_text(best)
    return [
        f"cfg=cfg:scale={b}",
        f"cfg_high=cfg:scale={scale_text(high)}",
        f"apg_high=apg:scale={scale_text(high)}",
        f"cfg_zero_star=cfg_zero_star:scale={b}",
        f"interval=cfg:scale={scale_text(2 * best)},interval_start=0.25,interval_end=0.75",
        f"linear=cfg:scale={scale_text(2 * best)},schedule=linear,scale_end=1",
        f"ag=ag:scale={b}",
        f"linear_ag=linear_ag:scale={b}",
    ]


def policies(out: Path, common: dict[str, Any], args) -> dict[str, Any]:
    scales = [float(s) for s in args.scales.split(",")]
    best, _ = tune_cfg_scale(
        {**common, "model": args.model},
        scales,
        prompts="pg:all",
        seed=args.tune_seed,
        max_prompts=args.tune_prompts,
        output_dir=str(out / "tune"),
        report=False,
    )
    results = run_ab(
        {
            **common,
            "model": args.model,
            "arms": policy_arms(best, args.high_scale),
            "baseline": "cfg",
            "prompts": "pg:all",
            "seed": args.seed,
            "seeds": args.seeds,
            "max_prompts": args.prompts_per_category,
            "metrics": ["verifier", "nfe", "latency", "saturation", "oversaturation"],
            "output_dir": str(out / "policies"),
        },
        progress=ab_progress_printer("policies"),
    )
    rows = {}
    for arm, stats in results["summary"].items():
        rows[arm] = {k: stats[k]["mean"] for k in ("verifier.passed", "nfe", "latency", "saturation", "oversaturation")}
        rows[arm]["ci"] = [stats["verifier.passed"]["ci_low"], stats["verifier.passed"]["ci_high"]]
        if arm != "cfg":
            rows[arm]["vs_cfg"] = ab_pair(results, "cfg", arm)["verifier.passed"]
    return {"best_scale": best, "high_scale": args.high_scale, "rows": rows}


def markdown(summary: dict[str, Any]) -> str:
    lines = []
    if "response" in summary:
        r = summary["response"]
        lines += [
            f"Guidance response ({r['n_images']} images per scale: {r['n_prompts']} held-out prompts × {r['seeds']} seeds, "
            f"{summary['steps']} steps, {summary['model']}):",
            "",
            "| cfg scale | pass rate [95% CI] | − best [95% CI] | saturation | clipped |",
            "|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            vs = row.get("vs_best")
            vs_text = f"{vs['mean_diff']:+.3f} [{vs['ci_low']:+.3f}, {vs['ci_high']:+.3f}]" if vs else "best"
            lines.append(
                f"| {scale_text(row['scale'])} | {row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] | {vs_text} "
                f"| {row['saturation']:.3f} | {row['clipped']:.4f} |"
            )
        bar = r["bar"]
        lines += [
            "",
            f"Bar (best ≥ 3, scales 5 and 7 within 5 points of it): {'met' if bar['met'] else 'NOT met'} "
            f"(best scale {scale_text(bar['best_scale'])})",
            "",
        ]
    if "compare" in summary:
        c = summary["compare"]
        lines += [
            f"Flow against UNet, each at its recommended settings ({c['n_prompts']} prompts × {c['seeds']} seeds, all "
            f"categories): UNet `{c['unet']['policy']}` {c['summary']['unet']['mean']:.3f}, flow `{c['flow']['policy']}` "
            f"{c['summary']['flow']['mean']:.3f}; flow − UNet {ci_text(c['flow_minus_unet']['verifier.passed'])}",
            "",
        ]
    if "policies" in summary:
        p = summary["policies"]
        lines += [
            f"Policies (best fixed scale {scale_text(p['best_scale'])} chosen on the tuning split; high scale "
            f"{scale_text(p['high_scale'])}):",
            "",
            "| arm | pass rate [95% CI] | − cfg [95% CI] | NFE | s/image | saturation | clipped |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm, row in p["rows"].items():
            vs = row.get("vs_cfg")
            vs_text = f"{vs['mean_diff']:+.3f} [{vs['ci_low']:+.3f}, {vs['ci_high']:+.3f}]" if vs else "—"
            lines.append(
                f"| {arm} | {row['verifier.passed']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}] | {vs_text} | "
                f"{row['nfe']:.1f} | {row['latency']:.3f} | {row['saturation']:.3f} | {row['oversaturation']:.4f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-o", "--output", required=True, help="folder for the runs (resumable)")
    ap.add_argument("--parts", default="response,compare,policies", help="comma-separated: response, compare, policies")
    ap.add_argument("--model", default=FLOW_MODEL)
    ap.add_argument("--unet-model", default=UNET_MODEL, help="the model the flow model is compared with")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--scales", default="1,2,3,5,7", help="CFG scales of the response and of the tuning split")
    ap.add_argument("--response-categories", default=RESPONSE_CATEGORIES)
    ap.add_argument("--prompts-per-category", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    ap.add_argument("--seed", type=int, default=2, help="held-out suite seed of the evaluation items")
    ap.add_argument("--tune-seed", type=int, default=1, help="held-out suite seed of the tuning items")
    ap.add_argument("--tune-prompts", type=int, default=12, help="tuning prompts per category (1 seed each)")
    ap.add_argument("--high-scale", type=float, default=7.0)
    ap.add_argument("--batch-size", type=int, default=30)
    ap.add_argument("--bootstrap", type=int, default=10_000)
    ap.add_argument("--smoke", action="store_true", help="tiny SD3/UNet models, 2 steps, a few prompts")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.unet_model, args.steps = "builtin:tiny-sd3", "builtin:tiny-sd3", 2
        args.scales, args.prompts_per_category, args.seeds, args.tune_prompts = "1,3", 1, 1, 1
        args.response_categories, args.bootstrap, args.batch_size = "single", 200, 8
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"response", "compare", "policies"}
    if unknown:
        ap.error(f"--parts: unknown {sorted(unknown)}; accepted: response, compare, policies")

    out = Path(args.output)
    common = {
        "device": args.device,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "n_resamples": args.bootstrap,
        "report": not args.smoke,
    }
    summary: dict[str, Any] = {"model": args.model, "steps": args.steps, "date": time.strftime("%Y-%m-%d")}
    t0 = time.perf_counter()
    try:
        if "response" in parts:
            summary["response"] = guidance_response(out, common, args)
        if "compare" in parts:
            summary["compare"] = compare_models(out, common, args)
        if "policies" in parts:
            summary["policies"] = policies(out, common, args)
    except InvalidInput as e:
        print(f"flow_guidance_study: error: {e}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
