"""A1111's everyday routes against a live server with the unmodified ``webuiapi`` client: progress of the caller's
own requests (and ``util_wait_for_ready``), interrupt and skip (the running request answers with its images as
they stand, checked against Euler's update), PNG info read back from generated images, the
``sd_model_checkpoint`` option, and the LoRA listing. Generations are held mid-way by a gate on the UNet."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_service_support import UNetGate, live_server, one_thread, wait_idle, wait_until  # noqa: F401

from diffsteer.guidance.events import GenerationInterrupted
from diffsteer.guidance.latents import decode_pixels
from diffsteer.guidance.models import load_model
from diffsteer.guidance.request import GenerationParams
from diffsteer.guidance.sampler import generate, make_scheduler

webuiapi = pytest.importorskip("webuiapi")

pytestmark = pytest.mark.usefixtures("one_thread")
KEY, OTHER = "routes-key", "other-key"
OTHER_MODEL = "builtin:tiny-v"
TXT2IMG = dict(prompt="a blue square", steps=10, width=32, height=32, seed=4, cfg_scale=5)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    weights = {"unet.down.lora_A.weight": torch.zeros(2, 2)}
    save_file(weights, folder / "style.safetensors", metadata={"ss_output_name": "Style One", "ss_tags": '{"a": 1}'})
    (folder / "detail").mkdir()
    save_file(weights, folder / "detail" / "pytorch_lora_weights.safetensors")
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


@pytest.fixture(scope="module")
def server(one_thread, lora_dir):  # noqa: F811
    with live_server(
        api_keys=[KEY, OTHER], batching=False, models=[OTHER_MODEL], lora_dir=str(lora_dir), log_level="warning"
    ) as s:
        yield s


def client(server, key: str = KEY):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="anyone", password=key)


@pytest.fixture(scope="module")
def webui(server):
    return client(server)


@pytest.fixture(scope="module")
def other(server):
    return client(server, OTHER)


@pytest.fixture(scope="module")
def engine(server):
    engine = server.app.state.engine
    engine.previewer.matrix(engine.models.get(engine.default_model))  # fitted now: previews need no device work
    return engine


def unet(engine):
    return engine.models.get(engine.default_model).unet


class Call(threading.Thread):
    """A client call in a thread: ``result`` or ``error`` once joined."""

    def __init__(self, fn, **kwargs):
        super().__init__(daemon=True)
        self.fn, self.kwargs, self.result, self.error = fn, kwargs, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn(**self.kwargs)
        except Exception as e:  # noqa: BLE001 - looked at by the test
            self.error = e

    def outcome(self):
        self.join(30)
        assert not self.is_alive()
        return self.result, self.error


def idle(progress: dict) -> bool:
    return progress["progress"] == 0 and progress["state"]["job_count"] == 0


# -- progress ----------------------------------------------------------------------------------------------------------


def test_nothing_in_flight_and_wait_for_ready(webui):
    progress = webui.get_progress()
    assert idle(progress) and progress["current_image"] is None and progress["eta_relative"] == 0
    webui.util_wait_for_ready(check_interval=0.1)  # returns at once


def test_progress_of_a_running_request(webui, other, engine):
    with UNetGate(unet(engine), hold_at=3) as gate:  # cfg: one UNet call per step; held inside step 3
        call = Call(webui.txt2img, **TXT2IMG)
        assert gate.reached.wait(30)
        progress = webui.get_progress()
        state = progress["state"]
        assert 0 < progress["progress"] < 1 and state["job_count"] == 1
        assert state["sampling_step"] == 2 and state["sampling_steps"] == 10
        assert progress["progress"] == pytest.approx(0.01 + 2 / 10)
        assert progress["eta_relative"] >= 0 and "step 2 of 10" in progress["textinfo"]
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        latent = 32 // engine.models.get(engine.default_model).vae_scale_factor
        assert preview.format == "PNG" and preview.size == (latent, latent)  # latent resolution
        assert webui.session.get(f"{webui.baseurl}/progress?skip_current_image=true").json()["current_image"] is None
        assert idle(other.get_progress())  # another caller's requests are not its own
        gate.release.set()
        result, error = call.outcome()
    assert error is None and result.images[0].size == (32, 32)
    wait_until(lambda: idle(webui.get_progress()))
    webui.util_wait_for_ready(check_interval=0.1)


def interrupted_at(model, step: int, **params):
    """The library's images of ``params`` with the denoising interrupted after ``step``."""

    def stop(event):
        if event.step == step:
            raise GenerationInterrupted("test")

    return generate(model, params, callback=stop)


