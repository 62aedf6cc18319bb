"""Cross-request batching: concurrent requests share UNet calls and still get the images they get alone."""

from __future__ import annotations

import threading

import pytest
import torch
from test_service_support import UNetGate, app_client, engine_of, one_thread  # noqa: F401

from diffsteer.guidance.denoiser import Condition, call_unet
from diffsteer.guidance.sampler import generate
from diffsteer.service.device import DeviceExecutor, DeviceWorker, _row_timesteps
from diffsteer.service.schemas import GenerateRequest

pytestmark = pytest.mark.usefixtures("one_thread")

REQUESTS = [
    {"prompt": "a red circle", "steps": 4, "seed": 1, "scheduler": "euler_a", "policy": "cfg:scale=5"},
    {
        "prompt": "a blue square",
        "steps": 6,
        "seed": 2,
        "scheduler": "dpmpp_2m",
        "policy": "apg:scale=6,eta=0",
        "num_images": 2,
    },
    {
        "prompt": "a green tree",
        "steps": 5,
        "seed": 3,
        "scheduler": "ddim",
        "policy": "perp_neg:scale=4",
        "negative_prompt": "a cat",
    },
    {"prompt": "two yellow cars", "steps": 4, "seed": 4, "policy": "ag:scale=5,gamma_bar=0.95"},
]


def batch_histogram(engine) -> tuple[float, float]:
    """(UNet calls that served one request, all UNet calls) from the metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    single = total = 0.0
    for family in text_string_to_metric_families(engine.metrics.exposition().decode()):
        for s in family.samples:
            if s.name == "diffsteer_unet_batch_requests_bucket" and s.labels["le"] == "1.0":
                single = s.value
            if s.name == "diffsteer_unet_batch_requests_count":
                total = s.value
    return single, total


def test_batched_requests_equal_the_same_requests_alone(one_thread):  # noqa: F811
    with app_client(batching=True, max_concurrent=4, batch_window_ms=500.0, max_batch_rows=32) as client:
        engine = engine_of(client)
        model = engine.models.get(engine.default_model)
        alone = [generate(model, r).pixels for r in REQUESTS]
        alone_calls = []
        for r in REQUESTS:
            with UNetGate(model.unet) as gate:
                generate(model, r)
            alone_calls.append(gate.calls)

        with UNetGate(model.unet) as gate:
            tickets = [engine.submit(engine.plan(GenerateRequest.model_validate(r))) for r in REQUESTS]
            outcomes = [t.future.result(timeout=60) for t in tickets]
        for outcome, expected in zip(outcomes, alone):
            assert outcome.result.pixels.shape == expected.shape
            assert (outcome.result.pixels - expected).abs().max().item() <= 1e-5
        single, total = batch_histogram(engine)
        assert total > single, "some UNet call served several requests"
        assert gate.calls < sum(alone_calls)  # shared calls: fewer forward passes than the requests alone
        assert gate.calls == total


def test_unbatched_service_is_bit_identical_to_the_library(one_thread):  # noqa: F811
    with app_client(batching=False) as client:
        engine = engine_of(client)
        model = engine.models.get(engine.default_model)
        for r in REQUESTS[:2]:
            outcome = engine.submit(engine.plan(GenerateRequest.model_validate(r))).future.result(timeout=60)
            assert torch.equal(outcome.result.pixels, generate(model, r).pixels)
        single, total = batch_histogram(engine)
        assert single == total > 0


def test_per_row_float_timesteps_change_nothing(sd_model):
    unet = sd_model.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=g)
    hidden = torch.randn(3, 77, 32, generator=g)
    t = torch.tensor(981)  # an integer timestep, as DDIM gives
    with torch.no_grad():
        scalar = unet(x, t, encoder_hidden_states=hidden).sample
        rows = unet(x, _row_timesteps(t, 3), encoder_hidden_states=hidden).sample
    assert _row_timesteps(t, 3).dtype == torch.float32
    assert torch.equal(scalar, rows)


class RowwiseUNet(torch.nn.Module):
    """A stand-in UNet whose output row i depends on row i only: x * t + mean(hidden); records batch sizes."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.batches: list[int] = []

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        self.batches.append(x.shape[0])
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        out = x * t.view(-1, 1, 1, 1) + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (out * self.weight,)


