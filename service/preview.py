"""Cheap progress previews: a linear latent -> RGB map fitted per model, applied to the current latents.

Decoding with the VAE at every step would cost about as much as a backbone call at full size. Instead, once per
model, the VAE *encodes* a few smooth random colour fields and a least-squares fit finds the affine map from
a latent pixel (C channels) to the mean RGB of the image patch it covers. A preview is that map applied to
the latents after a step (x_t, still noisy early on), at latent resolution (1/8 of the image for SD): no
network evaluation at all. The fit adapts to any VAE (SD, SDXL, SD3/FLUX's 16 channels, Qwen-Image's video VAE,
the tiny test models) without tables.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffsteer.guidance.latents import encode
from diffsteer.guidance.models import DiffusionModel


def colour_fields(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``count`` smooth random RGB images in [0, 1] (bilinear upsampling of 4x4 random colours)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(count, 3, 4, 4, generator=g)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def fit_affine(latents: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Least-squares [C + 1, 3] matrix M with rgb ≈ [latent, 1] @ M, per pixel (both [N, *, h, w])."""
    a = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double()
    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3).double()
    return torch.linalg.lstsq(a, y).solution.float()


def apply_affine(matrix: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents -> [B, 3, h, w] RGB in [0, 1]."""
    weight, bias = matrix[:-1], matrix[-1]
    rgb = torch.einsum("bchw,cr->brhw", latents.float().cpu(), weight) + bias.view(1, 3, 1, 1)
    return rgb.clamp(0, 1)


def png_bytes(rgb: torch.Tensor) -> bytes:
    array = (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class LatentPreviewer:
    """Fits the map of a model on first use (through ``run``, e.g. the device worker) and renders previews."""

    def __init__(self, size: int = 64, count: int = 12):
        self.size = size
        self.count = count
        self._maps: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def fit(self, model: DiffusionModel) -> torch.Tensor:
        size = max(self.size, 4 * model.vae_scale_factor)
        images = colour_fields(self.count, size)
        with torch.no_grad():
            z = encode(model.vae, images).cpu()  # every family's VAE (Qwen-Image's codes frames), normalised
        target = F.avg_pool2d(images, model.vae_scale_factor)
        return fit_affine(z, target)

    def matrix(self, model: DiffusionModel, run=lambda fn: fn()) -> torch.Tensor:
        key = id(model)
        with self._lock:
            found = self._maps.get(key)
        if found is None:
            found = run(lambda: self.fit(model))
            with self._lock:
                self._maps[key] = found
        return found

    def render(self, model: DiffusionModel, latents: torch.Tensor, run=lambda fn: fn()) -> list[bytes]:
        """One PNG per image of ``latents`` (at latent resolution)."""
        rgb = apply_affine(self.matrix(model, run), latents)
        return [png_bytes(image) for image in rgb]
