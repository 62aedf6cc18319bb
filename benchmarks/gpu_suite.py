"""The GPU suite: every performance row on whatever CUDA device is here, each against a baseline
measured in the same run, in one command that fits 8 minutes on one H100/H200.

    python benchmarks/gpu_suite.py --out gpu-results                 # on a CUDA machine (≈ 7 min)
    python benchmarks/gpu_suite.py --smoke --out /tmp/smoke          # tiny models on CPU: the same code end to end

First the random-weight models the rows need are written to a temporary folder (nothing downloads): the SD-1.5
architecture as a diffusers folder (fp16), the SDXL base UNet, and a ViT-H/14 open_clip state dict. Then each
row runs in its own process, with its own timeout, inside a total budget; a row that fails or times out is
recorded with its error and the next row runs. Results: ``OUT/gpu_suite.json`` and ``OUT/gpu_suite.md`` (a
table: row, measure, value, baseline, ratio, goal).

Rows (``--rows`` picks some; order = priority when the budget runs short):

- ``sampler``: ``generate`` (cfg 7.5, DDIM) / diffusers ``StableDiffusionPipeline`` over the same modules,
  SD-1.5 size, 512², fp16, 30 steps, batch 1 and 8 — goal ≤ 1.02;
- ``serving``: a real ``diffsteer serve`` on loopback, images/s at 1, 4, 8, 16 concurrent clients with cross-request
  batching against the same server one request at a time (batching off) — goal ≥ 2 at 8 clients;
- ``mfu``: the batched SD-1.5 UNet (16 rows: 8 cfg requests) in bf16: FLOPs per call from
  ``torch.utils.flop_counter`` over wall time, against the device's dense bf16 peak (:data:`BF16_PEAK_TFLOPS`)
  — goal ≥ 40%;
- ``adaptive``: Adaptive Guidance (``ag``) against cfg at the same 30 steps: wall time and NFE ratios;
- ``kernels``: the UNet call at 2 and 16 rows: SDPA fp16 (baseline) against xformers (where it imports), bf16,
  channels-last and CUDA graphs (guidance/fast_paths.py), with each output's largest difference from the baseline;
- ``reno``: ReNO, 50 iterations, SD-Turbo-size UNet (one step) + ViT-H/14 open_clip reward: seconds and peak
  memory against one plain one-step generation — goals < 10 s and < 15 GB;
- ``alignprop``: one AlignProp step (LoRA, 512², batch 1, 20 DDIM steps) at K = 1 and full backpropagation,
  gradient checkpointing on and off: step time and peak memory against K = 1 with checkpointing — goal < 12 GB
  at K = 1;
- ``mfu_sdxl``: as ``mfu``, the SDXL base UNet at 1024², 8 rows;
- ``compile``: ``torch.compile`` of the UNet (default mode), alone and with CUDA graphs, against eager (16 rows);
- ``flow_sd35m``: SD3.5 Medium's MMDiT at its real config (2.2B), random weights, bf16, 1024² (4096 image tokens
  and the real 333 text tokens; small random text encoders: the row measures the backbone): the backbone call at
  1, 2 (one cfg step) and 8 rows with its FLOPs, TFLOPS and MFU against the dense bf16 peak (goal ≥ 40%), the
  batching gain (rows/s at 8 rows over 1 row), peak memory against the weights, and ``generate`` (cfg 7, 4 steps)
  at batch 1 and 4 in images/s against the backbone calls alone;
- ``flow_flux``: the same for FLUX.1-dev's transformer at its real config (11.9B, guidance-distilled, the real 512
  T5 tokens), built in bf16 directly on the device; ``generate`` with cfg 1 on the distilled guidance 3.5.

- ``train_sd35m``: one LoRA training step of each training method on SD3.5 Medium's MMDiT (real config, random
  weights, bf16 base, fp32 LoRA on the attention projections of both streams, rank 16) at 1024², batch 1, through
  the shared trainer: AlignProp through the 4-step Euler flow sampler under cfg 7 with gradient checkpointing of
  every transformer call (K = 1 and K = 4 = full backpropagation; the ``saturation`` reward, so the row measures
  the backbone), Diffusion-DPO and SmPO in flow form on a one-pair synthetic file (gradient checkpointing), f-distill
  to a one-step student (gradient checkpointing), Flow-GRPO and DiffusionNFT (groups of 2, 4 sampling steps; they
  have no checkpointing option): step time and peak memory against the bf16 weights;
- ``train_flux``: the same on FLUX.1-dev's transformer (real config, 11.9B) at 1024², cfg 1 on the distilled
  guidance 3.5;
- ``fsdp_sd35m``: full fine-tuning of SD3.5 Medium's MMDiT (every weight, fp32 weights and AdamW state): one
  AlignProp step (K = 1, checkpointing, 1024², cfg 7, 4 Euler steps) with ``sharding: fsdp`` over the one device
  (FSDP2's gather and reduce-scatter path; ``torchrun`` over N devices divides the sharded state by N) against
  ``sharding: none``: step time and peak memory.

The flow rows come last: in the default budget they run only if the rows before them leave time; on their own
(``--rows flow_sd35m,flow_flux``) they take about 2-3 minutes on an H100 (FLUX.1-dev-size needs ~30 GB); the
training rows (``--rows train_sd35m,train_flux``) a few minutes more (a method that runs out of memory is a line
with its error; f-distill keeps two more copies of the backbone).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, from the vendors' data sheets; matched by substring of
# torch.cuda.get_device_name, first match wins (so the more specific names come first).
BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM and NVL
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),  # the AWS part: 70 TFLOPS dense bf16 with fp32 accumulate
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 6000 Ada", 364.2),
]

# Per-row time caps (seconds) on an H100/H200, and the order rows run in. The sum is above the default total
# budget on purpose: caps are limits, not estimates; the total budget is what keeps the run under 8 minutes.
ROWS: dict[str, float] = {
    "sampler": 80,
    "serving": 130,
    "mfu": 40,
    "adaptive": 40,
    "kernels": 60,
    "reno": 75,
    "alignprop": 130,
    "mfu_sdxl": 60,
    "compile": 150,
    "flow_sd35m": 75,
    "flow_flux": 120,
    "train_sd35m": 240,
    "train_flux": 420,
    "fsdp_sd35m": 200,
}
SMOKE_ROW_CAP = 600  # CPU, tiny models; generous because a shared machine can be 10x slower than idle
PROMPT = "a red circle to the left of a blue square"


# -- model files ----------------------------------------------------------------------------------------------


def write_models(folder: Path, device: str, smoke: bool) -> dict[str, str]:
    """The random-weight models every row reads, written once (built on the device for speed, saved in fp16)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from benchmarks.common import sd15_components, sdxl_unet
    from diffsteer.guidance.tiny import tiny_sd_components, tiny_unet

    paths = {
        "sd15": str(folder / "sd15"),
        "sdxl_unet": str(folder / "sdxl-unet"),
        "vit_h": str(folder / "vit-h-14.safetensors"),
    }
    with torch.device(device):
        parts = tiny_sd_components() if smoke else sd15_components()
        pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
        if not smoke:
            pipe.to(torch.float16)
        pipe.save_pretrained(paths["sd15"])
        del pipe, parts
        unet = tiny_unet(cross_dim=64, sdxl_pooled_dim=32) if smoke else sdxl_unet().to(torch.float16)
        unet.save_pretrained(paths["sdxl_unet"])
        del unet
        if not smoke:  # the smoke run scores with the shipped proving-ground open_clip model instead
            import open_clip
            from safetensors.torch import save_file

            clip = open_clip.create_model("ViT-H-14", device=device)
            save_file({k: v.half().contiguous() for k, v in clip.state_dict().items()}, paths["vit_h"])
            del clip
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return paths