def run_calls(worker, unet, specs, sessions=True):
    """Each spec (rows, t, shape) calls the worker from its own thread; returns outputs and expectations."""
    results, expected = [None] * len(specs), []
    start = threading.Barrier(len(specs))

    def call(i, rows, t, shape):
        x = torch.full((rows, *shape), float(i + 1))
        cond = Condition(torch.full((rows, 2, 3), float(i)))
        ctx = worker.session(unet, (), shape) if sessions else _null()
        with ctx:
            start.wait()
            results[i] = DeviceExecutor(worker, None).backbone_fn(call_unet, unet, x, torch.tensor(t), cond)

    threads = []
    for i, (rows, t, shape) in enumerate(specs):
        expected.append(torch.full((rows, *shape), float(i + 1)) * t + float(i))
        threads.append(threading.Thread(target=call, args=(i, rows, t, shape)))
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    return results, expected


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_worker_gathers_compatible_calls_and_splits_results():
    unet = RowwiseUNet()
    observed = []
    worker = DeviceWorker(batching=True, max_rows=16, window_s=2.0, on_batch=lambda r, n, s: observed.append((r, n)))
    try:
        specs = [(1, 10, (4, 2, 2)), (2, 20, (4, 2, 2)), (3, 30, (4, 2, 2))]
        results, expected = run_calls(worker, unet, specs)
        for got, want in zip(results, expected):
            assert torch.equal(got, want)
        assert observed == [(6, 3)]  # one call; it did not wait out the 2 s window: all sessions had submitted
    finally:
        worker.close()


def test_worker_respects_row_budget_and_shapes():
    unet = RowwiseUNet()
    observed = []
    worker = DeviceWorker(batching=True, max_rows=4, window_s=0.5, on_batch=lambda r, n, s: observed.append((r, n)))
    try:
        specs = [(3, 10, (4, 2, 2)), (3, 20, (4, 2, 2)), (1, 30, (4, 4, 4))]
        results, expected = run_calls(worker, unet, specs)
        for got, want in zip(results, expected):
            assert torch.equal(got, want)
        assert sorted(observed) == [(1, 1), (3, 1), (3, 1)]  # 3 + 3 > 4 rows; other latent shape never mixed
    finally:
        worker.close()


def test_worker_without_batching_runs_calls_one_by_one():
    unet = RowwiseUNet()
    worker = DeviceWorker(batching=False)
    try:
        results, expected = run_calls(worker, unet, [(2, 10, (4, 2, 2)), (2, 20, (4, 2, 2))])
        assert all(torch.equal(g, w) for g, w in zip(results, expected))
        assert unet.batches == [2, 2]
    finally:
        worker.close()


def test_a_failing_unet_call_reaches_its_callers_and_the_worker_survives():
    class Broken(RowwiseUNet):
        def forward(self, *a, **k):
            raise RuntimeError("out of memory (simulated)")

    broken = Broken()
    worker = DeviceWorker(batching=True, window_s=0.5)
    errors = []
    try:

        def call():
            try:
                DeviceExecutor(worker, None).backbone_fn(
                    call_unet, broken, torch.ones(1, 4, 2, 2), torch.tensor(1), Condition(torch.ones(1, 2, 3))
                )
            except RuntimeError as e:
                errors.append(str(e))

        threads = [threading.Thread(target=call) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert errors == ["out of memory (simulated)"] * 2
        assert worker.run_task(lambda: 41 + 1) == 42  # the worker survives
    finally:
        worker.close()
