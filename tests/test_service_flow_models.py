"""Every service surface on the flow-matching families (SD3, FLUX.1 dev/schnell, Qwen-Image, ...), on their tiny
random-weight builtins: the model listing, /generate, /jobs, the OpenAI and A1111 routes (Forge's samplers,
schedule types, ``distilled_cfg_scale`` and infotexts), cross-request batching on the device worker, LoRA
hot-loading of transformer LoRAs, the cost accounting and the CLI."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from test_infotext import parse_generation_parameters
from test_service_batching import batch_histogram
from test_service_jobs import wait_job
from test_service_support import app_client, decode_image, engine_of, live_server, one_thread, read_events  # noqa: F401

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.models import TINY_MODELS
from diffsteer.guidance.sampler import generate
from diffsteer.guidance.schedulers import scheduler_names
from diffsteer.service.schemas import GenerateRequest, ModelsResponse

pytestmark = pytest.mark.usefixtures("one_thread")

FLUX = "builtin:tiny-flux"
SCHNELL = "builtin:tiny-flux-schnell"
SD3 = "builtin:tiny-sd3"
QWEN = "builtin:tiny-qwenimage"
UNET = "builtin:tiny"
FLOW_MODELS = [spec for spec, tiny in TINY_MODELS.items() if tiny.family in ("sd3", "flux", "qwenimage", "zimage")]
OTHERS = [spec for spec in FLOW_MODELS if spec != FLUX]
BODY = {"prompt": "a red circle above a blue square", "steps": 3, "seed": 7, "policy": "cfg:scale=2"}
FORGE_FLUX = {  # what Forge's FLUX preset sends
    "prompt": "a red circle above a blue square",
    "steps": 3,
    "seed": 7,
    "sampler_name": "Euler",
    "scheduler": "Simple",
    "cfg_scale": 1,
    "distilled_cfg_scale": 3.5,
    "width": 32,
    "height": 32,
}


@pytest.fixture(scope="module")
def client(one_thread):  # noqa: F811
    with app_client(model=FLUX, models=[*OTHERS, UNET], batching=False, job_ttl_s=120.0) as c:
        yield c


def image_array(b64: str) -> np.ndarray:
    return np.asarray(decode_image(b64).convert("RGB"), dtype=np.int16)


def library_image(spec: str, client, **params) -> np.ndarray:
    model = engine_of(client).models.get(spec)
    return np.asarray(generate(model, {**BODY, **params}).images[0], dtype=np.int16)


def post_ok(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def infotext_of(b64: str) -> dict[str, str]:
    return parse_generation_parameters(Image.open(io.BytesIO(base64.b64decode(b64))).text["parameters"])


# --- the model listing ---------------------------------------------------------------------------------------


def test_the_model_listing_says_family_schedulers_and_distilled_guidance(client):
    listing = client.get("/models").json()
    ModelsResponse.model_validate(listing)
    rows = {row["name"]: row for row in listing["models"]}
    assert set(rows) == {*FLOW_MODELS, UNET}
    flux = rows[FLUX]
    assert flux["loaded"] and flux["default"]
    assert (flux["family"], flux["family_title"], flux["schedule"]) == ("flux", "FLUX.1", "flow")
    assert flux["schedulers"] == scheduler_names("flow") and flux["distilled_guidance"] is True
    assert flux["size_multiple"] == 4 and flux["native_size"] == 32  # the tiny VAE's 2 × patch 2
    for spec in OTHERS:  # not loaded: read from the builtin's description, without loading it
        row = rows[spec]
        assert row["family"] == TINY_MODELS[spec].family and row["schedule"] == "flow"
        assert row["schedulers"] == scheduler_names("flow") and row["distilled_guidance"] is False
    assert rows[UNET]["family"] == "sd" and rows[UNET]["schedule"] == "vp"
    assert rows[UNET]["schedulers"] == scheduler_names() and rows[UNET]["distilled_guidance"] is False
    assert engine_of(client).loaded_model(SCHNELL) is None  # listing loaded nothing


def test_the_openapi_schema_carries_the_flow_fields(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name, field in (
        ("GenerateRequest", "distilled_guidance"),
        ("OpenAIImageRequest", "distilled_guidance"),
        ("Txt2ImgRequest", "distilled_cfg_scale"),
        ("ModelInfo", "schedulers"),
        ("GenerateResponse", "distilled_guidance"),
    ):
        assert field in schemas[name]["properties"], (name, field)
    schedule_types = schemas["Txt2ImgRequest"]["properties"]["scheduler"]["anyOf"][0]["enum"]
    assert "Simple" in schedule_types


# --- /generate and /jobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", FLOW_MODELS)
def test_generate_on_each_flow_model_is_the_library_image(client, spec):
    r = post_ok(client, "/generate", {**BODY, "model": spec})
    assert (r["model"], r["width"], r["height"]) == (spec, 32, 32)
    assert np.abs(image_array(r["images"][0]) - library_image(spec, client)).max() == 0
    meta = r["metadata"][0]
    assert (meta["sampler"], meta["schedule_type"]) == ("Euler", "Simple")
    distilled = 3.5 if TINY_MODELS[spec].guidance_embeds else None
    assert r["distilled_guidance"] == meta.get("distilled_guidance") == distilled
    info = infotext_of(r["images"][0])
    assert (info["Sampler"], info["Schedule type"], info["Steps"], info["Seed"]) == ("Euler", "Simple", "3", "7")
    assert info.get("Distilled CFG Scale") == (None if distilled is None else "3.5")


def test_distilled_guidance_reaches_a_distilled_model(client):
    base = post_ok(client, "/generate", BODY)
    five = post_ok(client, "/generate", {**BODY, "distilled_guidance": 5})
    assert five["images"] != base["images"]
    assert np.abs(image_array(five["images"][0]) - library_image(FLUX, client, distilled_guidance=5)).max() == 0
    assert five["distilled_guidance"] == 5 and five["metadata"][0]["distilled_guidance"] == 5
    text = Image.open(io.BytesIO(base64.b64decode(five["images"][0]))).text["parameters"]
    assert "CFG scale: 2.0, Distilled CFG Scale: 5.0, Seed: 7" in text  # where Forge writes it
    default = post_ok(client, "/generate", {**BODY, "distilled_guidance": 3.5})
    assert default["images"] == base["images"]


@pytest.mark.parametrize("spec", [SCHNELL, SD3, QWEN, UNET])
def test_models_without_the_input_refuse_distilled_guidance(client, spec):
    for path in ("/generate", "/jobs"):
        r = client.post(path, json={**BODY, "model": spec, "distilled_guidance": 3.5})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "distilled_guidance"


def test_flow_models_take_the_flow_schedulers_and_name_them_when_refusing(client):
    seen = set()
    for name in scheduler_names("flow"):
        r = post_ok(client, "/generate", {**BODY, "scheduler": name})
        assert r["scheduler"] == name
        seen.add(image_array(r["images"][0]).tobytes())
    assert len(seen) == len(scheduler_names("flow")) - 1  # "default" is FLUX's own Euler
    r = client.post("/generate", json={**BODY, "scheduler": "ddim"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "scheduler"
    assert "euler, heun, dpmpp_2m, unipc" in r.json()["error"]["message"]


def test_a_job_on_qwen_image_streams_steps_with_previews(client):
    body = {**BODY, "model": QWEN, "prompt": "a small green tree"}
    job = client.post("/jobs", json=body)
    assert job.status_code == 202, job.text
    with client.stream("GET", f"/jobs/{job.json()['id']}/events", params={"preview": "true"}) as r:
        events = read_events(r)
    assert events[-1][1] == "succeeded"
    steps = [data for _, kind, data in events if kind == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    previews = [s for s in steps if "preview" in s]
    assert previews and decode_image(previews[-1]["preview"][0]).size == (16, 16)  # Qwen-Image's video VAE
    done = wait_job(client, job.json()["id"])
    assert done["result"]["images"] == post_ok(client, "/generate", body)["images"]


# --- the OpenAI route ----------------------------------------------------------------------------------------


def test_openai_route_on_flow_models(client):
    body = {"prompt": BODY["prompt"], "size": "32x32", "steps": 3, "seed": 7, "policy": "cfg:scale=2"}
    r = post_ok(client, "/v1/images/generations", {**body, "model": FLUX, "distilled_guidance": 5})
    assert r["diffsteer"]["distilled_guidance"] == 5 and r["diffsteer"]["model"] == FLUX
    direct = post_ok(client, "/generate", {**BODY, "distilled_guidance": 5})
    assert r["data"][0]["b64_json"] == direct["images"][0]
    r = client.post("/v1/images/generations", json={**body, "model": SD3, "distilled_guidance": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "distilled_guidance"
    r = post_ok(client, "/v1/images/generations", {**body, "model": QWEN, "scheduler": "unipc"})
    assert r["diffsteer"]["scheduler"] == "unipc" and r["diffsteer"]["distilled_guidance"] is None


# --- the A1111 / Forge routes ----------------------------------------------------------------------------------


def test_a_forge_flux_request_is_served_as_forge_would(client):
    r = post_ok(client, "/sdapi/v1/txt2img", {**FORGE_FLUX, "override_settings": {"sd_model_checkpoint": FLUX}})
    info = json.loads(r["info"])
    assert (info["sampler_name"], info["scheduler"], info["cfg_scale"]) == ("Euler", "Simple", 1.0)
    assert info["distilled_cfg_scale"] == 3.5 and info["sd_model_name"] == FLUX
    text = parse_generation_parameters(info["infotexts"][0])
    assert text == infotext_of(r["images"][0])  # info and the PNG agree
    assert (text["Sampler"], text["Schedule type"], text["Distilled CFG Scale"]) == ("Euler", "Simple", "3.5")
    same = post_ok(client, "/generate", {**BODY, "policy": "cfg:scale=1", "scheduler": "euler"})
    assert r["images"][0] == same["images"][0]
    stronger = post_ok(client, "/sdapi/v1/txt2img", {**FORGE_FLUX, "distilled_cfg_scale": 6})
    assert stronger["images"][0] != r["images"][0]
    assert json.loads(stronger["info"])["distilled_cfg_scale"] == 6


@pytest.mark.parametrize("spec", [SCHNELL, SD3, UNET])
def test_forge_distilled_cfg_scale_is_ignored_by_models_without_it(client, spec):
    body = {**FORGE_FLUX, "model": spec}
    if spec == UNET:
        body = {**body, "scheduler": "Automatic"}
    sent = post_ok(client, "/sdapi/v1/txt2img", body)
    left_out = post_ok(client, "/sdapi/v1/txt2img", {k: v for k, v in body.items() if k != "distilled_cfg_scale"})
    assert sent["images"] == left_out["images"]
    info = json.loads(sent["info"])
    assert info["distilled_cfg_scale"] is None and "Distilled CFG Scale" not in info["infotexts"][0]


@pytest.mark.parametrize(
    ("sampler", "schedule", "ours"),
    [
        ("Euler", None, "euler"),
        ("Heun", "Simple", "heun"),
        ("DPM++ 2M", "Simple", "dpmpp_2m"),
        ("UniPC", None, "unipc"),
    ],
)
def test_forge_samplers_map_to_the_flow_schedulers(client, sampler, schedule, ours):
    body = {**FORGE_FLUX, "model": QWEN, "sampler_name": sampler, "scheduler": schedule}
    r = post_ok(client, "/sdapi/v1/txt2img", body)
    info = json.loads(r["info"])
    assert (info["sampler_name"], info["scheduler"]) == (sampler, "Simple")
    direct = post_ok(client, "/generate", {**BODY, "model": QWEN, "policy": "cfg:scale=1", "scheduler": ours})
    assert r["images"][0] == direct["images"][0]


@pytest.mark.parametrize(
    ("change", "field", "text"),
    [
        ({"sampler_name": "DDIM"}, "sampler_name", "accepted values on builtin:tiny-flux (FLUX.1)"),
        ({"sampler_name": "Euler a"}, "sampler_name", "Euler, Heun, DPM++ 2M, UniPC"),
        ({"sampler_name": "DPM++ 2M Karras"}, "sampler_name", "has no flow-matching form"),
        ({"scheduler": "Karras"}, "scheduler", "accepted values: Automatic, Simple"),
        ({"distilled_cfg_scale": 101}, "distilled_cfg_scale", ""),
        ({"model": UNET, "scheduler": "Simple"}, "scheduler", "on flow-matching models"),
    ],
)
def test_a1111_refusals_on_flow_models_name_the_field(client, change, field, text):
    r = client.post("/sdapi/v1/txt2img", json={**FORGE_FLUX, **change})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field and text in r.json()["error"]["message"]


def test_a1111_listings(client):
    assert {"name": "simple", "label": "Simple"}.items() <= client.get("/sdapi/v1/schedulers").json()[-1].items()
    assert {m["title"] for m in client.get("/sdapi/v1/sd-models").json()} == {*FLOW_MODELS, UNET}
    assert {s["name"] for s in client.get("/sdapi/v1/samplers").json()} >= {"Euler", "Heun", "DPM++ 2M", "UniPC"}


# --- batching across requests on the device worker ---------------------------------------------------------------


class BackboneCalls:
    """Counts a transformer's forward calls and their rows."""

    def __init__(self, backbone: torch.nn.Module):
        self.calls = self.rows = 0
        self._lock = threading.Lock()
        self._handle = backbone.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # Z-Image: a list of images
        with self._lock:
            self.calls += 1
            self.rows += len(latents)

    def __enter__(self) -> BackboneCalls:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def run_together(spec: str, requests: list[dict]) -> None:
    """The requests concurrently on a batching server: they share backbone calls and get their images alone
    (within 1 grey level: float reassociation, and for padded texts the masked padding)."""
    with app_client(model=spec, batching=True, max_concurrent=4, batch_window_ms=500.0, max_batch_rows=32) as client:
        engine = engine_of(client)
        model = engine.models.get(spec)
        alone = [generate(model, r).pixels for r in requests]
        alone_calls = 0
        for r in requests:
            with BackboneCalls(model.backbone) as calls:
                generate(model, r)
            alone_calls += calls.calls
        with BackboneCalls(model.backbone) as calls:
            tickets = [engine.submit(engine.plan(GenerateRequest.model_validate(r))) for r in requests]
            outcomes = [t.future.result(timeout=60) for t in tickets]
        for outcome, expected in zip(outcomes, alone):
            assert (outcome.result.pixels - expected).abs().max().item() <= 1 / 255
        single, total = batch_histogram(engine)
        assert total > single, "some backbone call served several requests"
        assert calls.calls == total < alone_calls


