"""Uploaded images: every PIL mode becomes RGB (or a mask's luminance), EXIF orientation is applied, and what is
not a whole image within the pixel limit is refused naming the field, before its pixels are decoded."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.image_inputs import decode_image, image_tensor, mask_tensor, to_rgb


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def test_modes_become_rgb():
    grey16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))  # 16-bit greyscale (I;16)
    palette = Image.new("RGB", (4, 4), (255, 0, 0)).convert("P")
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    rgba = Image.new("RGBA", (4, 4), (10, 200, 10, 0))
    for image, colour in [(grey16, (255, 255, 255)), (palette, (255, 0, 0)), (rgba, (10, 200, 10))]:
        decoded = decode_image(encoded(image), "init_image")
        assert to_rgb(decoded).getpixel((0, 0)) == colour, image.mode
    cmyk_rgb = to_rgb(decode_image(encoded(cmyk, "JPEG"), "init_image")).getpixel((0, 0))
    assert cmyk_rgb[0] > 200 and cmyk_rgb[1] < 60  # red survives the JPEG round trip


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (8, 4), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 4, 4))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    decoded = decode_image(encoded(image, "JPEG", exif=exif.tobytes()), "init_image")
    assert decoded.size == (4, 8)
    assert decoded.getpixel((2, 1))[2] > 200  # the blue half is now on top


@pytest.mark.parametrize(
    "value",
    [
        "%%% not base64",
        base64.b64encode(b"just some text").decode(),
        encoded(Image.new("RGB", (16, 16)))[:40],  # truncated
    ],
)
def test_what_is_not_a_whole_image_is_refused_naming_the_field(value):
    with pytest.raises(InvalidInput) as e:
        decode_image(value, "mask")
    assert e.value.field == "mask"


def test_a_decompression_bomb_is_refused_before_its_pixels_are_decoded():
    bomb = encoded(Image.new("L", (5000, 5000)))  # compresses to a few kB
    with pytest.raises(InvalidInput) as e:
        decode_image(bomb, "init_image", max_pixels=1024 * 1024)
    assert e.value.field == "init_image" and "5000x5000" in str(e.value)


def test_data_urls_and_a_mask_of_another_size():
    image = decode_image("data:image/png;base64," + encoded(Image.new("RGB", (6, 6), "white")), "init_image")
    assert image.size == (6, 6)
    mask = Image.new("L", (16, 8), 0)
    mask.paste(255, (8, 0, 16, 8))  # right half repaints
    resized = mask_tensor(mask, 4, 8)  # to the generation's size
    assert resized.shape == (1, 1, 4, 8)
    assert torch.equal(resized[0, 0, :, 4:], torch.ones(4, 4)) and torch.equal(resized[0, 0, :, :4], torch.zeros(4, 4))
    assert image_tensor(image, 4, 4).shape == (1, 3, 4, 4)
