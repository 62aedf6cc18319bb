"""The native API through TestClient: /generate (JSON and raw bytes), listings, limits, bad input, CORS, metrics."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from test_service_support import app_client, decode_image, engine_of, one_thread, pixels  # noqa: F401

from diffsteer.guidance.images import read_png_metadata
from diffsteer.guidance.registry import policy_names
from diffsteer.guidance.sampler import generate

pytestmark = pytest.mark.usefixtures("one_thread")

BODY = {"prompt": "a red circle", "steps": 3, "seed": 7}


@pytest.fixture(scope="module")
def client(one_thread):  # noqa: F811
    with app_client(max_body_bytes=8192, batching=True) as c:
        yield c


def test_generate_returns_images_and_metadata(client):
    r = client.post("/generate", json={**BODY, "policy": "apg:scale=6,eta=0", "num_images": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [7, 8] and body["format"] == "png"
    assert body["policy"].startswith("apg:") and "scale=6" in body["policy"]
    assert body["nfe"] == [6, 6] and body["steps"] == 3 and (body["width"], body["height"]) == (32, 32)
    assert set(body["timings"]) >= {"queued_s", "encode_s", "denoise_s", "decode_s", "total_s", "steps_s"}
    assert len(body["timings"]["steps_s"]) == 3
    assert isinstance(body["trace"], dict)
    for k, b64 in enumerate(body["images"]):
        image = decode_image(b64)
        assert image.size == (32, 32)
        meta = read_png_metadata(io.BytesIO(__import__("base64").b64decode(b64)))
        assert meta["seed"] == 7 + k and meta["policy"] == body["policy"] and meta["nfe"] == 6
        assert "Steps: 3" in image.text["parameters"]


def test_generate_equals_the_library(client):
    """The service (device worker, batcher) gives the library's pixels for the same request."""
    engine = engine_of(client)
    model = engine.models.get(engine.default_model)
    r = client.post("/generate", json={**BODY, "scheduler": "euler_a", "policy": "cfg:scale=4"})
    expected = generate(model, {**BODY, "scheduler": "euler_a", "policy": "cfg:scale=4"}).images[0]
    assert torch.equal(pixels(decode_image(r.json()["images"][0])), pixels(expected))


def test_random_seed_is_returned_and_reproduces(client):
    body = {k: v for k, v in BODY.items() if k != "seed"}
    first = client.post("/generate", json=body).json()
    seed = first["seeds"][0]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    again = client.post("/generate", json={**body, "seed": seed}).json()
    assert again["images"] == first["images"]


def test_policy_string_and_object_are_the_same(client):
    a = client.post("/generate", json={**BODY, "policy": "cfg:scale=3,rescale=0.5"}).json()
    b = client.post("/generate", json={**BODY, "policy": {"name": "cfg", "scale": 3, "rescale": 0.5}}).json()
    assert a["images"] == b["images"] and a["policy"] == b["policy"]