# -- measurement helpers --------------------------------------------------------------------------------------


def line(
    row: str,
    measure: str,
    value: float | None,
    unit: str,
    *,
    baseline: str = "",
    baseline_value: float | None = None,
    ratio: float | None = None,
    goal: str = "",
    met: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    if ratio is None and value is not None and baseline_value:
        ratio = value / baseline_value
    return {
        "row": row,
        "measure": measure,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": None if ratio is None else round(ratio, 4),
        "goal": goal,
        "met": met,
        **extra,
    }


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads visible)"


def bf16_peak_tflops(name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


@contextlib.contextmanager
def peak_memory(device, out: dict[str, float]):
    """Peak bytes allocated on a CUDA device inside the block (total, not above the start), in ``out``."""
    import torch

    from benchmarks.common import proc_memory_bytes

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            out["peak_bytes"] = float(torch.cuda.max_memory_allocated(device))
        else:
            out["peak_bytes"] = float(proc_memory_bytes().get("VmHWM", 0))  # process peak RSS: an upper bound


def blocks(fns: dict[str, Callable[[], Any]], device, *, calls: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in blocks of ``calls`` calls, interleaved."""
    from benchmarks.common import interleaved_medians

    def block(fn):
        return lambda: [fn() for _ in range(calls)]

    for fn in fns.values():
        fn()  # warm-up
    medians = interleaved_medians({k: block(f) for k, f in fns.items()}, repeats, device)
    return {k: v / calls for k, v in medians.items()}


class Setup:
    """What a row gets: the device, dtype, sizes for this mode and the model paths."""

    def __init__(self, args):
        import torch

        self.smoke = args.smoke
        self.device = torch.device(args.device)
        self.paths = json.loads(args.paths)
        self.dtype = "fp16" if self.device.type == "cuda" else "fp32"
        self.size = 32 if self.smoke else 512  # pixels; the tiny models are 32×32 natively
        self.steps = 2 if self.smoke else 30
        self.repeats = 1 if self.smoke else 3

    def model(self, dtype: str | None = None, attention: str = "sdpa"):
        from diffsteer.guidance.models import load_model

        return load_model(self.paths["sd15"], device=self.device, dtype=dtype or self.dtype, attention=attention)

    def unet_inputs(self, unet, rows: int, dtype):
        """Random UNet inputs for ``rows`` rows at the model's native latent size (SDXL: with added inputs)."""
        import torch

        g = torch.Generator().manual_seed(0)
        cfg = unet.config
        h = cfg.sample_size
        x = torch.randn(rows, cfg.in_channels, h, h, generator=g).to(self.device, dtype)
        t = torch.full((rows,), 500.0, device=self.device)
        c = torch.randn(rows, 77, cfg.cross_attention_dim, generator=g).to(self.device, dtype)
        added = None
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            added = {
                "text_embeds": torch.randn(rows, pooled, generator=g).to(self.device, dtype),
                "time_ids": torch.tensor([[h * 8, h * 8, 0, 0, h * 8, h * 8]] * rows, dtype=dtype, device=self.device),
            }
        return x, t, c, added


def call(unet, x, t, c, added):
    return unet(x, t, encoder_hidden_states=c, added_cond_kwargs=added, return_dict=False)[0]


# -- rows -----------------------------------------------------------------------------------------------------


def row_sampler(s: Setup) -> list[dict]:
    from benchmarks.sampler_overhead import time_against_diffusers

    model = s.model()
    out = []
    for batch in (1, 2) if s.smoke else (1, 8):
        m = time_against_diffusers(model, steps=s.steps, batch=batch, size=s.size, scheduler="ddim", repeats=s.repeats)
        ratio = m["diffsteer"] / m["diffusers"]
        out.append(
            line(
                "sampler",
                f"generate, cfg, {s.steps} steps, batch {batch}, {s.size}²",
                m["diffsteer"],
                "s",
                baseline="diffusers StableDiffusionPipeline",
                baseline_value=m["diffusers"],
                goal="≤ 1.02",
                met=ratio <= 1.02,
            )
        )
    return out


def row_serving(s: Setup) -> list[dict]:
    """Two real servers (batching off, batching on) started together, then driven one after the other."""
    from benchmarks.service_load import Server, measure_server

    clients = [1, 2] if s.smoke else [1, 4, 8, 16]
    common = dict(
        model=s.paths["sd15"],
        device=str(s.device),
        dtype=s.dtype,
        threads=torch_threads() if s.smoke else None,
        ready_timeout=300.0,
    )
    body = {
        "prompt": PROMPT,
        "steps": 2 if s.smoke else 20,
        "policy": "cfg:scale=7.5",
        "scheduler": "euler",
        "width": s.size,
        "height": s.size,
    }
    bound = dict(requests=2, seconds=20.0) if s.smoke else dict(requests=32, seconds=12.0)
    off_args = argparse.Namespace(**common, **bound, clients=[1])
    on_args = argparse.Namespace(**common, **bound, clients=clients)
    servers = [Server(off_args, False), Server(on_args, True)]
    try:
        for server in servers:
            server.wait_ready(common["ready_timeout"])
        off = measure_server(servers[0], off_args, False, body)["runs"][0]
        on = measure_server(servers[1], on_args, True, body)["runs"]
    finally:
        for server in servers:
            server.stop()
    base = off["throughput_images_per_s"]
    out = [
        line("serving", "one request at a time (batching off), 1 client", base, "images/s", p50_s=off["latency_p50_s"])
    ]
    goal_at = 2 if s.smoke else 8
    for r in on:
        ratio = r["throughput_images_per_s"] / base if base and r["throughput_images_per_s"] else None
        out.append(
            line(
                "serving",
                f"batching on, {r['clients']} clients ({body['steps']} steps, {s.size}²)",
                r["throughput_images_per_s"],
                "images/s",
                baseline="batching off",
                baseline_value=base,
                ratio=ratio,
                goal="≥ 2 at 8 clients" if r["clients"] == goal_at else "",
                met=(ratio is not None and ratio >= 2) if r["clients"] == goal_at else None,
                p50_s=r["latency_p50_s"],
                p99_s=r["latency_p99_s"],
                rows_per_unet_call=r["rows_per_unet_call"],
                statuses=r["statuses"],
            )
        )
    return out


def _mfu(s: Setup, unet, rows: int, label: str, row: str) -> list[dict]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dtype = torch.bfloat16 if s.device.type == "cuda" else torch.float32  # bf16 is slow on most CPUs
    unet.to(dtype)
    x, t, c, added = s.unet_inputs(unet, rows, dtype)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            call(unet, x, t, c, added)
        flops = counter.get_total_flops()
        seconds = blocks(
            {"unet": lambda: call(unet, x, t, c, added)}, s.device, calls=2 if s.smoke else 10, repeats=s.repeats
        )["unet"]
    achieved = flops / seconds / 1e12
    name = device_name(s.device)
    peak = bf16_peak_tflops(name) if s.device.type == "cuda" else None
    mfu = achieved / peak if peak else None
    return [
        line(
            row,
            f"{label}, {rows} rows, {str(dtype).removeprefix('torch.')}: {flops / 1e9:.4g} GFLOP per call, {seconds * 1e3:.1f} ms",
            round(achieved, 3),
            "TFLOPS",
            baseline=f"dense bf16 peak of {name}" if peak else "no known peak for this device",
            baseline_value=peak,
            ratio=mfu,
            goal="MFU ≥ 40%",
            met=None if mfu is None else mfu >= 0.40,
            flops_per_call=flops,
            seconds_per_call=seconds,
        )
    ]


def row_mfu(s: Setup) -> list[dict]:
    label = "tiny UNet, 32²" if s.smoke else "SD-1.5 UNet, 512²"
    return _mfu(s, s.model(dtype="bf16" if s.device.type == "cuda" else "fp32").unet, 16, label, "mfu")


def row_mfu_sdxl(s: Setup) -> list[dict]:
    import torch
    from diffusers import UNet2DConditionModel

    dtype = torch.bfloat16 if s.device.type == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(s.paths["sdxl_unet"], torch_dtype=dtype)
    unet = unet.to(s.device).eval().requires_grad_(False)
    return _mfu(s, unet, 8, "tiny SDXL UNet" if s.smoke else "SDXL UNet, 1024²", "mfu_sdxl")


def row_adaptive(s: Setup) -> list[dict]:
    from benchmarks.common import interleaved_medians
    from diffsteer.guidance.sampler import generate

    model = s.model()
    request = {"prompt": PROMPT, "steps": s.steps, "seed": 1, "width": s.size, "height": s.size, "scheduler": "ddim"}
    specs = {"cfg": "cfg:scale=7.5", "ag": "ag:scale=7.5"}
    nfe = {name: generate(model, {**request, "policy": spec}).nfe[0] for name, spec in specs.items()}  # also warm-up
    fns = {name: (lambda spec=spec: generate(model, {**request, "policy": spec})) for name, spec in specs.items()}
    m = interleaved_medians(fns, s.repeats, s.device)
    time_ratio, nfe_ratio = m["ag"] / m["cfg"], nfe["ag"] / nfe["cfg"]
    return [
        line(
            "adaptive",
            f"ag:scale=7.5 (γ̄ default), {s.steps} steps, batch 1 — NFE {nfe['ag']} vs {nfe['cfg']} "
            f"(NFE ratio {nfe_ratio:.3f})",
            m["ag"],
            "s",
            baseline="cfg:scale=7.5, same steps",
            baseline_value=m["cfg"],
            goal="time ratio ≈ NFE ratio",
            met=time_ratio <= nfe_ratio + 0.05,
            nfe_ratio=nfe_ratio,
            time_saving_over_nfe_saving=(1 - time_ratio) / (1 - nfe_ratio) if nfe_ratio < 1 else None,
        )
    ]


def _variants_row(
    s: Setup, row: str, variants: dict[str, Callable[[Any], Any]], rows_list: tuple[int, ...]
) -> list[dict]:
    """Time the UNet call of each variant (a function turning a copy of the fp16 UNet into that variant, or
    raising to say why it is unavailable) against the eager SDPA UNet, interleaved; largest output difference."""
    import torch

    base = s.model().unet
    base_label = f"eager SDPA {s.dtype}"
    built: dict[str, Any] = {"eager SDPA": base}
    out: list[dict] = []
    for name, make in variants.items():
        try:
            built[name] = make(copy.deepcopy(base))
        except Exception as e:  # noqa: BLE001 - an unavailable variant is a recorded result
            out.append(line(row, name, None, "s", baseline=base_label, error=f"{type(e).__name__}: {e}"[:300]))
    for rows in rows_list:
        inputs = {}
        for name, unet in built.items():
            dtype = next(unet.parameters()).dtype
            inputs[name] = s.unet_inputs(unet, rows, dtype)
        with torch.no_grad():
            reference = call(base, *inputs["eager SDPA"]).float()
            diffs = {}
            for name, unet in built.items():
                try:
                    diffs[name] = float((call(unet, *inputs[name]).float() - reference).abs().max())
                except Exception as e:  # noqa: BLE001
                    out.append(line(row, f"{name}, {rows} rows", None, "s", error=f"{type(e).__name__}: {e}"[:300]))
            fns = {n: (lambda u=u, i=inputs[n]: call(u, *i)) for n, u in built.items() if n in diffs}
            seconds = blocks(fns, s.device, calls=2 if s.smoke else 10, repeats=s.repeats)
        for name in fns:
            if name == "eager SDPA":
                continue
            out.append(
                line(
                    row,
                    f"{name}, UNet call, {rows} rows",
                    seconds[name],
                    "s",
                    baseline=base_label,
                    baseline_value=seconds["eager SDPA"],
                    goal="< 1 to be worth a default",
                    met=seconds[name] < seconds["eager SDPA"],
                    max_abs_diff=diffs[name],
                )
            )
    return out


def _with_paths(spec: str):
    def make(unet):
        from diffsteer.guidance.fast_paths import apply_fast_paths

        apply_fast_paths(unet, spec)
        return unet

    return make


def _xformers(unet):
    from diffsteer.guidance.models import configure_attention

    configure_attention(unet, next(unet.parameters()).device, "xformers")
    return unet


def row_kernels(s: Setup) -> list[dict]:
    import torch

    variants = {
        "xformers": _xformers,
        "bf16" if s.device.type == "cuda" else "bf16 (CPU)": lambda u: u.to(torch.bfloat16),
        "channels_last": _with_paths("channels_last"),
        "cuda_graphs": _with_paths("cuda_graphs"),
    }
    return _variants_row(s, "kernels", variants, (2,) if s.smoke else (2, 16))


def row_compile(s: Setup) -> list[dict]:
    # in the smoke run the CPU would spend minutes in inductor's C++ code generation: trace with dynamo only
    backend = ",compile_backend=eager" if s.smoke else ""
    variants = {"compile": _with_paths("compile" + backend)}
    if s.device.type == "cuda":
        variants["compile + cuda_graphs"] = _with_paths("compile,cuda_graphs")
    return _variants_row(s, "compile", variants, (2,) if s.smoke else (16,))  # each shape compiles again: one


def row_reno(s: Setup) -> list[dict]:
    import torch

    from benchmarks.common import interleaved_medians, sd_turbo_components
    from diffsteer.guidance.models import _place, configure_attention, from_components, resolve_dtype
    from diffsteer.guidance.reward_models import DEFAULT_REWARDS, RewardModels
    from diffsteer.guidance.sampler import generate
    from diffsteer.guidance.tiny import tiny_sd_components

    with torch.device(s.device):
        parts = tiny_sd_components() if s.smoke else sd_turbo_components()
    model = from_components("sd-turbo-random", parts)
    _place(model, s.device, resolve_dtype(s.dtype, s.device))
    configure_attention(model.unet, s.device, "sdpa")
    rewards = (
        DEFAULT_REWARDS if s.smoke else RewardModels({"clip": {"model": "ViT-H-14", "checkpoint": s.paths["vit_h"]}})
    )
    iterations = 3 if s.smoke else 50
    request = {"prompt": PROMPT, "steps": 1, "seed": 7, "scheduler": "euler_a", "width": s.size, "height": s.size}
    reno = {**request, "policy": f"reno:iterations={iterations},reward=clip:1"}
    generate(model, request)  # warm-up of the one-step sampler
    generate(model, {**reno, "policy": "reno:iterations=1,reward=clip:1"}, rewards=rewards)  # warm-up: reward, backward
    plain = interleaved_medians({"plain": lambda: generate(model, request)}, 3, s.device)["plain"]
    memory: dict[str, float] = {}
    with peak_memory(s.device, memory):
        t0 = time.perf_counter()
        result = generate(model, reno, rewards=rewards)
        seconds = time.perf_counter() - t0
    peak_gb = memory["peak_bytes"] / 1e9
    trace = result.trace.get("reno", {})
    return [
        line(
            "reno",
            f"ReNO {iterations} iterations, SD-Turbo-size UNet 1 step + "
            f"{'ViT-H/14' if not s.smoke else 'proving-ground'} open_clip reward, {s.size}²",
            seconds,
            "s",
            baseline="one plain one-step generation",
            baseline_value=plain,
            goal="< 10 s",
            met=seconds < 10,
            iterations_run=trace.get("iterations"),
        ),
        line(
            "reno",
            "ReNO peak memory" + (" (CUDA, allocated)" if s.device.type == "cuda" else " (process peak RSS)"),
            round(peak_gb, 3),
            "GB",
            baseline="goal 15 GB",
            baseline_value=15.0,
            goal="< 15 GB",
            met=peak_gb < 15,
        ),
    ]


def row_alignprop(s: Setup, remaining: float) -> list[dict]:
    """benchmarks/alignprop_memory.py's four configurations: each in its own process on a device (so one's peak
    cannot hide another's, and an out-of-memory one fails alone); in the smoke run in this process."""
    from benchmarks import alignprop_memory

    steps, repeats = ("2", "1") if s.smoke else ("20", "1")  # one warm-up step, one timed (full backprop: seconds)
    dtype = ["--dtype", s.dtype] if s.device.type == "cuda" else []
    options = [
        "--arch",
        s.paths["sd15"],
        "--device",
        str(s.device),
        *dtype,
        "--size",
        str(s.size),
        "--steps",
        steps,
        "--batch",
        "1",
        "--repeats",
        repeats,
        "--threads",
        str(torch_threads()),
    ]
    pairs = [(1, 1), (0, 1), (1, 0), (0, 0)]
    if s.smoke:
        rows = [
            alignprop_memory.measure(alignprop_memory.parse_args([*options, "--k", str(k), "--checkpointing", str(c)]))
            for k, c in pairs
        ]
    else:
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "alignprop_memory.py"),
            *options,
            "--rows",
            ",".join(f"{k}:{c}" for k, c in pairs),
            "--json",
            "--timeout",
            str(max(10.0, remaining / 4 - 5)),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"alignprop_memory.py failed: {proc.stderr.strip().splitlines()[-1:]}")
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
    base = next((r for r in rows if r["k"] == 1 and r["checkpointing"] and "error" not in r), None)
    out = []
    for r in rows:
        label = f"K = {'full' if r['k'] == 0 else r['k']}, checkpointing {'on' if r['checkpointing'] else 'off'}"
        if "error" in r:
            out.append(line("alignprop", label, None, "s", error=r["error"]))
            continue
        total_gb = (r["peak_mb"] + r["start_mb"]) / 1024
        base_gb = (base["peak_mb"] + base["start_mb"]) / 1024 if base else None
        k1 = r["k"] == 1
        out.append(
            line(
                "alignprop",
                f"{label}: step time (LoRA, {s.size}², batch 1)",
                r["step_s"],
                "s",
                baseline="K = 1, checkpointing on",
                baseline_value=base["step_s"] if base else None,
            )
        )
        out.append(
            line(
                "alignprop",
                f"{label}: peak memory",
                round(total_gb, 3),
                "GB",
                baseline="K = 1, checkpointing on",
                baseline_value=base_gb,
                goal="< 12 GB" if k1 else "",
                met=(total_gb < 12) if k1 else None,
            )
        )
    return out


