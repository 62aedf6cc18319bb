"""Images a request brings (an init image, an inpainting mask): decoding, checking and preprocessing.

A request carries images as base64 text (optionally a ``data:image/...;base64,`` URL), or, from Python, as PIL
images. Decoding refuses what is not an image, a truncated file, and an image above the pixel limit before its
pixels are decoded (a decompression bomb), naming the field; the EXIF orientation is applied, and palette, 16-bit,
CMYK and alpha images become RGB (a mask: its luminance, or for an RGBA mask whose transparency marks the area to
edit, as OpenAI's edit route defines it, the caller converts it first).

Preprocessing follows diffusers' ``VaeImageProcessor``: resized to the generation's size with Lanczos when it
differs, values in [0, 1] (the VAE gets them as [-1, 1]); masks are binarised at 0.5 (white = repaint), after an
optional Gaussian blur of ``mask_blur`` pixels (A1111's field), which smooths the mask's outline.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from scipy.ndimage import gaussian_filter

from diffsteer.guidance.errors import InvalidInput

DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
MAX_PIXELS = 4096 * 4096  # per decoded image; the generation's own size limits are checked separately

ImageInput = str | bytes | Image.Image


def decode_image(value: ImageInput, field: str, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A PIL image from base64 text, a data URL, raw bytes or an image; InvalidInput naming ``field`` for
    anything that is not a whole image within ``max_pixels``."""
    if isinstance(value, Image.Image):
        image = value
    else:
        data = value
        if isinstance(value, str):
            try:
                data = base64.b64decode(DATA_URL.sub("", value.strip()), validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput(field, "is not base64-encoded image data (or a data:image/...;base64 URL)") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                width, height = image.size
                if width * height > max_pixels:
                    raise InvalidInput(field, f"{width}x{height} is above the limit of {max_pixels} pixels")
                image.load()
        except InvalidInput:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InvalidInput(field, f"cannot be read as an image ({type(e).__name__})") from None
    if image.width * image.height > max_pixels:
        raise InvalidInput(field, f"{image.width}x{image.height} is above the limit of {max_pixels} pixels")
    return ImageOps.exif_transpose(image)


def read_image_file(path: str, option: str) -> str:
    """A file's bytes as base64 text (what a request's image fields hold), for command lines; InvalidInput naming
    ``option`` when it cannot be read."""
    try:
        with open(path, "rb") as file:
            return base64.b64encode(file.read()).decode("ascii")
    except OSError as e:
        raise InvalidInput(option, f"cannot read {path!r}: {e.strerror or e}") from None


def image_fields_from_options(init_image: str | None, mask: str | None, **values: object) -> dict[str, object]:
    """A request's image-conditioning fields from command-line options: the ``--init-image`` and ``--mask`` files
    read as base64, the other ``values`` (strength, mask_blur, ...) as given; options left out (None) are left out."""
    fields: dict[str, object] = {k: v for k, v in values.items() if v is not None}
    if init_image is not None:
        fields["init_image"] = read_image_file(init_image, "--init-image")
    if mask is not None:
        fields["mask"] = read_image_file(mask, "--mask")
    return fields


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB of any mode (palette, CMYK, greyscale, 16-bit greyscale scaled to 8 bits); alpha is dropped, as
    diffusers' ``convert("RGB")`` does."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).round().astype(np.uint8), "L")
    return image.convert("RGB")


def to_luminance(image: Image.Image) -> Image.Image:
    return to_rgb(image).convert("L")


def resized(image: Image.Image, height: int, width: int) -> Image.Image:
    """``image`` at width × height (Lanczos, as diffusers' image processor), unchanged when already that size."""
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def image_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """[1, 3, H, W] float in [0, 1]."""
    array = np.asarray(resized(to_rgb(image), height, width), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def mask_tensor(mask: Image.Image, height: int, width: int, blur: int = 0) -> torch.Tensor:
    """[1, 1, H, W] of 0/1 (1 = repaint): the mask's luminance at the generation's size, blurred by ``blur``
    pixels, binarised at 0.5."""
    grey = resized(to_luminance(mask), height, width)
    if blur > 0:
        grey = grey.filter(ImageFilter.GaussianBlur(blur))
    array = np.asarray(grey, dtype=np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def fill_masked(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A1111's "fill" of the area to repaint: each masked pixel takes the colours around the mask, blurred
    (normalised Gaussian averages of the unmasked pixels, coarse radii first and finer ones where they reach),
    so that the init latents of that area carry the surroundings' colours and no trace of what was there.
    ``pixels`` [1, 3, H, W] in [0, 1], ``mask`` [1, 1, H, W] of 0/1 (1 = repaint)."""
    keep = (1.0 - mask[0, 0]).double().numpy()
    image = pixels[0].double().numpy()
    filled = image.mean(axis=(1, 2), keepdims=True) * np.ones_like(image)  # where no radius reaches: the mean
    for sigma in (64.0, 16.0, 4.0, 1.0):
        weight = gaussian_filter(keep, sigma)
        reached = weight > 1e-3
        for c in range(image.shape[0]):
            estimate = gaussian_filter(image[c] * keep, sigma) / np.maximum(weight, 1e-12)
            filled[c] = np.where(reached, estimate, filled[c])
    out = image * keep + filled * (1.0 - keep)
    return torch.from_numpy(out).to(pixels.dtype)[None]
