"""Helpers shared by the service tests (apps on the tiny model, a live uvicorn server, UNet call gates),
and tests of the pieces that need no server: settings, Accept negotiation, sampler mapping, previews."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from diffsteer.service.settings import ServiceSettings

TINY = "builtin:tiny"


def settings(**overrides) -> ServiceSettings:
    """Small limits and a short batching window: requests on the tiny model take ~0.1 s. DIFFSTEER_* variables
    of the environment the tests run in are ignored."""
    base = dict(
        model=TINY,
        device="cpu",
        max_steps=50,
        max_width=64,
        max_height=64,
        max_num_images=4,
        queue_size=8,
        batch_window_ms=20.0,
        request_timeout_s=60.0,
    )
    base.update(overrides)
    ambient = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("DIFFSTEER_")}
    try:
        return ServiceSettings(**base)
    finally:
        os.environ.update(ambient)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread while these tests run: the CI box has 2 cores shared with other jobs, and the
    service runs several threads that use torch at once."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Generous: on a starved CI box the first model load (imports of torch/diffusers) can take minutes of wall time.
READY_TIMEOUT_S = 600.0


def wait_ready(client, timeout: float = READY_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout} s: {client.get('/readyz').json()}")


@contextlib.contextmanager
def app_client(**overrides) -> Iterator:
    """A TestClient over a fresh app (lifespan run), ready to generate."""
    from fastapi.testclient import TestClient

    from diffsteer.service.app import create_app

    app = create_app(settings(**overrides))
    with TestClient(app) as client:
        wait_ready(client)
        yield client


def engine_of(client):
    return client.app.state.engine


def decode_image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.float32) / 255.0


class UNetGate:
    """Counts UNet forward calls (rows too) with a hook; can hold the call number ``hold_at`` until released."""

    def __init__(self, unet: torch.nn.Module, hold_at: int | None = None):
        self.calls = 0
        self.rows = 0
        self.hold_at = hold_at
        self.reached = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        with self._lock:
            self.calls += 1
            self.rows += args[0].shape[0]
            number = self.calls
        if self.hold_at is not None and number == self.hold_at:
            self.reached.set()
            if not self.release.wait(60):
                raise RuntimeError("UNetGate was never released")

    def close(self) -> None:
        self.release.set()
        self._handle.remove()

    def __enter__(self) -> UNetGate:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def assert_lora_served_like(model, lora_dir, name: str, spec: str = "builtin:tiny", scheduler: str = "ddim") -> None:
    """The service, given ``lora_dir``, generates with LoRA ``name`` what ``model`` (the trained ``spec``, its
    adapter active) generates directly (within PNG rounding); ``scheduler``: one of the model's schedule."""
    from diffsteer.guidance.sampler import generate

    # the policy is named: the service would otherwise use the model's recommended one, the library its own default
    body = {
        "prompt": "a red circle",
        "steps": 4,
        "seed": 7,
        "scheduler": scheduler,
        "policy": "cfg:scale=3",
        "model": spec,
    }
    with torch.no_grad():
        ours = generate(model, {k: v for k, v in body.items() if k != "model"}).pixels[0]
    with app_client(lora_dir=str(lora_dir), model=spec) as client:
        r = client.post("/generate", json={**body, "lora": [{"name": name, "weight": 1.0}]})
        assert r.status_code == 200, r.text
        served = pixels(decode_image(r.json()["images"][0]))
    assert (served - ours.permute(1, 2, 0).reshape(-1, 3)).abs().max() <= 1.5 / 255


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def wait_idle(engine, timeout: float = 30.0) -> None:
    """Until no generation runs or waits (the worker threads have really stopped)."""
    wait_until(lambda: engine.queue.running == 0 and engine.queue.depth == 0, timeout)


