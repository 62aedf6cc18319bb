"""Wall time of diffsteer's sampler against the family's diffusers pipeline on identical work.

Same components, prompt, seeds, scheduler, steps, batch and size; runs interleaved in one process after warm-up;
prints both medians and the ratio ours/diffusers.

- UNet models (``tiny``, ``default``, ``sd15``, a folder): ``generate`` with ``cfg`` at 7.5 against
  ``StableDiffusionPipeline`` at ``guidance_scale`` 7.5, both on the scheduler ``--scheduler`` (default DDIM) —
  goal ≤ 1.02.
- Flow-matching transformers (``tiny-flux``, ``tiny-flux-schnell``, ``tiny-sd3``, ``tiny-qwenimage``: the
  built-in tiny models): ``generate`` on the model's own scheduler (``default``: FlowMatchEuler with the family's
  shift) against the family's pipeline on its own scheduler, each at the pipeline's defaults (:data:`FLOW_ARCHS`)
  — goal ≤ 1.05. On a tiny model a run is dominated by fixed per-step costs, so these runs alternate the order
  (A B B A ...), collect garbage before each run, warm up three times and take 25 repeats by default.

Besides the ratio of the wall-time medians (``ratio``) the report gives the ratio of the fastest runs, the quartiles
of the per-round ratios and, on a CPU, the ratio of the median CPU seconds of the process (``cpu_ratio``), which
other processes on a shared machine disturb far less; ``--threads 1`` steadies CPU runs further.

    python benchmarks/sampler_overhead.py                          # built-in tiny model on CPU
    python benchmarks/sampler_overhead.py --arch sd15 --device cuda --dtype fp16 --size 512 --steps 30
    python benchmarks/sampler_overhead.py --arch tiny-flux --size 64 --steps 20 --batch 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import interleaved_times, load_arch  # noqa: E402
from diffsteer.guidance.sampler import generate  # noqa: E402
from diffsteer.guidance.schedulers import build_scheduler  # noqa: E402

PROMPT, SEED = "a red circle to the left of a blue square", 1234

# The flow archs: our policy and the pipeline's arguments for the same work (each the pipeline's default, written
# out so the report says what ran).
FLOW_ARCHS: dict[str, tuple[str, dict]] = {
    # FluxPipeline: distilled guidance 3.5 (ours: distilled_guidance left out = 3.5), no true CFG: one pass a step
    "tiny-flux": ("cfg:scale=1", {"guidance_scale": 3.5, "true_cfg_scale": 1.0}),
    "tiny-flux-schnell": ("cfg:scale=1", {"true_cfg_scale": 1.0}),  # no guidance input: one pass a step
    "tiny-sd3": ("cfg:scale=7", {"guidance_scale": 7.0}),  # StableDiffusion3Pipeline: true CFG, two passes a step
    # QwenImagePipeline without a negative prompt: no CFG, one pass a step (true_cfg_scale 1 rather than the
    # default 4 changes nothing without one, and spares the pipeline's warning on every call)
    "tiny-qwenimage": ("cfg:scale=1", {"true_cfg_scale": 1.0}),
}


def time_against_diffusers(
    model,
    *,
    steps: int,
    batch: int,
    size: int,
    scheduler: str = "ddim",
    repeats: int = 7,
    scale: float = 7.5,
    policy: dict | str | None = None,
    pipeline_kwargs: dict | None = None,
    warmups: int = 1,
    fair: bool = False,
    samples: dict | None = None,
    cpu_samples: dict | None = None,
) -> dict[str, float]:
    """Median seconds of ``generate`` (cfg at ``scale``, or ``policy``) and of diffusers' pipeline over the same
    modules on the same work, interleaved after ``warmups`` warm-ups each: {"diffsteer": s, "diffusers": s}.

    The pipeline gets ``guidance_scale=scale`` (or ``pipeline_kwargs`` instead) and the scheduler ``scheduler``;
    ``scheduler="default"`` leaves it the pipeline's own (the checkpoint's: for flow models the only fair choice,
    as the pipeline sets its σ grid and shift itself). ``fair``: alternate the order and collect garbage before
    each run (:func:`benchmarks.common.interleaved_times`). ``samples`` and ``cpu_samples``, if given, receive
    every run's wall and CPU seconds."""
    pipe = model.to_pipeline()
    if scheduler != "default":
        pipe.scheduler = build_scheduler(scheduler, model.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"guidance_scale": scale} if pipeline_kwargs is None else pipeline_kwargs

    def ours():
        generate(
            model,
            {
                "prompt": PROMPT,
                "steps": steps,
                "seed": SEED,
                "num_images": batch,
                "scheduler": scheduler,
                "policy": policy or {"name": "cfg", "scale": scale},
                "width": size,
                "height": size,
            },
        )

    def theirs():
        generators = [torch.Generator("cpu").manual_seed(SEED + k) for k in range(batch)]
        pipe(
            PROMPT,
            num_inference_steps=steps,
            num_images_per_prompt=batch,
            generator=generators,
            height=size,
            width=size,
            **kwargs,
        )

    for _ in range(warmups):
        ours(), theirs()
    times = interleaved_times(
        {"diffsteer": ours, "diffusers": theirs},
        repeats,
        model.device,
        alternate=fair,
        collect=fair,
        cpu_times=cpu_samples,
    )
    if samples is not None:
        samples.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny", choices=["tiny", "default", "sd15", *FLOW_ARCHS])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--scheduler", default=None, help="default: ddim (UNet), the model's own (flow archs)")
    ap.add_argument("--repeats", type=int, default=None, help="default: 7 (UNet), 25 (flow archs)")
    ap.add_argument("--warmups", type=int, default=None, help="default: 1 (UNet), 3 (flow archs)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = ap.parse_args(argv)

    flow = args.arch in FLOW_ARCHS
    scheduler = args.scheduler or ("default" if flow else "ddim")
    if flow and scheduler != "default":
        ap.error("flow archs run on the model's own scheduler (--scheduler default), as their pipelines do")
    repeats = args.repeats or (25 if flow else 7)
    warmups = args.warmups or (3 if flow else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_arch(args.arch, args.device, args.dtype)
    size = args.size or model.default_size
    policy, pipeline_kwargs = FLOW_ARCHS[args.arch] if flow else (None, None)
    samples: dict[str, list[float]] = {}
    cpu_samples: dict[str, list[float]] = {}
    medians = time_against_diffusers(
        model,
        steps=args.steps,
        batch=args.batch,
        size=size,
        scheduler=scheduler,
        repeats=repeats,
        policy=policy,
        pipeline_kwargs=pipeline_kwargs,
        warmups=warmups,
        fair=flow,
        samples=samples,
        cpu_samples=cpu_samples,
    )
    paired = sorted(a / b for a, b in zip(samples["diffsteer"], samples["diffusers"]))
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    report = {
        "benchmark": "sampler_overhead",
        "arch": args.arch,
        "family": model.family.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "dtype": str(model.dtype),
        "size": size,
        "steps": args.steps,
        "batch": args.batch,
        "scheduler": scheduler if scheduler != "default" else f"default ({model.scheduler_config['_class_name']})",
        "policy": policy or "cfg:scale=7.5",
        "pipeline": type(model.to_pipeline()).__name__,
        "pipeline_kwargs": pipeline_kwargs if pipeline_kwargs is not None else {"guidance_scale": 7.5},
        "repeats": repeats,
        "warmups": warmups,
        "diffsteer_s": round(medians["diffsteer"], 4),
        "diffusers_s": round(medians["diffusers"], 4),
        "ratio": round(medians["diffsteer"] / medians["diffusers"], 4),
        # the fastest run of each: what the work costs with the least interference from other processes
        "diffsteer_min_s": round(min(samples["diffsteer"]), 4),
        "diffusers_min_s": round(min(samples["diffusers"]), 4),
        "ratio_of_minimums": round(min(samples["diffsteer"]) / min(samples["diffusers"]), 4),
    }
    if device.type == "cpu":  # CPU seconds of this process: what a busy shared machine disturbs least
        cpu = {k: statistics.median(v) for k, v in cpu_samples.items()}
        report |= {
            "diffsteer_cpu_s": round(cpu["diffsteer"], 4),
            "diffusers_cpu_s": round(cpu["diffusers"], 4),
            "cpu_ratio": round(cpu["diffsteer"] / cpu["diffusers"], 4),
        }
    report |= {
        "paired_ratio_quartiles": [round(q, 4) for q in quartiles],
        "goal": "≤ 1.05" if flow else "≤ 1.02",
    }
    print(json.dumps(report, ensure_ascii=False))


if __name__ == "__main__":
    main()
