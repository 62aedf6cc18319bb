"""Fair scheduling on the device worker, cost limits and Retry-After (issue 16), and the executor seam (issue 15).

Worker-level tests use a stand-in UNet that sleeps a time proportional to its rows × latent area, so a "heavy"
call is really longer than a light one and the order the worker chose can be read from its log.
"""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from test_service_support import UNetGate, app_client, engine_of, one_thread, wait_idle, wait_until  # noqa: F401

from diffsteer.guidance.cost import GenerationCost, check_cost, generation_cost
from diffsteer.guidance.denoiser import Condition, call_unet
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.events import GenerationCancelled
from diffsteer.guidance.executor import DirectExecutor
from diffsteer.guidance.registry import build_policy
from diffsteer.guidance.request import GenerationParams
from diffsteer.guidance.sampler import generate
from diffsteer.service.device import NO_ADAPTERS, DeviceExecutor, DeviceWorker
from diffsteer.service.queue import QueueFull, Ticket, WorkQueue

SECONDS_PER_ROW_AREA = 0.05 / 16  # a light call: 1 row of 4×4 latents = 50 ms; 8×8: 200 ms


class SleepyUNet(torch.nn.Module):
    """Output row i = x_i · t; takes rows × area × SECONDS_PER_ROW_AREA; logs (label of the call, start time)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.log: list[str] = []

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        self.log.append("heavy" if x.shape[-1] > 4 else "light")
        time.sleep(x.shape[0] * x.shape[-1] * x.shape[-2] * SECONDS_PER_ROW_AREA)
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        return (x * t.view(-1, 1, 1, 1) * self.weight,)


def sampler_loop(
    worker: DeviceWorker, unet, flow, side: int, calls: int, done: list, stop: threading.Event | None = None
):
    """What a request's sampler loop does: one call at a time, in a session, in its flow."""
    executor = DeviceExecutor(worker, flow, native_area=16)
    cond = Condition(torch.zeros(1, 2, 3))
    with executor.session(unet, (4, side, side)):
        for _ in range(calls):
            if stop is not None and stop.is_set():
                break
            executor.backbone_fn(call_unet, unet, torch.ones(1, 4, side, side), torch.tensor(1.0), cond)
            done.append(time.monotonic())
    worker.close_flow(flow)


def test_a_light_request_runs_between_the_units_of_a_heavy_one():
    """A heavy flow (4× the work per call, heavy lane) keeps the worker busy; a light sampler loop of 8 calls
    that starts meanwhile gets its calls one after the other, after the heavy call in flight."""
    unet = SleepyUNet()
    worker = DeviceWorker(batching=True, window_s=0.0, anticipate_s=0.05)
    stop = threading.Event()
    heavy_done: list[float] = []
    light_done: list[float] = []
    try:
        heavy = threading.Thread(
            target=sampler_loop, args=(worker, unet, worker.flow(0.25, name="heavy"), 8, 1000, heavy_done, stop)
        )
        heavy.start()
        wait_until(lambda: len(heavy_done) >= 2)
        start = time.monotonic()
        sampler_loop(worker, unet, worker.flow(1.0, name="light"), 4, 8, light_done)
        latency = time.monotonic() - start
        stop.set()
        heavy.join(30)
    finally:
        worker.close()
    first_light = unet.log.index("light")
    during = unet.log[first_light : first_light + 8 + 2]
    assert during[:8] == ["light"] * 8, unet.log
    # alone: 8 × 50 ms; the heavy call in flight adds at most 200 ms (and the rest is slack for a busy machine)
    assert latency < 8 * 0.05 + 0.2 + 0.4, latency


