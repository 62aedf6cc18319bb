"""Shared helpers for benchmarks: model architectures at real size with random weights, timing."""

from __future__ import annotations

import contextlib
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def sd15_components(seed: int = 0) -> dict:
    """Stable Diffusion 1.5 architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder), random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffsteer.guidance.tiny import tiny_scheduler_config, tiny_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text.eval(),
        "tokenizer": tiny_tokenizer(),
        "scheduler": DDIMScheduler.from_config(tiny_scheduler_config()),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def sd_turbo_components(seed: int = 0) -> dict:
    """SD-Turbo architecture (= SD 2.1: UNet 865M with linear projections and 1024-wide cross-attention, SD VAE,
    OpenCLIP ViT-H/14 text tower as a 23-layer CLIP text model), random weights, a one-step trailing scheduler."""
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffsteer.guidance.tiny import tiny_scheduler_config

    parts = sd15_components(seed)
    torch.manual_seed(seed)
    parts["unet"] = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
    ).eval()
    parts["text_encoder"] = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
        )
    ).eval()
    parts["scheduler"] = EulerAncestralDiscreteScheduler.from_config(
        {**tiny_scheduler_config(), "timestep_spacing": "trailing"}
    )
    return parts


def sdxl_unet(seed: int = 0):
    """The SDXL base UNet (2.6B: 3 levels, 1/2/10 transformer layers, 2048-wide cross-attention, text_time
    added conditioning), random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=128,
        cross_attention_dim=2048,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ).eval()


def save_sd15_random(path: str, dtype: torch.dtype | None = None) -> str:
    """Write the random-weight SD-1.5 architecture as a diffusers folder (for tools that take a model path);
    ``dtype`` (e.g. fp16) halves what is written."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd15_components(), requires_safety_checker=False)
    if dtype is not None:
        pipe.to(dtype)
    pipe.save_pretrained(path)
    return path


def load_arch(arch: str, device: str, dtype: str | None):
    """``tiny`` (the built-in model), ``default`` (the shipped default), ``sd15`` (random weights) or a
    diffusers folder."""
    from diffsteer.guidance.models import _place, configure_attention, from_components, load_model, resolve_dtype

    if arch == "sd15":
        model = from_components("sd15-random", sd15_components())
        dev = torch.device(device)
        _place(model, dev, resolve_dtype(dtype, dev))
        configure_attention(model.unet, dev, "sdpa")
        return model
    if arch not in ("tiny", "default"):
        return load_model(arch, device=device, dtype=dtype, attention="sdpa")
    return load_model("builtin:tiny" if arch == "tiny" else None, device=device, dtype=dtype)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (SIGALRM; Unix, main thread only)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def proc_memory_bytes(pid: int | str = "self") -> dict[str, int]:
    """A process's resident set size now (``VmRSS``) and its peak (``VmHWM``), in bytes, from /proc (Linux);
    {} where /proc has no such process."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024  # the file gives kB
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Run each function ``repeats`` times, interleaved (A B A B ...) so drift hits both; median seconds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def ab_progress_printer(label: str, interval_s: float = 15.0):
    """An A/B ``progress`` callback printing to stderr: every stage change, and generation at most every
    ``interval_s`` seconds."""
    import sys

    last = {"t": 0.0}

    def progress(event) -> None:
        now = time.monotonic()
        if (
            event.stage != "generate"
            or now - last["t"] > interval_s
            or (event.step is None and event.done == event.total)
        ):
            last["t"] = now
            print(
                f"[{label}] {event.stage} {event.done}/{event.total} images"
                + (f" ({event.arm} step {event.step}/{event.steps})" if event.step else ""),
                file=sys.stderr,
                flush=True,
            )

    return progress


def scale_text(x: float) -> str:
    """A guidance scale as arm names and tables write it (3, 4.5)."""
    return f"{x:g}"


def ab_pair(results: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """The per-metric statistics of arms (a, b) in an A/B run's results."""
    for p in results["statistics"]:
        if (p["arm_a"], p["arm_b"]) == (a, b):
            return p["metrics"]
    raise KeyError(f"no statistics for the pair ({a}, {b})")


def ci_text(m: dict[str, Any], digits: int = 3, tests: bool = True) -> str:
    """A paired difference with its 95% CI (and the prompt-level win/tie/loss counts and tests)."""
    text = f"{m['mean_diff']:+.{digits}f} [{m['ci_low']:+.{digits}f}, {m['ci_high']:+.{digits}f}]"
    if tests:
        text += (
            f" (prompts W/T/L {m['wins']}/{m['ties']}/{m['losses']}, sign p={m['sign_test_p']:.2g}, "
            f"Wilcoxon p={m['wilcoxon_p']:.2g})"
        )
    return text
