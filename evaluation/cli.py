"""``diffsteer ab``: the command-line face of :func:`diffsteer.evaluation.ab.run_ab`.

Registered by ``service/cli.py`` (``add_ab_parser``). Every option maps onto a field of
:class:`diffsteer.evaluation.ab.ABConfig`; bad input exits with status 2 and a message naming the option.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tqdm import tqdm

from diffsteer.evaluation.ab import ABConfig, run_ab
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.image_inputs import image_fields_from_options

# ABConfig field -> the option that sets it (for error messages).
OPTIONS: dict[str, str] = {
    "arms": "--arm",
    "prompts": "--prompts",
    "output_dir": "--output",
    "seeds": "--seeds",
    "seed": "--seed",
    "max_prompts": "--max-prompts",
    "metrics": "--metrics",
    "directions": "--direction",
    "steps": "--steps",
    "scheduler": "--scheduler",
    "model": "--model",
    "width": "--size",
    "height": "--size",
    "batch_size": "--batch-size",
    "device": "--device",
    "dtype": "--dtype",
    "baseline": "--baseline",
    "unit": "--unit",
    "n_resamples": "--bootstrap",
    "confidence": "--confidence",
    "report": "--no-report",
    "init_image": "--init-image",
    "mask": "--mask",
    "strength": "--strength",
    "report_max_prompts": "--report-prompts",
}

EPILOG = """\
arms:    NAME=POLICY or NAME=POLICY@MODEL (the model after the last @), or a JSON object
         '{"name": "b", "policy": {"name": "apg", "scale": 10}, "model": "builtin:tiny"}'
prompts: pg:all | pg:single | pg:position,counting   (proving-ground held-out suite and its seeds)
         FILE: one prompt per line, GenEval evaluation_metadata.jsonl, or PartiPrompts TSV (detected;
         force with text:FILE, geneval:FILE, parti:FILE)
metrics: verifier, saturation, oversaturation, nfe, latency, reward:SPEC (e.g. reward:clip)
         default: saturation,oversaturation,nfe,latency (+ verifier for pg: prompts)