def test_equal_flows_share_the_device_and_weights_set_the_shares():
    """Two sampler loops with equal calls: weights 1 and 0.25 give about 4 calls to 1."""
    unet = SleepyUNet()
    worker = DeviceWorker(batching=False, anticipate_s=0.05)
    stop = threading.Event()
    counts = {"a": [], "b": []}
    try:
        threads = [
            threading.Thread(target=sampler_loop, args=(worker, unet, worker.flow(w, name=n), 4, 1000, counts[n], stop))
            for n, w in (("a", 1.0), ("b", 0.25))
        ]
        for th in threads:
            th.start()
        wait_until(lambda: len(counts["a"]) + len(counts["b"]) >= 30, timeout=60)
        stop.set()
        for th in threads:
            th.join(30)
    finally:
        worker.close()
    ratio = len(counts["a"]) / max(1, len(counts["b"]))
    assert 2.5 <= ratio <= 6.5, counts


def test_units_of_a_stopped_flow_fail_without_running():
    unet = SleepyUNet()
    worker = DeviceWorker(batching=False)
    stopped = threading.Event()
    try:
        flow = worker.flow(stopped=stopped.is_set)
        blocker, blocking = threading.Event(), threading.Event()

        def block() -> None:
            blocking.set()
            blocker.wait(30)

        holding = threading.Thread(target=lambda: worker.run_task(block, flow=worker.flow()))
        holding.start()
        assert blocking.wait(30)  # the worker is busy with another flow's unit
        futures = [
            worker.submit_backbone(
                call_unet,
                unet,
                torch.ones(1, 4, 4, 4),
                torch.tensor(1.0),
                Condition(torch.zeros(1, 2, 3)),
                NO_ADAPTERS,
                (),
                flow,
                1.0,
            )
            for _ in range(3)
        ]
        stopped.set()
        blocker.set()
        holding.join(30)
        for future in futures:
            with pytest.raises(GenerationCancelled):
                future.result(30)
        assert unet.log == []
    finally:
        worker.close()


def test_gradients_through_the_worker_equal_direct_autograd(sd_model):
    """A UNet call through DeviceExecutor with autograd on: forward on the worker, backward one unit there."""
    unet = sd_model.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    cond = Condition(torch.randn(2, 77, unet.config.cross_attention_dim, generator=g))
    t = torch.tensor(500)
    weights = torch.randn(2, 4, 8, 8, generator=g)
    (direct,) = torch.autograd.grad((call_unet(unet, x, t, cond) * weights).sum(), x)
    worker = DeviceWorker()
    try:
        executor = DeviceExecutor(worker, worker.flow())
        with torch.enable_grad():
            out = executor.backbone_fn(call_unet, unet, x, t, cond)
            (through,) = torch.autograd.grad((out * weights).sum(), x)
    finally:
        worker.close()
    torch.testing.assert_close(through, direct, atol=1e-5, rtol=1e-4)


def test_dynamic_cfg_scores_in_chunks_on_the_executor(sd_model, monkeypatch):
    """Candidate scoring runs as units of the executor, at most SCORE_CHUNK native images each; same choice."""
    import diffsteer.guidance.policies.dynamic as dynamic

    class Counting(DirectExecutor):
        def __init__(self):
            self.units = 0

        def run(self, fn, *, cost=0.0):
            self.units += 1
            return fn()

    params = {
        "prompt": ["a red circle", "a blue square"],
        "seeds": [5, 6],
        "steps": 2,
        "scheduler": "ddim",
        "policy": {"name": "dynamic_cfg", "candidates": [1.0, 4.0, 12.0], "reward": "saturation:1"},
    }
    whole = Counting()
    expected = generate(sd_model, params, executor=whole)
    monkeypatch.setattr(dynamic, "SCORE_CHUNK", 2)
    chunked = Counting()
    result = generate(sd_model, params, executor=chunked)
    assert result.trace["scale_schedule"] == expected.trace["scale_schedule"]
    torch.testing.assert_close(result.pixels, expected.pixels)
    # per evaluated step: 6 candidate images in 1 unit, or in 3 chunks of 2; plus encode and decode
    assert whole.units == 2 + 2 * 1 and chunked.units == 2 + 2 * 3


# ------------------------------------------------------------------------------------------- cost limits


def cost_of(body: dict, native: int = 64) -> GenerationCost:
    params = GenerationParams.parse(body)
    return generation_cost(params, build_policy(params.policy), native)


