"""Images/s of the default model on CPU: diffsteer (library, CLI settings, service) against plain diffusers.

Every arm makes the same images: the shipped proving-ground model (64×64), the same prompt, seeds, DDIM
scheduler, steps and cfg scale. Arms, run interleaved (one call of each per repeat, so load on a shared machine
hits all of them), median seconds per call, images/s and the ratio against diffusers:

- ``diffusers``: ``StableDiffusionPipeline.from_pretrained`` of the model folder (the baseline);
- ``generate``: ``diffsteer.guidance.sampler.generate`` as ``diffsteer generate`` calls it (no fast paths);
- ``generate+inference_mode``: the same inside ``torch.inference_mode()``;
- ``generate+channels_last``: with ``--fast-paths channels_last``;
- ``generate+compile``: with ``--fast-paths compile`` (inductor; its first call compiles, bounded by
  ``--compile-timeout``: past it the arm is dropped and reported as such);
- ``service``: ``POST /generate`` to a real ``diffsteer serve`` on loopback (default settings, one request at a
  time, PNG encoding and HTTP included);
- ``cli``: ``python -m diffsteer.service.cli generate`` once per repeat, end to end (process start and model load included).

    python benchmarks/cpu_default_model.py --repeats 5 --batch 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import interleaved_medians, time_limit  # noqa: E402
from diffsteer.guidance.models import load_model  # noqa: E402
from diffsteer.guidance.sampler import generate  # noqa: E402
from diffsteer.guidance.schedulers import build_scheduler  # noqa: E402
from diffsteer.proving_ground.shipped import MODEL as PROVING_GROUND_MODEL  # noqa: E402

PROMPT = "a red circle to the left of a blue square"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1, help="images per call")
    ap.add_argument("--scale", type=float, default=1.5, help="cfg scale (the proving-ground model's recommended one)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--compile-timeout", type=float, default=600.0, help="seconds allowed for the compile arm's first call"
    )
    ap.add_argument(
        "--arms",
        default="diffusers,generate,generate+inference_mode,generate+channels_last,generate+compile,service,cli",
    )
    args = ap.parse_args()
    arms = args.arms.split(",")
    seed = 1234
    request = {
        "prompt": PROMPT,
        "steps": args.steps,
        "seed": seed,
        "num_images": args.batch,
        "scheduler": "ddim",
        "policy": {"name": "cfg", "scale": args.scale},
    }
    fns = {}
    notes: dict[str, str] = {}

    if "diffusers" in arms:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            str(PROVING_GROUND_MODEL), safety_checker=None, requires_safety_checker=False
        )
        pipe.scheduler = build_scheduler("ddim", dict(pipe.scheduler.config, _class_name=type(pipe.scheduler).__name__))
        pipe.set_progress_bar_config(disable=True)

        def diffusers_call():
            generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(args.batch)]
            pipe(
                PROMPT,
                num_inference_steps=args.steps,
                guidance_scale=args.scale,
                num_images_per_prompt=args.batch,
                generator=generators,
            )

        fns["diffusers"] = diffusers_call

    plain = load_model(None, device="cpu")
    if "generate" in arms:
        fns["generate"] = lambda: generate(plain, request)
    if "generate+inference_mode" in arms:

        def in_inference_mode():
            with torch.inference_mode():
                generate(plain, request)

        fns["generate+inference_mode"] = in_inference_mode
    if "generate+channels_last" in arms:
        cl = load_model(None, device="cpu", fast_paths="channels_last")
        fns["generate+channels_last"] = lambda: generate(cl, request)
    if "generate+compile" in arms:
        compiled = load_model(None, device="cpu", fast_paths="compile")
        t0 = time.perf_counter()
        try:
            with time_limit(args.compile_timeout):
                generate(compiled, request)
            notes["generate+compile"] = f"first call (compilation) {time.perf_counter() - t0:.0f} s"
            fns["generate+compile"] = lambda: generate(compiled, request)
        except Exception as e:  # noqa: BLE001 - the alarm surfaces as TimeoutError or wrapped in inductor's own error
            notes["generate+compile"] = (
                f"dropped: no first call within {args.compile_timeout:.0f} s "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            )
    server = None
    if "service" in arms:
        import httpx

        from benchmarks.service_load import Server

        server = Server(
            argparse.Namespace(clients=[1], device="cpu", dtype=None, threads=None, model="default"), batching=True
        )
        server.wait_ready(600)
        body = {**request, "policy": f"cfg:scale={args.scale}"}
        client = httpx.Client(timeout=600)

        def service_call():
            client.post(f"{server.url}/generate", json=body).raise_for_status()

        fns["service"] = service_call
    if "cli" in arms:
        out = Path(tempfile.mkdtemp(prefix="cpu-bench-")) / "x.png"
        cmd = [
            sys.executable,
            "-m",
            "diffsteer.service.cli",
            "generate",
            PROMPT,
            "--steps",
            str(args.steps),
            "--seed",
            str(seed),
            "--num-images",
            str(args.batch),
            "--scheduler",
            "ddim",
            "--policy",
            f"cfg:scale={args.scale}",
            "-o",
            str(out),
            "-q",
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        fns["cli"] = lambda: subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    try:
        for fn in fns.values():
            fn()  # warm-up
        medians = interleaved_medians(fns, args.repeats, torch.device("cpu"))
    finally:
        if server is not None:
            server.stop()
    base = medians.get("diffusers")
    report = {
        "benchmark": "cpu_default_model",
        "model": "builtin:proving-ground (64×64)",
        "steps": args.steps,
        "batch": args.batch,
        "cfg_scale": args.scale,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "notes": notes,
        "arms": {
            k: {
                "median_s": round(v, 4),
                "images_per_s": round(args.batch / v, 3),
                "time_ratio_vs_diffusers": round(v / base, 3) if base else None,
            }
            for k, v in medians.items()
        },
    }
    print(json.dumps(report, indent=2))
    print("| arm | s per call | images/s | time / diffusers |\n| --- | --- | --- | --- |", file=sys.stderr)
    for k, v in report["arms"].items():
        print(f"| {k} | {v['median_s']} | {v['images_per_s']} | {v['time_ratio_vs_diffusers']} |", file=sys.stderr)
    for k, v in notes.items():
        print(f"{k}: {v}", file=sys.stderr)


if __name__ == "__main__":
    main()
