"""Wall time of diffsteer's sampler with `cfg` against diffusers' StableDiffusionPipeline on identical work.

Same components, prompt, seeds, scheduler, steps and batch; runs interleaved in one process, one warm-up
each; prints both medians and the ratio ours/diffusers (goal ≤ 1.02).

    python benchmarks/sampler_overhead.py                          # built-in tiny model on CPU
    python benchmarks/sampler_overhead.py --arch sd15 --device cuda --dtype fp16 --size 512 --steps 30
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import interleaved_medians, load_arch  # noqa: E402
from diffsteer.guidance.sampler import generate  # noqa: E402
from diffsteer.guidance.schedulers import build_scheduler  # noqa: E402


def time_against_diffusers(
    model,
    *,
    steps: int,
    batch: int,
    size: int,
    scheduler: str = "ddim",
    repeats: int = 7,
    scale: float = 7.5,
    policy: dict | None = None,
) -> dict[str, float]:
    """Median seconds of ``generate`` (cfg at ``scale``, or ``policy``) and of diffusers' pipeline over the same
    modules on the same work, interleaved after one warm-up each: {"diffsteer": s, "diffusers": s}."""
    pipe = model.to_pipeline()
    pipe.scheduler = build_scheduler(scheduler, model.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    prompt, seed = "a red circle to the left of a blue square", 1234

    def ours():
        generate(
            model,
            {
                "prompt": prompt,
                "steps": steps,
                "seed": seed,
                "num_images": batch,
                "scheduler": scheduler,
                "policy": policy or {"name": "cfg", "scale": scale},
                "width": size,
                "height": size,
            },
        )

    def theirs():
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(batch)]
        pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=scale,
            num_images_per_prompt=batch,
            generator=generators,
            height=size,
            width=size,
        )

    ours(), theirs()  # warm-up
    return interleaved_medians({"diffsteer": ours, "diffusers": theirs}, repeats, model.device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny", choices=["tiny", "default", "sd15"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    device = torch.device(args.device)
    model = load_arch(args.arch, args.device, args.dtype)
    size = args.size or model.default_size
    medians = time_against_diffusers(
        model, steps=args.steps, batch=args.batch, size=size, scheduler=args.scheduler, repeats=args.repeats
    )
    report = {
        "benchmark": "sampler_overhead",
        "arch": args.arch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(model.dtype),
        "size": size,
        "steps": args.steps,
        "batch": args.batch,
        "scheduler": args.scheduler,
        "repeats": args.repeats,
        "diffsteer_s": round(medians["diffsteer"], 4),
        "diffusers_s": round(medians["diffusers"], 4),
        "ratio": round(medians["diffsteer"] / medians["diffusers"], 4),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