def test_cost_is_the_product_of_its_factors():
    cost = cost_of({"prompt": "x", "steps": 30, "num_images": 2, "width": 128, "height": 64, "policy": "cfg:scale=3"})
    assert cost.total == 2 * 2 * 30 * 2  # images × area × steps × (cond + uncond)
    reno = cost_of({"prompt": "x", "steps": 4, "policy": {"name": "reno", "iterations": 10}})
    assert reno.total == 4 * 1 * (1 + 10 * 4)  # scale 1: cond only; each iteration forward + backward (3)
    assert reno.main_field() == "policy.iterations"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": 200}, "steps"),
        ({"num_images": 16, "steps": 30}, "num_images"),
        ({"width": 256, "height": 128, "steps": 30}, "width"),
        ({"steps": 4, "policy": {"name": "reno", "iterations": 1000}}, "policy.iterations"),
        ({"steps": 30, "policy": {"name": "dynamic_cfg", "candidates": [1.0] * 32}}, "policy.candidates"),
    ],
)
def test_a_costly_request_is_refused_naming_its_main_field(body, field):
    cost = cost_of({"prompt": "x", **body})
    with pytest.raises(InvalidInput) as e:
        check_cost(cost, 64, max_cost=cost.total - 1, max_area_factor=None)
    assert e.value.field == field and "max_cost" in e.value.reason
    check_cost(cost, 64, max_cost=cost.total, max_area_factor=None)  # at the limit: accepted


def test_service_refuses_costly_requests_up_front_with_422(one_thread):  # noqa: F811
    with app_client(max_cost=399.0, max_area_factor=2.0) as client:
        engine = engine_of(client)
        for body, field in [
            ({"width": 64, "height": 64}, "width"),
            ({"steps": 50, "num_images": 4}, "num_images"),
            (
                {"steps": 2, "policy": {"name": "reno", "reward": "saturation:1", "iterations": 100}},
                "policy.iterations",
            ),
        ]:
            for route in ("/generate", "/jobs"):
                r = client.post(route, json={"prompt": "x", **body})
                assert r.status_code == 422 and r.json()["error"]["field"] == field, (route, r.text)
        assert engine.queue.depth == 0 and engine.queue.running == 0
        assert client.post("/generate", json={"prompt": "x", "steps": 2}).status_code == 200


# ------------------------------------------------------------------------------------------- Retry-After


def test_retry_after_is_the_queued_cost_over_the_measured_throughput():
    rate = [None]
    queue = WorkQueue(1, 1, throughput=lambda: rate[0])
    release = threading.Event()
    try:
        running = Ticket(lambda t: release.wait(30), 60)
        running.cost = 300.0
        waiting = Ticket(lambda t: None, 60)
        waiting.cost = 500.0
        queue.submit(running)
        wait_until(lambda: queue.running == 1)
        queue.submit(waiting)
        rate[0] = 40.0  # cost units per second
        with pytest.raises(QueueFull) as e:
            queue.submit(Ticket(lambda t: None, 60))
        assert e.value.retry_after == math.ceil((300 + 500) / 40)
        running.add_cost_done(200.0)  # the device did part of the running one
        assert queue.retry_after() == math.ceil((100 + 500) / 40)
    finally:
        release.set()
        queue.close()


def test_service_retry_after_counts_the_work_ahead(one_thread):  # noqa: F811
    with app_client(max_concurrent=1, queue_size=1) as client:
        engine = engine_of(client)
        model = engine.models.get(engine.default_model)
        client.post("/generate", json={"prompt": "x", "steps": 2})  # a measured throughput
        rate = engine.device.throughput()
        assert rate is not None and rate > 0
        with UNetGate(model.unet, hold_at=2) as gate:
            first = client.post("/jobs", json={"prompt": "x", "steps": 40}).json()
            assert gate.reached.wait(60)
            client.post("/jobs", json={"prompt": "x", "steps": 20, "num_images": 2})
            r = client.post("/jobs", json={"prompt": "x", "steps": 2})
            assert r.status_code == 429
            ahead = engine.queue.cost_ahead()
            assert ahead == pytest.approx(40 * 2 - 2 + 20 * 2 * 2, abs=2)  # less the units the worker finished
            assert int(r.headers["Retry-After"]) == max(1, math.ceil(ahead / engine.device.throughput()))
            client.delete(f"/jobs/{first['id']}")
        wait_idle(engine)