def test_raw_png_with_accept_header(client):
    r = client.post("/generate", json=BODY, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-diffsteer-seed"] == "7" and r.headers["x-diffsteer-nfe"] == "6"
    assert read_png_metadata(r.content)["seed"] == 7
    as_json = client.post("/generate", json=BODY).json()
    assert torch.equal(pixels(Image.open(io.BytesIO(r.content))), pixels(decode_image(as_json["images"][0])))


def test_raw_bytes_need_one_image(client):
    r = client.post("/generate", json={**BODY, "num_images": 2}, headers={"Accept": "image/png"})
    assert r.status_code == 406 and r.json()["error"]["field"] == "num_images"


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_other_output_formats(client, fmt):
    r = client.post("/generate", json={**BODY, "output_format": fmt})
    assert r.status_code == 200 and r.json()["format"] == fmt
    assert decode_image(r.json()["images"][0]).format == fmt.upper()


def test_listings_and_health(client):
    policies = client.get("/policies").json()
    names = [p["name"] for p in policies["policies"]]
    assert names == policy_names()
    for row in policies["policies"]:
        assert row["schema"]["type"] == "object" and "properties" in row["schema"]
    assert "euler_a" in policies["schedulers"]
    models = client.get("/models").json()
    assert models["default"] == "builtin:tiny"
    assert models["models"][0]["loaded"] and models["models"][0]["native_size"] == 32
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"


# One bad value per field: a 4xx naming the field, never a 5xx.
BAD_FIELDS = [
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", 3]}, "prompt.1"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"negative_prompt": 3}, "negative_prompt"),
    ({"policy": "nope:scale=2"}, "policy.name"),
    ({"policy": "cfg:scale=abc"}, "policy.scale"),
    ({"policy": "cfg:bogus=1"}, "policy.bogus"),
    ({"policy": {"name": "apg", "eta": "x"}}, "policy.eta"),
    ({"policy": "cfg:scales=[1,2]"}, "policy.scales"),
    ({"policy": 12}, "policy"),
    ({"steps": 0}, "steps"),
    ({"steps": "many"}, "steps"),
    ({"steps": 51}, "steps"),
    ({"scheduler": "fastest"}, "scheduler"),
    ({"width": 30}, "width"),
    ({"width": 4096}, "width"),
    ({"height": -8}, "height"),
    ({"height": 128}, "height"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seeds": [1, 2], "num_images": 3}, "seeds"),
    ({"seed": 1, "seeds": [1]}, "seeds"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": 5}, "num_images"),
    ({"eta": 2.0}, "eta"),
    ({"output_format": "gif"}, "output_format"),
    ({"model": "some/other-model"}, "model"),
    ({"lora": [{"name": "style"}]}, "lora.0.name"),
    ({"lora": [{"name": "x", "weight": 99}]}, "lora.0.weight"),
    ({"lora": "style"}, "lora"),
    ({"unexpected": 1}, "unexpected"),
]


@pytest.mark.parametrize(("change", "field"), BAD_FIELDS, ids=[f for _, f in BAD_FIELDS])
def test_bad_input_names_the_field(client, change, field):
    body = {**BODY, **change}
    for route in ("/generate", "/jobs"):
        r = client.post(route, json=body)
        assert 400 <= r.status_code < 500, (route, r.status_code, r.text)
        error = r.json()["error"]
        assert error["field"] == field, error
        assert error["message"]


def test_malformed_and_missing_bodies(client):
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"
    r = client.post("/generate")
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"
    r = client.post("/generate", json=[1, 2])
    assert r.status_code == 422


def test_body_size_limit(client):
    big = {**BODY, "prompt": "a " * 5000}
    r = client.post("/generate", json=big)
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"

    def chunks():  # no Content-Length: the limit still holds while streaming
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_cors_is_off_unless_configured(client):
    r = client.options("/generate", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = client.get("/healthz", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_when_configured(one_thread):  # noqa: F811
    with app_client(cors_origins=["http://ui.example"], preload=False) as c:
        ok = c.options("/generate", headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
        assert ok.headers.get("access-control-allow-origin") == "http://ui.example"
        other = c.get("/healthz", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_metrics_after_requests(client):
    from prometheus_client.parser import text_string_to_metric_families

    before = client.post("/generate", json={**BODY, "num_images": 2}).json()
    client.post("/generate", json={**BODY, "steps": 0})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)

    def value(name, **labels):
        return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("diffsteer_http_requests_total", route="/generate", method="POST", status="200") >= 1
    assert value("diffsteer_http_requests_total", route="/generate", method="POST", status="422") >= 1
    assert value("diffsteer_http_request_duration_seconds_count", route="/generate") >= 2
    assert value("diffsteer_images_generated_total", model="builtin:tiny") >= 2
    assert value("diffsteer_nfe_total", model="builtin:tiny") >= sum(before["nfe"])
    assert value("diffsteer_unet_batch_rows_count") >= 3
    assert value("diffsteer_unet_batch_rows_sum") >= 3 * 2 * 2  # this request alone: 3 calls of 2x2 rows
    assert "diffsteer_queue_depth" in samples and "diffsteer_generations_running" in samples
    assert value("diffsteer_generations_total", outcome="succeeded") >= 1
    # routes are labelled by template (job ids never become labels)
    client.get("/jobs/no-such-job")
    templates = set(client.app.openapi()["paths"]) | {"unmatched"}
    r = client.get("/metrics")
    routes = {
        s.labels["route"]
        for f in text_string_to_metric_families(r.text)
        for s in f.samples
        if s.name == "diffsteer_http_requests_total"
    }
    assert "/jobs/{job_id}" in routes and routes <= templates
