"""OpenAI's ``POST /v1/images/edits`` with the official ``openai`` client against a live server: inpainting with an
OpenAI mask (alpha 0 = edit), the image's own alpha as the mask, img2img without one; each equal to the library's
``generate`` with the same init image, mask (white = repaint), strength and seed. Bad uploads are 400 naming the
field; the form's field encoding (the client's bracket keys, JSON values); the route in the OpenAPI document."""

from __future__ import annotations

import base64
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
import pytest
from PIL import Image
from test_service_support import live_server, one_thread  # noqa: F401

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "edits-test-key"
BASE = {"steps": 3, "seed": 5, "policy": "cfg:scale=4"}
PROMPT = "a red cat on a blue square"


@pytest.fixture(scope="module")
def server(one_thread):  # noqa: F811
    with live_server(api_keys=[KEY], batching=False) as s:
        yield s


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny():
    from diffsteer.guidance.models import load_model

    return load_model("builtin:tiny")


def picture(width=32, height=32, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.zeros((height, width, 3))
    base[: height // 2, :, 0] = 220
    base[:, width // 3 :, 2] = 180
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def openai_mask(width=32, height=32, box=(8, 8, 24, 24)) -> Image.Image:
    """OpenAI's kind of mask: opaque, with a fully transparent box where to edit."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def white_where_transparent(image: Image.Image) -> Image.Image:
    """The core's mask for an OpenAI mask: white (repaint) where alpha is 0."""
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))


def png_file(tmp_path, name: str, image: Image.Image):
    path = tmp_path / name
    image.save(path, format="PNG")
    return path


def decoded(result, k=0) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(result.data[k].b64_json)))


def library(model, **params) -> list[np.ndarray]:
    from diffsteer.guidance.sampler import generate

    result = generate(model, {"prompt": PROMPT, **BASE, **params})
    return [np.asarray(im.convert("RGB")) for im in result.images]


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# --- edits through the official client ---------------------------------------------------------------------


def test_client_edit_with_a_mask_is_inpainting_equal_to_the_library(oa, tiny, tmp_path):
    image, mask = picture(), openai_mask()
    image_path, mask_path = png_file(tmp_path, "in.png", image), png_file(tmp_path, "mask.png", mask)
    with open(image_path, "rb") as image_file, open(mask_path, "rb") as mask_file:
        result = oa.images.edit(
            image=image_file,
            mask=mask_file,
            prompt=PROMPT,
            n=2,
            size="32x32",
            response_format="b64_json",
            extra_body=BASE,
        )
    assert len(result.data) == 2
    info = result.model_extra["diffsteer"]
    assert info["mask"] == "mask" and info["strength"] == 1.0 and info["seeds"] == [5, 6]
    assert (info["width"], info["height"]) == (32, 32)
    first = decoded(result)
    assert first.size == (32, 32) and first.format == "PNG"
    assert "Denoising strength: 1.0" in first.text["parameters"]  # reached the core as inpainting at strength 1
    assert "Mask blur: 0" in first.text["parameters"]
    expected = library(tiny, init_image=image, mask=white_where_transparent(mask), strength=1.0, num_images=2)
    assert np.array_equal(rgb(first), expected[0]) and np.array_equal(rgb(decoded(result, 1)), expected[1])


def test_client_edit_without_a_mask_is_img2img_at_the_images_size(oa, tiny, tmp_path):
    image = picture(width=40, height=24)  # no size: the image's own (a multiple of 8 already)
    with open(png_file(tmp_path, "in.png", image), "rb") as image_file:
        result = oa.images.edit(image=image_file, prompt=PROMPT, extra_body=BASE)
    info = result.model_extra["diffsteer"]
    assert info["mask"] is None and info["strength"] == 0.8 and (info["width"], info["height"]) == (40, 24)
    out = decoded(result)
    assert out.size == (40, 24)
    assert "Denoising strength: 0.8" in out.text["parameters"] and "Mask blur" not in out.text["parameters"]
    assert np.array_equal(rgb(out), library(tiny, init_image=image, strength=0.8)[0])