def test_an_interrupt_decodes_the_clean_estimate_of_its_last_step():
    """Checked against Euler's own update: x_{i+1} = x_i + (σ_{i+1} − σ_i) ε̂_i gives ε̂_i from two recorded
    latents, and the image is the decoded x̂0 = x_i − σ_i ε̂_i (A1111's last "denoised")."""
    model = load_model("builtin:tiny")
    params = dict(prompt="a blue square", steps=6, seed=3, scheduler="euler", policy="cfg:scale=5")
    seen = {}
    generate(model, params, callback=lambda event: seen.setdefault(event.step, event.latents.clone()))
    cut = interrupted_at(model, 3, **params)
    scheduler, _ = make_scheduler(model, GenerationParams.model_validate(params))
    sigmas = scheduler.sigmas
    eps = (seen[3] - seen[2]) / (sigmas[3] - sigmas[2])
    expected = decode_pixels(model, seen[2] - sigmas[2] * eps)
    assert torch.allclose(cut.pixels, expected, atol=1e-5)
    assert cut.nfe == [6]  # three CFG steps
    full = interrupted_at(model, 6, **params)  # at the last step: the finished images
    assert torch.equal(full.pixels, generate(model, params).pixels)


def test_interrupt_answers_the_images_as_they_stand(webui, other, engine):
    request = {**TXT2IMG, "sampler_name": "Euler", "eta": 0}
    with UNetGate(unet(engine), hold_at=3) as gate:
        call = Call(webui.txt2img, **request)
        assert gate.reached.wait(30)
        assert other.interrupt() == {}  # another caller's interrupt leaves it alone
        assert webui.get_progress()["state"]["job_count"] == 1
        assert webui.interrupt() == {}
        assert webui.get_progress()["state"]["interrupted"] is True
        gate.release.set()
        result, error = call.outcome()  # the step in flight ends, then the images are decoded
        wait_idle(engine)
        assert gate.calls == 3  # no further step ran
    assert error is None, error
    model = engine.models.get(engine.default_model)
    expected = interrupted_at(
        model,
        3,
        prompt=TXT2IMG["prompt"],
        steps=10,
        seed=4,
        width=32,
        height=32,
        scheduler="euler",
        policy="cfg:scale=5",
    )
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")), np.asarray(expected.images[0]))
    assert "Steps: 10" in result.info["infotexts"][0] and result.info["seed"] == 4
    assert idle(webui.get_progress()) and webui.get_progress()["state"]["interrupted"] is True
    webui.txt2img(**{**TXT2IMG, "steps": 2})
    assert webui.get_progress()["state"]["interrupted"] is False  # cleared when the next request begins


@pytest.mark.parametrize("how", ["skip", "interrupt"])
def test_skip_spares_queued_requests_interrupt_does_not(webui, engine, how):
    with UNetGate(unet(engine), hold_at=3) as gate:
        first = Call(webui.txt2img, **TXT2IMG)
        assert gate.reached.wait(30)
        second = Call(webui.img2img, images=[Image.new("RGB", (32, 32), "red")], steps=4, width=32, height=32)
        wait_until(lambda: webui.get_progress()["state"]["job_count"] == 2)
        progress = webui.get_progress()
        assert progress["progress"] == pytest.approx(0.01 + (2 / 10 + 0) / 2)
        assert getattr(webui, how)() == {}
        gate.release.set()
        first_result, first_error = first.outcome()
        result, second_error = second.outcome()
        wait_idle(engine)
    assert first_error is None and first_result.images[0].size == (32, 32)  # the running one: its images so far
    if how == "skip":
        assert second_error is None and result.images[0].size == (32, 32)
        assert webui.get_progress()["state"]["skipped"] is False  # the second request began after the skip
    else:
        assert second_error.args[0] == 503 and "interrupted" in second_error.args[1]
        assert webui.get_progress()["state"]["interrupted"] is True
    assert idle(webui.get_progress())


# -- PNG info ----------------------------------------------------------------------------------------------------------


