"""AUTOMATIC1111's img2img image handling, around the core's img2img and inpainting: what ``/sdapi/v1/img2img``
does to the images before and after the generation, re-implemented from A1111 (1.10) ``modules/images.py``
(``resize_image``, ``flatten``), ``modules/masking.py`` (``get_crop_region_v2``, ``expand_crop_region``) and
``modules/processing.py`` (``StableDiffusionProcessingImg2Img.init``, ``apply_overlay``, ``uncrop``).

- **Resize modes** (``resize_mode``): 0 "just resize" (stretched to width × height), 1 "crop and resize" (scaled
  to cover, centred, the excess cropped), 2 "resize and fill" (scaled to fit, centred, the borders filled with the
  stretched edge rows or columns), 3 "just resize (latent upscale)": here as 0 (A1111 encodes the image at its
  own size and resizes the latents; this server resizes the pixels, so the generation has the same size).
  Lanczos, as A1111 without an img2img upscaler.
- **Masks**: an RGBA mask with transparency is its alpha channel (> 128: repaint), any other its luminance
  (white repaints); ``inpainting_mask_invert`` inverts it; ``mask_blur`` is a Gaussian blur of σ = mask_blur
  pixels (kernel 2·⌊2.5σ + 0.5⌋ + 1, first along x, then y, as A1111's ``cv2.GaussianBlur`` passes) at the mask's
  own resolution. The core repaints where the blurred mask is ≥ 0.5.
- **Overlay**: the result is the generated image composited under the init image, whose opacity is 1 − the blurred
  mask ("only masked") or 1 − min(1, 2 × blurred mask) (whole picture), so that every pixel outside the blurred
  mask is the init image's own.
- **Inpaint area "only masked"** (``inpaint_full_res``): the blurred mask's bounding box, grown by
  ``inpaint_full_res_padding`` pixels, widened to width:height within the image, is cut out of the image and the
  mask and scaled to width × height; the generation is scaled back to the box and pasted into the whole init image
  through the overlay, so the answer has the init image's size. A blank mask falls back to plain img2img, as
  A1111 does.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from scipy.ndimage import gaussian_filter1d

from diffsteer.guidance.image_inputs import to_luminance, to_rgb

RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}
# A1111's "masked content" (inpainting_fill) -> the core's inpainting_fill
INPAINTING_FILLS = {0: "fill", 1: "original", 2: "latent_noise", 3: "latent_nothing"}
BACKGROUND = (255, 255, 255)  # A1111's img2img_background_color: what transparent init pixels become


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def flatten(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """RGB with transparency replaced by ``background`` (A1111's ``images.flatten``)."""
    if not has_alpha(image):
        return to_rgb(image)
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    base.alpha_composite(rgba)
    return base.convert("RGB")


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` at width × height by A1111's resize mode (0 stretch, 1 crop, 2 fill; 3 is 0 here)."""
    if mode in (0, 3):
        return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)
    ratio = width / height
    src_ratio = image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    scaled = image.resize((src_w, src_h), Image.LANCZOS)
    result = Image.new(image.mode, (width, height))
    result.paste(scaled, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2:
        if ratio < src_ratio:  # bands above and below: the first and last rows, stretched
            fill = height // 2 - src_h // 2
            if fill > 0:
                result.paste(scaled.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                result.paste(
                    scaled.resize((width, fill), box=(0, scaled.height, width, scaled.height)), box=(0, fill + src_h)
                )
        elif ratio > src_ratio:  # bands left and right: the first and last columns, stretched
            fill = width // 2 - src_w // 2
            if fill > 0:
                result.paste(scaled.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                result.paste(
                    scaled.resize((fill, height), box=(scaled.width, 0, scaled.width, height)), box=(fill + src_w, 0)
                )
    return result


def mask_luminance(mask: Image.Image) -> Image.Image:
    """The mask as A1111's ``create_binary_mask`` reads it: the alpha channel of a mask with transparency
    (> 128: 255, else 0), else the luminance (as is: grey levels are kept)."""
    if has_alpha(mask):
        rgba = mask.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda v: 255 if v > 128 else 0)
        return rgba.convert("RGB").convert("L")
    return to_luminance(mask)


def blur_mask(mask: Image.Image, sigma: int) -> Image.Image:
    """A1111's mask blur: a Gaussian of σ = ``sigma`` pixels along x, then along y, each pass rounded to 8 bits,
    kernel radius ⌊2.5σ + 0.5⌋, borders reflected (cv2's default, BORDER_REFLECT_101)."""
    box = mask.getbbox()
    if sigma <= 0 or box is None:
        return mask
    radius = int(2.5 * sigma + 0.5)
    # only the mask's box grown by the kernel's reach can change: blurred there, the rest stays 0 (a margin of
    # radius + 1 zeros reflects as the zeros beyond it would)
    reach = radius + 1
    x1, y1 = max(box[0] - reach, 0), max(box[1] - reach, 0)
    x2, y2 = min(box[2] + reach, mask.width), min(box[3] + reach, mask.height)
    array = np.asarray(mask.crop((x1, y1, x2, y2)), dtype=np.float32)
    for axis in (1, 0):
        array = gaussian_filter1d(array, sigma, axis=axis, mode="mirror", radius=radius)
        array = np.clip(np.round(array), 0, 255)
    result = Image.new("L", mask.size)
    result.paste(Image.fromarray(array.astype(np.uint8), "L"), (x1, y1))
    return result


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) around the mask's non-zero pixels, grown by ``padding`` within the image; None
    for a blank mask (A1111's ``get_crop_region_v2``)."""
    box = mask.getbbox()
    if box is None:
        return None
    if not padding:
        return box
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def grow_span(low: int, high: int, grow: int, limit: int) -> tuple[int, int]:
    """[low, high) grown by ``grow`` split over both ends, shifted back inside [0, limit) where it sticks out."""
    low, high = low - grow // 2, high + grow - grow // 2
    if high >= limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, high - low
    return low, min(high, limit)


def expand_crop_region(
    region: tuple[int, int, int, int], width: int, height: int, image_width: int, image_height: int
) -> tuple[int, int, int, int]:
    """``region`` widened (or heightened) to the aspect ratio width:height, kept inside the image
    (A1111's ``expand_crop_region``)."""
    x1, y1, x2, y2 = region
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = grow_span(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), image_height)
    else:
        x1, x2 = grow_span(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), image_width)
    return x1, y1, x2, y2


@dataclass
class Img2ImgImages:
    """What the generation starts from (``init``, ``mask``: width × height) and how its results are finished."""

    init: Image.Image  # RGB, width × height
    mask: Image.Image | None  # L, width × height, soft (the core repaints where ≥ 0.5); None: plain img2img
    overlay: Image.Image | None = None  # RGBA at the answer's size: the init image, opaque where it is kept
    paste: tuple[int, int, int, int] | None = None  # "only masked": x, y, w, h of the box in the init image
    crop: tuple[int, int, int, int] | None = None  # that box as (x1, y1, x2, y2), for the record

    def finish(self, image: Image.Image) -> Image.Image:
        """A generated image (width × height) as A1111 answers it: pasted back into the init image's box ("only
        masked") and composited under the overlay; as is without a mask."""
        if self.overlay is None:
            return image
        if self.paste is not None:
            x, y, w, h = self.paste
            canvas = Image.new("RGBA", self.overlay.size)
            canvas.paste(resize_image(1, image.convert("RGB"), w, h), (x, y))
            base = canvas
        else:
            base = image.convert("RGBA")
        base.alpha_composite(self.overlay)
        return base.convert("RGB")


def prepare_images(
    init: Image.Image,
    mask: Image.Image | None,
    width: int,
    height: int,
    *,
    resize_mode: int = 0,
    mask_blur: int = 0,
    invert: bool = False,
    only_masked: bool = False,
    padding: int = 0,
) -> Img2ImgImages:
    """The init image and mask at width × height, and the overlay, as A1111's img2img makes them."""
    init = flatten(init)
    if mask is None:
        return Img2ImgImages(resize_image(resize_mode, init, width, height), None)
    soft = mask_luminance(mask)
    if only_masked and soft.size != init.size:  # the box is cut from both: the mask is stretched onto the image
        soft = soft.resize(init.size, Image.LANCZOS)
    if invert:
        soft = ImageOps.invert(soft)
    soft = blur_mask(soft, mask_blur)
    if only_masked:
        region = crop_region(soft, padding)
        if region is None:  # a blank mask: plain img2img, as A1111
            return Img2ImgImages(resize_image(resize_mode, init, width, height), None)
        region = expand_crop_region(region, width, height, init.width, init.height)
        x1, y1, x2, y2 = region
        overlay = init.convert("RGBA")
        overlay.putalpha(ImageOps.invert(soft))
        return Img2ImgImages(
            resize_image(2, init.crop(region), width, height),
            resize_image(2, soft.crop(region), width, height),
            overlay,
            (x1, y1, x2 - x1, y2 - y1),
            region,
        )
    init = resize_image(resize_mode, init, width, height)
    soft = resize_image(resize_mode, soft, width, height)
    doubled = Image.fromarray(np.clip(np.asarray(soft, dtype=np.float32) * 2, 0, 255).astype(np.uint8), "L")
    overlay = init.convert("RGBA")
    overlay.putalpha(ImageOps.invert(doubled))
    return Img2ImgImages(init, soft, overlay)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
