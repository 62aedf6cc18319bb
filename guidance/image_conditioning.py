"""Image-conditioned generation: where the reverse process starts (img2img) and what it keeps (inpainting).

Not a second pipeline: the sampler's loop with three changes, for every family and every policy.

- **Start.** ``strength`` s of N steps runs the last steps only, as diffusers' img2img pipelines cut the schedule
  (UNet families: the last ⌊N·s⌋; flow families: from step ⌊N − N·s⌋), and the start is the init image's latents
  noised to the first of them: ``scheduler.add_noise`` (VP), (1 − σ)·x0 + σ·ε (flow). An inpainting request at
  s = 1 starts from pure noise, as diffusers' inpainting pipelines do.
- **Keep.** With a mask and a backbone without inpainting inputs, after each step the unmasked part is replaced by
  the init latents noised to the next step's level, and by the clean init latents after the last
  (diffusers' ``StableDiffusionInpaintPipeline`` for 4-channel UNets, ``FluxInpaintPipeline``).
- **Inputs.** A dedicated inpainting UNet (9 input channels) gets the latent mask and the masked image's latents
  beside the sample at every call (:meth:`diffsteer.guidance.families.unet.StableDiffusion.forward`), carried as
  an added input of every condition so that batching, CFG and every policy see them like any other.

What the area to repaint starts from is A1111's "masked content" (``inpainting_fill``): the init image, its
surroundings' colours blurred in (:func:`diffsteer.guidance.image_inputs.fill_masked`), noise, or zeros.

The init image's latents are VAE samples drawn from each image's generator before its noise (the masked image's
after it), so a seed gives diffusers' image for the same seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.families.base import Condition
from diffsteer.guidance.image_inputs import decode_image, fill_masked, image_tensor, mask_tensor
from diffsteer.guidance.latents import sample_latents
from diffsteer.guidance.models import DiffusionModel
from diffsteer.guidance.parameterisation import NoiseLevel, add_noise


@dataclass(frozen=True)
class RequestImages:
    """A request's decoded images."""

    init: Image.Image
    mask: Image.Image | None = None


def decode_request_images(init_image: str | None, mask: str | None) -> RequestImages | None:
    if init_image is None:
        return None
    return RequestImages(decode_image(init_image, "init_image"), None if mask is None else decode_image(mask, "mask"))


def default_size(model: DiffusionModel, image: Image.Image) -> tuple[int, int]:
    """(height, width) of a generation from ``image`` when the request names none: the image's, rounded down to
    the model's size multiple (as diffusers' image processor does)."""
    multiple = model.family.size_multiple(model)
    height, width = image.height // multiple * multiple, image.width // multiple * multiple
    if not height or not width:
        raise InvalidInput(
            "init_image", f"{image.width}x{image.height} is smaller than this model's size multiple {multiple}"
        )
    return height, width


@dataclass
class ImageConditioning:
    """What an image-conditioned generation adds to its runs (latents in the sampler's layout, [B, C, h, w])."""

    init_latents: torch.Tensor | None  # None: an inpainting start from pure noise that keeps nothing per step
    mask: torch.Tensor | None  # [B, 1, h, w], 1 = repaint
    from_noise: bool  # start from pure noise (inpainting at strength 1)
    blend: bool  # replace the unmasked part after every step (backbones without inpainting inputs)


def prepare_image_conditioning(
    model: DiffusionModel,
    images: RequestImages,
    strength: float,
    mask_blur: int,
    inpainting_fill: str,
    height: int,
    width: int,
    generators: list[torch.Generator],
    draw_noise: Callable[[], torch.Tensor],
) -> tuple[ImageConditioning, torch.Tensor, torch.Tensor | None]:
    """The image conditioning, the seeds' noise (drawn by ``draw_noise`` at the point of the generators' sequence
    where diffusers draws it) and, for an inpainting backbone, its added input [B, 1 + C, h, w]: the latent mask
    and the masked image's latents."""
    pixels = image_tensor(images.init, height, width)
    inpaint_inputs = model.family.inpainting_inputs(model)
    mask = None if images.mask is None else mask_tensor(images.mask, height, width, mask_blur)
    from_noise = mask is not None and strength >= 1.0
    needs_init = mask is None or not inpaint_inputs or not from_noise
    if mask is not None and inpainting_fill == "fill":
        pixels = fill_masked(pixels, mask)
    init_latents = sample_latents(model.vae, pixels, generators) if needs_init else None
    noise = draw_noise()
    added = None
    latent_mask = None
    if mask is not None:
        h, w = noise.shape[-2:]
        latent_mask = torch.nn.functional.interpolate(mask, size=(h, w)).to(noise).expand(noise.shape[0], -1, -1, -1)
        if init_latents is not None and inpainting_fill in ("latent_noise", "latent_nothing"):
            replacement = noise if inpainting_fill == "latent_noise" else torch.zeros_like(noise)
            init_latents = init_latents.to(noise) * (1 - latent_mask) + replacement * latent_mask
        if inpaint_inputs:
            masked = pixels * (mask < 0.5) + 0.5 * (mask >= 0.5)  # the masked pixels grey: 0 in the VAE's [-1, 1]
            masked_latents = sample_latents(model.vae, masked, generators).to(noise)
            added = torch.cat([latent_mask, masked_latents], dim=1)
    conditioning = ImageConditioning(
        None if init_latents is None else init_latents.to(noise),
        latent_mask,
        from_noise,
        blend=mask is not None and not inpaint_inputs,
    )
    return conditioning, noise, added


def with_inpainting_inputs(conditions: dict[str, Condition], added: torch.Tensor | None) -> dict[str, Condition]:
    """Every condition with the inpainting backbone's extra input (rows: the batch's images)."""
    if added is None:
        return conditions
    return {
        name: Condition(c.hidden_states, {**c.added, "inpaint": added.to(c.hidden_states.dtype)}, c.mask)
        for name, c in conditions.items()
    }


def first_step(steps: int, strength: float, schedule: str) -> int:
    """Index of the first of ``steps`` steps an img2img run at ``strength`` makes, as the families' diffusers
    pipelines compute it (UNets: N − ⌊N·s⌋; flow: ⌊N − N·s⌋)."""
    if schedule == "flow":
        return int(max(steps - min(steps * strength, steps), 0))
    return max(steps - min(int(steps * strength), steps), 0)


def noised(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
    """``latents`` noised to step level ``level`` (timestep ``t``): the scheduler's own forward process for VP
    schedulers (their latents may be VE-scaled), (1 − σ)·x0 + σ·ε for flow ones."""
    if level.schedule == "flow":
        return add_noise(latents, noise, level)
    return scheduler.add_noise(latents, noise, t.reshape(1).expand(latents.shape[0]))


def start_latents(
    scheduler, image: ImageConditioning, noise: torch.Tensor, t: torch.Tensor, level: NoiseLevel
) -> torch.Tensor:
    if image.from_noise:
        return noise * getattr(scheduler, "init_noise_sigma", 1.0)
    return noised(scheduler, image.init_latents, noise, t, level)


def keep_unmasked(
    scheduler,
    image: ImageConditioning,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    levels: list[NoiseLevel],
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """After step ``i``: the unmasked part replaced by the init latents at the next step's level (clean after
    the last step)."""

    def keep(i: int, latents: torch.Tensor) -> torch.Tensor:
        if i + 1 < len(timesteps):
            proper = noised(scheduler, image.init_latents, noise, timesteps[i + 1], levels[i + 1])
        else:
            proper = image.init_latents
        return (1 - image.mask) * proper + image.mask * latents

    return keep
