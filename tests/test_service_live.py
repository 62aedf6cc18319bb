"""Against a real uvicorn server on a loopback port: client disconnects, SSE, bursts beyond the queue, auth and logs."""

from __future__ import annotations

import json
import logging
import socket
import threading

import httpx
import pytest
from test_service_support import (  # noqa: F401
    UNetGate,
    live_server,
    one_thread,
    wait_idle,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BODY = {"prompt": "a white house", "steps": 4, "seed": 21}


def unet_of(server):
    engine = server.app.state.engine
    return engine.models.get(engine.default_model).unet


def outcome_count(engine, outcome: str) -> float:
    return engine.metrics.generations.labels(outcome)._value.get()


def test_client_disconnect_cancels_the_generation(one_thread):  # noqa: F811
    with live_server(batching=False) as server:
        engine = server.app.state.engine
        with UNetGate(unet_of(server), hold_at=2) as gate:
            body = json.dumps({**BODY, "steps": 40}).encode()
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(
                b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert gate.reached.wait(30)
            sock.close()  # the client goes away mid-generation
            wait_until(lambda: outcome_count(engine, "cancelled") == 1)
            gate.release.set()
            wait_idle(engine)
            assert gate.calls == 2  # nothing ran after the step in flight
        assert engine.metrics.requests.labels("/generate", "POST", "499")._value.get() == 1


def test_sse_over_a_real_connection(one_thread):  # noqa: F811
    with live_server(batching=True) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            job = client.post("/jobs", json=BODY).json()
            events = []
            with client.stream("GET", f"/jobs/{job['id']}/events?preview=true") as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                current = {}
                for line in r.iter_lines():
                    if not line:
                        if "event" in current:
                            events.append((current["event"], json.loads(current["data"])))
                        current = {}
                    elif not line.startswith(":"):
                        key, _, value = line.partition(": ")
                        current[key] = value
            assert [e for e, _ in events][0] == "queued" and events[-1][0] == "succeeded"
            assert [d["step"] for e, d in events if e == "step"] == [1, 2, 3, 4]
            result = client.get(f"/jobs/{job['id']}").json()["result"]
            assert result["seeds"] == [21]


def test_burst_beyond_the_queue_gets_200_or_429_and_nothing_hangs(one_thread):  # noqa: F811
    with live_server(batching=False, max_concurrent=1, queue_size=2) as server:
        engine = server.app.state.engine
        results: list[httpx.Response | Exception] = []
        lock = threading.Lock()

        def post(seed):
            try:
                r = httpx.post(f"{server.url}/generate", json={**BODY, "seed": seed}, timeout=60)
            except Exception as e:  # recorded: a lost request fails the test
                r = e
            with lock:
                results.append(r)

        with UNetGate(unet_of(server), hold_at=1) as gate:
            first = threading.Thread(target=post, args=(0,))
            first.start()
            assert gate.reached.wait(30)  # the only worker is busy
            burst = [threading.Thread(target=post, args=(seed,)) for seed in range(1, 9)]
            for t in burst:
                t.start()
            wait_until(lambda: len(results) == 6 and engine.queue.depth == 2)
            gate.release.set()
            for t in [first, *burst]:
                t.join(60)
                assert not t.is_alive()
        assert len(results) == 9 and not [r for r in results if isinstance(r, Exception)]
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200] * 3 + [429] * 6
        for r in results:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["message"].startswith("too many requests")
        assert outcome_count(engine, "rejected") == 6
        # a ticket's listeners (the outcome counter) run just after its future resolves, so the response of
        # the last request may be on the wire before its count is
        wait_until(lambda: outcome_count(engine, "succeeded") == 3, timeout=10)


def test_api_keys_and_no_key_in_logs(one_thread, caplog):  # noqa: F811
    keys = ["k-0123456789-first", "k-abcdefghij-second"]
    caplog.set_level(logging.DEBUG)
    with live_server(api_keys=keys, preload=True) as server:
        url = server.url
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/healthz").status_code == 200
            assert c.get("/readyz").status_code == 200
            assert c.get("/metrics").status_code == 200  # open unless metrics_require_key
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"X-API-Key": keys[0] + "x"},
                {"Authorization": "Basic !!!"},
                {"Authorization": f"Token {keys[0]}"},
            ):
                for method, path in (
                    ("POST", "/generate"),
                    ("POST", "/jobs"),
                    ("GET", "/models"),
                    ("GET", "/policies"),
                    ("POST", "/v1/images/generations"),
                    ("POST", "/sdapi/v1/txt2img"),
                ):
                    r = c.request(method, path, json=BODY, headers=headers)
                    assert r.status_code == 401, (path, headers, r.status_code)
                    assert r.headers["www-authenticate"].startswith("Bearer")
                    assert keys[0] not in r.text
            ok = [
                {"Authorization": f"Bearer {keys[0]}"},
                {"X-API-Key": keys[1]},
                {"Authorization": "Basic " + __import__("base64").b64encode(f"user:{keys[1]}".encode()).decode()},
            ]
            for headers in ok:
                assert c.get("/models", headers=headers).status_code == 200
            r = c.post("/generate", json=BODY, headers=ok[0])
            assert r.status_code == 200
            bad_body = c.post("/generate", json={**BODY, "steps": 0}, headers=ok[1])
            assert bad_body.status_code == 422  # authenticated, then validated
    logged = "\n".join(f"{rec.name} {rec.getMessage()}" for rec in caplog.records)
    assert "POST /generate" in logged  # uvicorn's access log was captured
    for key in keys:
        assert key not in logged
    assert "user:" not in logged
