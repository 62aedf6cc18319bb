"""Acceptance figures of the reward-driven policies (ReNO, dynamic CFG) on the proving ground.

Everything runs on the shipped default model (``builtin:proving-ground``), its held-out prompt suite (``pg:``
sources: held-out meanings with held-out instance seeds), its exact verifier, and its open_clip reward ``clip``
(the project's own proving-ground CLIP, configured by default). Each comparison is one paired run of
``diffsteer.evaluation.ab.run_ab``: every arm generates the same prompt x seed items from the same initial noise, and the
statistics are paired differences with 95% bootstrap CIs that resample prompts (the independent unit).

1. **ReNO** (``reno``, Eyring et al. 2024) against the *same sampler without optimisation*: arm ``plain`` is
   ``cfg:scale=S`` and arm ``reno`` is ``reno:scale=S,iterations=N,reward=clip:1`` at the same few steps,
   scheduler and seeds. ReNO's inner sampler is exactly ``cfg:scale=S``, and its iteration 0 scores the seed's
   own noise, so ``plain`` *is* the un-optimised initial noise. Reported: the fraction of pairs whose
   ``reward:clip`` ReNO raised (bar: >= 80% of >= 64 pairs), the verifier pass-rate difference with its CI
   (bar: >= +10 points), per category. Then the cost next to plain sampling, for ``--probe-batch`` images
   (default 1), in two child processes (fresh interpreters, so one measurement does not inherit the other's
   allocator state): the peak memory above the start of one plain generation and of one ReNO generation
   (CPU: the process's peak RSS -- ``VmHWM``, reset through ``/proc/self/clear_refs`` once the model and the
   reward are loaded -- minus the RSS then; CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation
   then; both include their first call's lazy initialisation alike), and, in the ReNO child afterwards, the
   seconds per ReNO iteration (median of the intervals between consecutive iterations, each = backward + SGD
   step of the previous iterate + sampling, decoding and scoring of the next; first iteration excluded) and
   the seconds per plain generation, timed interleaved (plain, ReNO) x ``--probe-repeats``.

   Settings, and why: ReNO is made for one- to few-step generators sampled *without* CFG (SD-Turbo,
   SDXL-Turbo, PixArt-alpha DMD, HyperSD; its inner CFG is off there), because every iteration backpropagates
   through the whole sampler; its hyperparameters (SGD lr 5, Nesterov momentum 0.9, per-image gradient clip
   0.1, lambda = 0.01 on the noise-norm regulariser, 50 iterations, best iterate by reward) are the policy's
   defaults and are kept. The proving-ground model is not distilled, so its closest analogue is its own
   scheduler at few steps (default 4 DDIM steps) with ``scale=1`` (CFG off, one UNet evaluation per step);
   more steps make each iteration proportionally dearer and fewer leave the non-distilled model's x0 blurry.
   ``--steps`` and ``--reno-scale`` change them (the baseline follows, so it stays the same sampler).
   Categories: ``single``, ``two_objects``, ``counting`` and ``colour_binding`` by default; ``position`` is
   left out because the proving-ground CLIP reads spatial relations poorly, unlike colour, shape and count (its
   zero-shot probe: BENCHMARKS.md, section Proving-ground CLIP model), so ReNO cannot be expected to optimise
   what its reward does not see; add it with ``--categories all`` to measure that.

2. **Dynamic CFG** (``dynamic_cfg``, Papalampidi et al. 2025) with the ``clip`` evaluator against fixed
   ``cfg`` scales (default 1, 2, 3, 4.5, 6) on the same items, at the proving ground's usual 30 DDIM steps.
   Its candidate scales are the fixed scales themselves, so it can only win by choosing per step and per
   image, not by reaching a scale the baselines lack; the other parameters are the policy's defaults
   (evaluate every step over the whole trajectory, no downsampling; ``--dyn-extra`` changes them). The best
   fixed scale is the one with the highest pass rate *on these same items* (ties: the smaller scale), a
   selection that favours the fixed baseline, so "dynamic >= best fixed" is a conservative test. Reported:
   the pass rates, dynamic minus best fixed with its CI (bar: >= 0), and the time overhead = mean seconds per
   image of ``dynamic_cfg`` / that of ``cfg`` at the same steps (the fixed arms with scale != 1, which make the
   same two UNet evaluations per step), measured interleaved in the same run (``run_ab`` alternates the arms
   batch by batch), with a prompt-bootstrap CI.

Commands (CPU; rerunning the same command resumes the A/B runs from their ``records.jsonl``)::

    # the full measurement for BENCHMARKS.md: 58 prompts x 2 seeds = 116 pairs per comparison
    # (about half an hour on 2 otherwise idle CPU cores; add --threads 1 when other CPU jobs share the machine)
    python benchmarks/reward_policies.py --out bench-reward-policies

    # a smoke test (a few minutes on 2 idle cores)
    python benchmarks/reward_policies.py --out /tmp/rp-smoke --categories single,counting --prompts-per-category 2 \\
        --seeds 2 --iterations 3 --dyn-steps 4 --scales 1,3 --probe-iterations 3 --bootstrap 500 --batch-size 4

    # on a GPU
    python benchmarks/reward_policies.py --out bench-reward-policies-cuda --device cuda

Prints a Markdown summary for BENCHMARKS.md (tables and the key figures with their bars) on stdout, progress
on stderr, and writes ``summary.json``; each A/B run has its own ``results.json`` and ``report.html`` under
``--out`` (``reno_ab/``, ``dynamic_ab/``), and the cost probe ``probe.json``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import ab_pair, ab_progress_printer, best_scale, ci_text, proc_memory_bytes, scale_text
from diffsteer.evaluation.ab import run_ab
from diffsteer.guidance.errors import InvalidInput

DEFAULT_CATEGORIES = "single,two_objects,counting,colour_binding"
RENO_BAR_FRACTION = 0.80
RENO_BAR_PAIRS = 64
RENO_BAR_PASS = 0.10


# ----------------------------------------------------------------------------- helpers


def parse_floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s.strip()]


def parse_extra(text: str, what: str) -> dict[str, Any]:
    """``key=value,...`` (the body of a policy spec string) -> a dict of typed values."""
    from diffsteer.guidance.registry import parse_spec_string

    if not text.strip():
        return {}
    data = parse_spec_string(f"x:{text}", what)
    data.pop("name")
    return data


def per_item(results: dict[str, Any], arm: str, column: str) -> np.ndarray:
    """One value per item (in item order) of an arm's column; NaN where undefined."""
    n = len(results["items"])
    out = np.full(n, np.nan)
    for img in results["images"]:
        if img["arm"] == arm:
            v = img["metrics"].get(column)
            out[img["item"]] = np.nan if v is None else float(v)
    return out