# -- flow-matching transformers at real size ------------------------------------------------------------------


def count_text(n: float) -> str:
    """A parameter count as people write it: 47.1k, 2.24B."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def flop_text(flops: float) -> str:
    return f"{flops / 1e12:.4g} TFLOP" if flops >= 1e12 else f"{flops / 1e9:.4g} GFLOP"


def seconds_per_call(fn: Callable[[], Any], device, *, repeats: int, target_s: float = 0.5) -> float:
    """Median seconds of one call of ``fn``, after one warm-up, timed in blocks of as many calls as fill about
    ``target_s`` (1 to 10)."""
    from benchmarks.common import interleaved_medians, sync

    sync(device)
    t0 = time.perf_counter()
    fn()  # warm-up, and the block size
    sync(device)
    calls = max(1, min(10, int(target_s / max(time.perf_counter() - t0, 1e-9))))
    return interleaved_medians({"f": lambda: [fn() for _ in range(calls)]}, repeats, device)["f"] / calls


def _flow_model(s: Setup, row: str, build: Callable[[], dict]):
    """The components ``build`` makes, built on the device in bf16 (fp32 on a CPU), as a DiffusionModel."""
    import torch

    from benchmarks.common import default_dtype
    from diffsteer.guidance.models import _place, from_components

    dtype = torch.bfloat16 if s.device.type == "cuda" else torch.float32  # bf16 is slow on most CPUs
    with torch.device(s.device), default_dtype(dtype):
        model = from_components(f"{row}-random", build())
    for module in (model.backbone, model.vae, *model.text_encoders):
        tensors = [*module.parameters(), *module.buffers()]
        if any(v.is_floating_point() and v.dtype != dtype for v in tensors):
            module.to(dtype)  # buffers made in fp32 (positions), as loading a checkpoint in bf16 would
    _place(model, s.device, dtype)
    return model, dtype


def _flow_row(s: Setup, row: str, label: str, build: Callable[[], dict], policy: str, passes: int) -> list[dict]:
    """A flow transformer built on the device in bf16 (fp32 on a CPU): its backbone call (as the sampler makes it,
    through the family's ``forward``) at 1, 2, 8 rows and at the rows of the generations, its MFU and batching
    gain, peak memory, and ``generate`` end to end (``policy``, ``passes`` rows per image) at batch 1 and 4 against
    the backbone calls alone."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.common import interleaved_medians
    from diffsteer.guidance.sampler import generate

    model, dtype = _flow_model(s, row, build)
    dtype_name = str(dtype).removeprefix("torch.")
    family, backbone = model.family, model.backbone
    size = 32 if s.smoke else 1024
    steps = 2 if s.smoke else 4
    batches = (1, 4)
    condition = family.encode_prompts(model, [PROMPT], height=size, width=size)[0]
    condition = family.with_request_inputs(model, condition, None)  # FLUX.1-dev: the distilled guidance 3.5
    image_tokens, text_tokens = family.tokens(model, size, size), int(condition.hidden_states.shape[1])
    weights_gb = sum(p.numel() * p.element_size() for p in backbone.parameters()) / 1e9
    params = sum(p.numel() for p in backbone.parameters())
    shape = model.latent_shape(size, size)
    t = torch.tensor(500.0, device=s.device)

    def inputs(rows: int):
        g = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, *shape, generator=g).to(s.device, dtype)
        return x, condition.rows(torch.zeros(rows, dtype=torch.long, device=s.device))

    name = device_name(s.device)
    peak = bf16_peak_tflops(name) if s.device.type == "cuda" else None
    out: list[dict] = []
    with torch.no_grad():
        x, c = inputs(1)
        with FlopCounterMode(display=False) as counter:
            family.forward(backbone, x, t, c)
        flops_per_row = counter.get_total_flops()  # every op is per row: a call of N rows costs N times this
        rows_list = sorted({1, 2, 8, *(b * passes for b in batches)})
        seconds: dict[int, float] = {}
        memory: dict[int, float] = {}
        for rows in rows_list:
            x, c = inputs(rows)
            mem: dict[str, float] = {}
            with peak_memory(s.device, mem):
                family.forward(backbone, x, t, c)
            memory[rows] = mem["peak_bytes"] / 1e9
            seconds[rows] = seconds_per_call(
                lambda x=x, c=c: family.forward(backbone, x, t, c), s.device, repeats=s.repeats
            )
            del x, c
            achieved = rows * flops_per_row / seconds[rows] / 1e12
            out.append(
                line(
                    row,
                    f"{label} call, {rows} row{'s' if rows > 1 else ''}, {dtype_name}, {size}² ({image_tokens} image "
                    f"+ {text_tokens} text tokens): {flop_text(rows * flops_per_row)}",
                    seconds[rows],
                    "s",
                    rows=rows,
                    rows_per_s=rows / seconds[rows],
                    tflops=round(achieved, 2),
                    mfu=None if peak is None else round(achieved / peak, 4),
                    peak_gb=round(memory[rows], 3),
                    flops_per_call=rows * flops_per_row,
                    image_tokens=image_tokens,
                    text_tokens=text_tokens,
                )
            )
    achieved = 8 * flops_per_row / seconds[8] / 1e12
    mfu = achieved / peak if peak else None
    out.append(
        line(
            row,
            f"MFU, {label} call, 8 rows, {dtype_name}",
            round(achieved, 3),
            "TFLOPS",
            baseline=f"dense bf16 peak of {name}" if peak else "no known peak for this device",
            baseline_value=peak,
            ratio=mfu,
            goal="MFU ≥ 40%",
            met=None if mfu is None else mfu >= 0.40,
        )
    )
    out.append(
        line(
            row,
            f"batching gain: rows/s at 8 rows per call over 1 row per call, {size}²",
            8 / seconds[8],
            "rows/s",
            baseline="1 row per call",
            baseline_value=1 / seconds[1],
        )
    )
    out.append(
        line(
            row,
            f"peak memory, {label} call, 8 rows"
            + (" (CUDA, allocated)" if s.device.type == "cuda" else " (process peak RSS)"),
            round(memory[8], 3),
            "GB",
            baseline=f"the transformer's weights ({count_text(params)} parameters, {dtype_name})",
            baseline_value=weights_gb,
        )
    )
    request = {"prompt": PROMPT, "steps": steps, "seed": 1, "width": size, "height": size, "policy": policy}
    request["scheduler"] = "default"  # the family's FlowMatchEuler, as its pipeline
    for batch in batches:
        params = {**request, "num_images": batch}
        mem = {}
        with peak_memory(s.device, mem):
            result = generate(model, params)  # warm-up, and the peak of a whole generation
        m = interleaved_medians({"g": lambda params=params: generate(model, params)}, s.repeats, s.device)["g"]
        rows = batch * passes
        backbone_only = steps * seconds[rows]
        out.append(
            line(
                row,
                f"generate end to end, {policy}, {steps} steps, batch {batch} ({rows} row{'s' if rows > 1 else ''} "
                f"per call), {size}²",
                batch / m,
                "images/s",
                baseline=f"the backbone calls alone ({steps} × the {rows}-row call, measured above)",
                baseline_value=batch / backbone_only,
                batch=batch,
                seconds=m,
                nfe=result.nfe[0],
                phases={k: round(v, 4) for k, v in result.phases.items()},
                peak_gb=round(mem["peak_bytes"] / 1e9, 3),
            )
        )
    return out


