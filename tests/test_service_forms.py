"""Multipart forms on ``POST /generate`` and ``POST /jobs`` (``init_image``/``mask`` as file parts, the other
fields as the JSON body's), the same images as the JSON body with base64 images; bad parts are 4xx naming the
field; the upload body limit (``max_upload_bytes``) of the routes that upload images, apart from the JSON limit."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from test_service_support import app_client, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

BODY = {"prompt": "a red cat on a blue square", "steps": 3, "seed": 11, "policy": "cfg:scale=4", "strength": 0.7}
MAX_BODY, MAX_UPLOAD = 8192, 64 * 1024


@pytest.fixture(scope="module")
def client(one_thread):  # noqa: F811
    with app_client(max_body_bytes=MAX_BODY, max_upload_bytes=MAX_UPLOAD, batching=False) as c:
        yield c


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(size: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return png(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))


def mask() -> bytes:
    area = Image.new("L", (32, 32), 0)
    area.paste(255, (8, 8, 24, 24))
    return png(area)


def as_form(body: dict) -> dict[str, str]:
    """A JSON body's fields as form fields: text as it is, the rest as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_a_form_with_image_files_gives_the_json_bodys_images(client):
    init, area = picture(), mask()
    by_json = client.post("/generate", json={**BODY, "init_image": b64(init), "mask": b64(area), "mask_blur": 2})
    assert by_json.status_code == 200, by_json.text
    by_form = client.post(
        "/generate",
        data=as_form({**BODY, "mask_blur": 2}),
        files={"init_image": ("init.png", init, "image/png"), "mask": ("mask.png", area, "image/png")},
    )
    assert by_form.status_code == 200, by_form.text
    assert by_form.json()["images"] == by_json.json()["images"]
    # an image as a text part (a data URL; a part without a filename) is read as in a JSON body
    data_url = "data:image/png;base64," + b64(init)
    by_text = client.post("/generate", data=as_form(BODY), files={"init_image": (None, data_url)})
    plain = client.post("/generate", json={**BODY, "init_image": b64(init)})
    assert by_text.status_code == 200 and by_text.json()["images"] == plain.json()["images"]
    assert by_text.json()["images"] != by_json.json()["images"]  # the mask mattered


def test_a_form_job_and_the_clients_bracket_keys(client):
    init = picture(seed=1)
    fields = {"prompt": "x", "steps": "2", "seed": "3", "policy[name]": "cfg", "policy[scale]": "5", "strength": "0.5"}
    r = client.post("/jobs", data=fields, files={"init_image": ("a.png", init, "image/png")})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    for _ in range(600):
        status = client.get(f"/jobs/{job}").json()
        if status["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert status["status"] == "succeeded", status
    expected = client.post(
        "/generate",
        json={
            "prompt": "x",
            "steps": 2,
            "seed": 3,
            "policy": {"name": "cfg", "scale": 5},
            "strength": 0.5,
            "init_image": b64(init),
        },
    )
    assert status["result"]["images"] == expected.json()["images"]


@pytest.mark.parametrize(
    ("fields", "files", "field", "words"),
    [
        ({}, {"init_image": ("a.png", b"not an image at all", "image/png")}, "init_image", "cannot be read"),
        ({}, {"init_image": ("a.png", picture()[:60], "image/png")}, "init_image", "cannot be read"),  # truncated
        ({}, {"init_image": ("a.png", b"", "image/png")}, "init_image", "empty file"),
        ({}, {"mask": ("m.png", mask(), "image/png")}, "mask", "needs init_image"),
        ({"colour": "red"}, {}, "colour", "Extra inputs"),  # an unknown field
        ({}, {"image": ("a.png", picture(), "image/png")}, "image", "init_image, mask"),  # an unknown file part
        ({}, {"prompt": ("p.txt", b"a cat", "text/plain")}, "prompt", "got a file"),
        ({"steps": "many"}, {}, "steps", "integer"),
        ({"seed": "1", "seeds": "[1]"}, {}, "seeds", ""),
        ({"policy[name]": "cfg", "policy": "apg"}, {}, "policy", ""),
    ],
)
def test_bad_form_parts_are_4xx_naming_the_field(client, fields, files, field, words):
    base = {"prompt": "x", "steps": "2", "strength": "0.5"}
    if field != "mask" and "init_image" not in files and field != "image":
        files = {**files, "init_image": ("a.png", picture(), "image/png")}
    for route in ("/generate", "/jobs"):
        r = client.post(route, data={**base, **fields}, files=files)
        assert r.status_code == 422, (route, r.status_code, r.text)
        error = r.json()["error"]
        assert error["field"] == field and words in error["message"], (route, error)


def test_bodies_of_other_kinds_are_refused_naming_the_accepted_ones(client):
    r = client.post("/generate", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"
    assert "multipart/form-data" in r.json()["error"]["message"]
    r = client.post("/generate", content=b'{"prompt": ' + b"[" * 7_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"
    r = client.post("/jobs")
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"


# --- the upload body limit -----------------------------------------------------------------------------------


def noise_png(nbytes: int) -> bytes:
    """A valid PNG of about ``nbytes`` (noise does not compress)."""
    side = int((nbytes / 3) ** 0.5) + 1
    return png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)))