class LiveServer:
    """The app under a real uvicorn server on a loopback port, in a thread of this process."""

    def __init__(self, app, log_level: str = "info", options: dict | None = None):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level=log_level, log_config=None, lifespan="on", timeout_graceful_shutdown=5, **(options or {})
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        import httpx

        self.thread.start()
        end = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("live server did not become ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@contextlib.contextmanager
def live_server(**overrides) -> Iterator[LiveServer]:
    from diffsteer.service.app import create_app

    configured = settings(**overrides)
    with LiveServer(create_app(configured), options=configured.uvicorn_options()) as server:
        yield server


def read_events(response) -> list[tuple[int, str, dict]]:
    """(id, event, data) of a server-sent event stream, until it ends."""
    events, current = [], {}
    for line in response.iter_lines():
        if not line:
            if "event" in current:
                events.append((int(current["id"]), current["event"], json.loads(current["data"])))
            current = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(": ")
        current[key] = value
    return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------
# Tests of the parts that need no server
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("DIFFSTEER_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_settings_sources_in_order(tmp_path, clean_env):
    from diffsteer.service.settings import load_settings

    monkeypatch = clean_env
    config = tmp_path / "serve.yaml"
    config.write_text("max_steps: 40\nqueue_size: 3\nmodel: builtin:tiny\ncors_origins: [http://a.example]\n")
    monkeypatch.setenv("DIFFSTEER_QUEUE_SIZE", "5")
    monkeypatch.setenv("DIFFSTEER_API_KEYS", "alpha, beta")
    s = load_settings(config, port=9001, model=None)
    assert s.max_steps == 40  # file
    assert s.queue_size == 5  # environment beats file
    assert s.port == 9001  # explicit option beats both
    assert s.model == "builtin:tiny"  # None overrides are ignored
    assert [k.get_secret_value() for k in s.api_keys] == ["alpha", "beta"]
    assert s.cors_origins == ["http://a.example"]
    assert "alpha" not in repr(s) and "alpha" not in str(s.model_dump())


def test_settings_json_file_and_env_json_list(tmp_path, clean_env):
    from diffsteer.service.settings import load_settings

    monkeypatch = clean_env
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"batching": False, "max-batch-rows": 4}))
    monkeypatch.setenv("DIFFSTEER_MODELS", '["builtin:tiny-v"]')
    s = load_settings(config)
    assert s.batching is False and s.max_batch_rows == 4 and s.models == ["builtin:tiny-v"]
    assert s.concurrency == 1  # no batching: one generation at a time by default


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("max_steps: 0\n", "settings.max_steps"),
        ("no_such_setting: 1\n", "settings.no_such_setting"),
        ("- a list\n", "--config"),
        ("max_steps: [\n", "--config"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path, clean_env, text, field):
    from diffsteer.guidance.errors import InvalidInput
    from diffsteer.service.settings import load_settings

    config = tmp_path / "serve.yaml"
    config.write_text(text)
    with pytest.raises(InvalidInput) as e:
        load_settings(config)
    assert e.value.field == field


def test_serve_reports_a_bad_config_and_exits_2(tmp_path, capsys):
    from diffsteer.service.cli import main

    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, None),
        ("application/json", None),
        ("*/*", None),
        ("image/png", "png"),
        ("image/webp", "webp"),
        ("image/*", "jpeg"),
        ("application/json, image/png;q=0.5", None),
        ("image/png, application/json;q=0.9", "png"),
        ("image/png;q=0", None),
        ("text/html", None),
    ],
)
def test_accept_negotiation(accept, expected):
    from diffsteer.service.routers.common import negotiate

    assert negotiate(accept, "jpeg") == expected


@pytest.mark.parametrize(
    ("sampler", "scheduler", "expected"),
    [
        ("Euler a", None, "euler_a"),
        ("Euler", "Automatic", "euler"),
        ("DDIM", None, "ddim"),
        ("DPM++ 2M", None, "dpmpp_2m"),
        ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),
        ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
        ("Heun", None, "heun"),
        ("LMS", None, "lms"),
        ("UniPC", None, "unipc"),
        ("PLMS", None, "pndm"),
        (None, None, "default"),
    ],
)
def test_a1111_sampler_names_map_to_schedulers(sampler, scheduler, expected):
    from diffsteer.guidance.schedulers import check_scheduler_name
    from diffsteer.service.routers.a1111 import resolve_sampler

    assert check_scheduler_name(resolve_sampler(sampler, scheduler)) == expected


@pytest.mark.parametrize(
    ("sampler", "scheduler", "field"),
    [("Euler b", None, "sampler_name"), ("Euler", "Karras", "scheduler"), ("Euler", "exponential", "scheduler")],
)
def test_a1111_unknown_samplers_are_refused(sampler, scheduler, field):
    from diffsteer.guidance.errors import InvalidInput
    from diffsteer.service.routers.a1111 import resolve_sampler

    with pytest.raises(InvalidInput) as e:
        resolve_sampler(sampler, scheduler)
    assert e.value.field == field


def test_a1111_cfg_scale_fills_only_an_unset_scale():
    from diffsteer.service.routers.a1111 import resolve_policy

    assert resolve_policy(None, 5.0) == {"name": "cfg", "scale": 5.0}
    assert resolve_policy("apg:eta=0", 5.0) == {"name": "apg", "eta": 0, "scale": 5.0}
    assert resolve_policy("apg:scale=9", 5.0) == {"name": "apg", "scale": 9}
    assert resolve_policy({"name": "cfg", "scale": 3}, 5.0) == {"name": "cfg", "scale": 3}


def test_preview_fit_recovers_an_affine_latent_to_rgb_map():
    from diffsteer.service.preview import apply_affine, fit_affine

    g = torch.Generator().manual_seed(0)
    truth = torch.randn(5, 3, generator=g)  # 4 channels + bias
    latents = torch.randn(6, 4, 8, 8, generator=g)
    rgb = torch.einsum("bchw,cr->brhw", latents, truth[:-1]) + truth[-1].view(1, 3, 1, 1)
    fitted = fit_affine(latents, rgb)
    assert torch.allclose(fitted, truth, atol=1e-4)
    inside = (rgb - rgb.min()) / (rgb.max() - rgb.min())  # apply_affine clamps to [0, 1]
    assert torch.allclose(apply_affine(fit_affine(latents, inside), latents), inside, atol=1e-4)