# ------------------------------------------------------------------------------------------- cancellation


def test_deleting_a_large_job_frees_the_worker_within_one_unet_call(one_thread):  # noqa: F811
    with app_client() as client:
        engine = engine_of(client)
        unet = engine.models.get(engine.default_model).unet
        with UNetGate(unet, hold_at=3) as gate:
            job = client.post("/jobs", json={"prompt": "x", "steps": 50, "width": 64, "height": 64}).json()
            assert gate.reached.wait(60)
            assert client.delete(f"/jobs/{job['id']}").status_code == 202
            gate.release.set()
            wait_idle(engine)
            assert gate.calls == 3  # the call in flight when the DELETE came, and none after
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"


@pytest.mark.parametrize("batching", [True, False])
def test_a_heavy_call_is_split_into_units_another_flow_can_run_between(batching):
    """A backbone call costing more than max_unit_cost goes to the worker as row units of at most that cost, run
    one at a time even with batching on (a batch holds one unit per flow: re-gathering them was why an earlier
    split changed nothing), so a light flow's call runs after the first of them, not after all; the rows' outputs
    equal one call's."""
    from diffsteer.guidance.tiny import tiny_unet

    unet = tiny_unet(cross_dim=32).eval()
    worker = DeviceWorker(batching=batching, max_rows=16, window_s=0.05)
    calls: list[tuple[str, int]] = []
    heavy_flow, light_flow = worker.flow(name="heavy"), worker.flow(name="light")
    per_row = lambda x: 3.0 * int(x.shape[0])  # noqa: E731 - 3 evaluations per row
    heavy = DeviceExecutor(worker, heavy_flow, call_cost=per_row, max_unit_cost=7.0)  # 2 rows per unit
    light = DeviceExecutor(worker, light_flow, call_cost=per_row, max_unit_cost=7.0)
    x = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = Condition(torch.randn(8, 77, 32, generator=torch.Generator().manual_seed(1)))
    t = torch.tensor(10.0)
    first_unit = threading.Event()

    def traced(name):
        def call(backbone, x, t, condition):
            calls.append((name, int(x.shape[0])))
            if name == "heavy":
                first_unit.set()
                time.sleep(0.05)  # the light call arrives while the heavy call's units are under way
            return call_unet(backbone, x, t, condition)

        return call

    with torch.no_grad():
        results: dict[str, torch.Tensor] = {}
        heavy_thread = threading.Thread(
            target=lambda: results.__setitem__("heavy", heavy.backbone_fn(traced("heavy"), unet, x, t, cond))
        )
        heavy_thread.start()
        assert first_unit.wait(30)
        small = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))  # never batched with heavy's
        light.backbone_fn(traced("light"), unet, small, t, cond.rows(torch.tensor([0])))
        heavy_thread.join()
        direct = call_unet(unet, x, t, cond)
    worker.close()
    assert [rows for name, rows in calls if name == "heavy"] == [2, 2, 2, 2]  # 4 units of 2 rows, never merged
    assert calls.index(("light", 1)) < len(calls) - 1  # ran before the heavy call's last unit
    torch.testing.assert_close(results["heavy"], direct, atol=1e-5, rtol=1e-5)


def test_rows_per_unit():
    from diffsteer.service.device import rows_per_unit

    assert rows_per_unit(16, 16.0, 8.0) == 1  # a row above the limit: one row per unit
    assert rows_per_unit(32, 1.0, 8.0) == 8
    assert rows_per_unit(4, 2.0, 8.0) == 4  # at the limit: one unit
    assert rows_per_unit(64, 1.0, None) == 64