def _pairs_file(folder: Path, size: int) -> str:
    """One preference pair of two random ``size``² PNGs (image 0 preferred, scores for SmPO) for the DPO rows."""
    import io

    import numpy as np
    from PIL import Image

    from diffsteer.training.preference_data import write_preference_pairs

    def png(seed: int) -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    row = {"caption": PROMPT, "jpg_0": png(0), "jpg_1": png(1), "label_0": 1.0, "label_1": 0.0}
    return str(write_preference_pairs(folder / "pairs.parquet", [{**row, "score_0": 0.7, "score_1": 0.3}]))


def training_methods(s: Setup, policy: str, steps: int, data: str) -> dict[str, tuple[str, Callable[[], Any]]]:
    """Each training method's (config, trainer) factory for one LoRA step at batch 1 (a label for the line)."""
    from diffsteer.training.alignprop import AlignPropConfig, AlignPropTrainer
    from diffsteer.training.dpo import DPOConfig, DPOTrainer
    from diffsteer.training.fdistill import FDistillConfig, FDistillTrainer
    from diffsteer.training.grpo import GRPOConfig, GRPOTrainer
    from diffsteer.training.nft import NFTConfig, NFTTrainer
    from diffsteer.training.smpo import SmPOConfig, SmPOTrainer

    scale = float(policy.rsplit("=", 1)[1])
    rollout = dict(prompts="pg-train:single", reward="saturation:1", policy=policy, scheduler="euler")
    online = dict(rollout, group_size=2, batch_size=2, sample_steps=steps, rollout_cfg=scale, steps=steps)
    return {
        "alignprop K = 1": (AlignPropConfig, AlignPropTrainer, dict(rollout, steps=steps, truncation_k=1)),
        f"alignprop K = {steps} (full)": (
            AlignPropConfig,
            AlignPropTrainer,
            dict(rollout, steps=steps, truncation_k=steps),
        ),
        "dpo": (DPOConfig, DPOTrainer, dict(data=data, gradient_checkpointing=True, beta=1000.0)),
        "smpo": (SmPOConfig, SmPOTrainer, dict(data=data, gradient_checkpointing=True)),
        "fdistill": (
            FDistillConfig,
            FDistillTrainer,
            dict(
                prompts="pg-train:single",
                real_data="teacher",
                trainable="lora",
                fake_trainable="lora",
                teacher_steps=steps,
                teacher_policy=policy,
                scheduler="euler",
                policy="cfg:scale=1",
                gradient_checkpointing=True,
                export="lora",
                regression_weight=0.0,
            ),
        ),
        "grpo": (GRPOConfig, GRPOTrainer, dict(online, updates_per_rollout=1)),
        "nft": (NFTConfig, NFTTrainer, online),
    }


