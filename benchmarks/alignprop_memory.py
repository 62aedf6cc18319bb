"""Peak memory and step time of AlignProp for truncation K = 1, K = 10 and full backpropagation, with and without
gradient checkpointing; ratios against K = 1 with checkpointing, measured in the same run.

Each configuration runs in a fresh process (so one's peak cannot hide another's): build the trainer, record the
memory in use, run one warm-up optimizer step and ``--repeats`` timed ones, and report the peak above the
starting point: ``torch.cuda.max_memory_allocated`` on GPU, the process's peak resident set (``ru_maxrss``)
on CPU. The reward is the proving ground's open_clip model on every architecture (its cost is small and equal
across rows, so the rows differ only in what is differentiated).

    python benchmarks/alignprop_memory.py                                      # proving-ground model, CPU
    python benchmarks/alignprop_memory.py --arch sd15 --device cuda --dtype fp16 --size 512 --steps 50 --batch 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROWS = [(1, True), (10, True), (0, True), (1, False), (10, False), (0, False)]  # K = 0: full backpropagation


def measure(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import load_arch, proc_memory_bytes
    from diffsteer.training.alignprop import AlignPropConfig, AlignPropTrainer

    torch.set_num_threads(args.threads)
    k = args.k if args.k > 0 else args.steps
    mixed = {"fp16": "fp16", "bf16": "bf16"}.get(args.dtype or "", "no") if args.device.startswith("cuda") else "no"
    config = AlignPropConfig(
        model=args.arch,
        output_dir="/tmp/alignprop-bench",
        prompts="pg-train:all",
        eval_prompts="",
        steps=args.steps,
        batch_size=args.batch,
        truncation="fixed",
        truncation_k=k,
        gradient_checkpointing=args.checkpointing,
        policy="cfg:scale=3",
        scheduler="ddim",
        mixed_precision=mixed,
        device=args.device,
        progress=False,
        tensorboard=False,
        height=args.size,
        width=args.size,
    )
    model = load_arch("default" if args.arch == "proving-ground" else args.arch, args.device, args.dtype)
    trainer = AlignPropTrainer(config, model=model)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        start = proc_memory_bytes()["VmRSS"]
    times = []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - start
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    return {
        "k": args.k,
        "checkpointing": args.checkpointing,
        "peak_mb": peak / 2**20,
        "step_s": statistics.median(times),
        "start_mb": start / 2**20,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", default="proving-ground", help="proving-ground, tiny, sd15 (random weights) or a diffusers folder"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="fp16 / bf16 on GPU (mixed precision, LoRA in fp32)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per rollout")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rows", default=None, help="K:checkpointing pairs, e.g. 1:1,0:1 (K = 0: full); default: all six"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the rows as one JSON list (last line) instead of a table"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per row (a row past it is recorded as failed)"
    )
    parser.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)  # one row, in a child process
    parser.add_argument("--checkpointing", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.checkpointing = bool(args.checkpointing)
    return args


def main() -> None:
    args = parse_args()
    if args.k is not None:
        print(json.dumps(measure(args)))
        return
    wanted = (
        ROWS if args.rows is None else [(int(k), bool(int(c))) for k, c in (p.split(":") for p in args.rows.split(","))]
    )
    rows = []
    for k, ckpt in wanted:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--k", str(k), "--checkpointing", str(int(ckpt))]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rows.append({"k": k, "checkpointing": ckpt, "error": f"timed out after {args.timeout} s"})
            continue
        if out.returncode != 0:
            lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
            rows.append({"k": k, "checkpointing": ckpt, "error": lines[-1]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows))
        return
    base = next(r for r in rows if r["k"] == 1 and r["checkpointing"] and "error" not in r)
    print(f"arch={args.arch} device={args.device} dtype={args.dtype} steps={args.steps} batch={args.batch}")
    print("| K | checkpointing | peak memory (MB) | × K=1+ckpt | step (s) | × K=1+ckpt |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        k = "full" if r["k"] == 0 else r["k"]
        if "error" in r:
            print(f"| {k} | {'on' if r['checkpointing'] else 'off'} | {r['error']} | | | |")
            continue
        print(
            f"| {k} | {'on' if r['checkpointing'] else 'off'} | {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} "
            f"| {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
