"""Ray Serve (service/ray_serve.py): a local Ray cluster with 2 replicas of the default model behind Ray's HTTP
proxy, checked against the plain app: both replicas answer, the same seed gives the same image as
``diffsteer serve``, job routes reach the replica holding the job, errors and 429s are ours, metrics name the
replica. Plus the settings -> deployment options mapping, without a cluster."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_service_support import app_client, free_port, one_thread, read_events, settings  # noqa: F401

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -e '.[dev]')")
serve = pytest.importorskip("ray.serve")

from diffsteer.service import ray_serve  # noqa: E402
from diffsteer.service.settings import load_settings  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts Ray or a subprocess per row

ROOT = Path(__file__).resolve().parent.parent
BODY = {"prompt": "a red circle above a blue square", "steps": 4, "seed": 1234}


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


# --- without a cluster -----------------------------------------------------------------------------------


def test_deployment_options_come_from_the_settings_file(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "device: cpu\nmax_concurrent: 3\nqueue_size: 5\n"
        "ray: {num_replicas: null, min_replicas: 2, max_replicas: 6, stream_slots: 4}\n"
    )
    s = load_settings(config)
    options = ray_serve.deployment_options(s)
    assert options["max_ongoing_requests"] == 3 + 5 + 4
    auto = options["autoscaling_config"]
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 6, 3.0)
    assert "num_replicas" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}  # device: cpu -> CPU replicas
    assert options["backpressure_config"].status_code == 429

    fixed = load_settings(config, ray={"num_replicas": 2, "num_gpus_per_replica": 0.5})
    options = ray_serve.deployment_options(fixed)
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    assert options["ray_actor_options"]["num_gpus"] == 0.5
    assert ray_serve.replica_settings(s).torch_threads == 1  # CPU replica: its reserved CPUs


def test_ray_settings_refuse_bad_values(tmp_path):
    from diffsteer.guidance.errors import InvalidInput

    with pytest.raises(InvalidInput, match="min_replicas"):
        load_settings(None, ray={"num_replicas": None, "min_replicas": 5, "max_replicas": 2})
    with pytest.raises(InvalidInput, match="ray.replicas"):
        load_settings(None, ray={"replicas": 2})
    with pytest.raises(ValueError, match="config=FILE"):
        ray_serve.build_app({"cfg": "x.yaml"})


def test_serve_has_a_ray_switch():
    from diffsteer.service.cli import build_parser

    assert build_parser().parse_args(["serve", "--ray", "--config", "serve.yaml"]).ray is True
    assert build_parser().parse_args(["serve"]).ray is False


def test_job_paths_name_their_replica():
    assert ray_serve.replica_of_path("/jobs/ab12cd34.AbC-d_e") == "ab12cd34"
    assert ray_serve.replica_of_path("/jobs/ab12cd34.AbC-d_e/events") == "ab12cd34"
    assert ray_serve.replica_of_path("/api/ab/x9.tok/report.html") == "x9"
    assert ray_serve.replica_of_path("/jobs/AbCdef") is None  # a plain server's id
    assert ray_serve.replica_of_path("/generate") is None


# --- a local cluster -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """2 CPU replicas of the default model on a local Ray cluster; skips only where Ray cannot start here."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}},
        )
    except Exception as e:  # e.g. no /dev/shm, no room for the object store
        pytest.skip(f"a local Ray cluster cannot start here: {type(e).__name__}: {e}")
    port = free_port()
    s = settings(
        model=None,
        host="127.0.0.1",
        port=port,
        max_concurrent=1,
        queue_size=1,
        ray={"num_replicas": 2, "num_cpus_per_replica": 0.5},
    )
    try:
        ray_serve.run(s, blocking=False)
        yield f"http://127.0.0.1:{port}", s
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_with_the_image_of_plain_serve(cluster, one_thread):  # noqa: F811
    import httpx

    url, s = cluster
    answers = {}
    for _ in range(12):
        r = httpx.post(f"{url}/generate", json=BODY, timeout=600)
        assert r.status_code == 200, r.text
        answers.setdefault(r.headers["x-diffsteer-replica"], r.json())
        if len(answers) == 2:
            break
    assert len(answers) == 2, f"only replica(s) {sorted(answers)} answered"

    with app_client(**s.model_dump(exclude={"ray", "host", "port", "api_keys"})) as client:
        plain = client.post("/generate", json=BODY).json()
    for replica, body in answers.items():
        assert body["seeds"] == plain["seeds"] and body["nfe"] == plain["nfe"]
        assert np.array_equal(pixels(body["images"][0]), pixels(plain["images"][0])), replica

    metrics = httpx.get(f"{url}/metrics", timeout=60)
    assert f'diffsteer_replica_info{{replica="{metrics.headers["x-diffsteer-replica"]}"}} 1.0' in metrics.text
    assert "diffsteer_generations_total" in metrics.text or "diffsteer_generations" in metrics.text


def test_job_routes_reach_the_replica_holding_the_job(cluster):
    import httpx

    url, _ = cluster
    created = httpx.post(f"{url}/jobs", json={**BODY, "seed": 5}, timeout=60)
    assert created.status_code == 202, created.text
    job_id, owner = created.json()["id"], created.headers["x-diffsteer-replica"]
    assert job_id.startswith(f"{owner}.")
    for _ in range(6):  # with random routing, 6 lookups all finding the job would be a 1-in-64 chance
        r = httpx.get(f"{url}/jobs/{job_id}", timeout=60)
        assert r.status_code == 200 and r.headers["x-diffsteer-replica"] == owner
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", timeout=600) as events:
        kinds = [kind for _, kind, _ in read_events(events)]
    assert kinds[-1] == "succeeded"
    assert httpx.get(f"{url}/jobs/{job_id}", timeout=60).json()["result"]["seeds"] == [5]


def test_errors_and_backpressure_are_ours(cluster):
    import httpx

    url, _ = cluster
    bad = httpx.post(f"{url}/generate", json={**BODY, "steps": 0}, timeout=60)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "steps"

    # each replica runs 1 generation and queues 1: 8 at once overflow both
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda k: httpx.post(f"{url}/generate", json={**BODY, "steps": 12, "seed": k}, timeout=600), range(8)
            )
        )
    codes = sorted(r.status_code for r in answers)
    assert set(codes) <= {200, 429} and codes.count(200) >= 2 and 429 in codes, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 1
