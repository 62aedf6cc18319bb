"""Three A/B demonstrations on the proving ground, each a paired run of ``diffsteer.evaluation.ab.run_ab``.

1. **Guidance helps.** ``cfg:scale=1`` (guidance off) against CFG at its best scale: the verifier pass-rate
   difference with its 95% prompt-bootstrap CI. The best scale is chosen on a *tuning* split (the held-out
   suite drawn with another suite seed: the same held-out meanings, other instance seeds) unless
   ``--best-scale`` is given, so the evaluation split does not select its own winner.
2. **Adaptive guidance saves NFEs.** ``ag`` against ``cfg`` at that scale: the NFE saving and the verifier
   difference, both with CIs (the claim: fewer UNet evaluations at no measurable loss).
3. **APG tames oversaturation.** ``apg`` against ``cfg`` at a high scale: mean HSV saturation and the fraction
   of clipped pixels, lower being better (APG's motivation).

Demonstrations 1 and 2 share one run (arms ``off``, ``cfg``, ``ag``; the ``cfg`` images are made once);
demonstration 3 is a second run. Every run is resumable: rerun the same command to finish an interrupted one.

    python benchmarks/ab_proving_ground.py -o bench-ab                      # proving-ground model, CPU
    python benchmarks/ab_proving_ground.py -o /tmp/ab-smoke --model builtin:tiny --steps 2 \\
        --categories single --prompts-per-category 2 --tune-prompts 2 --scales 2,4 --seeds 1   # smoke test

Prints a Markdown summary for BENCHMARKS.md and writes ``summary.json``; each run has its own ``report.html``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ab_pair, ab_progress_printer, ci_text, scale_text, tune_cfg_scale  # noqa: E402
from diffsteer.evaluation.ab import run_ab  # noqa: E402
from diffsteer.guidance.errors import InvalidInput  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-o", "--output", required=True, help="folder for the runs (resumable)")
    ap.add_argument("--model", default="builtin:proving-ground")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--categories", default="all", help="pg categories: all or a comma-separated list")
    ap.add_argument("--prompts-per-category", type=int, default=18, help="evaluation prompts per category")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per evaluation prompt")
    ap.add_argument("--tune-prompts", type=int, default=8, help="tuning prompts per category (1 seed each)")
    ap.add_argument("--scales", default="1.5,2,3,4.5,6,9", help="CFG scales tried on the tuning split")
    ap.add_argument("--best-scale", type=float, default=None, help="skip tuning and use this CFG scale")
    ap.add_argument("--ag-gamma", type=float, default=0.99, help="ag's gamma_bar (cosine threshold)")
    ap.add_argument("--high-scale", type=float, default=15.0, help="the high scale of demonstration 3")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--bootstrap", type=int, default=10_000)
    args = ap.parse_args(argv)

    out = Path(args.output)
    pg = f"pg:{args.categories}"
    common = {
        "model": args.model,
        "device": args.device,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "batch_size": args.batch_size,
        "n_resamples": args.bootstrap,
    }
    summary: dict[str, Any] = {"model": args.model, "steps": args.steps, "scheduler": args.scheduler, "prompts": pg}
    t0 = time.perf_counter()
    try:
        best = args.best_scale
        if best is None:
            scales = [float(s) for s in args.scales.split(",") if s.strip()]
            best, rates = tune_cfg_scale(
                common,
                scales,
                prompts=pg,
                seed=1,
                max_prompts=args.tune_prompts,
                output_dir=str(out / "tune_cfg_scale"),
                report=True,
            )
            summary["tuning"] = {"pass_rate_by_scale": {scale_text(s): rates[s] for s in scales}, "best_scale": best}
            print(
                f"tuning split: pass rate by CFG scale {summary['tuning']['pass_rate_by_scale']} -> best {best:g}",
                file=sys.stderr,
            )
        main_run = run_ab(
            {
                **common,
                "arms": ["off=cfg:scale=1", f"cfg=cfg:scale={best}", f"ag=ag:scale={best},gamma_bar={args.ag_gamma}"],
                "prompts": pg,
                "seed": 0,
                "seeds": args.seeds,
                "max_prompts": args.prompts_per_category,
                "metrics": ["verifier", "nfe", "latency", "saturation", "oversaturation"],
                "output_dir": str(out / "guidance_and_ag"),
            },
            progress=ab_progress_printer("cfg/ag"),
        )
        high = args.high_scale
        apg_run = run_ab(
            {
                **common,
                "arms": [f"cfg_high=cfg:scale={high}", f"apg_high=apg:scale={high}"],
                "prompts": pg,
                "seed": 0,
                "seeds": args.seeds,
                "max_prompts": args.prompts_per_category,
                "metrics": ["saturation", "oversaturation", "verifier", "nfe"],
                "output_dir": str(out / "apg_high_scale"),
            },
            progress=ab_progress_printer("apg"),
        )
    except InvalidInput as e:
        print(f"ab_proving_ground: error: {e}", file=sys.stderr)
        return 2

    d1 = ab_pair(main_run, "off", "cfg")["verifier.passed"]
    cfg_ag = ab_pair(main_run, "cfg", "ag")
    nfe, ver2 = cfg_ag["nfe"], cfg_ag["verifier.passed"]
    saving = -nfe["mean_diff"] / nfe["mean_a"]
    apg = ab_pair(apg_run, "cfg_high", "apg_high")
    sat, over, ver3 = apg["saturation"], apg["oversaturation"], apg["verifier.passed"]
    n = main_run["prompts"]
    shown = {
        "1_guidance_improves_verifier": d1["ci_low"] > 0,
        "2_ag_saves_nfe": nfe["ci_high"] < 0,
        "2_ag_no_measurable_loss": ver2["ci_low"] > -0.05,  # a loss of more than 5 points is excluded
        "3_apg_lower_saturation": sat["ci_high"] < 0,
        "3_apg_lower_oversaturation": over["ci_high"] < 0,
    }
    summary.update(
        {
            "n_prompts": n["n_prompts"],
            "seeds_per_prompt": n["seeds_per_prompt"],
            "best_scale": best,
            "high_scale": high,
            "demo1_off_vs_cfg": d1,
            "demo2_cfg_vs_ag": {"nfe": nfe, "verifier.passed": ver2, "nfe_saving_fraction": saving},
            "demo3_cfg_vs_apg": {"saturation": sat, "oversaturation": over, "verifier.passed": ver3},
            "shown": shown,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    unit = f"{n['n_prompts']} held-out prompts x {n['seeds_per_prompt']} seeds, {args.steps} {args.scheduler} steps, {args.model}"
    print(f"### A/B on the proving ground ({unit}); differences B - A with 95% prompt-bootstrap CIs\n")
    print(
        f"1. cfg:scale={best:g} vs cfg:scale=1, verifier pass rate: {ci_text(d1)} "
        f"[{'shown' if shown['1_guidance_improves_verifier'] else 'NOT shown'}]"
    )
    print(
        f"2. ag:scale={best:g},gamma_bar={args.ag_gamma:g} vs cfg:scale={best:g}: NFE {nfe['mean_a']:.1f} -> "
        f"{nfe['mean_b']:.1f} ({100 * saving:.1f}% fewer), diff {ci_text(nfe, digits=2)}; verifier pass rate {ci_text(ver2)} "
        f"[{'shown' if shown['2_ag_saves_nfe'] and shown['2_ag_no_measurable_loss'] else 'NOT shown'}]"
    )
    print(
        f"3. apg:scale={high:g} vs cfg:scale={high:g}: saturation {sat['mean_a']:.3f} -> {sat['mean_b']:.3f}, {ci_text(sat)}; "
        f"clipped-pixel fraction {over['mean_a']:.3f} -> {over['mean_b']:.3f}, {ci_text(over)}; verifier pass rate {ci_text(ver3)} "
        f"[{'shown' if shown['3_apg_lower_saturation'] and shown['3_apg_lower_oversaturation'] else 'NOT shown'}]"
    )
    print(
        f"\nreports: {out / 'guidance_and_ag' / 'report.html'}, {out / 'apg_high_scale' / 'report.html'}"
        + ("" if args.best_scale is not None else f", {out / 'tune_cfg_scale' / 'report.html'}")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
