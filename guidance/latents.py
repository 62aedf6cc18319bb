"""Between pixels and the latent space the sampler works in: VAE decoding and encoding with the checkpoint's
latent normalisation, one rule for every family: sampler latents x = (z − m)·k/s, with k the VAE's
``scaling_factor`` (1 where it has none, as Qwen-Image's), m its per-channel ``latents_mean`` (SDXL-style and
Qwen-Image VAEs) or its ``shift_factor`` (SD3, FLUX) or 0, and s its ``latents_std`` or 1.

Pixels are float images in [0, 1], [B, 3, H, W]; latents are what the sampler denoises (the VAE posterior
mean, normalised), [B, C, h, w] for every family: a causal video VAE (Qwen-Image's) gets a one-frame axis here
and nowhere else.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from diffsteer.guidance.models import DiffusionModel


def latent_normalisation(vae: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(m, s, k) of the module docstring, shaped [1, C, 1, 1] like ``like``."""
    cfg = vae.config
    channels = like.shape[1]
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        m, s = torch.tensor(mean), torch.tensor(std)
    else:
        m = torch.full((channels,), float(getattr(cfg, "shift_factor", None) or 0.0))
        s = torch.ones(channels)
    k = getattr(cfg, "scaling_factor", None) or 1.0
    return m.view(1, -1, 1, 1).to(like), s.view(1, -1, 1, 1).to(like), float(k)


def is_video_vae(vae: torch.nn.Module) -> bool:
    """Whether the VAE codes frames ([B, C, T, H, W]), as Qwen-Image's causal 3-D VAE."""
    return getattr(vae, "temperal_downsample", None) is not None


def decode(model: DiffusionModel, latents: torch.Tensor, *, checkpoint: bool = False) -> torch.Tensor:
    """VAE decode to images in [0, 1], differentiable; ``checkpoint`` recomputes the decoder in the backward
    pass instead of storing its activations. (VAEs that need fp32 are kept in fp32 at load time.)"""
    vae = model.vae
    m, s, k = latent_normalisation(vae, latents)
    z = (latents * s / k + m).to(vae.dtype)
    if is_video_vae(vae):
        z = z.unsqueeze(2)
    if checkpoint and torch.is_grad_enabled():
        image = activation_checkpoint(lambda v: vae.decode(v, return_dict=False)[0], z, use_reentrant=False)
    else:
        image = vae.decode(z, return_dict=False)[0]
    if is_video_vae(vae):
        image = image[:, :, 0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def to_sampler_latents(vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """VAE posterior means -> the latent space the sampler works in (inverse of :func:`decode`'s scaling)."""
    m, s, k = latent_normalisation(vae, z)
    return (z - m) * k / s


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    array = (pixels.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


@torch.no_grad()
def decode_pixels(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """The final images in [0, 1], on the CPU."""
    return decode(model, latents).cpu()


def encode(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to the sampler's latents (the VAE posterior mean, scaled): the inverse of :func:`decode`."""
    images = (pixels * 2 - 1).to(device=vae.device, dtype=vae.dtype)
    if is_video_vae(vae):
        images = images.unsqueeze(2)
    z = vae.encode(images).latent_dist.mean.float()
    if is_video_vae(vae):
        z = z[:, :, 0]
    return to_sampler_latents(vae, z)


def sample_latents(vae: torch.nn.Module, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One VAE posterior sample of the image ``pixels`` ([1, 3, H, W] in [0, 1]) per generator, in the sampler's
    latents [len(generators), C, h, w]: what diffusers' img2img and inpainting pipelines start from."""
    images = (pixels * 2 - 1).to(device=vae.device, dtype=vae.dtype)
    if is_video_vae(vae):
        images = images.unsqueeze(2)
    posterior = vae.encode(images).latent_dist
    z = torch.cat([posterior.sample(generator=g) for g in generators]).float()
    if is_video_vae(vae):
        z = z[:, :, 0]
    return to_sampler_latents(vae, z)