def item_prompts(results: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(prompt id, category) of every item."""
    cat = {p["prompt_id"]: p.get("category") or "?" for p in results["prompts"]["list"]}
    pids = [it["prompt_id"] for it in results["items"]]
    return pids, [cat[p] for p in pids]


def bootstrap_ratio(
    num: np.ndarray, den: np.ndarray, pids: list[str], n: int, seed: int = 0
) -> tuple[float, float, float]:
    """sum(num) / sum(den) with a percentile CI resampling prompts (all of a prompt's items together)."""
    from diffsteer.evaluation.stats import percentile_interval, prompt_index

    index, prompts = prompt_index(pids)
    sn = np.bincount(index, weights=num, minlength=len(prompts))
    sd = np.bincount(index, weights=den, minlength=len(prompts))
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(prompts), size=(n, len(prompts)))
    ratios = sn[drawn].sum(axis=1) / sd[drawn].sum(axis=1)
    low, high = percentile_interval(ratios)
    return float(num.sum() / den.sum()), low, high


def mean_ci(values: np.ndarray, pids: list[str], n: int) -> tuple[float, float, float]:
    from diffsteer.evaluation.stats import cluster_bootstrap_ci

    low, high = cluster_bootstrap_ci(values, pids, n_resamples=n)
    return float(values.mean()), low, high


TABLE_HEAD = [
    "| arm | NFE/image | s/image | reward clip | present | colour | shape | count | pass |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def arm_row(label: str, sm: dict[str, Any], reward_column: str) -> str:
    """One Markdown row of an arm's means (``results["summary"][arm]``)."""

    def g(col: str, digits: int = 3) -> str:
        m = sm.get(col, {}).get("mean")
        return "—" if m is None else f"{m:.{digits}f}"

    cells = [
        label,
        g("nfe", 0),
        g("latency"),
        g(reward_column, 2),
        g("verifier.object_present"),
        g("verifier.colour_correct"),
        g("verifier.shape_correct"),
        g("verifier.count_correct"),
        g("verifier.passed"),
    ]
    return "| " + " | ".join(cells) + " |"


def device_text(device: str | None) -> str:
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(dev))} ({dev})"
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}"


