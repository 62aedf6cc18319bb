"""Between pixels and the latent space the sampler works in: VAE decoding and encoding with the checkpoint's
latent scaling (``scaling_factor``, and SDXL-style ``latents_mean`` / ``latents_std`` where the VAE has them).

Pixels are float images in [0, 1], [B, 3, H, W]; latents are what the sampler denoises (the VAE posterior
mean, scaled).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from diffsteer.guidance.models import DiffusionModel


def decode(model: DiffusionModel, latents: torch.Tensor, *, checkpoint: bool = False) -> torch.Tensor:
    """VAE decode to images in [0, 1], differentiable; ``checkpoint`` recomputes the decoder in the backward
    pass instead of storing its activations. (VAEs that need fp32 are kept in fp32 at load time.)"""
    vae = model.vae
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        latents = latents * torch.tensor(std).view(shape).to(latents) / cfg.scaling_factor
        latents = latents + torch.tensor(mean).view(shape).to(latents)
    else:
        latents = latents / cfg.scaling_factor
    latents = latents.to(vae.dtype)
    if checkpoint and torch.is_grad_enabled():
        image = activation_checkpoint(lambda z: vae.decode(z, return_dict=False)[0], latents, use_reentrant=False)
    else:
        image = vae.decode(latents, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def to_sampler_latents(vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """VAE posterior means -> the latent space the sampler works in (inverse of :func:`decode`'s scaling)."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        return (z - torch.tensor(mean).view(shape).to(z)) * cfg.scaling_factor / torch.tensor(std).view(shape).to(z)
    return z * cfg.scaling_factor


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    array = (pixels.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


@torch.no_grad()
def decode_pixels(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """The final images in [0, 1], on the CPU."""
    return decode(model, latents).cpu()


def encode(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to the sampler's latents (the VAE posterior mean, scaled): the inverse of :func:`decode`."""
    z = vae.encode((pixels * 2 - 1).to(device=vae.device, dtype=vae.dtype)).latent_dist.mean.float()
    return to_sampler_latents(vae, z)
