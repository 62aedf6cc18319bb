"""A1111's ``POST /sdapi/v1/img2img`` against a live server with the unmodified ``webuiapi`` client: inpainting
with A1111's defaults (only masked, mask blur 4, masked content "fill"), the composite that keeps every pixel
outside the blurred mask, resize modes 0/1/2 on hand-made images, "only masked" at the init image's size, mask
inversion, and bad input answered 422 under A1111's field names; the image operations against A1111's own
definitions (``resize_image``, ``get_crop_region_v2``, ``expand_crop_region``)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_service_support import live_server, one_thread  # noqa: F401

from diffsteer.service.routers.a1111_img2img import (
    blur_mask,
    crop_region,
    expand_crop_region,
    mask_luminance,
    prepare_images,
    resize_image,
)

webuiapi = pytest.importorskip("webuiapi")

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "img2img-key"
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def server(one_thread):  # noqa: F811
    with live_server(api_keys=[KEY], batching=False, log_level="warning") as s:
        yield s


@pytest.fixture(scope="module")
def webui(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="anyone", password=KEY)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def rect_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def post(webui, **body):
    return webui.session.post(f"{webui.baseurl}/img2img", json=body, timeout=60)


def answer_image(response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))


def outside(box: tuple[int, int, int, int], reach: int, width: int, height: int) -> np.ndarray:
    """True where a pixel is farther than ``reach`` from ``box`` (beyond the blurred mask)."""
    x1, y1, x2, y2 = box
    keep = np.ones((height, width), dtype=bool)
    keep[max(y1 - reach, 0) : y2 + reach, max(x1 - reach, 0) : x2 + reach] = False
    return keep


# -- the client, end to end ---------------------------------------------------------------------------------------


def test_webuiapi_inpaints_and_keeps_the_unmasked_pixels(webui):
    init = noise_image(32, 32)
    box = (10, 12, 20, 22)
    result = webui.img2img(
        images=[init], mask_image=rect_mask(32, 32, box), prompt="a red dot", seed=3, steps=4, width=32, height=32
    )
    out = result.image
    assert out.size == (32, 32) and len(result.images) == 1
    blur_reach = int(2.5 * 4 + 0.5)  # webuiapi's mask_blur=4: the Gaussian's kernel radius
    keep = outside(box, blur_reach, 32, 32)
    assert keep.any() and (array(out)[keep] == array(init)[keep]).all()  # the init image's own pixels
    assert (array(out)[13:21, 11:19] != array(init)[13:21, 11:19]).any()  # repainted inside
    info = result.info
    assert info["denoising_strength"] == 0.75 and info["seed"] == 3 and info["width"] == 32
    text = info["infotexts"][0]
    assert "Denoising strength: 0.75" in text and "Mask blur: 4" in text and "Seed: 3" in text
    # webuiapi's defaults, as A1111 writes them: inpaint_full_res=True, padding 0, inpainting_fill=0
    assert "Inpaint area: Only masked" in text and "Masked area padding: 0" in text and "Masked content: fill" in text
    assert "Mask mode" not in text
    assert result.parameters["init_images"] is None and result.parameters["mask"] is None  # include_init_images
    again = webui.img2img(
        images=[init], mask_image=rect_mask(32, 32, box), prompt="a red dot", seed=3, steps=4, width=32, height=32
    )
    assert (array(again.image) == array(out)).all()  # a seed gives the same image


def test_webuiapi_img2img_without_a_mask(webui):
    init = noise_image(48, 40, seed=1)
    result = webui.img2img(images=[init], prompt="a tree", seed=5, steps=4, width=32, height=32, batch_size=2)
    assert [im.size for im in result.images] == [(32, 32), (32, 32)]
    assert result.info["all_seeds"] == [5, 6] and result.info["denoising_strength"] == 0.75
    assert "Mask blur" not in result.info["infotexts"][0]
    assert (array(result.images[0]) != array(result.images[1])).any()


def test_data_urls_and_include_init_images(webui):
    init = b64(noise_image(32, 32))
    r = post(
        webui, init_images=[f"data:image/png;base64,{init}"], steps=2, width=32, height=32, include_init_images=True
    )
    assert answer_image(r).size == (32, 32)
    assert r.json()["parameters"]["init_images"] == [f"data:image/png;base64,{init}"]
    silent = post(webui, init_images=[init], steps=2, width=32, height=32, send_images=False)
    assert silent.status_code == 200 and silent.json()["images"] == []


def test_size_defaults_to_the_init_images(webui):
    out = answer_image(post(webui, init_images=[b64(noise_image(43, 26))], steps=2))
    assert out.size == (40, 24)  # rounded down to the tiny model's multiple of 8


# -- resize modes: with a blank mask over the whole picture, the answer is the prepared init image itself -----------


def bands(width: int, height: int, cuts: tuple[int, int], axis: int) -> Image.Image:
    """Three bands red | green | blue, cut at ``cuts`` along x (axis 1) or y (axis 0)."""
    data = np.zeros((height, width, 3), dtype=np.uint8)
    index = np.arange(width if axis == 1 else height)
    colour = np.where(index < cuts[0], 0, np.where(index < cuts[1], 1, 2))
    palette = np.array([RED, GREEN, BLUE], dtype=np.uint8)[colour]
    data[:] = palette[None, :, :] if axis == 1 else palette[:, None, :]
    return Image.fromarray(data)


def prepared(webui, init: Image.Image, mode: int, width: int = 32, height: int = 32) -> np.ndarray:
    blank = Image.new("L", init.size, 0)
    r = post(
        webui,
        init_images=[b64(init)],
        mask=b64(blank),
        inpaint_full_res=False,
        resize_mode=mode,
        steps=2,
        width=width,
        height=height,
    )
    out = answer_image(r)
    assert out.size == (width, height)
    return array(out)


def test_resize_mode_0_stretches(webui):
    out = prepared(webui, bands(40, 20, (20, 40), axis=1), 0)  # left half red, right half green
    assert (out[:, :12] == RED).all() and (out[:, 20:] == GREEN).all()


def test_resize_mode_1_crops_the_centre(webui):
    # 40x20 to cover 32x32: scaled to 64x32, the middle 32 columns kept: the green band only
    out = prepared(webui, bands(40, 20, (5, 35), axis=1), 1)
    assert (out == GREEN).all()


def test_resize_mode_2_fills_the_borders_with_the_edges(webui):
    # 40x20 to fit 32x32: scaled to 32x16 at rows 8..24; above it the first row stretched, below the last
    out = prepared(webui, bands(40, 20, (10, 20), axis=0), 2)  # top half red, bottom half green
    assert (out[:8] == RED).all() and (out[24:] == GREEN).all()
    assert (out[9:14] == RED).all() and (out[18:23] == GREEN).all()


def test_resize_mode_3_is_just_resize(webui):
    init = bands(40, 20, (20, 40), axis=1)
    assert (prepared(webui, init, 3) == prepared(webui, init, 0)).all()


# -- inpaint area, inversion -------------------------------------------------------------------------------------------


def test_only_masked_keeps_the_size_and_changes_only_the_box(webui):
    init = noise_image(56, 40, seed=2)
    box = (30, 8, 38, 14)
    r = post(
        webui,
        init_images=[b64(init)],
        mask=b64(rect_mask(56, 40, box)),
        mask_blur=2,
        inpaint_full_res=True,
        inpaint_full_res_padding=4,
        steps=4,
        seed=1,
        width=32,
        height=32,
    )
    out = answer_image(r)
    assert out.size == (56, 40)  # the init image's, not width x height
    changed = (array(out) != array(init)).any(axis=2)
    ys, xs = np.nonzero(changed)
    reach = int(2.5 * 2 + 0.5)
    assert changed.any()
    assert xs.min() >= box[0] - reach and xs.max() < box[2] + reach
    assert ys.min() >= box[1] - reach and ys.max() < box[3] + reach
    assert json.loads(r.json()["info"])["width"] == 32  # the generation's size, as A1111 reports it


def test_only_masked_with_a_blank_mask_is_plain_img2img(webui):
    init = noise_image(48, 40, seed=4)
    out = answer_image(
        post(webui, init_images=[b64(init)], mask=b64(Image.new("L", (48, 40))), steps=2, width=32, height=32)
    )
    assert out.size == (32, 32)  # as A1111: no box to cut, the whole picture at width x height


def test_inverted_mask_keeps_the_masked_square(webui):
    init = noise_image(32, 32, seed=6)
    box = (8, 8, 24, 24)
    body = dict(init_images=[b64(init)], mask=b64(rect_mask(32, 32, box)), mask_blur=0, steps=4, seed=2)
    body.update(width=32, height=32, inpaint_full_res=False)
    plain = array(answer_image(post(webui, **body)))
    inverted = array(answer_image(post(webui, **body, inpainting_mask_invert=1)))
    inside = ~outside(box, 0, 32, 32)
    assert (plain[~inside] == array(init)[~inside]).all() and (plain[inside] != array(init)[inside]).any()
    assert (inverted[inside] == array(init)[inside]).all() and (inverted[~inside] != array(init)[~inside]).any()


def test_an_rgba_mask_is_its_alpha_channel(webui):
    init = noise_image(32, 32, seed=7)
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    mask.paste((0, 0, 0, 255), (0, 0, 16, 32))  # opaque left half: repaint (its colour is black)
    body = dict(init_images=[b64(init)], mask=b64(mask), mask_blur=0, inpaint_full_res=False, steps=4)
    out = array(answer_image(post(webui, **body, width=32, height=32)))
    assert (out[:, 16:] == array(init)[:, 16:]).all() and (out[:, :16] != array(init)[:, :16]).any()


# -- bad input ---------------------------------------------------------------------------------------------------------

PNG = b64(noise_image(32, 32))
TRUNCATED = base64.b64encode(base64.b64decode(PNG)[:200]).decode("ascii")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"init_images": ["not base64!"]}, "init_images.0"),
        ({"init_images": [base64.b64encode(b"not an image").decode()]}, "init_images.0"),
        ({"init_images": [TRUNCATED]}, "init_images.0"),
        ({"init_images": []}, "init_images"),
        ({"init_images": [PNG, PNG]}, "init_images"),
        ({"mask": "%%%"}, "mask"),
        ({"mask": TRUNCATED}, "mask"),
        ({"denoising_strength": 0.1}, "denoising_strength"),  # no step left of 4
        ({"denoising_strength": 1.5}, "denoising_strength"),
        ({"width": 31}, "width"),
        ({"width": 4096}, "width"),
        ({"resize_mode": 4}, "resize_mode"),
        ({"inpainting_fill": 4}, "inpainting_fill"),
        ({"mask_blur": -1}, "mask_blur"),
        ({"initial_noise_multiplier": 0.5}, "initial_noise_multiplier"),
        ({"s_churn": 1.0}, "s_churn"),
        ({"seed_resize_from_h": 64, "seed_resize_from_w": 64}, "seed_resize_from_h"),
        ({"refiner_checkpoint": "sdxl-refiner"}, "refiner_checkpoint"),
        ({"enable_hr": True}, "enable_hr"),
        ({"sampler_name": "Euler b"}, "sampler_name"),
        ({"batch_size": 9}, "batch_size"),
        ({"override_settings": {"sd_model_checkpoint": "nope"}}, "override_settings.sd_model_checkpoint"),
    ],
)
def test_bad_input_is_422_naming_a1111_fields(webui, change, field):
    body = {"init_images": [PNG], "steps": 4, "width": 32, "height": 32, **change}
    r = post(webui, **body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


def test_a_bad_image_through_the_client(webui):
    with pytest.raises(RuntimeError) as e:
        webui.img2img(images=[noise_image(32, 32)], mask_image=None, steps=4, width=32, height=32, s_churn=1)
    status, text = e.value.args
    assert status == 422 and json.loads(text)["error"]["field"] == "s_churn"


def test_a_too_large_init_image_names_it_when_no_size_is_given(webui):
    r = post(webui, init_images=[b64(noise_image(80, 32))], steps=2)
    assert r.status_code == 422 and r.json()["error"]["field"] == "init_images.0"


@settings(max_examples=12, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(
    size=st.tuples(st.integers(9, 60), st.integers(9, 60)),
    target=st.tuples(st.sampled_from([8, 16, 32]), st.sampled_from([8, 16, 32])),
    box=st.tuples(st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.05, 1), st.floats(0.05, 1)),
    mode=st.integers(0, 3),
    blur=st.integers(0, 12),
    full=st.booleans(),
    padding=st.integers(0, 40),
    invert=st.integers(0, 1),
    fill=st.integers(0, 3),
)
def test_valid_img2img_requests_succeed(webui, size, target, box, mode, blur, full, padding, invert, fill):
    w, h = size
    x1, y1 = int(box[0] * w), int(box[1] * h)
    x2, y2 = min(w, x1 + max(1, int(box[2] * w))), min(h, y1 + max(1, int(box[3] * h)))
    body = dict(init_images=[b64(noise_image(w, h))], mask=b64(rect_mask(w, h, (x1, y1, x2, y2))), steps=2)
    body.update(width=target[0], height=target[1], resize_mode=mode, mask_blur=blur, inpaint_full_res=full)
    body.update(inpaint_full_res_padding=padding, inpainting_mask_invert=invert, inpainting_fill=fill)
    body.update(denoising_strength=1.0)
    out = answer_image(post(webui, **body))
    assert out.size == ((w, h) if full else target)


# -- the image operations, against A1111's definitions --------------------------------------------------------------


def test_resize_image_sizes_and_placement():
    wide = bands(40, 20, (20, 40), axis=1)
    assert resize_image(0, wide, 32, 16).size == (32, 16)
    cropped = np.asarray(resize_image(1, bands(40, 20, (5, 35), axis=1), 32, 32))
    assert (cropped == GREEN).all()
    tall = bands(20, 40, (10, 20), axis=1)  # left red, right green; fit 32x32: 16x32 at columns 8..24
    filled = np.asarray(resize_image(2, tall, 32, 32))
    assert (filled[:, :8] == RED).all() and (filled[:, 24:] == GREEN).all()
    assert resize_image(1, Image.new("L", (10, 30)), 32, 16).mode == "L"


def test_crop_region_padding_and_aspect_ratio():
    mask = rect_mask(100, 60, (40, 20, 50, 26))
    assert crop_region(mask, 0) == (40, 20, 50, 26)
    assert crop_region(mask, 45) == (0, 0, 95, 60)
    assert crop_region(Image.new("L", (10, 10)), 4) is None
    # A1111's expand_crop_region: 10x6 to 1:1 -> 10x10, centred; at an edge, shifted inside
    assert expand_crop_region((40, 20, 50, 26), 32, 32, 100, 60) == (40, 18, 50, 28)
    assert expand_crop_region((0, 0, 10, 2), 32, 32, 100, 60) == (0, 0, 10, 10)
    assert expand_crop_region((90, 50, 100, 60), 64, 32, 100, 60) == (80, 50, 100, 60)  # 20x10, moved in


def test_mask_blur_matches_a_separable_gaussian_of_a1111s_kernel():
    from scipy.ndimage import gaussian_filter1d

    mask = rect_mask(40, 30, (10, 5, 20, 12))
    sigma = 3
    radius = int(2.5 * sigma + 0.5)
    expected = np.asarray(mask, dtype=np.float64)
    for axis in (1, 0):
        expected = np.round(gaussian_filter1d(expected, sigma, axis=axis, mode="mirror", radius=radius))
    blurred = np.asarray(blur_mask(mask, sigma))
    assert (blurred == expected).all()
    assert blur_mask(mask, sigma).getbbox() == (10 - radius, 0, 20 + radius, 12 + radius)  # the kernel's reach


def test_mask_reading_and_overlay():
    grey = Image.new("L", (4, 4), 100)
    assert mask_luminance(grey).getpixel((0, 0)) == 100  # kept grey, as A1111 (the core binarises later)
    opaque_rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 255))
    assert mask_luminance(opaque_rgba).getpixel((0, 0)) == 255  # no transparency: its luminance
    prepared_ = prepare_images(noise_image(16, 16), rect_mask(16, 16, (4, 4, 8, 8)), 16, 16, mask_blur=0)
    alpha = np.asarray(prepared_.overlay.getchannel("A"))
    assert (alpha[4:8, 4:8] == 0).all() and alpha[0, 0] == 255
