"""Train the proving-ground text-to-image model from scratch, on CPU, in Stable Diffusion format.

Three stages, all on scenes from :class:`diffsteer.proving_ground.TrainingScenes` (never the held-out split):

1. an ``AutoencoderKL`` (64×64 RGB → 16×16×4 latents) trained on reconstruction (L1 + L2) with a small KL
   term, as the SD autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
   Models", Sec. 3.1) minus the perceptual and adversarial losses this flat-colour world does not need;
   its ``scaling_factor`` is set to 1/std of the training latents (Sec. 4.3.2 of the same paper);
2. a CLIP text encoder (transformers ``CLIPTextModel``) over a byte-level BPE tokenizer whose merges are the
   world's words, trained jointly with
3. a ``UNet2DConditionModel`` with the ε-prediction DDPM objective (Ho et al. 2020) on the scaled-linear β
   schedule of Stable Diffusion, weighted by Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via
   Min-SNR Weighting Strategy"), with caption dropout so the same network is the unconditional model for
   classifier-free guidance (Ho & Salimans 2022), and an exponential moving average of the weights.

The result is saved as a diffusers ``StableDiffusionPipeline`` folder in fp16 safetensors, loadable by
``StableDiffusionPipeline.from_pretrained`` and by ``diffsteer.guidance.models.load_model``.

    python -m diffsteer.proving_ground.build_model --output proving_ground/assets/model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffsteer.guidance.tiny import tiny_scheduler_config, write_clip_tokenizer
from diffsteer.proving_ground import TrainingScenes, shipped
from diffsteer.proving_ground.prompts import heldout_suite
from diffsteer.proving_ground.render import render_prompt
from diffsteer.proving_ground.verifier import summarise, verify
from diffsteer.training.config_io import add_config_arguments, config_from_arguments

WORLD_WORDS = (
    "a an one two three four and to the of left right above below photo image picture "
    "red yellow green cyan blue magenta circle circles square squares triangle triangles"
).split()


@dataclass
class ProvingGroundModelConfig:
    output: str = field(default=str(shipped.MODEL), metadata={"help": "Output pipeline folder."})
    seed: int = field(default=0, metadata={"help": "Seed of the data stream and of every initialisation."})
    num_scenes: int = field(default=30_000, metadata={"help": "Training scenes rendered once and reused."})
    category_weights: dict[str, float] = field(
        default_factory=lambda: {
            "single": 0.35,
            "counting": 0.2,
            "two_objects": 0.1,
            "colour_binding": 0.15,
            "position": 0.2,
        },
        metadata={"help": "Mix of prompt categories in the training stream."},
    )
    threads: int = field(default=2, metadata={"help": "torch CPU threads."})
    # autoencoder
    vae_channels: tuple[int, ...] = field(default=(16, 32, 64), metadata={"help": "VAE block widths (3 → ×4 down)."})
    vae_steps: int = field(default=1500, metadata={"help": "VAE optimisation steps on random crops."})
    vae_crop: int = field(default=32, metadata={"help": "Crop size of the first VAE stage."})
    vae_batch: int = field(default=16, metadata={"help": "VAE batch size on crops."})
    vae_whole_steps: int = field(default=300, metadata={"help": "VAE steps on whole 64×64 images after the crops."})
    vae_whole_batch: int = field(default=8, metadata={"help": "VAE batch size on whole images."})
    vae_whole_lr: float = field(default=3e-4, metadata={"help": "VAE learning rate on whole images (constant)."})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE peak learning rate (cosine decay)."})
    vae_eval_images: int = field(
        default=200,
        metadata={"help": "Held-out single-object scenes reconstructed and verified after VAE training (logged)."},
    )
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "Weight of the KL term."})
    # text encoder
    text_width: int = field(default=64, metadata={"help": "Text encoder width (= cross-attention dim)."})
    text_layers: int = field(default=2, metadata={"help": "Text encoder transformer layers."})
    max_length: int = field(default=16, metadata={"help": "Tokenizer max length (captions are ≤ 12 tokens)."})
    # denoiser
    unet_channels: tuple[int, ...] = field(default=(32, 64, 64), metadata={"help": "UNet block widths."})
    unet_steps: int = field(default=6000, metadata={"help": "Denoiser optimisation steps."})
    unet_batch: int = field(default=32, metadata={"help": "Denoiser batch size."})
    unet_lr: float = field(default=5e-4, metadata={"help": "Denoiser peak learning rate (warm-up, cosine decay)."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Probability of training on the empty caption."})
    min_snr_gamma: float = field(default=5.0, metadata={"help": "Min-SNR-γ loss weighting; 0 disables."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the saved denoiser/text weights."})


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * 0.95 + 0.05


def render_scenes(cfg: ProvingGroundModelConfig) -> tuple[torch.Tensor, list[str]]:
    stream = TrainingScenes(seed=cfg.seed, category_weights=cfg.category_weights)
    images, captions = stream.batch(0, cfg.num_scenes)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, 64, 64]
    return pixels, captions


def to_unit(pixels_u8: torch.Tensor) -> torch.Tensor:
    return pixels_u8.float() / 127.5 - 1.0


def build_vae(cfg: ProvingGroundModelConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=64,
        mid_block_add_attention=False,  # flat-colour scenes need no global mixing
    )


def train_vae(cfg: ProvingGroundModelConfig, pixels: torch.Tensor, log: dict) -> torch.nn.Module:
    """Crops first (four times cheaper per image), then whole images: GroupNorm normalises over the whole
    feature map, so a VAE trained on crops alone reconstructs whole scenes much worse than crops, and the
    verifier's shape accuracy on its reconstructions falls with it (see BENCHMARKS.md, section Proving-ground
    model); a few hundred whole-image steps close the gap."""
    vae = build_vae(cfg).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, fused=True)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    total = cfg.vae_steps + cfg.vae_whole_steps
    for step in tqdm(range(total), desc="vae", mininterval=10):
        idx = torch.randint(
            0, len(pixels), (cfg.vae_batch if step < cfg.vae_steps else cfg.vae_whole_batch,), generator=g
        )
        if step < cfg.vae_steps:
            lr = cfg.vae_lr * _schedule(step, cfg.vae_steps, 100)
            top, left = torch.randint(0, pixels.shape[-1] - cfg.vae_crop + 1, (2,), generator=g).tolist()
            x = to_unit(pixels[idx, :, top : top + cfg.vae_crop, left : left + cfg.vae_crop])
        else:
            lr = cfg.vae_whole_lr
            x = to_unit(pixels[idx])
        for group in opt.param_groups:
            group["lr"] = lr
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    log["vae_loss_first_100"] = float(np.mean(losses[:100]))
    log["vae_loss_last_100"] = float(np.mean(losses[-100:]))
    return vae.eval()


@torch.no_grad()
def vae_roundtrip_report(vae, n: int = 200) -> dict[str, float]:
    """Reconstruct held-out single-object scenes through the VAE and score them with the verifier: the ceiling
    that the autoencoder puts on any denoiser trained in its latent space."""
    items = heldout_suite("single", n)
    scenes = np.stack([render_prompt(item.spec, item.seed)[0] for item in items])
    x = to_unit(torch.from_numpy(scenes).permute(0, 3, 1, 2))
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    recon_u8 = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    scores = summarise(verify(image, item.spec) for image, item in zip(recon_u8, items))["all"]
    return {
        "mae_255": float(np.abs(recon_u8.astype(np.float64) - scenes).mean()),
        **{k: scores[k] for k in ("colour_correct", "shape_correct", "passed")},
    }


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        dist = vae.encode(to_unit(pixels[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def build_text_encoder(cfg: ProvingGroundModelConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed + 2)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=4,
        max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.text_width,
    )
    return CLIPTextModel(config)


def build_unet(cfg: ProvingGroundModelConfig):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(cfg.seed + 3)
    n = len(cfg.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_scheduler():
    """SD 1.x's DDIM scheduler (scaled-linear betas, ε-prediction), as the tiny test models use."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(tiny_scheduler_config())


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Hang et al. 2023, eq. 9 for ε-prediction: w_t = min(SNR_t, γ) / SNR_t."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return torch.clamp(snr, max=gamma) / snr if gamma > 0 else torch.ones_like(snr)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def train_denoiser(cfg, latent_mean, latent_std, scaling, captions, tokenizer, log):
    unet, text = build_unet(cfg).train(), None
    text = build_text_encoder(cfg, tokenizer).train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    scheduler = build_scheduler()
    acp = scheduler.alphas_cumprod
    unique = sorted(set(captions)) + [""]
    ids = tokenizer(
        unique, padding="max_length", max_length=cfg.max_length, truncation=True, return_tensors="pt"
    ).input_ids
    caption_index = torch.tensor([unique.index(c) for c in captions])
    empty_index = len(unique) - 1
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01, fused=True)
    g = torch.Generator().manual_seed(cfg.seed + 4)
    losses = []
    bar = tqdm(range(cfg.unet_steps), desc="denoiser", mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * _schedule(step, cfg.unet_steps, 200)
        idx = torch.randint(0, len(captions), (cfg.unet_batch,), generator=g)
        z = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g)) * scaling
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=g)
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        noisy = a * z + s * noise
        cap = caption_index[idx].clone()
        cap[torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout] = empty_index
        hidden = text(ids[cap])[0]
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (min_snr_weights(acp, t, cfg.min_snr_gamma) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        losses.append(float(per_sample.detach().mean()))
        if step % 200 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
    log["denoiser_mse_first_200"] = float(np.mean(losses[:200]))
    log["denoiser_mse_last_200"] = float(np.mean(losses[-200:]))
    return ema_unet, ema_text, scheduler


def start_build(cfg) -> tuple[Path, dict, torch.Tensor, list[str]]:
    """The first stage of a proving-ground builder (this one's and build_flow_model's config): torch's threads and
    seed set, the training scenes rendered; returns the output folder, the log begun, the pixels and captions."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    log: dict = {"config": asdict(cfg)}
    t0 = time.perf_counter()
    pixels, captions = render_scenes(cfg)
    log["render_s"] = time.perf_counter() - t0
    return Path(cfg.output), log, pixels, captions


def train(cfg: ProvingGroundModelConfig) -> Path:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    t0 = time.perf_counter()
    out, log, pixels, captions = start_build(cfg)

    t1 = time.perf_counter()
    vae = train_vae(cfg, pixels, log)
    log["vae_roundtrip_heldout"] = vae_roundtrip_report(vae, cfg.vae_eval_images)
    print("VAE round trip on held-out scenes:", log["vae_roundtrip_heldout"])
    mean, std = encode_latents(vae, pixels)
    scaling = float(1.0 / (mean + std * torch.randn_like(mean)).std())
    vae.register_to_config(scaling_factor=scaling)
    log["vae_s"] = time.perf_counter() - t1
    log["scaling_factor"] = scaling

    t2 = time.perf_counter()
    tok_dir = out / "tokenizer"
    write_clip_tokenizer(tok_dir, tuple(WORLD_WORDS), max_length=cfg.max_length)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    unet, text, scheduler = train_denoiser(cfg, mean, std, scaling, captions, tokenizer, log)
    log["denoiser_s"] = time.perf_counter() - t2
    log["total_s"] = time.perf_counter() - t0

    # UNet and VAE in fp16. The text encoder (0.3 MB) stays fp32: transformers loads weights in their saved
    # dtype while diffusers upcasts its models, and a fp16 text encoder would make the pipeline's latents fp16.
    pipe = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet.half(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    log["parameters"] = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("vae", vae), ("text_encoder", text), ("unet", unet))
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, ProvingGroundModelConfig)
    print(train(config_from_arguments(ProvingGroundModelConfig, parser.parse_args(argv))))


if __name__ == "__main__":
    main()
