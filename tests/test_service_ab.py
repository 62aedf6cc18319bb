"""A/B evaluations as service jobs (POST /ab) and jobs scoped per API key.

One app with two API keys and an ab_dir, on the tiny model (32 px, 2-4 steps): a run end to end with progress
events, its report and images served back, results free of server paths; traversal refused; bad input naming
the field; cancellation; a run sharing the device with /generate; another key's jobs and files are 404."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest
from test_service_support import (  # noqa: F401
    UNetGate,
    app_client,
    engine_of,
    one_thread,
    read_events,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA = {"Authorization": "Bearer alpha"}
BETA = {"X-API-Key": "beta"}
RUN = {
    "arms": ["base=cfg:scale=1", {"name": "apg", "policy": {"name": "apg", "scale": 5}}],
    "prompts": ["a red circle", "a blue square"],
    "seeds": 1,
    "steps": 2,
    "batch_size": 2,
    "metrics": "saturation,oversaturation,nfe",
    "n_resamples": 200,
}
GEN = {"prompt": "a blue square", "steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def ab_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ab_runs")


@pytest.fixture(scope="module")
def client(ab_dir, one_thread):  # noqa: F811
    # no batching: one generation slot, which an A/B run must not take
    with app_client(ab_dir=str(ab_dir), api_keys="alpha,beta", batching=False, job_ttl_s=120.0) as c:
        yield c


def wait_finished(client, url: str, headers=ALPHA, timeout: float = 60.0) -> dict:
    body: dict = {}

    def finished() -> bool:
        nonlocal body
        body = client.get(url, headers=headers).json()
        return body["status"] in ("succeeded", "failed", "cancelled")

    wait_until(finished, timeout)
    return body


def wait_ab_idle(client) -> None:
    queue = engine_of(client).ab_queue
    wait_until(lambda: queue.running == 0 and queue.depth == 0)


@pytest.fixture(scope="module")
def finished_run(client):
    r = client.post("/ab", json=RUN, headers=ALPHA)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/ab/{job['id']}" and job["progress"]["stage"] == "queued"
    assert job["progress"]["total"] == 4  # 2 arms x 2 prompts x 1 seed
    with client.stream("GET", f"/ab/{job['id']}/events", headers=ALPHA) as stream:
        events = read_events(stream)
    return {"id": job["id"], "events": events, "status": client.get(f"/ab/{job['id']}", headers=ALPHA).json()}


def test_ab_run_end_to_end(client, finished_run, ab_dir):
    job_id, events, status = finished_run["id"], finished_run["events"], finished_run["status"]
    kinds = [kind for _, kind, _ in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "succeeded", kinds
    progress = [data for _, kind, data in events if kind == "progress"]
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)  # never goes back
    assert {"generate", "statistics", "report", "done"} <= {p["stage"] for p in progress}
    assert progress[-1] == {**progress[-1], "stage": "done", "done": 4, "total": 4, "generated": 4}
    final = events[-1][2]
    assert final["report"] == f"/ab/{job_id}/report.html" and final["generated"] == 4

    assert status["status"] == "succeeded" and status["progress"]["stage"] == "done"
    result = status["result"]
    assert [a["name"] for a in result["arms"]] == ["base", "apg"] and len(result["images"]) == 4
    [pair] = result["statistics"]
    assert (pair["arm_a"], pair["arm_b"]) == ("base", "apg")
    assert set(pair["metrics"]) == {"saturation", "oversaturation", "nfe"}
    assert pair["metrics"]["nfe"]["mean_diff"] == 2.0  # cfg at scale 1 skips the unconditional branch
    assert result["summary"]["apg"]["nfe"]["mean"] == 4.0
    assert result["config"]["output_dir"] == f"/ab/{job_id}/"
    assert result["files"]["results"] == f"/ab/{job_id}/results.json"
    assert str(ab_dir) not in json.dumps(status)  # no server path in what the client sees
    # an A/B job is not a generation job
    assert client.get(f"/jobs/{job_id}", headers=ALPHA).status_code == 404


def test_report_and_images_are_served(client, finished_run, ab_dir):
    job_id = finished_run["id"]
    report = client.get(f"/ab/{job_id}/report.html", headers=ALPHA)
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in report.headers["content-security-policy"]
    result = finished_run["status"]["result"]
    for image in result["images"]:
        assert f"src='{image['path']}'" in report.text  # relative: resolves to /ab/{id}/images/...
        png = client.get(f"/ab/{job_id}/{image['path']}", headers=ALPHA)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content == (ab_dir / job_id / image["path"]).read_bytes()
    assert client.get(f"/ab/{job_id}/plots/distributions.png", headers=ALPHA).status_code == 200
    served = client.get(f"/ab/{job_id}/results.json", headers=ALPHA).json()
    assert served == result and str(ab_dir) not in json.dumps(served)


@pytest.mark.parametrize(
    "path",
    [
        "job.json",
        "records.jsonl",
        "%2e%2e/%2e%2e/etc/passwd",
        "images/%2e%2e/job.json",
        "images/..%2fjob.json",
        "%2fetc%2fpasswd",
        "images/base/%2e%2e/%2e%2e/records.jsonl.png",
        "images",
        "report.html/",
        "plots/../job.json",
    ],
)
def test_paths_outside_the_served_files_are_404(client, finished_run, path):
    r = client.get(f"/ab/{finished_run['id']}/{path}", headers=ALPHA)
    assert r.status_code == 404, (path, r.text[:200])
    assert "owner" not in r.text and "root:" not in r.text


def test_traversal_by_job_id_and_links_out_of_the_folder(client, finished_run, ab_dir, tmp_path):
    assert client.get("/ab/%2e%2e/report.html", headers=ALPHA).status_code == 404
    assert client.get("/ab/..%2f..%2fetc/report.html", headers=ALPHA).status_code == 404
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    link = ab_dir / finished_run["id"] / "images" / "base" / "link.png"
    os.symlink(secret, link)
    try:
        assert client.get(f"/ab/{finished_run['id']}/images/base/link.png", headers=ALPHA).status_code == 404
    finally:
        link.unlink()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"arms": ["only=cfg"]}, "arms"),
        ({"arms": ["a=cfg", "b=nosuchpolicy"]}, "arms"),
        ({"arms": ["a=cfg", "a=apg"]}, "arms"),
        ({"arms": ["a=cfg", "b=cfg@nosuchmodel"]}, "arms"),
        ({"prompts": "/etc/passwd"}, "prompts"),
        ({"prompts": "text:/etc/passwd"}, "prompts"),
        ({"prompts": "pg:nosuchcategory"}, "prompts"),
        ({"prompts": ["x" * 5000]}, "prompts"),
        ({"prompts": [" "]}, "prompts"),
        ({"output_dir": "/tmp/elsewhere"}, "output_dir"),
        ({"device": "cuda"}, "device"),
        ({"steps": 51}, "steps"),
        ({"batch_size": 5}, "batch_size"),
        ({"width": 128}, "width"),
        ({"height": 20}, "height"),
        ({"model": "nosuchmodel"}, "model"),
        ({"metrics": "nfe,bogus"}, "metrics"),
        ({"metrics": True}, "metrics"),
        ({"metrics": "verifier", "prompts": ["a photo of a cat"]}, "metrics"),  # needs proving-ground prompts
        ({"scheduler": "bogus"}, "scheduler"),
        ({"baseline": "nobody"}, "baseline"),
        ({"seeds": 5000}, "seeds"),
        ({"directions": {"nfe": "sideways"}}, "directions.nfe"),
        ({"directions": {"bogus": "higher"}}, "directions"),
        ({"confidence": 2}, "confidence"),
    ],
)
def test_bad_input_names_the_field(client, ab_dir, change, field):
    before = set(ab_dir.iterdir())
    r = client.post("/ab", json={**RUN, **change}, headers=ALPHA)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field, r.text
    assert set(ab_dir.iterdir()) == before  # nothing written for a refused run


def test_cancel_a_running_ab_job(client, ab_dir):
    engine = engine_of(client)
    unet = engine.models.get(engine.default_model).unet
    with UNetGate(unet, hold_at=3) as gate:
        job = client.post("/ab", json={**RUN, "steps": 40}, headers=ALPHA).json()
        assert gate.reached.wait(30)
        r = client.delete(f"/ab/{job['id']}", headers=ALPHA)
        assert r.status_code == 202 and r.json()["status"] == "cancelled"
        gate.release.set()
        wait_ab_idle(client)
        assert gate.calls == 3  # the call in flight finished; no further step ran
    with client.stream("GET", f"/ab/{job['id']}/events", headers=ALPHA) as stream:
        kinds = [kind for _, kind, _ in read_events(stream)]
    assert kinds[-1] == "cancelled" and "succeeded" not in kinds
    body = client.get(f"/ab/{job['id']}", headers=ALPHA).json()
    assert body["status"] == "cancelled" and "DELETE" in body["error"]["message"]
    # deleting the finished job removes it and its folder
    assert (ab_dir / job["id"]).is_dir()
    assert client.delete(f"/ab/{job['id']}", headers=ALPHA).status_code == 200
    assert not (ab_dir / job["id"]).exists()
    assert client.get(f"/ab/{job['id']}", headers=ALPHA).status_code == 404
    assert client.get(f"/ab/{job['id']}/report.html", headers=ALPHA).status_code == 404


def test_a_full_ab_queue_answers_429_and_leaves_no_folder(client, ab_dir):
    engine = engine_of(client)
    with UNetGate(engine.models.get(engine.default_model).unet, hold_at=1) as gate:
        running = client.post("/ab", json={**RUN, "steps": 40}, headers=ALPHA).json()
        assert gate.reached.wait(30)
        waiting = [client.post("/ab", json=RUN, headers=ALPHA) for _ in range(engine.settings.ab_queue_size)]
        assert [r.status_code for r in waiting] == [202] * len(waiting)
        before = set(ab_dir.iterdir())
        r = client.post("/ab", json=RUN, headers=ALPHA)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert set(ab_dir.iterdir()) == before
        for job_id in [running["id"], *(w.json()["id"] for w in waiting)]:
            assert client.delete(f"/ab/{job_id}", headers=ALPHA).status_code == 202
        gate.release.set()
        wait_ab_idle(client)


def test_generate_is_served_while_an_ab_run_holds_the_device(client):
    """The run's batches go through the device worker call by call, on the A/B queue: /generate (with its one
    generation slot) is answered long before the run ends."""
    run = {
        **RUN,
        "prompts": ["a red circle", "a blue square", "a green triangle", "a cyan circle"],
        "seeds": 2,
        "steps": 50,
        "batch_size": 1,
    }
    job = client.post("/ab", json=run, headers=ALPHA).json()
    wait_until(lambda: client.get(f"/ab/{job['id']}", headers=ALPHA).json()["progress"]["stage"] == "generate")
    start = time.monotonic()
    r = client.post("/generate", json=GEN, headers=ALPHA)
    assert r.status_code == 200
    status = client.get(f"/ab/{job['id']}", headers=ALPHA).json()
    assert status["status"] == "running" and status["progress"]["done"] < 16, (status, time.monotonic() - start)
    assert client.delete(f"/ab/{job['id']}", headers=ALPHA).status_code == 202
    wait_ab_idle(client)


def test_jobs_are_scoped_per_api_key(client):
    job = client.post("/jobs", json=GEN, headers=ALPHA).json()
    url = f"/jobs/{job['id']}"
    for method, path in (("GET", url), ("GET", f"{url}/events"), ("DELETE", url)):
        r = client.request(method, path, headers=BETA)
        assert r.status_code == 404 and r.json()["error"]["field"] == "job_id", (method, path, r.text)
    done = wait_finished(client, url)  # beta's DELETE did not cancel it
    assert done["status"] == "succeeded"
    basic = {"Authorization": "Basic " + base64.b64encode(b"user:alpha").decode()}
    assert client.get(url, headers=basic).status_code == 200  # the same key, however presented
    assert client.get(url).status_code == 401


def test_ab_runs_and_files_are_scoped_per_api_key(client, finished_run):
    job_id = finished_run["id"]
    for method, path in (
        ("GET", f"/ab/{job_id}"),
        ("GET", f"/ab/{job_id}/events"),
        ("DELETE", f"/ab/{job_id}"),
        ("GET", f"/ab/{job_id}/report.html"),
        ("GET", f"/ab/{job_id}/results.json"),
        ("GET", f"/ab/{job_id}/plots/distributions.png"),
    ):
        r = client.request(method, path, headers=BETA)
        assert r.status_code == 404, (method, path, r.status_code)
    assert client.get(f"/ab/{job_id}", headers=ALPHA).json()["status"] == "succeeded"
    assert client.get(f"/ab/{job_id}/report.html").status_code == 401


def test_files_outlive_the_purged_job(client, finished_run, monkeypatch):
    store = client.app.state.jobs
    job_id = finished_run["id"]
    monkeypatch.setattr(store, "ttl_s", 0.0)
    wait_until(lambda: client.get(f"/ab/{job_id}", headers=ALPHA).status_code == 404)
    assert client.get(f"/ab/{job_id}/report.html", headers=ALPHA).status_code == 200
    assert client.get(f"/ab/{job_id}/report.html", headers=BETA).status_code == 404


def test_ab_is_disabled_without_ab_dir(one_thread):  # noqa: F811
    with app_client(preload=False) as c:
        for method, path in (("POST", "/ab"), ("GET", "/ab/abc"), ("GET", "/ab/abc/report.html")):
            r = c.request(method, path, json=RUN if method == "POST" else None)
            assert r.status_code == 403 and r.json()["error"]["code"] == "ab_disabled", r.text
            assert "ab_dir" in r.json()["error"]["message"]


def test_served_file_refuses_paths_outside_the_run(tmp_path):
    from diffsteer.service.ab import served_file
    from diffsteer.service.errors import ServiceError

    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "x.png").write_bytes(b"png")
    (tmp_path / "job.json").write_text("{}")
    assert served_file(tmp_path, "images/a/x.png") == (tmp_path / "images" / "a" / "x.png").resolve()
    for path in (
        "job.json",
        "images/../job.json",
        "images/a/../../job.json.png",
        "/etc/passwd",
        "images//a/x.png",
        "./report.html",
        "images/a/missing.png",
    ):
        with pytest.raises(ServiceError) as e:
            served_file(tmp_path, path)
        assert e.value.status == 404


def test_ab_checks_the_models_maximum_size_and_the_cost_up_front(tmp_path, one_thread):  # noqa: F811
    """As /generate: a size above the model's max_size and a run whose batches cost more than max_cost are
    refused before anything is queued, naming the field."""
    from test_service_support import app_client

    body = {"arms": ["a=cfg:scale=2", "b=apg:scale=2"], "prompts": ["a red circle"], "steps": 2}
    with app_client(ab_dir=str(tmp_path / "ab"), max_cost=10.0) as client:
        r = client.post("/ab", json={**body, "width": 64, "height": 64})
        assert r.status_code == 422 and r.json()["error"]["field"] in ("width", "height", "steps", "batch_size")
        assert client.post("/ab", json=body).status_code == 202
        r = client.post("/ab", json={**body, "steps": 40})
        assert r.status_code == 422, r.text
