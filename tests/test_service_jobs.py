"""Jobs: lifecycle, progress events (SSE) with previews, cancellation within a step, timeouts, purge."""

from __future__ import annotations

import time

import pytest
from test_service_support import (  # noqa: F401
    UNetGate,
    app_client,
    decode_image,
    engine_of,
    one_thread,
    read_events,
    wait_idle,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BODY = {"prompt": "a blue square", "steps": 4, "seed": 11}


@pytest.fixture(scope="module")
def client(one_thread):  # noqa: F811
    with app_client(batching=False, queue_size=4, job_ttl_s=120.0) as c:
        yield c


def unet(client):
    engine = engine_of(client)
    return engine.models.get(engine.default_model).unet


def wait_job(client, job_id: str, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        body = client.get(f"/jobs/{job_id}").json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def test_job_lifecycle_matches_generate(client):
    r = client.post("/jobs", json=BODY)
    assert r.status_code == 202 and r.headers["location"] == f"/jobs/{r.json()['id']}"
    assert r.json()["status"] in ("queued", "running")
    done = wait_job(client, r.json()["id"])
    assert done["status"] == "succeeded" and done["error"] is None
    assert done["progress"] == {"step": 4, "total": 4, "nfe": 8, "phase": "denoise"}
    assert done["expires_at"] > done["finished_at"]
    direct = client.post("/generate", json=BODY).json()
    assert done["result"]["images"] == direct["images"] and done["result"]["seeds"] == [11]


def test_unknown_job_is_404(client):
    for method in ("GET", "DELETE"):
        r = client.request(method, "/jobs/not-a-job")
        assert r.status_code == 404 and r.json()["error"]["field"] == "job_id"
    assert client.get("/jobs/not-a-job/events").status_code == 404


def test_events_stream_steps_and_previews(client):
    job = client.post("/jobs", json={**BODY, "num_images": 2}).json()
    with client.stream("GET", f"/jobs/{job['id']}/events", params={"preview": "true"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r)
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded" and "started" in kinds
    steps = [data for _, kind, data in events if kind == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["total"] == 4 for s in steps)
    assert [s["nfe"] for s in steps] == [4, 8, 12, 16]  # 2 images x (cond + uncond) per step
    assert [i for i, _, _ in events] == list(range(1, len(events) + 1))
    with_preview = [s for s in steps if "preview" in s]
    assert with_preview, "the stream ran alongside the job, so at least the freshest steps had previews"
    for s in with_preview:
        assert s["preview_kind"] == "latent-rgb-approximation" and len(s["preview"]) == 2
        assert decode_image(s["preview"][0]).size == (16, 16)  # latent resolution of the 32 px tiny model
    assert events[-1][2]["seeds"] == [11, 12]


def test_events_resume_after_last_event_id(client):
    job = client.post("/jobs", json=BODY).json()
    wait_job(client, job["id"])
    with client.stream("GET", f"/jobs/{job['id']}/events", headers={"Last-Event-ID": "3"}) as r:
        events = read_events(r)
    assert events[0][0] == 4 and events[-1][1] == "succeeded"
    bad = client.get(f"/jobs/{job['id']}/events", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "Last-Event-ID"


def test_cancel_stops_within_one_step(client):
    engine = engine_of(client)
    with UNetGate(unet(client), hold_at=3) as gate:  # cfg: one UNet call per step
        job = client.post("/jobs", json={**BODY, "steps": 40}).json()
        assert gate.reached.wait(30)
        r = client.delete(f"/jobs/{job['id']}")
        assert r.status_code == 202
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"  # at once, before the step ends
        gate.release.set()
        wait_idle(engine)
        assert gate.calls == 3  # the call in flight finished; no further step ran
    body = client.get(f"/jobs/{job['id']}").json()
    assert body["status"] == "cancelled" and "DELETE" in body["error"]["message"]
    assert body["progress"]["step"] == 2  # steps 1, 2 completed; step 3 was cut short
    assert client.post("/generate", json=BODY).status_code == 200  # the worker is free again
    assert client.delete(f"/jobs/{job['id']}").status_code == 200  # a finished job is deleted
    assert client.get(f"/jobs/{job['id']}").status_code == 404


def test_cancel_a_queued_job_never_runs_it(client):
    engine = engine_of(client)
    with UNetGate(unet(client), hold_at=1) as gate:
        first = client.post("/jobs", json=BODY).json()
        assert gate.reached.wait(30)
        second = client.post("/jobs", json={**BODY, "seed": 99}).json()
        assert client.get(f"/jobs/{second['id']}").json()["status"] == "queued"
        assert client.delete(f"/jobs/{second['id']}").json()["status"] == "cancelled"
        gate.release.set()
        assert wait_job(client, first["id"])["status"] == "succeeded"
        wait_idle(engine)
        assert gate.calls == 4  # the first job's 4 steps only
    with client.stream("GET", f"/jobs/{second['id']}/events") as r:
        kinds = [kind for _, kind, _ in read_events(r)]
    assert kinds == ["queued", "cancelled"]


def test_finished_jobs_are_purged(client, monkeypatch):
    store = client.app.state.jobs
    job = client.post("/jobs", json=BODY).json()
    wait_job(client, job["id"])
    assert client.get(f"/jobs/{job['id']}").status_code == 200
    monkeypatch.setattr(store, "ttl_s", 0.2)
    wait_until(lambda: client.get(f"/jobs/{job['id']}").status_code == 404, timeout=30)
    monkeypatch.setattr(store, "ttl_s", 120.0)
    monkeypatch.setattr(store, "max_finished", 2)  # and beyond the count limit, the oldest go first
    ids = [client.post("/jobs", json={**BODY, "seed": s}).json()["id"] for s in range(3)]
    wait_job(client, ids[-1])  # one worker, FIFO: the others finished before it
    wait_until(lambda: client.get(f"/jobs/{ids[0]}").status_code == 404, timeout=30)
    assert all(client.get(f"/jobs/{job_id}").status_code == 200 for job_id in ids[1:])


def test_timeouts_answer_504_and_fail_jobs(one_thread):  # noqa: F811
    with app_client(batching=False, request_timeout_s=0.5) as c:
        engine = engine_of(c)
        with UNetGate(unet(c), hold_at=2) as gate:
            start = time.monotonic()
            r = c.post("/generate", json={**BODY, "steps": 30})
            assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
            assert time.monotonic() - start < 5
            gate.release.set()
            wait_idle(engine)
            calls = gate.calls
        assert calls == 2  # stopped at the step after the deadline
        with UNetGate(unet(c), hold_at=1) as gate:
            job = c.post("/jobs", json={**BODY, "steps": 30}).json()
            done = wait_job(c, job["id"])  # the watchdog fails it while its first UNet call is held
            gate.release.set()
            wait_idle(engine)
        assert done["status"] == "failed" and "timeout" in done["error"]["message"]
        assert gate.calls == 1
