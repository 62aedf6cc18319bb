"""Every registered policy through the service gives what the library gives, including the reward-driven
ones: ReNO's outer loop (autograd through the sampler) runs on the device worker, one iteration per task so
other requests interleave, and reports its phase;
dynamic CFG scores candidates inside its steps while its UNet calls go through the batcher."""

from __future__ import annotations

import json

import pytest
from test_service_support import (  # noqa: F401
    UNetGate,
    app_client,
    decode_image,
    engine_of,
    one_thread,
    pixels,
    wait_idle,
    wait_until,
)

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.registry import policy_names
from diffsteer.guidance.sampler import generate
from diffsteer.service.engine import jsonable

pytestmark = pytest.mark.usefixtures("one_thread")

REWARD = "saturation:1"  # weight-free and differentiable: no checkpoint needed
POLICIES = {
    "cfg": "cfg:scale=4,rescale=0.3",
    "apg": "apg:scale=6,eta=0,momentum=-0.5",
    "ag": "ag:scale=5,gamma_bar=0.9",
    "linear_ag": "linear_ag:scale=5,warmup_steps=1,period=2",
    "cfg_zero_star": "cfg_zero_star:scale=4",
    "perp_neg": "perp_neg:scale=4",
    "reno": {"name": "reno", "reward": REWARD, "iterations": 2},
    "dynamic_cfg": {"name": "dynamic_cfg", "reward": REWARD, "candidates": [1.0, 6.0]},
}
BODY = {"prompt": ["a red circle", "a blue square"], "negative_prompt": "green", "steps": 3, "seed": 4}


@pytest.fixture(scope="module")
def client(one_thread):  # noqa: F811
    with app_client(batching=True, max_concurrent=2, batch_window_ms=5.0) as c:
        yield c


@pytest.mark.parametrize("name", policy_names())
def test_every_policy_matches_the_library(client, name):
    engine = engine_of(client)
    model = engine.models.get(engine.default_model)
    body = {**BODY, "policy": POLICIES.get(name, {"name": name})}
    try:
        expected = generate(model, body)
    except InvalidInput as e:  # a new policy whose defaults need configuration: the service must say the same
        r = client.post("/generate", json=body)
        assert r.status_code == 422 and r.json()["error"]["field"] == e.field
        return
    r = client.post("/jobs", json=body)
    assert r.status_code == 202, r.text
    with client.stream("GET", f"/jobs/{r.json()['id']}/events") as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    final = client.get(f"/jobs/{r.json()['id']}").json()
    assert final["status"] == "succeeded", final
    result = final["result"]
    assert result["nfe"] == expected.nfe and result["policy"] == expected.params.policy.spec()
    assert jsonable(expected.trace) == result["trace"] or jsonable(expected.trace).keys() == result["trace"].keys()

    for k, b64 in enumerate(result["images"]):
        got = pixels(decode_image(b64))
        want = pixels(expected.images[k])
        assert (got - want).abs().max().item() <= 1 / 255 + 1e-6  # PNG rounding of values within 1e-5
    phases = {json.loads(line[6:]).get("phase") for line in lines} - {None}
    assert phases == ({"reno", "denoise"} if name == "reno" else {"denoise"})


def test_reno_can_be_cancelled_during_its_outer_loop(client):
    engine = engine_of(client)
    unet = engine.models.get(engine.default_model).unet
    body = {**BODY, "policy": {"name": "reno", "reward": REWARD, "iterations": 50}}
    with UNetGate(unet, hold_at=3) as gate:
        job = client.post("/jobs", json=body).json()
        assert gate.reached.wait(60)
        assert client.delete(f"/jobs/{job['id']}").status_code == 202
        gate.release.set()
        wait_idle(engine)
        # iterations are 2 steps each, with their forward passes recomputed in backward (checkpointing):
        # at most the iteration in flight finishes after the cancel
        assert gate.calls <= 3 + 4
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"
    assert client.post("/generate", json={**BODY, "policy": "cfg"}).status_code == 200


def test_other_requests_run_between_reno_iterations(client):
    """Each ReNO iteration is its own device task: a /generate submitted meanwhile is answered while the
    optimisation goes on, instead of after all of its iterations."""
    engine = engine_of(client)
    body = {**BODY, "policy": {"name": "reno", "reward": REWARD, "iterations": 1000}}
    job = client.post("/jobs", json=body).json()
    wait_until(lambda: client.get(f"/jobs/{job['id']}").json()["progress"]["phase"] == "reno")
    assert client.post("/generate", json={**BODY, "policy": "cfg", "steps": 2}).status_code == 200
    status = client.get(f"/jobs/{job['id']}").json()
    assert status["status"] == "running" and status["progress"]["phase"] == "reno", status
    assert status["progress"]["step"] < 1001
    assert client.delete(f"/jobs/{job['id']}").status_code == 202
    wait_idle(engine)


def test_reward_policies_refuse_unknown_rewards(client):
    for policy in ({"name": "reno", "reward": "nosuchreward:1"}, {"name": "dynamic_cfg", "reward": "nosuchreward:1"}):
        r = client.post("/generate", json={**BODY, "policy": policy})
        assert r.status_code == 422 and r.json()["error"]["field"] == "policy.reward", r.text
