"""Shared helpers for benchmarks: model architectures at real size with random weights, timing."""

from __future__ import annotations

import contextlib
import gc
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffsteer.evaluation.ab import run_ab


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


# The real transformer configs (the checkpoints' transformer/config.json), for random-weight models of their size.
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
FLUX1_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside the block get parameters of ``dtype`` (with ``torch.device(...)``: a large model is
    created in bf16 directly on the GPU, never in fp32 nor on the CPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def flow_vae(scaling_factor: float, shift_factor: float, seed: int = 0):
    """The SD3 / FLUX.1 VAE architecture (KL, 16 latent channels, factor 8, no quant convs; 84M), random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        sample_size=1024,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def sd35_medium_components(seed: int = 0) -> dict:
    """``StableDiffusion3Pipeline`` components around SD3.5 Medium's MMDiT at its real config (2.5B), random weights:
    SD3's VAE, and two small random CLIP encoders with projections to the real pooled widths (768 + 1280 = 2048)
    and no T5, so the family fills T5's 256 tokens with zeros as for a checkpoint shipped without T5: the
    transformer sees the real 77 + 256 = 333 text tokens of the real width. For the backbone's cost (the real text
    encoders' cost, a one-off per prompt, is not measured). Build under ``torch.device`` and
    :func:`default_dtype`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from diffsteer.guidance.tiny import tiny_text_encoder, tiny_tokenizer
    from diffsteer.guidance.tiny_transformers import SD3_SCHEDULER

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER).eval()
    return {
        "transformer": transformer,
        "vae": flow_vae(scaling_factor=1.5305, shift_factor=0.0609, seed=seed + 1),
        "text_encoder": tiny_text_encoder(len(tokenizer), hidden=32, projection_dim=768, seed=seed + 2),
        "text_encoder_2": tiny_text_encoder(len(tokenizer), hidden=64, projection_dim=1280, seed=seed + 3),
        "text_encoder_3": None,
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_tokenizer(),
        "tokenizer_3": None,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        "image_encoder": None,
        "feature_extractor": None,
    }


def flux_dev_components(seed: int = 0) -> dict:
    """``FluxPipeline`` components around FLUX.1-dev's transformer at its real config (12B, guidance-distilled),
    random weights: FLUX's VAE, a small random CLIP text model of the real pooled width (768) and a one-layer
    random T5 encoder of the real width (4096) behind the 512-token T5 tokenizer, so the transformer sees the real
    512 text tokens. For the backbone's cost. Build under ``torch.device`` and :func:`default_dtype`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from diffsteer.guidance.tiny import tiny_text_encoder, tiny_tokenizer
    from diffsteer.guidance.tiny_transformers import FLUX_SCHEDULER, tiny_t5_encoder, tiny_t5_tokenizer

    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_t5_tokenizer(max_length=512)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER).eval()
    return {
        "transformer": transformer,
        "vae": flow_vae(scaling_factor=0.3611, shift_factor=0.1159, seed=seed + 1),
        "text_encoder": tiny_text_encoder(len(tokenizer), hidden=768, seed=seed + 2),
        "text_encoder_2": tiny_t5_encoder(len(tokenizer_2), d_model=4096, seed=seed + 3),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        "image_encoder": None,
        "feature_extractor": None,
    }


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
    """``tiny`` (the built-in model), ``default`` (the shipped default), ``sd15`` (random weights), the name of a
    built-in tiny model without its ``builtin:`` prefix (``tiny-flux``, ``tiny-flux-schnell``, ``tiny-sd3``,
    ``tiny-qwenimage``, ``tiny-sdxl``...) or a diffusers folder."""
    from diffsteer.guidance.models import (
        TINY_MODELS,
        _place,
        configure_attention,
        from_components,
        load_model,
        resolve_dtype,
    )

    if arch == "sd15":
        model = from_components("sd15-random", sd15_components())
        dev = torch.device(device)
        _place(model, dev, resolve_dtype(dtype, dev))
        configure_attention(model.unet, dev, "sdpa")
        return model
    if f"builtin:{arch}" in TINY_MODELS:
        return load_model(f"builtin:{arch}", device=device, dtype=dtype)
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


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    *,
    alternate: bool = False,
    collect: bool = False,
    cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds of each of ``repeats`` runs of each function, interleaved (A B A B ...) so drift hits both.
    ``alternate``: every other round runs in reverse order (A B B A ...), so neither always runs right after the
    other; ``collect``: a full garbage collection before each run (outside the timing), so that one function's
    garbage is not collected on the other's clock; ``cpu_times``, if given, receives each run's CPU seconds of
    this process (all its threads), which other processes on a shared machine disturb far less than wall time."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for round_ in range(repeats):
        for name, fn in reversed(items) if alternate and round_ % 2 else items:
            if collect:
                gc.collect()
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - c0)
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    *,
    alternate: bool = False,
    collect: bool = False,
) -> dict[str, float]:
    """Run each function ``repeats`` times, interleaved (A B A B ...) so drift hits both; median seconds.
    ``alternate`` and ``collect`` as in :func:`interleaved_times`."""
    times = interleaved_times(fns, repeats, device, alternate=alternate, collect=collect)
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


def best_scale(rates: dict[float, float]) -> float:
    """The scale with the highest pass rate; ties: the smaller scale."""
    return max(rates, key=lambda s: (rates[s], -s))


def scale_arm(scale: float) -> str:
    """The arm name of plain CFG at ``scale`` (``s3``, ``s4.5``)."""
    return f"s{scale_text(scale)}"


def cfg_scale_arms(scales: list[float]) -> list[str]:
    """One A/B arm ``sX=cfg:scale=X`` per scale."""
    return [f"{scale_arm(s)}=cfg:scale={s}" for s in scales]


def tune_cfg_scale(
    common: dict[str, Any], scales: list[float], label: str = "tune", **fields: Any
) -> tuple[float, dict[float, float]]:
    """The plain CFG scale with the best verifier pass rate on a tuning split (ties: the smaller), and each
    scale's pass rate: one A/B run of :func:`cfg_scale_arms` at one seed per prompt, with ``common`` and
    ``fields`` (prompts, seed, max_prompts, output_dir, report...)."""
    tuning = run_ab(
        {**common, "arms": cfg_scale_arms(scales), "seeds": 1, "metrics": ["verifier", "nfe"], **fields},
        progress=ab_progress_printer(label),
    )
    rates = {s: tuning["summary"][scale_arm(s)]["verifier.passed"]["mean"] for s in scales}
    return best_scale(rates), rates


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
