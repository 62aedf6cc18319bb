"""Inputs that used to give a 500 (or a connection reset) get a readable 4xx naming the field, on every route
that takes them: deeply nested policies, lone surrogates in prompts, non-ASCII digits in OpenAI sizes, and
request bodies far above the size limit."""

from __future__ import annotations

import contextlib
import json
import socket

import pytest
from fastapi.testclient import TestClient

from test_service_support import one_thread, settings, wait_ready  # noqa: F401

DEEP = "cfg:scales=" + "[" * 100_000


@pytest.fixture(scope="module")
def client(one_thread, tmp_path_factory):  # noqa: F811
    from service.app import create_app

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


@pytest.mark.parametrize(("route", "body", "field"), [
    ("/generate", {"prompt": "a \ud800 b"}, "prompt"),
    ("/generate", {"prompt": ["fine", "a \udfff"]}, "prompt.1"),
    ("/generate", {"prompt": "a", "negative_prompt": "\ud800"}, "negative_prompt"),
    ("/jobs", {"prompt": "a \ud800 b"}, "prompt"),  # refused up front, not a 202 that fails later
    ("/jobs", {"prompt": "a", "negative_prompt": "x\udc00"}, "negative_prompt"),
    ("/v1/images/generations", {"prompt": "a \ud800 b"}, "prompt"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "negative_prompt": "\ud800"}, "negative_prompt"),
    ("/ab", {"arms": ["a=cfg", "b=apg"], "prompts": ["ok", "\ud800"]}, "prompts.1"),
])
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
    from service.routers.openai_images import parse_size

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
            piece = BIG[i:i + 65536]
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