def test_the_images_own_alpha_is_the_mask(oa, tiny, tmp_path):
    rgba = picture().convert("RGBA")
    rgba.putalpha(openai_mask(box=(0, 16, 32, 32)).getchannel("A"))  # the lower half transparent
    with open(png_file(tmp_path, "in.png", rgba), "rb") as image_file:
        result = oa.images.edit(image=image_file, prompt=PROMPT, size="auto", extra_body=BASE)
    info = result.model_extra["diffsteer"]
    assert info["mask"] == "alpha" and info["strength"] == 1.0
    expected = library(tiny, init_image=rgba.convert("RGB"), mask=white_where_transparent(rgba), strength=1.0)
    assert np.array_equal(rgb(decoded(result)), expected[0])

    opaque = picture().convert("RGBA")  # an alpha channel without a transparent pixel: the whole image (img2img)
    with open(png_file(tmp_path, "opaque.png", opaque), "rb") as image_file:
        result = oa.images.edit(image=image_file, prompt=PROMPT, extra_body={**BASE, "strength": 0.5})
    assert result.model_extra["diffsteer"]["mask"] is None and result.model_extra["diffsteer"]["strength"] == 0.5
    assert np.array_equal(rgb(decoded(result)), library(tiny, init_image=picture(), strength=0.5)[0])