example: diffsteer ab --arm off=cfg:scale=1 --arm cfg=cfg:scale=4.5 --prompts pg:single --seeds 2 -o ab-out
"""


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise InvalidInput("width", f"expected WxH like 512x512, got {text!r}")


def parse_directions(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for text in values:
        name, eq, direction = text.rpartition("=")
        if not eq or not name:
            raise InvalidInput("directions", f"expected METRIC=higher or METRIC=lower, got {text!r}")
        out[name.strip()] = direction.strip()
    return out


def option_for(field: str) -> str:
    head = field.split(".", 1)[0]
    return OPTIONS.get(head, field)


def config_from_args(args: argparse.Namespace) -> ABConfig:
    width = height = None
    if args.size is not None:
        width, height = parse_size(args.size)
    data: dict[str, Any] = {
        "arms": args.arm or [],
        "prompts": args.prompts,
        "output_dir": args.output,
        "seeds": args.seeds,
        "seed": args.seed,
        "max_prompts": args.max_prompts,
        "metrics": args.metrics,
        "directions": parse_directions(args.direction or []),
        "steps": args.steps,
        "scheduler": args.scheduler,
        "model": args.model,
        "width": width,
        "height": height,
        "batch_size": args.batch_size,
        "device": args.device,
        "dtype": args.dtype,
        "baseline": args.baseline,
        "unit": args.unit,
        "n_resamples": args.bootstrap,
        "confidence": args.confidence,
        "report": not args.no_report,
        "report_max_prompts": args.report_prompts,
        **image_fields_from_options(args.init_image, args.mask, strength=args.strength),
    }
    return ABConfig.parse(data)


def print_summary(results: dict[str, Any], out: str) -> None:
    for pair in results["statistics"]:
        a, b = pair["arm_a"], pair["arm_b"]
        print(f"{b} vs {a} (differences {b} - {a}; tests per {results['config']['unit']}):")
        for col, m in pair["metrics"].items():
            print(
                f"  {col:26s} {m['mean_a']:>10.4g} -> {m['mean_b']:<10.4g} diff {m['mean_diff']:+.4g} "
                f"[{m['ci_low']:+.4g}, {m['ci_high']:+.4g}]  W/T/L {m['wins']}/{m['ties']}/{m['losses']}  "
                f"sign p={m['sign_test_p']:.3g}  wilcoxon p={m['wilcoxon_p']:.3g}  {m['verdict']}"
            )
    run = results["run"]
    print(
        f"{run['generated']} images generated, {run['skipped']} reused; results in {out}/results.json"
        + (f", report {out}/report.html" if results["config"]["report"] else "")
    )


def cmd_ab(args: argparse.Namespace) -> int:
    bar = None  # opened at the first progress event, i.e. after the input was validated

    def progress(event) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=event.total, desc="ab", unit="img", disable=args.quiet, file=sys.stderr)
        bar.n = event.done
        post = {"arm": event.arm} if event.arm else {}
        if event.step is not None:
            post["step"] = f"{event.step}/{event.steps}"
        bar.set_postfix(stage=event.stage, **post, refresh=False)
        bar.refresh()

    try:
        results = run_ab(config_from_args(args), progress=progress)
    except InvalidInput as e:
        _, _, tail = e.field.partition(".")
        named = tail and not tail.split(".")[0].isdigit()  # e.g. directions.nfe -> "--direction: nfe: ..."
        raise InvalidInput(option_for(e.field), f"{tail}: {e.reason}" if named else e.reason) from None
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print_summary(results, args.output)
    return 0


def add_ab_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``ab`` subcommand to a ``diffsteer`` subparsers object."""
    ab = sub.add_parser(
        "ab",
        help="A/B evaluation of guidance policies on the same prompts x seeds, with statistics and an HTML report",
        description="Run two or more arms (guidance policies, optionally with their own model) on the same prompts "
        "and seeds (paired), score every image, compare every pair of arms and write results.json, images/, "
        "plots/ and report.html to the output folder. A rerun into the same folder skips finished images.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ab.add_argument("--arm", action="append", metavar="NAME=SPEC[@MODEL]", help="an arm (give two or more)")
    ab.add_argument("--prompts", required=True, metavar="SOURCE", help="pg:CATEGORIES or a prompts file")
    ab.add_argument("--seeds", type=int, default=1, metavar="K", help="seeds (images) per prompt (default 1)")
    ab.add_argument("--seed", type=int, default=0, help="first seed for files; the held-out suite's seed for pg:")
    ab.add_argument("--max-prompts", type=int, default=None, metavar="N", help="first N prompts (per category for pg:)")
    ab.add_argument("--metrics", default=None, metavar="LIST", help="comma-separated metrics (see below)")
    ab.add_argument("--direction", action="append", metavar="METRIC=higher|lower", help="override a metric's direction")
    ab.add_argument("--steps", type=int, default=30)
    ab.add_argument("--scheduler", default="default", help="sampler, as for `diffsteer generate`")
    ab.add_argument("--model", default=None, help="model of arms without @MODEL (default: the built-in default)")
    ab.add_argument("--size", default=None, help="WxH (default: the model's native size)")
    ab.add_argument("--batch-size", type=int, default=8, help="images per generate() call")
    ab.add_argument("--device", default=None, help="cpu, cuda, cuda:N")
    ab.add_argument("--dtype", default=None, help="auto, fp32, fp16, bf16")
    ab.add_argument(
        "--baseline", default=None, metavar="ARM", help="compare each arm with this one (default: all pairs)"
    )
    ab.add_argument("--unit", default="prompt", help="unit of win/tie/loss and tests: prompt (default) or image")
    ab.add_argument("--bootstrap", type=int, default=10_000, metavar="N", help="bootstrap resamples (default 10000)")
    ab.add_argument("--confidence", type=float, default=0.95, help="confidence level (default 0.95)")
    ab.add_argument("--report-prompts", type=int, default=60, metavar="N", help="prompts shown as grids in the report")
    ab.add_argument("--no-report", action="store_true", help="skip plots and report.html")
    ab.add_argument("--init-image", default=None, metavar="PNG", help="img2img for every arm: the image to start from")
    ab.add_argument("--strength", type=float, default=None, help="how much of the init image is noised away (0.8)")
    ab.add_argument("--mask", default=None, metavar="PNG", help="inpainting for every arm: white repaints")
    ab.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (reruns resume in it)")
    ab.add_argument("-q", "--quiet", action="store_true")
    ab.set_defaults(func=cmd_ab)
    return ab
