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
from guidance.sampler import generate  # noqa: E402
from guidance.schedulers import build_scheduler  # noqa: E402


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
    pipe = model.to_pipeline()
    pipe.scheduler = build_scheduler(args.scheduler, model.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    prompt, scale, seed = "a red circle to the left of a blue square", 7.5, 1234

    def ours():
        generate(model, {"prompt": prompt, "steps": args.steps, "seed": seed, "num_images": args.batch,
                         "scheduler": args.scheduler, "policy": {"name": "cfg", "scale": scale},
                         "width": size, "height": size})

    def theirs():
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(args.batch)]
        pipe(prompt, num_inference_steps=args.steps, guidance_scale=scale, num_images_per_prompt=args.batch,
             generator=generators, height=size, width=size)

    ours(), theirs()  # warm-up
    medians = interleaved_medians({"diffsteer": ours, "diffusers": theirs}, args.repeats, device)
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