def test_extensions_as_the_client_flattens_them_and_as_json_form_values(server, oa, tmp_path):
    image = png_file(tmp_path, "in.png", picture())
    with open(image, "rb") as f:  # extra_body objects and lists arrive as policy[name], seeds[] ...
        flat = oa.images.edit(
            image=f,
            prompt=PROMPT,
            extra_body={"policy": {"name": "cfg", "scale": 4}, "seeds": [3, 4], "steps": 3, "mask_blur": 2},
        )
    assert flat.model_extra["diffsteer"]["seeds"] == [3, 4]
    assert flat.model_extra["diffsteer"]["policy"] == "cfg:scale=4.0"
    fields = {"prompt": PROMPT, "policy": '{"name": "cfg", "scale": 4}', "seeds": "[3, 4]", "steps": "3", "n": "null"}
    r = httpx.post(
        f"{server.url}/v1/images/edits",
        data=fields,
        files={"image": ("in.png", image.read_bytes(), "image/png")},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert [d["b64_json"] for d in r.json()["data"]] == [d.b64_json for d in flat.data]


def test_a_size_resizes_image_and_mask_and_an_oversized_image_needs_one(oa, tmp_path):
    big = picture(width=128, height=128)  # the server's max_width/height are 64
    mask = openai_mask(128, 128, (32, 32, 96, 96))
    with open(png_file(tmp_path, "big.png", big), "rb") as f:
        with pytest.raises(openai.BadRequestError) as e:
            oa.images.edit(image=f, prompt=PROMPT, extra_body=BASE)
    assert e.value.body["param"] == "image" and "64" in e.value.body["message"]
    with open(png_file(tmp_path, "big.png", big), "rb") as f, open(png_file(tmp_path, "m.png", mask), "rb") as m:
        result = oa.images.edit(image=f, mask=m, prompt=PROMPT, size="32x32", extra_body=BASE)
    assert decoded(result).size == (32, 32) and result.model_extra["diffsteer"]["mask"] == "mask"


# --- refusals ------------------------------------------------------------------------------------------------


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = _png_bytes(picture())
BAD_UPLOADS = [
    ({"image": ("in.png", b"not an image at all", "image/png")}, "image", "cannot be read"),
    ({"image": ("in.png", GOOD[: len(GOOD) // 2], "image/png")}, "image", "cannot be read"),
    ({"image": ("in.png", b"", "image/png")}, "image", "empty"),
    ({"image": ("in.png", GOOD, "image/png"), "mask": ("m.png", b"GIF89a...", "image/png")}, "mask", "cannot be read"),
    (
        {"image": ("in.png", GOOD, "image/png"), "mask": ("m.png", _png_bytes(openai_mask(16, 16, (0, 0, 8, 8))))},
        "mask",
        "the image's size",
    ),
    ({"image": ("in.png", GOOD, "image/png"), "mask": ("m.png", _png_bytes(picture()))}, "mask", "no alpha channel"),
    (
        {"image": ("in.png", GOOD), "mask": ("m.png", _png_bytes(openai_mask(box=(0, 0, 0, 0))))},
        "mask",
        "no fully transparent pixel",
    ),
]


@pytest.mark.parametrize(("files", "param", "words"), BAD_UPLOADS)
def test_bad_uploads_are_400_naming_the_field(oa, files, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        oa.images.edit(prompt=PROMPT, **{k: v for k, v in files.items()})
    body = e.value.body
    assert e.value.status_code == 400 and body["param"] == param and body["type"] == "invalid_request_error"
    assert words in body["message"], body


def test_missing_or_misplaced_image_and_other_bad_forms(server, oa):
    def post(**kwargs):
        r = httpx.post(
            f"{server.url}/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, **kwargs
        )
        assert r.status_code == 400, r.text
        return r.json()["error"]

    assert post(files={"prompt": (None, PROMPT)})["param"] == "image"  # no image
    assert post(files={"prompt": (None, PROMPT), "image": (None, "aGVsbG8=")})["param"] == "image"  # not a file
    assert post(data={"prompt": PROMPT}, files={"image": ("in.png", GOOD), "n": ("n.txt", b"2")})["param"] == "n"
    assert post(files={"image": ("in.png", GOOD)})["param"] == "prompt"
    two = [("image[]", ("a.png", GOOD)), ("image[]", ("b.png", GOOD))]
    assert "one image" in post(data={"prompt": PROMPT}, files=two)["message"]
    assert post(json={"prompt": PROMPT})["param"] == "body"  # not a form
    assert post(data={"prompt": PROMPT, "unknown_option": "1"}, files={"image": ("in.png", GOOD)})["param"] == (
        "unknown_option"
    )
    assert post(data={"prompt": PROMPT, "n": "2", "n[]": "3"}, files={"image": ("i.png", GOOD)})["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        oa.images.edit(image=("in.png", GOOD), prompt=PROMPT, response_format="url")
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        oa.images.edit(image=("in.png", GOOD), prompt=PROMPT, extra_body={"strength": 2})
    assert e.value.body["param"] == "strength"
    with pytest.raises(openai.BadRequestError) as e:
        oa.images.edit(image=("in.png", GOOD), prompt=PROMPT, size="30x30")
    assert e.value.body["param"] == "size"


def test_uploads_count_against_max_upload_bytes_and_need_the_key(server, oa):
    huge = os.urandom(server.app.state.settings.max_upload_bytes + 1)
    with pytest.raises(openai.APIStatusError) as e:
        oa.images.edit(image=("in.png", huge), prompt=PROMPT)
    assert e.value.status_code == 413 and e.value.body["field"] == "body"
    assert "max_upload_bytes" in e.value.body["message"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.images.edit(image=("in.png", GOOD), prompt=PROMPT)


# --- the form's encoding and the published schema -----------------------------------------------------------


def test_form_fields_read_text_json_and_brackets():
    from starlette.datastructures import FormData

    from diffsteer.guidance.errors import InvalidInput
    from diffsteer.service.routers.common import form_fields
    from diffsteer.service.routers.openai_images import FILE_FIELDS

    form = FormData(
        [
            ("prompt", "123"),  # text fields stay text
            ("n", "2"),
            ("policy[name]", "cfg"),
            ("policy[scale]", "4.5"),
            ("policy[scales][]", "1"),
            ("policy[scales][]", "2"),
            ("lora[][name]", "a"),
            ("lora[][weight]", "0.5"),
            ("lora[][name]", "b"),
            ("lora[][weight]", "1"),
            ("seeds", "7"),
            ("negative_prompt", "null"),
            ("stream", "false"),
            ("image", "skipped"),
        ]
    )
    assert form_fields(form, skip=FILE_FIELDS) == {
        "prompt": "123",
        "n": 2,
        "policy": {"name": "cfg", "scale": 4.5, "scales": [1, 2]},
        "lora": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 1}],
        "seeds": [7],
        "stream": False,
    }
    assert form_fields(FormData([("policy", "apg:scale=3"), ("seeds", "[1, 2]")])) == {
        "policy": "apg:scale=3",
        "seeds": [1, 2],
    }
    for bad, field in (
        ([("n", "1"), ("n", "2")], "n"),
        ([("policy", "cfg"), ("policy[name]", "cfg")], "policy"),
        ([("a]b", "1")], "a]b"),
        ([("policy" + "[x]" * 40, "1")], "policy"),  # deeper than any field nests
    ):
        with pytest.raises(InvalidInput) as e:
            form_fields(FormData(bad))
        assert e.value.field == field


def test_the_route_is_in_the_openapi_document_as_a_bounded_form(server):
    schema = server.app.openapi()
    operation = schema["paths"]["/v1/images/edits"]["post"]
    ref = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert form["required"] == ["image", "prompt"] and form["additionalProperties"] is False
    props = form["properties"]
    assert props["image"]["format"] == "binary" and props["mask"]["format"] == "binary"
    limits = schema["info"]["x-diffsteer-limits"]
    assert props["n"]["anyOf"][0]["maximum"] == limits["max_num_images"]
    assert props["steps"]["anyOf"][0]["maximum"] == limits["max_steps"]
    assert props["strength"]["anyOf"][0] == {"type": "number", "minimum": 0.0, "maximum": 1.0}
    assert {"400", "401", "413", "429", "503", "504"} <= set(operation["responses"]) and "422" not in operation[
        "responses"
    ]