_MODELS: dict[str, Any] = {}


def shared_model_loader(device: str | None, dtype: str | None):
    """A model loader for ``run_ab`` that loads each model once for all the runs of this script and warms it up
    (one short generation: lazy initialisation), so the first batch of the first arm is not charged for it."""
    from diffsteer.guidance.models import canonical_spec, load_model
    from diffsteer.guidance.sampler import generate

    def load(spec: str | None) -> Any:
        key = canonical_spec(spec)
        if key not in _MODELS:
            model = load_model(spec, device=device, dtype=dtype)
            generate(
                model, {"prompt": "a red circle", "seed": 0, "steps": 2, "scheduler": "ddim", "policy": "cfg:scale=2"}
            )
            _MODELS[key] = model
        return _MODELS[key]

    return load


# ----------------------------------------------------------------------------- cost probe (child process)


def probe_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh interpreter. Memory: load the model and the reward, reset the peak, one generation of
    ``cfg["mode"]`` (``plain`` or ``reno``), read the peak. Time (``reno`` only, after that): ``repeats`` rounds
    of one plain generation then one ReNO generation, interleaved so that machine load hits both; ReNO's
    iteration times are the intervals between its consecutive iteration callbacks (first iteration excluded)."""
    import gc
    import resource

    import torch

    from diffsteer.evaluation.prompts import load_prompts
    from diffsteer.guidance.models import load_model
    from diffsteer.guidance.reward_models import get_reward
    from diffsteer.guidance.sampler import generate

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    model = load_model(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
    # The reward ReNO will ask for, with the same cache key (spec, device, float32), loaded before the start
    # in both modes: its weights are the reward's, not the method's working memory.
    get_reward(cfg["reward"], model.device, torch.float32)
    items = load_prompts(cfg["prompts"], 1, cfg["suite_seed"], None).items[: cfg["batch"]]
    common = {
        "prompt": [it.prompt for it in items],
        "seeds": [it.seed for it in items],
        "steps": cfg["steps"],
        "scheduler": cfg["scheduler"],
    }
    plain = {**common, "policy": cfg["plain_policy"]}
    reno = {**common, "policy": cfg["reno_policy"]}
    cuda = model.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(model.device)

    marks: list[float] = []

    def on_step(event) -> None:
        if event.phase == "reno":
            marks.append(event.elapsed)

    gc.collect()
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(model.device)
        start = torch.cuda.memory_allocated(model.device)
        how = "torch.cuda.max_memory_allocated - memory_allocated at the start"
    else:
        start = proc_memory_bytes()["VmRSS"]
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
            how = "peak RSS (VmHWM, reset through /proc/self/clear_refs at the start) - RSS at the start"
        except OSError:
            how = "ru_maxrss - RSS at the start (the peak could not be reset: it may include the loading peak)"
    t0 = time.perf_counter()
    result = generate(model, reno if cfg["mode"] == "reno" else plain, callback=on_step)
    sync()
    first = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated(model.device)
    elif how.startswith("peak RSS"):
        peak = proc_memory_bytes()["VmHWM"]
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out: dict[str, Any] = {
        "mode": cfg["mode"],
        "peak_above_start_mb": max(0, peak - start) / 2**20,
        "memory_method": how,
        "first_call_s": first,
        "nfe_per_image": result.nfe[0],
        "batch": len(items),
        "prompts": [it.prompt for it in items],
    }
    if cfg["mode"] != "reno":
        return out
    out["reno_trace"] = result.trace.get("reno")
    plain_times: list[float] = []
    intervals: list[float] = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        generate(model, plain)
        sync()
        plain_times.append(time.perf_counter() - t0)
        marks.clear()
        generate(model, reno, callback=on_step)
        intervals += [b - a for a, b in itertools.pairwise(marks)]
    out.update(
        {
            "s_per_generation_plain": statistics.median(plain_times),
            "plain_times": plain_times,
            "s_per_iteration": statistics.median(intervals),
            "iteration_intervals": intervals,
        }
    )
    return out


def run_probe(mode: str, cfg: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_probe", json.dumps(cfg)]
    print(
        f"[probe] {mode}: memory{' and interleaved timing' if mode == 'reno' else ''} (batch {cfg['batch']}, "
        f"{cfg['steps']} steps) in a child process",
        file=sys.stderr,
        flush=True,
    )
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("PROBE ") :])


# ----------------------------------------------------------------------------- the two comparisons


def reno_comparison(args, common: dict[str, Any], out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    s = args.reno_scale
    reno_policy = {
        "name": "reno",
        "scale": s,
        "iterations": args.iterations,
        "reward": args.reward,
        **parse_extra(args.reno_extra, "--reno-extra"),
    }
    base_policy = {"name": "cfg", "scale": s}
    res = run_ab(
        {
            **common,
            "steps": args.steps,
            "arms": [{"name": "plain", "policy": base_policy}, {"name": "reno", "policy": reno_policy}],
            "metrics": ["verifier", f"reward:{args.reward_metric}", "nfe", "latency"],
            "output_dir": str(out / "reno_ab"),
        },
        progress=ab_progress_printer("reno"),
        model_loader=shared_model_loader(args.device, args.dtype),
    )
    return res, reno_policy


def dynamic_comparison(args, common: dict[str, Any], out: Path) -> tuple[dict[str, Any], dict[str, Any], list[float]]:
    scales = parse_floats(args.scales)
    candidates = parse_floats(args.dyn_candidates) if args.dyn_candidates else scales
    dyn_policy = {
        "name": "dynamic_cfg",
        "candidates": candidates,
        "reward": args.dyn_reward,
        **parse_extra(args.dyn_extra, "--dyn-extra"),
    }
    arms = [{"name": f"cfg{scale_text(x)}", "policy": {"name": "cfg", "scale": x}} for x in scales]
    arms.append({"name": "dynamic", "policy": dyn_policy})
    res = run_ab(
        {
            **common,
            "steps": args.dyn_steps,
            "arms": arms,
            "metrics": ["verifier", f"reward:{args.reward_metric}", "nfe", "latency"],
            "output_dir": str(out / "dynamic_ab"),
        },
        progress=ab_progress_printer("dynamic"),
        model_loader=shared_model_loader(args.device, args.dtype),
    )
    return res, dyn_policy, scales


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring for the design.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("-o", "--out", help="folder for the runs (required; rerunning the command resumes)")
    ap.add_argument("--model", default="builtin:proving-ground")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="auto, fp32, fp16, bf16")
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--categories", default=DEFAULT_CATEGORIES, help="pg categories, comma-separated, or all")
    ap.add_argument(
        "--prompts-per-category",
        type=int,
        default=18,
        help="held-out prompts per category (capped by the category's size: single 18, two_objects 8, "
        "counting 14, colour_binding 44, position 306)",
    )
    ap.add_argument("--seeds", type=int, default=2, help="held-out seeds per prompt")
    ap.add_argument("--suite-seed", type=int, default=0, help="the held-out suite's seed (0: the shipped suite)")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images per generate() call (ReNO optimises them together, independently per image)",
    )
    ap.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples")
    ap.add_argument("--reward", default="clip:1", help="ReNO's reward (weighted spec)")
    ap.add_argument(
        "--reward-metric", default="clip", help="the reward scored on the saved images (metric reward:SPEC)"
    )
    # ReNO
    ap.add_argument("--steps", type=int, default=4, help="ReNO's (and its baseline's) sampling steps: few")
    ap.add_argument("--reno-scale", type=float, default=1.0, help="CFG scale of ReNO's inner sampler and its baseline")
    ap.add_argument("--iterations", type=int, default=50, help="ReNO iterations (the paper's 50)")
    ap.add_argument("--reno-extra", default="", help="more reno parameters, e.g. 'lr=5,grad_clip=0.1'")
    ap.add_argument("--probe-batch", type=int, default=1, help="images per generation in the cost probe")
    ap.add_argument("--probe-iterations", type=int, default=10, help="ReNO iterations in the cost probe (>= 2)")
    ap.add_argument(
        "--probe-repeats",
        type=int,
        default=3,
        help="rounds of (plain generation, ReNO generation) timed interleaved in the cost probe",
    )
    # dynamic CFG
    ap.add_argument("--dyn-steps", type=int, default=30, help="steps of the dynamic-vs-fixed comparison")
    ap.add_argument("--scales", default="1,2,3,4.5,6", help="fixed cfg scales compared")
    ap.add_argument("--dyn-candidates", default="", help="dynamic_cfg's candidate scales (default: --scales)")
    ap.add_argument("--dyn-reward", default="clip:1", help="dynamic_cfg's evaluators")
    ap.add_argument(
        "--dyn-extra", default="", help="more dynamic_cfg parameters, e.g. 'evaluate_every=2,eval_downsample=2'"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own). Use 1 when other CPU jobs share the machine: "
        "spinning worker threads of a descheduled process can make it many times slower",
    )
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: reno, probe, dynamic")
    ap.add_argument("--no-report", action="store_true", help="no plots / report.html (faster)")
    ap.add_argument("--_probe", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._probe:
        print("PROBE " + json.dumps(probe_child(json.loads(args._probe))), flush=True)
        return 0
    if not args.out:
        parser.error("the following arguments are required: -o/--out")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"reno", "probe", "dynamic"}
    if unknown:
        print(f"reward_policies: error: --skip accepts reno, probe, dynamic; got {sorted(unknown)}", file=sys.stderr)
        return 2
    if args.probe_iterations < 2 and "probe" not in skip:
        print(
            "reward_policies: error: --probe-iterations must be >= 2 (the first iteration is not timed)",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pg = f"pg:{args.categories}"
    common = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "scheduler": args.scheduler,
        "prompts": pg,
        "seed": args.suite_seed,
        "seeds": args.seeds,
        "max_prompts": args.prompts_per_category,
        "batch_size": args.batch_size,
        "n_resamples": args.bootstrap,
        "report": not args.no_report,
    }
    date = datetime.date.today().isoformat()
    dev = device_text(args.device)
    command = "python benchmarks/reward_policies.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary: dict[str, Any] = {
        "date": date,
        "device": dev,
        "model": args.model,
        "prompts": pg,
        "command": command,
        "scheduler": args.scheduler,
    }
    lines: list[str] = []
    t_all = time.perf_counter()
    rm = f"reward:{args.reward_metric}"
    try:
        # ------------------------------------------------------------------ ReNO quality
        if "reno" not in skip:
            t0 = time.perf_counter()
            res, reno_policy = reno_comparison(args, common, out)
            pids, cats = item_prompts(res)
            rb, rr = per_item(res, "plain", rm), per_item(res, "reno", rm)
            raised = (rr > rb).astype(float)
            lowered = int((rr < rb).sum())
            n_pairs = len(raised)
            frac, frac_lo, frac_hi = mean_ci(raised, pids, args.bootstrap)
            st = ab_pair(res, "plain", "reno")
            dpass, drew = st["verifier.passed"], st[rm]
            lat_b, lat_r = per_item(res, "plain", "latency").mean(), per_item(res, "reno", "latency").mean()
            nfe_b, nfe_r = per_item(res, "plain", "nfe").mean(), per_item(res, "reno", "nfe").mean()
            amortised = (lat_r - lat_b) / max(1, args.iterations)
            met = {
                "pairs": n_pairs >= RENO_BAR_PAIRS,
                "fraction": frac >= RENO_BAR_FRACTION,
                "pass": dpass["mean_diff"] >= RENO_BAR_PASS,
            }
            summary["reno"] = {
                "policy": reno_policy,
                "baseline": {"name": "cfg", "scale": args.reno_scale},
                "steps": args.steps,
                "n_pairs": n_pairs,
                "n_prompts": res["prompts"]["n_prompts"],
                "seeds_per_prompt": res["prompts"]["seeds_per_prompt"],
                "fraction_raised": frac,
                "fraction_raised_ci": [frac_lo, frac_hi],
                "pairs_raised": int(raised.sum()),
                "pairs_lowered": lowered,
                "pairs_equal": n_pairs - int(raised.sum()) - lowered,
                "verifier_passed": dpass,
                "reward": drew,
                "latency_s": [lat_b, lat_r],
                "nfe": [nfe_b, nfe_r],
                "amortised_s_per_iteration_per_image": amortised,
                "bars_met": met,
                "seconds": time.perf_counter() - t0,
            }
            sp = summary["reno"]
            lines += [
                f"### ReNO on the proving ground ({date}, {dev})",
                "",
                (
                    f"`reno:scale={scale_text(args.reno_scale)},iterations={args.iterations},reward={args.reward}` against the same "
                    f"sampler on the seeds' own noise (`cfg:scale={scale_text(args.reno_scale)}`), {args.steps} {args.scheduler} steps, "
                    f"{n_pairs} held-out prompt x seed pairs ({sp['n_prompts']} prompts x {sp['seeds_per_prompt']} seeds, {pg}); "
                    f"differences ReNO - plain with 95% prompt-bootstrap CIs."
                ),
                "",
                *TABLE_HEAD,
            ]
            for arm, label in (
                ("plain", f"plain (cfg scale {scale_text(args.reno_scale)})"),
                ("reno", f"ReNO, {args.iterations} it."),
            ):
                lines.append(arm_row(label, res["summary"][arm], rm))
            lines += [
                "",
                "| category | pairs | pass plain | pass ReNO | reward raised |",
                "| --- | --- | --- | --- | --- |",
            ]
            pb, pr = per_item(res, "plain", "verifier.passed"), per_item(res, "reno", "verifier.passed")
            for c in dict.fromkeys(cats):
                m = np.array([x == c for x in cats])
                lines.append(
                    f"| {c} | {int(m.sum())} | {pb[m].mean():.3f} | {pr[m].mean():.3f} | {raised[m].mean():.3f} |"
                )
            lines += [
                "",
                (
                    f"- reward raised on {int(raised.sum())}/{n_pairs} pairs = **{frac:.3f}** [{frac_lo:.3f}, {frac_hi:.3f}] "
                    f"(equal {sp['pairs_equal']}, lowered {lowered}); bar >= {RENO_BAR_FRACTION:.2f} of >= {RENO_BAR_PAIRS} pairs: "
                    f"{'met' if met['pairs'] and met['fraction'] else 'NOT met'}"
                ),
                f"- Δ verifier pass: **{ci_text(dpass)}**; bar >= +{RENO_BAR_PASS:.2f}: {'met' if met['pass'] else 'NOT met'}",
                f"- Δ reward clip: {ci_text(drew, digits=2)}",
                (
                    f"- A/B wall time per image: plain {lat_b:.3f} s, ReNO {lat_r:.3f} s (batches of {args.batch_size}; "
                    f"{amortised:.3f} s per iteration per image amortised over the batch)"
                ),
            ]
        # ------------------------------------------------------------------ ReNO cost
        if "probe" not in skip:
            probe_path = out / "probe.json"
            s = args.reno_scale
            base_cfg = {
                "model": args.model,
                "device": args.device,
                "dtype": args.dtype,
                "prompts": pg,
                "suite_seed": args.suite_seed,
                "batch": args.probe_batch,
                "steps": args.steps,
                "scheduler": args.scheduler,
                "reward": args.reward,
                "repeats": args.probe_repeats,
                "threads": args.threads,
            }
            policies = {
                "plain_policy": {"name": "cfg", "scale": s},
                "reno_policy": {
                    "name": "reno",
                    "scale": s,
                    "iterations": args.probe_iterations,
                    "reward": args.reward,
                    **parse_extra(args.reno_extra, "--reno-extra"),
                },
            }
            cfgs = {mode: {**base_cfg, **policies, "mode": mode} for mode in ("plain", "reno")}
            cached = json.loads(probe_path.read_text()) if probe_path.is_file() else {}
            if cached.get("configs") == cfgs:
                probe = cached["results"]
                print("[probe] reusing probe.json (same settings)", file=sys.stderr)
            else:
                probe = {mode: run_probe(mode, cfg) for mode, cfg in cfgs.items()}
                probe_path.write_text(json.dumps({"configs": cfgs, "results": probe}, indent=1))
            pl, rn = probe["plain"], probe["reno"]
            summary["probe"] = probe
            unit = "image" if args.probe_batch == 1 else f"batch of {args.probe_batch}"
            lines += [
                "",
                f"ReNO cost, one {unit} ({args.steps} {args.scheduler} steps, child processes, {dev}):",
                "",
                "| mode | NFE/image | time | peak memory above start |",
                "| --- | --- | --- | --- |",
                (
                    f"| plain sampling | {pl['nfe_per_image']} | {rn['s_per_generation_plain']:.3f} s per generation (median of "
                    f"{len(rn['plain_times'])}) | {pl['peak_above_start_mb']:.1f} MB |"
                ),
                (
                    f"| ReNO | {args.steps} + backward per iteration | **{rn['s_per_iteration']:.3f} s per iteration** (median of "
                    f"{len(rn['iteration_intervals'])}) = {rn['s_per_iteration'] / rn['s_per_generation_plain']:.1f}x a plain "
                    f"generation | **{rn['peak_above_start_mb']:.1f} MB** ({args.probe_iterations} iterations) |"
                ),
                "",
                (
                    f"Memory: {rn['memory_method']}. Times: (plain generation, ReNO generation) x {args.probe_repeats}, "
                    "interleaved in one process."
                ),
            ]
        # ------------------------------------------------------------------ dynamic CFG
        if "dynamic" not in skip:
            t0 = time.perf_counter()
            res, dyn_policy, scales = dynamic_comparison(args, common, out)
            pids, cats = item_prompts(res)
            rates = {x: res["summary"][f"cfg{scale_text(x)}"]["verifier.passed"]["mean"] for x in scales}
            best = best_scale(rates)
            best_arm = f"cfg{scale_text(best)}"
            st = ab_pair(res, best_arm, "dynamic")
            dpass, drew = st["verifier.passed"], st[rm]
            same_cost = [x for x in scales if x != 1.0] or scales
            cfg_lat = np.mean([per_item(res, f"cfg{scale_text(x)}", "latency") for x in same_cost], axis=0)
            dyn_lat = per_item(res, "dynamic", "latency")
            ratio, r_lo, r_hi = bootstrap_ratio(dyn_lat, cfg_lat, pids, args.bootstrap)
            met = dpass["mean_diff"] >= 0
            summary["dynamic"] = {
                "policy": dyn_policy,
                "steps": args.dyn_steps,
                "scales": scales,
                "pass_rate_by_scale": {scale_text(x): rates[x] for x in scales},
                "pass_rate_dynamic": res["summary"]["dynamic"]["verifier.passed"]["mean"],
                "best_scale": best,
                "dynamic_minus_best": dpass,
                "reward_dynamic_minus_best": drew,
                "overhead_ratio": ratio,
                "overhead_ratio_ci": [r_lo, r_hi],
                "overhead_reference_scales": same_cost,
                "n_pairs": len(pids),
                "bar_met": met,
                "seconds": time.perf_counter() - t0,
            }
            n = res["prompts"]
            lines += [
                "",
                f"### Dynamic CFG against fixed scales ({date}, {dev})",
                "",
                (
                    f"`dynamic_cfg` (candidates {', '.join(scale_text(c) for c in dyn_policy['candidates'])}, evaluator "
                    f"`{args.dyn_reward}`{', ' + args.dyn_extra if args.dyn_extra else ''}) and `cfg` at fixed scales, {args.dyn_steps} "
                    f"{args.scheduler} steps, {len(pids)} held-out pairs ({n['n_prompts']} prompts x {n['seeds_per_prompt']} seeds, {pg})."
                ),
                "",
                *TABLE_HEAD,
            ]
            for arm in [f"cfg{scale_text(x)}" for x in scales] + ["dynamic"]:
                label = (
                    "dynamic_cfg"
                    if arm == "dynamic"
                    else f"cfg scale {arm[3:]}" + (" (best)" if arm == best_arm else "")
                )
                lines.append(arm_row(label, res["summary"][arm], rm))
            lines += [
                "",
                "| category | pairs | " + " | ".join(f"cfg {scale_text(x)}" for x in scales) + " | dynamic |",
                "| --- | --- | " + " | ".join("---" for _ in scales) + " | --- |",
            ]
            passes = {x: per_item(res, f"cfg{scale_text(x)}", "verifier.passed") for x in scales}
            pd = per_item(res, "dynamic", "verifier.passed")
            for c in dict.fromkeys(cats):
                m = np.array([x == c for x in cats])
                lines.append(
                    f"| {c} | {int(m.sum())} | "
                    + " | ".join(f"{passes[x][m].mean():.3f}" for x in scales)
                    + f" | {pd[m].mean():.3f} |"
                )
            lines += [
                "",
                (
                    f"- best fixed scale on these items: {best:g} (pass {rates[best]:.3f}); dynamic_cfg pass "
                    f"{summary['dynamic']['pass_rate_dynamic']:.3f}"
                ),
                (
                    f"- Δ pass dynamic - best fixed: **{ci_text(dpass)}**; bar >= 0: {'met' if met else 'NOT met'} "
                    f"(point estimate; the CI says how sure)"
                ),
                f"- Δ reward clip dynamic - best fixed: {ci_text(drew, digits=2)}",
                (
                    f"- time overhead dynamic / cfg at {args.dyn_steps} steps: **{ratio:.2f}x** [{r_lo:.2f}, {r_hi:.2f}] (mean s/image, "
                    f"cfg = the arms at scale{'s' if len(same_cost) > 1 else ''} {', '.join(scale_text(x) for x in same_cost)}, "
                    f"interleaved in one run)"
                ),
            ]
    except InvalidInput as e:
        print(f"reward_policies: error: {e}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    lines += [
        "",
        f"Command: `{command}` — {summary['seconds']:.0f} s wall. Reports: "
        + ", ".join(
            str(out / d / "report.html") for d in ("reno_ab", "dynamic_ab") if (out / d / "report.html").is_file()
        ),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
