"""A request's walk through the engine (issue 28): checked once against its model, queued in one pass."""

from __future__ import annotations

import pytest
from test_service_support import UNetGate, app_client, engine_of, one_thread, wait_idle  # noqa: F401

import diffsteer.service.engine as engine_module
from diffsteer.guidance.sampler import check_request
from diffsteer.service.errors import ServiceError
from diffsteer.service.schemas import GenerateRequest

pytestmark = pytest.mark.usefixtures("one_thread")

BODY = {"prompt": "a blue square", "steps": 3, "seed": 5}


@pytest.fixture
def checks(monkeypatch) -> list[str]:
    """The prompts ``check_request`` was called with, in the service (the engine's one call site)."""
    calls: list[str] = []

    def counting(model, params, **kwargs):
        calls.append(params.prompt)
        return check_request(model, params, **kwargs)

    monkeypatch.setattr(engine_module, "check_request", counting)
    return calls


def test_a_request_planned_with_the_model_loaded_is_checked_once(checks):
    with app_client(batching=False) as client:
        engine = engine_of(client)
        assert engine.loaded_model(engine.default_model) is not None
        r = client.post("/generate", json=BODY)
        assert r.status_code == 200, r.text
        assert checks == ["a blue square"]
        job = client.post("/jobs", json={**BODY, "prompt": "a job"}).json()
        wait_idle(engine)
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "succeeded"
        assert checks == ["a blue square", "a job"]
        # a mistake only the check against the model finds (a scale per step): 422 naming the field, never queued
        bad = client.post("/jobs", json={**BODY, "prompt": "bad", "policy": {"name": "cfg", "scales": [1.0, 2.0]}})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "policy.scales"
        assert checks == ["a blue square", "a job", "bad"] and len(client.app.state.jobs) == 1


def test_a_request_planned_before_the_model_was_loaded_is_checked_once(checks):
    with app_client(batching=False, preload=False) as client:
        engine = engine_of(client)
        assert engine.loaded_model(engine.default_model) is None
        r = client.post("/generate", json=BODY)  # planned unchecked, checked on the queue thread after the load
        assert r.status_code == 200, r.text
        assert checks == ["a blue square"]
        assert client.post("/generate", json={**BODY, "prompt": "loaded now"}).status_code == 200
        assert checks == ["a blue square", "loaded now"]  # planned (and checked) with the model loaded


def test_a_plan_checked_at_plan_time_queues_with_its_cost(checks):
    with app_client(batching=False) as client:
        engine = engine_of(client)
        plan = engine.plan(GenerateRequest(**BODY))
        assert plan.checked is not None and checks == ["a blue square"]
        seen = []
        ticket = engine.submit(plan, attach=lambda t: seen.append((t, t.state, t.cost)))
        assert seen == [(ticket, "queued", plan.checked.cost.total)] and ticket.cost > 0
        assert ticket.future.result(timeout=60).result.seeds == [5]
        assert checks == ["a blue square"]


def test_a_refused_job_leaves_no_job_behind(one_thread):  # noqa: F811
    with app_client(batching=False, max_concurrent=1, queue_size=0) as client:
        engine, store = engine_of(client), client.app.state.jobs
        unet = engine.models.get(engine.default_model).unet
        with UNetGate(unet, hold_at=1) as gate:
            running = client.post("/jobs", json={**BODY, "steps": 20})
            assert running.status_code == 202
            assert gate.reached.wait(30)
            before = len(store)
            refused = client.post("/jobs", json=BODY)
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
            assert len(store) == before == 1
            assert client.post("/generate", json=BODY).status_code == 429
            assert client.delete(f"/jobs/{running.json()['id']}").status_code == 202
            gate.release.set()
            wait_idle(engine)
        assert len(store) == 1  # the cancelled job, finished; nothing else


def test_a_closing_engine_refuses_with_503(one_thread):  # noqa: F811
    with app_client(batching=False) as client:
        engine = engine_of(client)
        plan = engine.plan(GenerateRequest(**BODY))
        attached = []
        engine.closing = True
        try:
            with pytest.raises(ServiceError) as e:
                engine.submit(plan, attach=attached.append)
        finally:
            engine.closing = False
        assert e.value.status == 503 and attached == []
