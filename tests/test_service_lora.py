"""LoRA adapters by name: made with peft on the tiny UNet, saved in diffusers format, applied per request
without leaking into concurrent requests on the shared model."""

from __future__ import annotations

import pytest
import torch
from test_service_support import TINY, UNetGate, app_client, engine_of, one_thread  # noqa: F401

from diffsteer.service.schemas import GenerateRequest

pytestmark = pytest.mark.usefixtures("one_thread")

BODY = {"prompt": "a red circle", "steps": 4, "seed": 5, "scheduler": "euler"}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from diffsteer.guidance.models import load_model

    folder = tmp_path_factory.mktemp("loras")
    donor = load_model(TINY, device="cpu")  # same architecture and weights as the served model
    donor.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in donor.unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter); make it do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(donor.unet))
    StableDiffusionPipeline.save_lora_weights(str(folder / "style"), unet_lora_layers=layers)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.safetensors"
    outside.write_bytes((folder / "style" / "pytorch_lora_weights.safetensors").read_bytes())
    (folder / "escape.safetensors").symlink_to(outside)  # a link out of lora_dir: neither listed nor loadable
    return folder


@pytest.fixture(scope="module")
def client(lora_dir, one_thread):  # noqa: F811
    with app_client(lora_dir=str(lora_dir), batching=True, max_concurrent=4, batch_window_ms=300.0) as c:
        yield c


def image(client, **extra):
    r = client.post("/generate", json={**BODY, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def run_concurrently(engine, bodies):
    tickets = [engine.submit(engine.plan(GenerateRequest.model_validate(b))) for b in bodies]
    return [t.future.result(timeout=60).result.pixels for t in tickets]


def test_lora_is_listed(client):
    assert client.get("/models").json()["loras"] == ["broken", "style"]


def test_lora_changes_the_image_and_weight_zero_is_the_base(client):
    base = image(client)
    styled = image(client, lora=[{"name": "style", "weight": 1.0}])
    assert styled["images"] != base["images"]
    assert styled["lora"] == [{"name": "style", "weight": 1.0}]
    assert "style:1" in styled["metadata"][0]["lora"]
    zero = image(client, lora=[{"name": "style", "weight": 0.0}])
    assert zero["images"] == base["images"] and zero["lora"] == []
    after = image(client)  # the adapter is off again for plain requests
    assert after["images"] == base["images"]


def test_concurrent_plain_request_is_unaffected(client):
    engine = engine_of(client)
    plain_alone, styled_alone = (
        run_concurrently(engine, [BODY]),
        run_concurrently(engine, [{**BODY, "lora": [{"name": "style"}]}]),
    )
    observed = []
    engine.device.on_batch = lambda rows, requests, seconds: observed.append(requests)
    try:
        with UNetGate(engine.models.get(engine.default_model).unet) as gate:
            mixed = run_concurrently(engine, [BODY, {**BODY, "lora": [{"name": "style"}]}, {**BODY, "seed": 6}])
    finally:
        engine.device.on_batch = engine.metrics.observe_batch
    assert (mixed[0] - plain_alone[0]).abs().max() <= 1e-5
    assert (mixed[1] - styled_alone[0]).abs().max() <= 1e-5
    assert (mixed[1] - plain_alone[0]).abs().max() > 1e-3
    assert max(observed) == 2  # the two plain requests shared calls; the LoRA one never joined them
    assert gate.calls == len(observed)


@pytest.mark.parametrize(
    ("lora", "field", "text"),
    [
        ([{"name": "missing"}], "lora.0.name", "available: broken, style"),
        ([{"name": "../style"}], "lora.0.name", "invalid LoRA name"),
        ([{"name": "style"}, {"name": "style", "weight": 0.5}], "lora.1.name", "twice"),
    ],
)
def test_bad_lora_requests(client, lora, field, text):
    r = client.post("/generate", json={**BODY, "lora": lora})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == field and text in r.json()["error"]["message"]


def test_unreadable_lora_fails_cleanly(client, lora_dir, caplog):
    r = client.post("/generate", json={**BODY, "lora": [{"name": "broken"}]})
    message = r.json()["error"]["message"]
    assert r.status_code == 422 and "cannot load LoRA 'broken'" in message
    assert str(lora_dir) not in message and "Error" not in message  # no server path, no library internals
    assert image(client)["images"] == image(client, seed=5)["images"]  # the server goes on serving
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = client.post("/generate", json={**BODY, "lora": [{"name": "broken"}]})
    assert again.status_code == 422 and again.json()["error"]["message"] == message
    assert not [r for r in caplog.records if "failed to load" in r.getMessage()]  # remembered, not loaded again


def test_a_lora_linking_out_of_the_folder_is_neither_listed_nor_loaded(client):
    assert "escape" not in client.get("/models").text
    r = client.post("/generate", json={**BODY, "lora": [{"name": "escape"}]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "lora.0.name"