def assert_413(r, setting: str) -> None:
    assert r.status_code == 413, (r.status_code, r.text[:200])
    error = r.json()["error"]
    assert error["field"] == "body" and setting in error["message"], error


def test_uploads_have_their_own_body_limit(client):
    between = noise_png(3 * MAX_BODY)  # above the JSON limit, below the upload limit
    assert MAX_BODY < len(between) < MAX_UPLOAD // 2
    # a form with the image passes the body limit (the image is larger than the model's maximum size: 422)
    r = client.post("/generate", data={"prompt": "x"}, files={"init_image": ("a.png", between, "image/png")})
    assert r.status_code == 422 and r.json()["error"]["field"] in ("init_image", "width"), r.text
    r = client.post("/jobs", data={"prompt": "x"}, files={"init_image": ("a.png", between, "image/png")})
    assert r.status_code == 422, r.text
    # the same image in a JSON body is above max_body_bytes
    assert_413(client.post("/generate", json={"prompt": "x", "init_image": b64(between)}), "max_body_bytes")
    assert_413(client.post("/v1/images/generations", json={"prompt": "x" * 2 * MAX_BODY}), "max_body_bytes")
    # A1111's img2img and png-info, and OpenAI's edits, take uploads whatever the content type
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64(between)], "steps": 2})
    assert r.status_code != 413, r.text[:200]
    r = client.post("/sdapi/v1/png-info", json={"image": b64(between)})
    assert r.status_code == 200, r.text[:200]
    r = client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", between, "image/png")})
    assert r.status_code != 413, r.text[:200]
    # above the upload limit: 413 naming it, declared or streamed
    big = noise_png(MAX_UPLOAD)
    assert_413(
        client.post("/generate", data={"prompt": "x"}, files={"init_image": ("a.png", big, "image/png")}),
        "max_upload_bytes",
    )
    assert_413(
        client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", big, "image/png")}),
        "max_upload_bytes",
    )
    text = json.dumps({"prompt": "x", "init_images": [b64(big)]}).encode()

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for i in range(0, len(text), 4096):
            yield text[i : i + 4096]

    r = client.post("/sdapi/v1/img2img", content=chunks(), headers={"content-type": "application/json"})
    assert_413(r, "max_upload_bytes")


def test_the_form_and_the_limits_are_in_the_openapi_document(client):
    schema = client.app.openapi()
    limits = schema["info"]["x-diffsteer-limits"]
    assert limits["max_upload_bytes"] == MAX_UPLOAD and limits["max_body_bytes"] == MAX_BODY
    for path in ("/generate", "/jobs"):
        operation = schema["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert content["application/json"]["schema"]["$ref"].endswith("/GenerateRequest")
        assert content["multipart/form-data"]["schema"]["$ref"].endswith("/GenerateForm")
        assert "max_upload_bytes" in operation["responses"]["413"]["description"]
    form = schema["components"]["schemas"]["GenerateForm"]
    request = schema["components"]["schemas"]["GenerateRequest"]
    assert set(form["properties"]) == set(request["properties"])
    assert {"type": "string", "format": "binary"} in form["properties"]["init_image"]["anyOf"]
    assert form["properties"]["steps"] == request["properties"]["steps"]  # bounded like the JSON body
    assert "max_upload_bytes" in schema["paths"]["/sdapi/v1/img2img"]["post"]["responses"]["413"]["description"]
    assert "max_upload_bytes" not in schema["paths"]["/sdapi/v1/txt2img"]["post"]["responses"]["413"]["description"]


def test_repeated_parts_of_a_list_field_are_the_list():
    """OpenAPI's multipart encoding of an array (schemathesis, generated clients): one part per item."""
    from starlette.datastructures import FormData

    from diffsteer.service.routers.common import form_fields

    assert form_fields(FormData([("prompt", "a"), ("prompt", "b"), ("seeds", "1"), ("seeds", "2")])) == {
        "prompt": ["a", "b"],
        "seeds": [1, 2],
    }
    assert form_fields(FormData([("prompt", "[1]"), ("seeds", "[3, 4]")])) == {"prompt": "[1]", "seeds": [3, 4]}
