"""Dynamic CFG with the model's latent evaluators against fixed scales, on the proving ground.

Four measurements in one run:

1. **Verifier pass rate on held-out items** (the shipped suite, seed 0): each category's items alternate between a
   *selection* half, where the best fixed CFG scale of ``--scales`` is chosen by pass rate, and a *test* half,
   where that scale and ``dynamic_cfg`` (``--policy``, latent evaluators; several policies separated by ``;`` are
   tuned on the selection half the same way) are compared: Δ pass with a 95% bootstrap CI over test prompts
   (paired).
2. **Wall time over cfg at the same steps**, interleaved: on every test batch, each cfg arm and the dynamic arm run
   one after another in a rotating order; ratio of the dynamic arm's total time to the mean cfg arm's, with a
   95% bootstrap CI over batches.
3. **Agreement** of the alignment evaluator with the pixel reward it was distilled from, on held-out decoded
   candidates (the test prompts' trajectories under CFG at a random candidate scale, candidates recorded at
   random steps, decoded and scored): Spearman correlation over all candidates and within each group of
   candidates (the order the policy uses), by noise level (thirds of the steps).
4. **Memory** of a 16-image × 32-candidate request against cfg, each in a fresh child process: peak RSS (VmHWM
   reset through /proc/self/clear_refs after a 2-step warm-up) above the RSS after loading, and above the RSS
   after the warm-up.

    python benchmarks/dynamic_cfg_latent.py --items 8 --steps 20 --batch 4 --records 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import proc_memory_bytes  # noqa: E402
from diffsteer.proving_ground import shipped  # noqa: E402

DEFAULT_POLICY = "dynamic_cfg:candidates=[1,1.5,2,3,4.5,6],start=0.2,initial_scale=1,evaluator=latent"


def bootstrap(values_fn, n_units: int, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    stats = [values_fn(rng.integers(0, n_units, n_units)) for _ in range(n)]
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def split_items(categories: list[str], per_category: int, suite_seed: int = 0):
    from diffsteer.proving_ground import heldout_suite

    selection, test = [], []
    for category in categories:
        for i, item in enumerate(heldout_suite(category, per_category, suite_seed)):
            (selection if i % 2 == 0 else test).append(item)
    return selection, test


def run_arm(model, items, policy: str, steps: int, scheduler: str) -> tuple[list[float], float, dict[str, Any]]:
    """Verifier pass per item, wall seconds, trace."""
    from diffsteer.guidance.request import Limits
    from diffsteer.guidance.sampler import generate
    from diffsteer.proving_ground import verify

    t0 = time.perf_counter()
    result = generate(
        model,
        {
            "prompt": [it.prompt for it in items],
            "seeds": [it.seed for it in items],
            "steps": steps,
            "scheduler": scheduler,
            "policy": policy,
        },
        limits=Limits(max_num_images=max(len(items), Limits.max_num_images)),
    )
    seconds = time.perf_counter() - t0
    passed = [float(verify(np.asarray(img), it.spec).passed) for img, it in zip(result.images, items)]
    return passed, seconds, result.trace


def batches(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def pass_comparison(model, args) -> dict[str, Any]:
    categories = args.categories.split(",")
    selection, test = split_items(categories, args.items, args.suite_seed)
    scales = [float(s) for s in args.scales.split(",")]
    cfg_arms = {f"cfg:scale={s:g}": f"cfg:scale={s:g}" for s in scales}
    print(f"[select] {len(selection)} items x {len(scales)} scales", file=sys.stderr, flush=True)
    select_pass = {name: [] for name in cfg_arms}
    for batch in batches(selection, args.batch):
        for name, policy in cfg_arms.items():
            select_pass[name] += run_arm(model, batch, policy, args.steps, args.scheduler)[0]
    best = max(cfg_arms, key=lambda n: (np.mean(select_pass[n]), -list(cfg_arms).index(n)))
    print(
        f"[select] pass: { ({k: round(float(np.mean(v)), 3) for k, v in select_pass.items()}) }; best {best}",
        file=sys.stderr,
        flush=True,
    )
    # the dynamic policy's parameters are tuned on the selection half too (never on the test half)
    dynamic_policies = [p.strip() for p in args.policy.split(";") if p.strip()]
    dynamic_select = {p: [] for p in dynamic_policies}
    if len(dynamic_policies) > 1:
        for batch in batches(selection, args.batch):
            for policy in dynamic_policies:
                dynamic_select[policy] += run_arm(model, batch, policy, args.steps, args.scheduler)[0]
        print(
            f"[select] dynamic pass: { ({k: round(float(np.mean(v)), 3) for k, v in dynamic_select.items()}) }",
            file=sys.stderr,
            flush=True,
        )
    dynamic = max(
        dynamic_policies,
        key=lambda p: (np.mean(dynamic_select[p]) if dynamic_select[p] else 0.0, -dynamic_policies.index(p)),
    )

    arms = {**cfg_arms, "dynamic": dynamic}
    passed = {name: [] for name in arms}
    times = {name: [] for name in arms}
    schedules: list[list[float]] = []
    for b, batch in enumerate(batches(test, args.batch)):
        names = list(arms)
        names = names[b % len(names) :] + names[: b % len(names)]  # rotate the order so that drift hits every arm
        for name in names:
            p, s, trace = run_arm(model, batch, arms[name], args.steps, args.scheduler)
            passed[name] += p
            times[name].append(s)
            if name == "dynamic":
                schedules += np.asarray(trace["scale_schedule"]).T.tolist()
        print(
            f"[test] batch {b + 1}: " + ", ".join(f"{n} {times[n][-1]:.1f}s" for n in arms), file=sys.stderr, flush=True
        )

    prompts = [it.prompt for it in test]
    unique = sorted(set(prompts))
    index = np.array([unique.index(p) for p in prompts])
    delta = np.array(passed["dynamic"]) - np.array(passed[best])

    def mean_over(prompt_ids):
        return float(np.mean(np.concatenate([delta[index == u] for u in prompt_ids])))

    lo, hi = bootstrap(mean_over, len(unique))
    t = {n: np.array(v) for n, v in times.items()}
    cfg_mean = np.mean([t[n] for n in cfg_arms], axis=0)  # per batch

    def ratio(ids):
        return float(t["dynamic"][ids].sum() / cfg_mean[ids].sum())

    r_lo, r_hi = bootstrap(ratio, len(cfg_mean))
    per_category = {}
    for category in categories:
        mask = np.array([c == category for c in _categories(test)])
        per_category[category] = {n: float(np.mean(np.array(v)[mask])) for n, v in passed.items()}
    return {
        "selection_items": len(selection),
        "test_items": len(test),
        "test_prompts": len(unique),
        "selection_pass": {k: float(np.mean(v)) for k, v in select_pass.items()},
        "best_fixed": best,
        "dynamic_selection_pass": {k: float(np.mean(v)) for k, v in dynamic_select.items() if v},
        "dynamic_policy": dynamic,
        "test_pass": {k: float(np.mean(v)) for k, v in passed.items()},
        "per_category": per_category,
        "delta_pass": float(delta.mean()),
        "delta_pass_ci": [lo, hi],
        "seconds": {k: float(np.sum(v)) for k, v in times.items()},
        "time_ratio": ratio(np.arange(len(cfg_mean))),
        "time_ratio_ci": [r_lo, r_hi],
        "mean_schedule_by_step": np.mean(schedules, axis=0).round(2).tolist() if schedules else [],
        # per test item, so that draws can be pooled and other arms compared on the same items later
        "test_item_list": [{"prompt": it.prompt, "seed": it.seed, "category": it.spec.category} for it in test],
        "test_pass_per_item": {k: [int(x) for x in v] for k, v in passed.items()},
    }


def _categories(items) -> list[str]:
    return [it.spec.category for it in items]


def agreement(model, args) -> dict[str, Any]:
    """Spearman of the alignment evaluator with its pixel reward on held-out decoded candidates, by noise level."""
    import torch

    from diffsteer.guidance.latent_evaluators import evaluators_for
    from diffsteer.guidance.reward_models import get_reward
    from diffsteer.training.latent_evaluator import Groups, record_candidate_groups, spearman

    evaluators = evaluators_for(model)
    spec = evaluators.specs["alignment"]
    reward = get_reward(spec.target, model.device)
    _, test = split_items(args.categories.split(","), args.items, args.suite_seed)
    candidates = tuple(evaluators.meta.get("candidates", [1.0, 1.5, 2.0, 3.0, 4.5, 6.0]))
    rng = np.random.default_rng(17)
    groups = []
    for batch in batches(test, args.batch):
        params = {
            "prompt": [it.prompt for it in batch],
            "seeds": [it.seed for it in batch],
            "steps": args.steps,
            "scheduler": args.scheduler,
            "policy": "cfg:scale=1",
        }
        groups.append(
            record_candidate_groups(
                model,
                params["prompt"],
                params["seeds"],
                rng,
                params,
                candidates,
                args.records,
                reward,
                embeddings=spec.embedding_dim > 0,
            )
        )
    recorded = Groups.concatenate(groups)
    x0, bars, target = recorded.x0, recorded.alpha_bar, recorded.reward.numpy()
    k = x0.shape[1]
    with torch.no_grad():
        pred = (
            evaluators.evaluate(
                "alignment", x0.flatten(0, 1), bars.repeat_interleave(k), recorded.prompt_inputs().repeat_interleave(k)
            )
            .view(-1, k)
            .numpy()
        )
    lam = np.log(bars.numpy() / (1 - bars.numpy()))
    edges = np.quantile(lam, [0, 1 / 3, 2 / 3, 1])
    out = {"groups": int(len(lam)), "candidates": k, "reward": spec.target, "by_noise": []}
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        mask = (lam >= a) & ((lam <= b) if i == 2 else (lam < b))
        within = [spearman(pred[j], target[j]) for j in np.nonzero(mask)[0]]
        out["by_noise"].append(
            {
                "log_snr": [round(float(a), 2), round(float(b), 2)],
                "groups": int(mask.sum()),
                "spearman_pooled": spearman(pred[mask].ravel(), target[mask].ravel()),
                "spearman_within_group": float(np.nanmean(within)),
                "top1_agreement": float(np.mean(pred[mask].argmax(1) == target[mask].argmax(1))),
            }
        )
    out["spearman_pooled_all"] = spearman(pred.ravel(), target.ravel())
    out["spearman_within_all"] = float(np.nanmean([spearman(p, t) for p, t in zip(pred, target)]))
    return out


def with_evaluators(model, folder: str | None):
    """The model, pointed at the evaluator folder ``folder`` where one is given."""
    import dataclasses

    if not folder:
        return model
    return dataclasses.replace(model, extra={**model.extra, "latent_evaluators": str(Path(folder).resolve())})


def memory_child(cfg: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch

    from diffsteer.guidance.latent_evaluators import evaluators_for
    from diffsteer.guidance.models import load_model
    from diffsteer.guidance.request import Limits
    from diffsteer.guidance.sampler import generate

    torch.set_num_threads(cfg["threads"])
    model = with_evaluators(load_model(None, device="cpu"), cfg.get("evaluators"))
    evaluators = evaluators_for(model)  # the evaluators' weights are the model's, loaded before the start like the UNet
    if evaluators is not None and evaluators.embedding_target is not None:
        evaluators.text_tower()  # and so is the reward's text tower an embedding evaluator reads
    n = cfg["images"]
    params = {"prompt": ["a red circle"] * n, "seed": 0, "steps": cfg["steps"], "policy": cfg["policy"]}
    if cfg.get("size"):
        params.update(height=cfg["size"], width=cfg["size"])
    limits = Limits(max_num_images=n, max_cost=1e12, max_area_factor=16)
    gc.collect()
    loaded = proc_memory_bytes()["VmRSS"]
    generate(model, {**params, "steps": 2}, limits=limits)  # warm up (allocator, lazy inits)
    gc.collect()
    start = proc_memory_bytes()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    generate(model, params, limits=limits)
    peak = proc_memory_bytes()["VmHWM"]
    # above start: what the request adds to a warm process; above loaded: also what the warm-up left in the
    # allocator's pools (a policy whose warm-up keeps more than cfg's shows less above start, not less memory)
    return {
        "peak_above_start_mb": (peak - start) / 2**20,
        "peak_above_loaded_mb": (peak - loaded) / 2**20,
        "seconds": time.perf_counter() - t0,
    }


def memory(args) -> dict[str, Any]:
    candidates = "[" + ",".join(f"{1 + 7 * i / 31:.3f}" for i in range(32)) + "]"
    policies = {
        "cfg": "cfg:scale=3",
        "dynamic_latent_32": f"dynamic_cfg:candidates={candidates},start=0.2,initial_scale=1,evaluator=latent",
    }
    out: dict[str, Any] = {}
    for size in [None, *([int(s) for s in args.memory_sizes.split(",") if s] if args.memory_sizes else [])]:
        key = f"{size or 'native'}"
        out[key] = {}
        for name, policy in policies.items():
            cfg = {
                "images": 16,
                "steps": args.memory_steps,
                "policy": policy,
                "threads": args.threads,
                "size": size,
                "evaluators": args.evaluators,
            }
            proc = subprocess.run(
                [sys.executable, __file__, "--_memory", json.dumps(cfg)], capture_output=True, text=True
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"memory child failed: {proc.stderr[-2000:]}")
            out[key][name] = json.loads(lines[-1][len("MEMORY ") :])
            print(f"[memory] {key} {name}: {out[key][name]}", file=sys.stderr, flush=True)
        for measure in ("peak_above_start_mb", "peak_above_loaded_mb"):
            out[key][f"ratio_{measure[:-3]}"] = out[key]["dynamic_latent_32"][measure] / max(
                1e-9, out[key]["cfg"][measure]
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=12, help="held-out items per category (half select, half test)")
    ap.add_argument("--categories", default="single,two_objects,counting,colour_binding")
    ap.add_argument(
        "--suite-seed",
        type=int,
        default=0,
        help="held-out suite draw (0: the items of BENCHMARKS.md; others: fresh instances no tuning saw)",
    )
    ap.add_argument("--scales", default="1.5,3,4.5", help="fixed cfg scales (the best is chosen on the selection half)")
    ap.add_argument(
        "--policy",
        default=DEFAULT_POLICY,
        help="the dynamic policy; several separated by ';' are tuned on the selection half (best pass rate)",
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--records", type=int, default=3, help="agreement: recorded steps per trajectory")
    ap.add_argument("--memory-steps", type=int, default=4)
    ap.add_argument("--memory-sizes", default="", help="extra image sizes for the memory probe, e.g. 128")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: pass, agreement, memory")
    ap.add_argument(
        "--evaluators",
        default=str(shipped.LATENT_EVALUATORS),
        help="latent evaluator folder ('': the one in the model's folder)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the JSON report here too")
    ap.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory:
        print("MEMORY " + json.dumps(memory_child(json.loads(args._memory))))
        return 0

    import torch

    from diffsteer.guidance.models import load_model

    torch.set_num_threads(args.threads)
    model = with_evaluators(load_model(None, device="cpu"), args.evaluators)
    skip = set(args.skip.split(","))
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
    t0 = time.perf_counter()
    if "agreement" not in skip:
        report["agreement"] = agreement(model, args)
        print(json.dumps(report["agreement"], indent=1), file=sys.stderr, flush=True)
    if "pass" not in skip:
        report["pass"] = pass_comparison(model, args)
    if "memory" not in skip:
        report["memory"] = memory(args)
    report["wall_s"] = time.perf_counter() - t0
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