def test_concurrent_flux_requests_share_backbone_calls():
    run_together(
        FLUX,
        [
            {**BODY, "prompt": "a red circle", "seed": 1, "steps": 4},
            {**BODY, "prompt": "a blue square", "seed": 2, "steps": 4, "distilled_guidance": 5, "num_images": 2},
        ],
    )


@pytest.mark.parametrize("spec", [s for s in FLOW_MODELS if TINY_MODELS[s].family in ("qwenimage", "zimage")])
def test_concurrent_requests_with_prompts_of_different_lengths_share_backbone_calls(spec):
    """Qwen-Image's and Z-Image's texts are as long as their prompts: the worker pads and masks them."""
    requests = [
        {**BODY, "prompt": "a cat", "seed": 1, "steps": 4},
        {**BODY, "prompt": "a very long prompt about a small dog asleep on a red sofa in the sun", "seed": 2},
    ]
    run_together(spec, requests)


# --- transformer LoRAs -----------------------------------------------------------------------------------------


def make_lora(spec: str, folder, seed: int = 0) -> None:
    """A LoRA for ``spec``'s backbone made with peft, random non-zero, saved as its family's pipeline saves."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from diffsteer.guidance.models import load_model

    donor = load_model(spec, device="cpu")
    donor.backbone.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in donor.backbone.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter)
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    layers = get_peft_model_state_dict(donor.backbone)
    if donor.family.name == "flux":
        FluxPipeline.save_lora_weights(str(folder), transformer_lora_layers=layers)
    elif donor.family.name == "sd3":
        StableDiffusion3Pipeline.save_lora_weights(str(folder), transformer_lora_layers=layers)
    else:
        StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=convert_state_dict_to_diffusers(layers))


@pytest.fixture(scope="module")
def lora_client(tmp_path_factory, one_thread):  # noqa: F811
    folder = tmp_path_factory.mktemp("loras")
    make_lora(FLUX, folder / "flux_style")
    make_lora(SD3, folder / "sd3_style")
    make_lora(UNET, folder / "unet_style")
    with app_client(model=FLUX, models=[SD3, UNET], lora_dir=str(folder), batching=False) as c:
        yield c


@pytest.mark.parametrize(("spec", "lora"), [(FLUX, "flux_style"), (SD3, "sd3_style")])
def test_a_transformer_lora_changes_the_image_and_goes_away(lora_client, spec, lora):
    body = {**BODY, "model": spec}
    base = post_ok(lora_client, "/generate", body)
    styled = post_ok(lora_client, "/generate", {**body, "lora": [{"name": lora, "weight": 1.0}]})
    assert styled["images"] != base["images"] and styled["metadata"][0]["lora"] == f"{lora}:1"
    half = post_ok(lora_client, "/generate", {**body, "lora": [{"name": lora, "weight": 0.5}]})
    assert half["images"] not in (base["images"], styled["images"])
    assert post_ok(lora_client, "/generate", body)["images"] == base["images"]  # off again for plain requests


def test_a_served_flux_lora_is_the_lora_diffusers_loads(lora_client, tmp_path):
    from diffsteer.guidance.models import load_model

    folder = engine_of(lora_client).loras.folder / "flux_style"
    model = load_model(FLUX, device="cpu")
    model.to_pipeline().load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    direct = np.asarray(generate(model, BODY).images[0], dtype=np.int16)
    served = post_ok(lora_client, "/generate", {**BODY, "lora": [{"name": "flux_style"}]})
    assert np.abs(image_array(served["images"][0]) - direct).max() <= 1


@pytest.mark.parametrize(
    ("spec", "lora", "text"),
    [
        (FLUX, "unet_style", "is for a UNet model"),
        (SD3, "unet_style", "is for a UNet model"),
        (UNET, "flux_style", "is for a transformer model"),
    ],
)
def test_a_lora_for_the_other_kind_of_backbone_is_refused_before_it_queues(lora_client, spec, lora, text):
    for path in ("/generate", "/jobs"):
        r = lora_client.post(path, json={**BODY, "model": spec, "lora": [{"name": lora}]})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "lora.0.name" and text in r.json()["error"]["message"]


def test_loading_a_lora_that_does_not_fit_is_refused_and_leaves_the_model_clean(lora_client):
    from diffsteer.guidance.models import load_model

    engine = engine_of(lora_client)
    flux = engine.models.get(FLUX)
    control = engine.control_for(flux)
    with pytest.raises(InvalidInput, match="is for a UNet model"):
        engine.device.run_task(lambda: control.activate((("unet_style", 1.0),)))
    sd3 = engine.models.get(SD3)  # FLUX's LoRA names SD3's layers in part (transformer_blocks.0.attn.to_q...)
    with pytest.raises(InvalidInput, match=r"only \d+ of its \d+ transformer layers match"):
        engine.device.run_task(lambda: engine.control_for(sd3).activate((("flux_style", 1.0),)))
    assert "flux_style" not in engine.control_for(sd3).loaded()
    r = lora_client.post("/generate", json={**BODY, "model": SD3, "lora": [{"name": "flux_style"}]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "lora.name"
    plain = post_ok(lora_client, "/generate", {**BODY, "model": SD3})  # no adapter left active
    fresh = generate(load_model(SD3, device="cpu"), BODY).images[0]
    assert np.abs(image_array(plain["images"][0]) - np.asarray(fresh, dtype=np.int16)).max() == 0


# --- the cost model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "size"), [(FLUX, 32), (FLUX, 64), (QWEN, 48)])
def test_the_device_charges_a_flow_request_what_its_admission_counted(client, spec, size):
    engine = engine_of(client)
    body = {**BODY, "model": spec, "width": size, "height": size, "num_images": 2}
    plan = engine.plan(GenerateRequest.model_validate(body))
    ticket = engine.submit(plan)
    ticket.future.result(timeout=60)
    assert ticket.cost == pytest.approx(plan.checked.cost.total)
    assert ticket.cost_done == pytest.approx(ticket.cost)  # the units' costs add up to the checked cost
    if size != 32:
        # a transformer's evaluation grows with its image + text tokens, not with the area alone
        assert plan.checked.cost.evaluation_factor != pytest.approx((size / 32) ** 2)


def test_flow_requests_are_refused_by_the_same_cost_limit(one_thread):  # noqa: F811
    with app_client(model=FLUX, models=[QWEN], max_cost=60.0) as client:
        r = client.post("/generate", json={**BODY, "steps": 40})  # 2 evaluations × 40 steps = 80
        assert r.status_code == 422 and r.json()["error"]["field"] == "steps"
        assert "max_cost of 60" in r.json()["error"]["message"]
        post_ok(client, "/generate", {**BODY, "steps": 30})
        qwen = {**BODY, "model": QWEN, "steps": 8}
        post_ok(client, "/generate", qwen)  # 2 × 8 = 16 at the native size
        r = client.post("/generate", json={**qwen, "width": 64, "height": 64})  # 4× the tokens: above 60
        assert r.status_code == 422 and r.json()["error"]["field"] in ("width", "height")


# --- the playground ---------------------------------------------------------------------------------------------


def test_the_playground_offers_a_flow_model_its_schedulers_and_distilled_guidance(one_thread):  # noqa: F811
    import shutil

    import httpx

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH")
    with live_server(model=UNET, models=[FLUX], log_level="warning") as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.set_default_timeout(60_000)
            page.goto(f"{server.url}/")
            page.wait_for_selector("#policy-A-scale")
            options = "s => [...s.options].map(o => o.value)"
            assert page.eval_on_selector("#scheduler", options) == scheduler_names()
            assert page.is_hidden("#distilled-field")
            page.select_option("#model", FLUX)
            assert page.eval_on_selector("#scheduler", options) == scheduler_names("flow")
            assert "FLUX.1" in page.inner_text("#model-info") and page.is_visible("#distilled-field")
            page.select_option("#scheduler", "heun")
            page.fill("#prompt", BODY["prompt"])
            page.fill("#steps", "3")
            page.fill("#seed", "7")
            page.fill("#distilled-guidance", "5")
            page.select_option('fieldset[data-slot="A"] .policy-name', "cfg")
            page.fill("#policy-A-scale", "2")
            page.click("#generate")
            figure = page.wait_for_selector(".gallery-entry figure")
            shown = figure.eval_on_selector(
                "img",
                """async (img) => {
                const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
                let text = ""; for (const b of bytes) text += String.fromCharCode(b); return btoa(text); }""",
            )
            body = {**BODY, "model": FLUX, "scheduler": "heun", "distilled_guidance": 5}
            api = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()["images"][0]
            assert np.array_equal(image_array(shown), image_array(api))
            page.select_option("#model", UNET)
            assert page.is_hidden("#distilled-field") and page.input_value("#scheduler") == "heun"
            assert not errors, errors
        finally:
            browser.close()


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_generates_with_distilled_guidance(tmp_path, capsys):
    from diffsteer.guidance.models import load_model
    from diffsteer.service.cli import main

    out = tmp_path / "out.png"
    argv = ["generate", "a cat", "--model", FLUX, "--distilled-guidance", "5", "--seed", "1", "--steps", "3"]
    assert main([*argv, "-q", "-o", str(out)]) == 0
    image = Image.open(out)
    info = parse_generation_parameters(image.text["parameters"])
    assert (info["Distilled CFG Scale"], info["Sampler"], info["Schedule type"]) == ("5.0", "Euler", "Simple")
    expected = generate(
        load_model(FLUX, device="cpu"), {"prompt": "a cat", "steps": 3, "seed": 1, "distilled_guidance": 5}
    )
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.images[0]))
    assert main(["generate", "a cat", "--model", UNET, "--distilled-guidance", "5", "-q", "-o", str(out)]) == 2
    assert "distilled_guidance" in capsys.readouterr().err
    assert main(["generate", "a cat", "--model", SCHNELL, "--scheduler", "ddim", "-q", "-o", str(out)]) == 2
    assert "euler, heun, dpmpp_2m, unipc" in capsys.readouterr().err
