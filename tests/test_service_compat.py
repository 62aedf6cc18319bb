"""Drop-in compatibility, tested with the real client libraries against a real server: the official ``openai``
client on /v1/images/generations, and ``webuiapi`` (A1111) on /sdapi/v1/txt2img."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image
from test_service_support import live_server, one_thread, pixels  # noqa: F401

openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "compat-test-key"


@pytest.fixture(scope="module")
def server(one_thread):  # noqa: F811
    with live_server(api_keys=[KEY], batching=True) as s:
        yield s


def native(server, **body) -> Image.Image:
    import httpx

    r = httpx.post(f"{server.url}/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_generates(server, oa):
    result = oa.images.generate(
        prompt="a red circle",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"policy": "cfg:scale=4", "steps": 3, "seed": 9},
    )
    assert len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert all(im.size == (32, 32) and im.format == "PNG" for im in images)
    same = native(server, prompt="a red circle", policy="cfg:scale=4", steps=3, seed=9)
    assert torch.equal(pixels(images[0]), pixels(same))
    assert result.model_extra["diffsteer"]["seeds"] == [9, 10]


def test_openai_client_model_names_and_model_list(server, oa):
    result = oa.images.generate(prompt="a cat", model="dall-e-3", size="auto", extra_body={"steps": 2, "seed": 1})
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (32, 32)
    assert [m.id for m in oa.models.list()] == ["builtin:tiny"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"response_format": "url"}, "response_format"),
        ({"size": "big"}, "size"),
        ({"size": "30x30"}, "size"),
        ({"n": 99}, "n"),
        ({"extra_body": {"policy": "cfg:scale=x"}}, "policy.scale"),
        ({"extra_body": {"steps": 0}}, "steps"),
        ({"extra_body": {"unknown_option": 1}}, "unknown_option"),
        ({"model": "not-a-model"}, "model"),
    ],
)
def test_openai_client_errors_are_400_with_the_param(oa, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        oa.images.generate(prompt="a cat", **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    if param == "response_format":
        assert "b64_json" in e.value.body["message"]


def test_openai_client_without_key_is_refused(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(prompt="a cat")


@pytest.fixture(scope="module")
def webui(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="anyone", password=KEY)
    return api


def test_webuiapi_txt2img(server, webui):
    result = webui.txt2img(
        prompt="a blue square",
        negative_prompt="red",
        seed=5,
        steps=3,
        cfg_scale=5,
        width=32,
        height=32,
        sampler_name="Euler a",
        batch_size=2,
    )
    assert len(result.images) == 2 and result.images[0].size == (32, 32)
    assert result.info["seed"] == 5 and result.info["all_seeds"] == [5, 6]
    assert result.info["sampler_name"] == "Euler a" and len(result.info["infotexts"]) == 2
    assert "Seed: 5" in result.info["infotexts"][0]
    assert result.parameters["prompt"] == "a blue square"
    same = native(
        server,
        prompt="a blue square",
        negative_prompt="red",
        seed=5,
        steps=3,
        width=32,
        height=32,
        scheduler="euler_a",
        policy={"name": "cfg", "scale": 5},
    )
    assert torch.equal(pixels(result.images[0]), pixels(same))


def test_webuiapi_random_seed_and_policy_extension(server, webui):
    result = webui.txt2img(prompt="a tree", steps=2, width=32, height=32, sampler_name="DPM++ 2M", scheduler="Karras")
    seed = result.info["seed"]
    assert isinstance(seed, int) and seed >= 0 and result.info["all_seeds"] == [seed]
    again = webui.txt2img(prompt="a tree", steps=2, width=32, height=32, sampler_name="DPM++ 2M Karras", seed=seed)
    assert torch.equal(pixels(result.images[0]), pixels(again.images[0]))
    via_post = webui.session.post(
        f"{webui.baseurl}/txt2img",
        json={
            "prompt": "a tree",
            "steps": 2,
            "width": 32,
            "height": 32,
            "seed": 3,
            "cfg_scale": 6,
            "policy": "apg:eta=0",
        },
    )
    assert via_post.status_code == 200
    info = __import__("json").loads(via_post.json()["info"])
    assert info["policy"].startswith("apg:") and "scale=6" in info["policy"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sampler_name": "Euler b"}, "sampler_name"),
        ({"enable_hr": True}, "enable_hr"),
        ({"width": 31}, "width"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 9}, "batch_size"),
    ],
)
def test_webuiapi_errors_name_the_field(webui, kwargs, field):
    base = {"prompt": "a cat", "steps": 2, "width": 32, "height": 32, "sampler_name": "Euler"}
    with pytest.raises(RuntimeError) as e:
        webui.txt2img(**{**base, **kwargs})
    status, text = e.value.args
    assert status == 422 and f'"field":"{field}"' in text.replace(" ", "")
