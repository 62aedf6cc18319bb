"""Inputs that used to give a 500 (or a connection reset) get a readable 4xx naming the field, on every route
that takes them: deeply nested policies, lone surrogates in prompts, non-ASCII digits in OpenAI sizes, and
request bodies far above the size limit."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import pytest
from fastapi.testclient import TestClient
from test_service_support import one_thread, settings, wait_ready  # noqa: F401

DEEP = "cfg:scales=" + "[" * 100_000


@pytest.fixture(scope="module")
def client(one_thread, tmp_path_factory):  # noqa: F811
    from diffsteer.service.app import create_app

    app = create_app(settings(ab_dir=str(tmp_path_factory.mktemp("ab"))))
    with TestClient(app, raise_server_exceptions=False) as c:  # a 500 must show as a 500, not as an exception
        wait_ready(c)
        yield c


def post(client, path: str, body: dict):
    # json.dumps keeps lone surrogates as \ud800 escapes, as a client's JSON encoder sends them
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


ROUTES = {
    "/generate": lambda policy: {"prompt": "x", "steps": 1, "policy": policy},
    "/jobs": lambda policy: {"prompt": "x", "steps": 1, "policy": policy},
    "/v1/images/generations": lambda policy: {"prompt": "x", "steps": 1, "policy": policy},
    "/sdapi/v1/txt2img": lambda policy: {"prompt": "x", "steps": 1, "policy": policy},
    "/ab": lambda policy: {"arms": ["a=cfg", f"b={policy}"], "prompts": ["x"], "steps": 1},
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("policy", [DEEP, '{"name": "cfg", "scales": ' + "[" * 100_000 + "}"])
def test_deeply_nested_policy_is_a_4xx_naming_the_policy(client, route, policy):
    r = post(client, route, ROUTES[route](policy))
    assert r.status_code in (400, 422), (r.status_code, r.text[:300])
    error = r.json()["error"]
    field = "arms" if route == "/ab" else "policy"
    assert error["field"].split(".")[0] == field and "nested" in error["message"], error


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("levels", [478, 975])
def test_json_nested_hundreds_of_levels_in_any_field_is_a_4xx(client, route, levels):
    """Not only the policy: any field nested that deep was a 500 (the body's recursive walk); it is refused
    before any walk, naming the field."""
    body = ROUTES[route]("cfg")
    field = "prompts" if route == "/ab" else "prompt"
    body.pop(field, None)
    text = json.dumps(body)[:-1] + f', "{field}": ' + "[" * levels + "1" + "]" * levels + "}"  # too deep for json.dumps
    r = client.post(route, content=text.encode(), headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), (r.status_code, r.text[:300])
    assert r.json()["error"]["field"] in (field, "body"), r.json()


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize(
    "policy",
    [
        {"name": "cfg", "\ud800": 1},  # a lone surrogate as a parameter *name*
        "cfg:scale=3,\udfff=1",
        "cfg:scale=3\x07",  # control characters would reach logs and the X-Diffsteer-Policy header
        "cfg:sc\r\nale=3",
        {"name": "cfg\n"},
    ],
)
def test_policy_text_with_surrogates_or_control_characters_is_a_4xx(client, route, policy):
    r = post(client, route, ROUTES[route](policy if route != "/ab" or isinstance(policy, str) else "cfg"))
    if route == "/ab" and not isinstance(policy, str):
        return  # A/B arms take spec strings only
    assert r.status_code in (400, 422), (r.status_code, r.text[:300])
    message = r.json()["error"]["message"]
    assert "surrogate" in message or "control character" in message, message


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/generate", {"prompt": "a \ud800 b"}, "prompt"),
        ("/generate", {"prompt": ["fine", "a \udfff"]}, "prompt.1"),
        ("/generate", {"prompt": "a", "negative_prompt": "\ud800"}, "negative_prompt"),
        ("/jobs", {"prompt": "a \ud800 b"}, "prompt"),  # refused up front, not a 202 that fails later
        ("/jobs", {"prompt": "a", "negative_prompt": "x\udc00"}, "negative_prompt"),
        ("/v1/images/generations", {"prompt": "a \ud800 b"}, "prompt"),
        ("/sdapi/v1/txt2img", {"prompt": "a", "negative_prompt": "\ud800"}, "negative_prompt"),
        ("/ab", {"arms": ["a=cfg", "b=apg"], "prompts": ["ok", "\ud800"]}, "prompts.1"),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(client, route, body, field):
    r = post(client, route, {**body, "steps": 1})
    assert r.status_code in (400, 422), (r.status_code, r.text[:300])
    assert r.json()["error"]["field"] == field
    assert "surrogate" in r.json()["error"]["message"]


@pytest.mark.parametrize("size", ["²x²", "٦٤x٦٤", "６４x６４", "64x", "x64", "64x64x64", "-8x8", " x "])
def test_openai_size_accepts_ascii_digits_only(client, size):
    r = post(client, "/v1/images/generations", {"prompt": "x", "size": size, "steps": 1})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert r.json()["error"]["param"] == "size"


def test_openai_size_parses_ascii():
    from diffsteer.service.routers.openai_images import parse_size

    assert parse_size(" 32 x 16 ") == (32, 16) and parse_size("auto") == (None, None)


# --- bodies above max_body_bytes: a readable 413, never a connection reset ----------------------------------

BIG = b'{"prompt": "' + b"a" * 5_000_000 + b'"}'


def _raw_post(port: int, chunked: bool, expect_continue: bool = False) -> bytes:
    """POST BIG the way a naive client does: write the whole body, then read the answer."""
    with contextlib.closing(socket.create_connection(("127.0.0.1", port), timeout=30)) as s:
        head = b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        head += b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % len(BIG)
        if expect_continue:
            s.sendall(head + b"Expect: 100-continue\r\n\r\n")
            return s.recv(65536)  # the 413 comes before any body is sent
        s.sendall(head + b"\r\n")
        for i in range(0, len(BIG), 65536):
            piece = BIG[i : i + 65536]
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            s.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = s.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_a_5mb_body_always_gets_a_readable_413(one_thread):  # noqa: F811
    from test_service_support import live_server

    with live_server() as server:
        for attempt in range(4):
            for chunked in (False, True):
                answer = _raw_post(server.port, chunked)
                assert answer.startswith(b"HTTP/1.1 413"), (attempt, chunked, answer[:200])
                body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
                assert body["error"]["field"] == "body" and "larger than" in body["error"]["message"]
        assert _raw_post(server.port, False, expect_continue=True).startswith(b"HTTP/1.1 413")


# --- metrics: junk requests add no series ------------------------------------------------------------------


def _series(client) -> set[tuple]:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(text) for s in f.samples}


def test_junk_requests_add_no_metric_series(client):
    import random

    rng = random.Random(0)

    def junk(i: int):
        method = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(3, 10)))
        path = "/" + "/".join(f"x{rng.randrange(10**9)}" for _ in range(rng.randint(1, 3)))
        choice = i % 4
        if choice == 0:
            return client.request(method, path)
        if choice == 1:
            return client.request(method, "/generate")
        if choice == 2:
            return client.get(path)
        return client.request(method, f"/jobs/{rng.randrange(10**9)}")

    for i in range(8):  # one of each kind first, so every bounded label value already exists
        junk(i)
    _series(client)  # the scrape's own series
    before = _series(client)
    for i in range(100):
        junk(i)
    after = _series(client)
    assert after == before, sorted(after - before)[:10]
    labels = {dict(k).get("method") for _, k in after} - {None}
    assert labels <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}


# --- small things: 500s logged once, previews once per job, stored jobs capped by bytes, model defaults --------


def test_a_500_is_logged_once_and_answered_as_json(one_thread, caplog, monkeypatch):  # noqa: F811
    from diffsteer.service.app import create_app

    app = create_app(settings(preload=False))
    with TestClient(app) as c:  # raise_server_exceptions: a re-raised exception would fail this test

        def boom(*a, **k):
            raise RuntimeError("boom-7d1")

        monkeypatch.setattr(app.state.engine, "plan", boom)
        with caplog.at_level("DEBUG"):
            r = c.post("/generate", json={"prompt": "x"})
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error (RuntimeError); see the server log"
    logged = [rec for rec in caplog.records if rec.exc_info and "boom-7d1" in str(rec.exc_info[1])]
    assert len(logged) == 1, [(rec.name, rec.getMessage()) for rec in logged]


def test_previews_are_rendered_once_per_step_whatever_the_subscribers():
    import asyncio

    import torch

    from diffsteer.service.jobs import Job
    from diffsteer.service.routers.jobs import _with_preview

    class Engine:
        calls = 0

        def preview(self, model, latents):
            Engine.calls += 1
            return [b"png-%d" % i for i in range(latents.shape[0])]

    job = Job("j", None)
    job.model, job.latest_latents = object(), (3, torch.zeros(2, 4, 2, 2))
    event = {"id": 5, "event": "step", "data": {"step": 3, "total": 9}}

    async def readers():
        return await asyncio.gather(*[_with_preview(Engine(), job, event) for _ in range(5)])

    results = asyncio.run(readers())
    assert Engine.calls == 1 and all(len(r["data"]["preview"]) == 2 for r in results)


def test_stored_jobs_are_capped_by_bytes():
    from diffsteer.service.jobs import Job, JobStore, body_bytes

    store = JobStore(ttl_s=1e9, max_finished=100, max_bytes=1000)
    for k in range(6):
        job = Job(f"j{k}", None, status="succeeded", finished_mono=float(k))
        job.result_body = {"images": ["x" * 300]}
        job.size_bytes = body_bytes(job.result_body)
        store._jobs[job.id] = job
    assert store.purge(now=10.0) == 3  # 6 x ~300 bytes: the three oldest go
    assert {j for j in store._jobs} == {"j3", "j4", "j5"}


def test_requests_naming_no_policy_get_the_models_recommendation(one_thread):  # noqa: F811
    from diffsteer.service.app import create_app
    from diffsteer.service.routers import a1111, openai_images
    from diffsteer.service.schemas import GenerateRequest

    app = create_app(settings(model="builtin:proving-ground", preload=False, max_width=2048, max_height=2048))
    engine = app.state.engine
    plan = engine.plan(GenerateRequest(prompt="x"))
    assert plan.params.policy.spec() == "cfg:scale=1.5" and plan.params.steps == 30  # proving_ground/.../diffsteer.json
    plan = engine.plan(GenerateRequest(prompt="x", policy=None, steps=None))  # null: the same as absent
    assert plan.params.policy.spec() == "cfg:scale=1.5"
    assert engine.plan(GenerateRequest(prompt="x", policy="cfg", steps=7)).params.policy.spec() == "cfg"
    with pytest.raises(Exception) as e:  # the model's max_size (256) caps the server's 2048
        engine.plan(GenerateRequest(prompt="x", width=512))
    assert e.value.field == "width"
    via_a1111 = engine.plan(a1111.to_generate_request(a1111.Txt2ImgRequest(prompt="x")))
    assert via_a1111.params.policy.spec() == "cfg:scale=1.5" and via_a1111.params.steps == 30
    assert via_a1111.params.width is None  # the native size
    with_scale = engine.plan(a1111.to_generate_request(a1111.Txt2ImgRequest(prompt="x", cfg_scale=4.0)))
    assert with_scale.params.policy.spec() == "cfg:scale=4.0"
    via_openai = engine.plan(openai_images.to_generate_request(openai_images.OpenAIImageRequest(prompt="x"), engine))
    assert via_openai.params.policy.spec() == "cfg:scale=1.5"
    # a default never makes a request invalid: steps above max_steps are clamped
    small = create_app(settings(model="builtin:proving-ground", preload=False, max_steps=4)).state.engine
    assert small.plan(GenerateRequest(prompt="x")).params.steps == 4


def test_cli_generate_uses_the_models_recommendation(monkeypatch):
    import diffsteer.guidance.models
    import diffsteer.guidance.sampler
    from diffsteer.service.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def fake_generate(model, params, **kw):
        seen["params"] = params
        raise Stop()

    monkeypatch.setattr(diffsteer.guidance.models, "load_model", lambda *a, **k: object())
    monkeypatch.setattr(diffsteer.guidance.sampler, "generate", fake_generate)
    with pytest.raises(Stop):
        main(["generate", "a red circle", "-q"])
    assert seen["params"].policy.spec() == "cfg:scale=1.5" and seen["params"].steps == 30
    with pytest.raises(Stop):
        main(["generate", "a red circle", "-q", "--policy", "apg:scale=6", "--steps", "5"])
    assert seen["params"].policy.spec() == "apg:scale=6.0" and seen["params"].steps == 5
    assert main(["generate", "x", "--size", "512x512", "-q"]) == 2  # above the model's max_size


def test_serve_takes_a_lora_dir(monkeypatch, tmp_path):
    import uvicorn

    from diffsteer.service.cli import main

    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.setdefault("app", app))
    assert main(["serve", "--lora-dir", str(tmp_path), "--model", "builtin:tiny"]) == 0
    assert captured["app"].state.settings.lora_dir == tmp_path


def test_an_empty_api_key_is_refused_at_start():
    import pydantic

    from diffsteer.service.settings import ServiceSettings

    with pytest.raises(pydantic.ValidationError, match="api_keys.1 is empty"):
        ServiceSettings(api_keys=["good-key", "  "])


def test_owners_are_keyed_hashes_that_survive_a_restart(tmp_path):
    import hashlib

    from diffsteer.service.owners import key_fingerprint, owner_secret

    secret = owner_secret(tmp_path)
    assert owner_secret(tmp_path) == secret and len(secret) == 32  # the same after a restart
    assert (tmp_path / ".owner-secret").stat().st_mode & 0o777 == 0o600
    fingerprint = key_fingerprint("sk-test", secret)
    assert fingerprint != hashlib.sha256(b"sk-test").hexdigest()  # not checkable against guessed keys without it
    assert fingerprint == key_fingerprint("sk-test", owner_secret(tmp_path))
    assert owner_secret(None) != owner_secret(None)


def test_an_8mb_header_is_refused_and_connections_are_bounded(one_thread):  # noqa: F811
    """The server's head limit answers an 8 MB header with a 400 (the connection closed), and beyond
    max_connections open connections new requests get an immediate 503: slow or idle clients cannot pin more
    file descriptors than the stated bound."""
    import httpx
    from test_service_support import live_server

    with live_server(max_connections=8, keep_alive_s=30.0, header_timeout_s=2.0) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            try:  # the server answers 400 and closes once the head passes its limit, before all 8 MB are sent
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 * 1024 * 1024) + b"\r\n\r\n")
                head = sock.recv(64)
            except (ConnectionResetError, BrokenPipeError):
                head = b""
        assert head.startswith(b"HTTP/1.1 400") or head == b""
        slow = []
        try:
            for _ in range(12):  # clients that open a request and never finish its head
                s = socket.create_connection(("127.0.0.1", server.port))
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                slow.append(s)
            time.sleep(0.3)
            assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 503  # beyond max_connections
            time.sleep(2.5)  # header_timeout_s: the slow ones are closed by the server
            for s in slow:
                s.settimeout(2)
                assert s.recv(1024) == b""  # closed
            assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        finally:
            for s in slow:
                s.close()