def _training_row(s: Setup, row: str, label: str, build: Callable[[], dict], policy: str) -> list[dict]:
    """One LoRA training step of each method (:func:`training_methods`) on the model ``build`` makes, through the
    shared trainer on the same bf16 base (each method's adapter removed before the next): the median of the timed
    steps after one warm-up step, and the peak memory of those steps against the base weights."""
    import torch

    from benchmarks.common import interleaved_medians
    from diffsteer.guidance.models import with_family_defaults

    model, dtype = _flow_model(s, row, build)
    backbone, family = model.backbone, model.family
    size = 32 if s.smoke else 1024
    steps = 2 if s.smoke else 4
    model.defaults = with_family_defaults(model.defaults, family, dict(backbone.config), size)  # its native size
    weights_gb = sum(p.numel() * p.element_size() for p in backbone.parameters()) / 1e9
    condition = family.encode_prompts(model, [PROMPT], height=size, width=size)[0]
    condition = family.with_request_inputs(model, condition, None)
    x = torch.randn(1, *model.latent_shape(size, size), generator=torch.Generator().manual_seed(0)).to(s.device, dtype)
    t = torch.tensor(500.0, device=s.device)
    with torch.no_grad():  # the yardstick: one inference call of one row
        forward_s = seconds_per_call(lambda: family.forward(backbone, x, t, condition), s.device, repeats=s.repeats)
    work = Path(tempfile.mkdtemp(prefix="diffsteer-train-row-"))
    common = dict(
        eval_prompts="",
        batch_size=1,
        max_steps=1000,
        height=size,
        width=size,
        lora_rank=4 if s.smoke else 16,
        lora_alpha=4 if s.smoke else 16,
        mixed_precision="bf16" if s.device.type == "cuda" else "no",
        device=str(s.device),
        progress=False,
        tensorboard=False,
        threads=torch_threads(),
    )
    out: list[dict] = []
    try:
        data = _pairs_file(work, size)
        for name, (config_cls, trainer_cls, fields) in training_methods(s, policy, steps, data).items():
            measure = f"{name}: one LoRA step, {label}, {size}², batch 1"
            try:
                config = config_cls(**{**common, **fields, "output_dir": str(work / name.split()[0])})
                trainer = trainer_cls(config, model=model)
                trainer.train_step()  # warm-up
                mem: dict[str, float] = {}
                with peak_memory(s.device, mem):
                    seconds = interleaved_medians({"s": trainer.train_step}, s.repeats, s.device)["s"]
            except Exception as e:  # noqa: BLE001 - one method's failure (out of memory) is its line's error
                out.append(line(row, measure, None, "s", error=f"{type(e).__name__}: {e}"[:300]))
                continue
            finally:
                trainer = None
                gc.collect()  # a method's data-loader workers end with its trainer, before the next method runs
                if getattr(backbone, "peft_config", None):
                    backbone.unload_lora()  # the next method starts from the bare base
                if s.device.type == "cuda":
                    torch.cuda.empty_cache()
            out.append(
                line(
                    row,
                    measure,
                    seconds,
                    "s",
                    baseline="one backbone call of one row, no grad",
                    baseline_value=forward_s,
                    method=name,
                    checkpointing=bool(fields.get("gradient_checkpointing", "truncation_k" in fields)),
                )
            )
            out.append(
                line(
                    row,
                    f"{name}: peak memory"
                    + (" (CUDA, allocated)" if s.device.type == "cuda" else " (process peak RSS)"),
                    round(mem["peak_bytes"] / 1e9, 3),
                    "GB",
                    baseline=f"the transformer's weights ({str(dtype).removeprefix('torch.')})",
                    baseline_value=weights_gb,
                    method=name,
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def row_fsdp_sd35m(s: Setup) -> list[dict]:
    """One full-weight AlignProp step on SD3.5 Medium's MMDiT with ``sharding: fsdp`` (a group of one) against
    ``sharding: none``, each on a freshly built model (smoke: the tiny SD3.5-M-style model, 32²)."""
    import torch

    from benchmarks.common import interleaved_medians
    from diffsteer.guidance.models import with_family_defaults
    from diffsteer.training.alignprop import AlignPropConfig, AlignPropTrainer

    size, steps = (32, 2) if s.smoke else (1024, 4)
    label = "tiny SD3.5-M-style MMDiT" if s.smoke else "SD3.5-Medium MMDiT"
    work = Path(tempfile.mkdtemp(prefix="diffsteer-fsdp-row-"))
    results: dict[str, tuple[float, float] | str] = {}
    try:
        for sharding in ("none", "fsdp"):
            model, _ = _flow_model(s, "fsdp_sd35m", _sd35m_components(s))
            model.defaults = with_family_defaults(model.defaults, model.family, dict(model.backbone.config), size)
            config = AlignPropConfig(
                prompts="pg-train:single",
                reward="saturation:1",
                policy="cfg:scale=7",
                scheduler="euler",
                steps=steps,
                truncation_k=1,
                trainable="full",
                export="pipeline",
                sharding=sharding,
                learning_rate=1e-5,
                eval_prompts="",
                batch_size=1,
                max_steps=1000,
                height=size,
                width=size,
                mixed_precision="bf16" if s.device.type == "cuda" else "no",
                device=str(s.device),
                progress=False,
                tensorboard=False,
                threads=torch_threads(),
                output_dir=str(work / sharding),
            )
            trainer = None
            try:
                trainer = AlignPropTrainer(config, model=model)
                trainer.train_step()  # warm-up
                mem: dict[str, float] = {}
                with peak_memory(s.device, mem):
                    seconds = interleaved_medians({"s": trainer.train_step}, s.repeats, s.device)["s"]
                results[sharding] = (seconds, mem["peak_bytes"] / 1e9)
            except Exception as e:  # noqa: BLE001 - out of memory is the line's error
                results[sharding] = f"{type(e).__name__}: {e}"[:300]
            finally:
                if trainer is not None:
                    trainer.close()
                trainer = model = None
                gc.collect()
                if s.device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results["none"] if isinstance(results["none"], tuple) else (None, None)
    kind = " (CUDA, allocated)" if s.device.type == "cuda" else " (process peak RSS)"
    out = []
    for sharding, result in results.items():
        measure = f"sharding {sharding}: one full-weight AlignProp step, {label}, {size}², batch 1, K = 1"
        if isinstance(result, str):
            out.append(line("fsdp_sd35m", measure, None, "s", error=result, sharding=sharding))
            continue
        time_base = dict(baseline="sharding none", baseline_value=base[0]) if sharding != "none" else {}
        memory_base = dict(baseline="sharding none", baseline_value=base[1]) if sharding != "none" else {}
        out.append(line("fsdp_sd35m", measure, result[0], "s", sharding=sharding, **time_base))
        out.append(
            line(
                "fsdp_sd35m",
                f"sharding {sharding}: peak memory{kind}",
                round(result[1], 3),
                "GB",
                sharding=sharding,
                **memory_base,
            )
        )
    return out


def row_train_sd35m(s: Setup) -> list[dict]:
    """:func:`_training_row` on SD3.5 Medium's MMDiT under cfg 7 (smoke: the tiny SD3.5-M-style model, 32²)."""
    label = "tiny SD3.5-M-style MMDiT" if s.smoke else "SD3.5-Medium MMDiT"
    return _training_row(s, "train_sd35m", label, _sd35m_components(s), "cfg:scale=7")


def row_train_flux(s: Setup) -> list[dict]:
    """:func:`_training_row` on FLUX.1-dev's transformer, cfg 1 on the distilled guidance (smoke: tiny FLUX.1-dev)."""
    label = "tiny FLUX.1-dev transformer" if s.smoke else "FLUX.1-dev transformer"
    return _training_row(s, "train_flux", label, _flux_components(s), "cfg:scale=1")


def _sd35m_components(s: Setup) -> Callable[[], dict]:
    def build():
        if s.smoke:
            from diffsteer.guidance.tiny_transformers import tiny_sd3_components

            parts = tiny_sd3_components(dual_attention_layers=(0,))
            return {**parts, "text_encoder_3": None, "tokenizer_3": None}  # T5's positions as zeros, as below
        from benchmarks.common import sd35_medium_components

        return sd35_medium_components()

    return build


def _flux_components(s: Setup) -> Callable[[], dict]:
    def build():
        if s.smoke:
            from diffsteer.guidance.tiny_transformers import tiny_flux_components

            return tiny_flux_components()
        from benchmarks.common import flux_dev_components

        return flux_dev_components()

    return build


def row_flow_sd35m(s: Setup) -> list[dict]:
    """SD3.5 Medium's MMDiT (real config, 2.2B, random weights, bf16) at 1024²: 4096 image tokens and the real
    333 text tokens (77 CLIP + 256 T5 positions; the text encoders are small random ones and T5's states zeros,
    :func:`benchmarks.common.sd35_medium_components`): the rows measure the backbone. cfg at 7 (two rows per
    image, as ``StableDiffusion3Pipeline``). Smoke: the tiny SD3.5-Medium-style model (dual attention) at 32²."""
    label = "tiny SD3.5-M-style MMDiT" if s.smoke else "SD3.5-Medium MMDiT"
    return _flow_row(s, "flow_sd35m", label, _sd35m_components(s), "cfg:scale=7", passes=2)


def row_flow_flux(s: Setup) -> list[dict]:
    """FLUX.1-dev's transformer (real config, 11.9B, random weights, bf16, built on the device) at 1024²: 4096
    image tokens and the real 512 T5 tokens (a small random CLIP and a one-layer random T5 of the real width,
    :func:`benchmarks.common.flux_dev_components`): the rows measure the backbone. cfg at 1 on the distilled
    guidance 3.5 (one row per image, as ``FluxPipeline``'s defaults). Smoke: the tiny FLUX.1-dev model at 32²."""
    label = "tiny FLUX.1-dev transformer" if s.smoke else "FLUX.1-dev transformer"
    return _flow_row(s, "flow_flux", label, _flux_components(s), "cfg:scale=1", passes=1)


ROW_FUNCTIONS: dict[str, Callable[..., list[dict]]] = {
    "sampler": row_sampler,
    "serving": row_serving,
    "mfu": row_mfu,
    "adaptive": row_adaptive,
    "kernels": row_kernels,
    "reno": row_reno,
    "alignprop": row_alignprop,
    "compile": row_compile,
    "mfu_sdxl": row_mfu_sdxl,
    "flow_sd35m": row_flow_sd35m,
    "flow_flux": row_flow_flux,
    "train_sd35m": row_train_sd35m,
    "train_flux": row_train_flux,
    "fsdp_sd35m": row_fsdp_sd35m,
}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_row_here(args) -> None:
    """Child process: one row, its lines as JSON on the last stdout line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    s = Setup(args)
    fn = ROW_FUNCTIONS[args.row]
    lines = fn(s, args.remaining) if args.row == "alignprop" else fn(s)
    print(json.dumps(lines, default=float))


# -- the driver -----------------------------------------------------------------------------------------------


def run_row_in_process(name: str, args, paths: dict[str, str], timeout: float) -> dict[str, Any]:
    """A row in this process (the smoke run: saves a Python start per row), stopped by SIGALRM at ``timeout``."""
    import traceback

    from benchmarks.common import time_limit

    child = argparse.Namespace(**{**vars(args), "paths": json.dumps(paths), "remaining": timeout})
    t0 = time.perf_counter()
    record: dict[str, Any] = {"row": name, "timeout_s": round(timeout, 1)}
    try:
        with time_limit(timeout):
            s = Setup(child)
            fn = ROW_FUNCTIONS[name]
            record.update(
                status="ok",
                lines=json.loads(json.dumps(fn(s, timeout) if name == "alignprop" else fn(s), default=float)),
            )
    except TimeoutError as e:
        record.update(status="timeout", error=str(e))
    except Exception as e:  # noqa: BLE001 - one row's failure is recorded, the suite goes on
        record.update(
            status="failed", error=f"{type(e).__name__}: {e}"[:500], stderr_tail=traceback.format_exc()[-1500:]
        )
    record["seconds"] = round(time.perf_counter() - t0, 1)
    print(
        f"[gpu_suite] {name}: {record['status']} in {record['seconds']} s"
        + (f" ({record.get('error')})" if record["status"] != "ok" else ""),
        file=sys.stderr,
        flush=True,
    )
    return record


def run_row(name: str, args, paths: dict[str, str], timeout: float) -> dict[str, Any]:
    """A row in its own process, killed at ``timeout``."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--row",
        name,
        "--device",
        args.device,
        "--paths",
        json.dumps(paths),
        "--remaining",
        str(timeout),
    ]
    if args.smoke:
        cmd.append("--smoke")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    record: dict[str, Any] = {"row": name, "timeout_s": round(timeout, 1)}
    # its own session, so that a timeout ends the row's children too (the serving row's servers hold the device)
    child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True
    )
    try:
        stdout, stderr = child.communicate(timeout=timeout)
        proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        _, stderr = child.communicate()
        record.update(status="timeout", error=f"over {timeout:.0f} s", stderr_tail=(stderr or "")[-1500:])
    else:
        if proc.returncode == 0:
            try:
                record.update(status="ok", lines=json.loads(proc.stdout.strip().splitlines()[-1]))
            except (json.JSONDecodeError, IndexError):
                record.update(status="failed", error="no result line", stderr_tail=proc.stderr[-1500:])
        else:
            tail = proc.stderr.strip().splitlines()
            record.update(
                status="failed", error=tail[-1] if tail else f"exit {proc.returncode}", stderr_tail=proc.stderr[-1500:]
            )
    record["seconds"] = round(time.perf_counter() - t0, 1)
    print(
        f"[gpu_suite] {name}: {record['status']} in {record['seconds']} s"
        + (f" ({record.get('error')})" if record["status"] != "ok" else ""),
        file=sys.stderr,
        flush=True,
    )
    return record


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    out = [
        f"GPU suite — device: {report['device']}, torch {report['torch']}, {report['date']}, "
        f"{'smoke (tiny models)' if report['smoke'] else 'full sizes'}, total {report['seconds']} s",
        f"command: `{report['command']}`",
        "",
        "| row | measure | value | baseline | baseline value | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for record in report["rows"]:
        if record["status"] != "ok":
            out.append(f"| {record['row']} | {record['status']}: {record.get('error', '')} | | | | | | |")
            continue
        for ln in record["lines"]:
            value = f"{fmt(ln['value'])} {ln['unit']}" if ln["value"] is not None else f"error: {ln.get('error', '?')}"
            met = {True: "yes", False: "no", None: ""}[ln["met"]]
            extra = f" (max abs diff {ln['max_abs_diff']:.2g})" if ln.get("max_abs_diff") is not None else ""
            out.append(
                f"| {ln['row']} | {ln['measure']}{extra} | {value} | {ln['baseline']} | {fmt(ln['baseline_value'])} | "
                f"{fmt(ln['ratio'], 3)} | {ln['goal']} | {met} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu-suite-results", help="folder for gpu_suite.json and gpu_suite.md")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny models, few steps: the whole suite on CPU in a minute or two"
    )
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu (--smoke only)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="total seconds for the whole run (default 450; smoke 1800)"
    )
    ap.add_argument("--min-row-s", type=float, default=20.0, help="a row is skipped when less than this is left")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads in each row's process (default: torch's own; 1 with --smoke)",
    )
    ap.add_argument("--keep-models", action="store_true", help="leave the temporary model folder in place")
    ap.add_argument(
        "--isolate",
        choices=["auto", "yes", "no"],
        default="auto",
        help="each row in its own process (auto: yes on a device, no for --smoke)",
    )
    # internal: one row in a child process
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--remaining", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is None and args.smoke:
        args.threads = 1  # tiny models gain nothing from threads, and a shared CI machine loses a lot to them
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.row is not None:
        run_row_here(args)
        return 0
    if torch.device(args.device).type != "cuda" and not args.smoke:
        print(
            "gpu_suite: no CUDA device here; the full-size suite needs one (use --smoke for the CPU check)",
            file=sys.stderr,
        )
        return 2
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"gpu_suite: --rows: unknown {unknown}; accepted: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    budget = args.budget_s or (1800.0 if args.smoke else 450.0)
    start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(tempfile.mkdtemp(prefix="diffsteer-gpu-suite-"))
    records = []
    try:
        t0 = time.perf_counter()
        paths = write_models(model_dir, args.device, args.smoke)
        print(f"[gpu_suite] models written in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for name in rows:
            remaining = budget - (time.perf_counter() - start)
            cap = SMOKE_ROW_CAP if args.smoke else ROWS[name]
            if remaining < args.min_row_s:
                records.append(
                    {"row": name, "status": "skipped", "error": f"total budget spent ({remaining:.0f} s left)"}
                )
                continue
            isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.smoke)
            records.append((run_row if isolate else run_row_in_process)(name, args, paths, min(cap, remaining)))
    finally:
        if not args.keep_models:
            shutil.rmtree(model_dir, ignore_errors=True)
    report = {
        "benchmark": "gpu_suite",
        "device": device_name(torch.device(args.device)),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke,
        "command": " ".join(["python", "benchmarks/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
        "seconds": round(time.perf_counter() - start, 1),
        "budget_s": budget,
        "rows": records,
    }
    (out_dir / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=float))
    (out_dir / "gpu_suite.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