def test_png_info_reads_back_a_generated_image(webui):
    result = webui.txt2img(prompt="a cat, sitting", negative_prompt="dog", steps=3, width=32, height=24, seed=8)
    info = webui.png_info(result.image)  # webuiapi re-encodes the image with its text chunks
    assert info.info == result.info["infotexts"][0]
    params = info.parameters
    assert params["Prompt"] == "a cat, sitting" and params["Negative prompt"] == "dog"
    assert params["Seed"] == "8" and params["Steps"] == "3" and (params["Size-1"], params["Size-2"]) == ("32", "24")
    assert params["Sampler"] == result.info["sampler_name"] and params["Clip skip"] == "1"
    assert json.loads(info.json["items"]["diffsteer"])["seed"] == 8


def test_png_info_of_an_inpainted_image_and_a_jpeg(webui, server):
    init = Image.new("RGB", (32, 32), "green")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 16, 16))
    result = webui.img2img(images=[init], mask_image=mask, steps=4, width=32, height=32, denoising_strength=0.5)
    params = webui.png_info(result.image).parameters
    assert params["Denoising strength"] == "0.5" and params["Mask blur"] == "4"
    r = webui.session.post(
        f"{server.url}/generate", json={"prompt": "x", "steps": 2, "seed": 1, "output_format": "jpeg"}, timeout=60
    )
    jpeg = r.json()["images"][0]
    read = webui.session.post(f"{webui.baseurl}/png-info", json={"image": jpeg}).json()
    assert read["parameters"]["Seed"] == "1" and "exif" not in read["items"]


def test_png_info_of_nothing_and_of_garbage(webui):
    empty = webui.session.post(f"{webui.baseurl}/png-info", json={"image": ""})
    assert empty.json() == {"info": "", "items": {}, "parameters": {}}
    plain = io.BytesIO()
    Image.new("RGB", (4, 4)).save(plain, format="PNG")
    no_text = webui.session.post(
        f"{webui.baseurl}/png-info", json={"image": base64.b64encode(plain.getvalue()).decode()}
    )
    assert no_text.json()["info"] == ""
    bad = webui.session.post(f"{webui.baseurl}/png-info", json={"image": "not an image"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "image"


# -- options, LoRAs ----------------------------------------------------------------------------------------------------


def test_the_checkpoint_option_switches_the_callers_model(webui, other):
    assert webui.util_get_current_model() == "builtin:tiny"
    assert sorted(webui.util_get_model_names()) == ["builtin:tiny", OTHER_MODEL]
    try:
        assert webui.set_options({"sd_model_checkpoint": OTHER_MODEL, "CLIP_stop_at_last_layers": 1}) is None
        assert webui.get_options()["sd_model_checkpoint"] == OTHER_MODEL
        assert webui.txt2img(prompt="x", steps=2, width=32, height=32).info["sd_model_name"] == OTHER_MODEL
        img2img = webui.img2img(images=[Image.new("RGB", (32, 32))], steps=2, width=32, height=32)
        assert img2img.info["sd_model_name"] == OTHER_MODEL
        overridden = webui.txt2img(
            prompt="x", steps=2, width=32, height=32, override_settings={"sd_model_checkpoint": "builtin:tiny"}
        )
        assert overridden.info["sd_model_name"] == "builtin:tiny"
        assert other.get_options()["sd_model_checkpoint"] == "builtin:tiny"  # another caller's option
        assert other.txt2img(prompt="x", steps=2, width=32, height=32).info["sd_model_name"] == "builtin:tiny"
        bad = webui.session.post(f"{webui.baseurl}/options", json={"sd_model_checkpoint": "sd_xl_base_1.0"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "sd_model_checkpoint"
        assert webui.get_options()["sd_model_checkpoint"] == OTHER_MODEL  # unchanged by the refusal
    finally:
        webui.set_options({"sd_model_checkpoint": "default"})
    assert webui.get_options()["sd_model_checkpoint"] == "builtin:tiny"


def test_loras_are_listed_with_relative_paths_and_metadata(webui, lora_dir):
    response = webui.session.get(f"{webui.baseurl}/loras")
    assert str(lora_dir) not in response.text  # no server paths
    loras = {row["name"]: row for row in response.json()}
    assert loras == {
        "detail": {
            "name": "detail",
            "alias": "detail",
            "path": "detail/pytorch_lora_weights.safetensors",
            "metadata": {},
        },
        "style": {
            "name": "style",
            "alias": "Style One",
            "path": "style.safetensors",
            "metadata": {"ss_output_name": "Style One", "ss_tags": {"a": 1}},
        },
    }
    assert webui.get_loras() == response.json()
    refreshed = webui.session.post(f"{webui.baseurl}/refresh-loras")
    assert refreshed.status_code == 200 and refreshed.json() is None
