"""Prometheus metrics (``prometheus_client``), one registry per app so several apps can live in one process.

Every label value comes from a known, bounded set, whatever a client sends: HTTP requests are labelled by
route *template* (``/jobs/{job_id}``, never the raw path; unmatched paths count under ``route="unmatched"``),
by method (the standard ones, anything else ``other``) and by status (the codes this service answers, anything
else its class, e.g. ``5xx``); models by the names the server was configured with.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class _GpuMemory:
    """GPU memory per CUDA device, read at scrape time."""

    def collect(self):
        if not torch.cuda.is_available():
            return
        allocated = GaugeMetricFamily(
            "diffsteer_gpu_memory_allocated_bytes", "Memory held by tensors", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "diffsteer_gpu_memory_reserved_bytes", "Memory reserved by the caching allocator", labels=["device"]
        )
        peak = GaugeMetricFamily(
            "diffsteer_gpu_memory_peak_allocated_bytes", "Peak memory held by tensors", labels=["device"]
        )
        for i in range(torch.cuda.device_count()):
            allocated.add_metric([str(i)], torch.cuda.memory_allocated(i))
            reserved.add_metric([str(i)], torch.cuda.memory_reserved(i))
            peak.add_metric([str(i)], torch.cuda.max_memory_allocated(i))
        yield allocated
        yield reserved
        yield peak


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only add noise here
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "diffsteer_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "diffsteer_http_request_duration_seconds",
            "HTTP request latency (to the last body byte)",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generation_seconds = Histogram(
            "diffsteer_generation_duration_seconds",
            "Time from a generation's start on a worker to its images",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "diffsteer_queue_wait_seconds", "Time a request waited for a worker", buckets=LATENCY_BUCKETS, registry=r
        )
        self.generations = Counter(
            "diffsteer_generations", "Generations by outcome", ["outcome"], registry=r
        )  # succeeded failed cancelled timeout rejected
        self.images = Counter("diffsteer_images_generated", "Images generated", ["model"], registry=r)
        self.nfe = Counter(
            "diffsteer_nfe",
            "Backbone (UNet or transformer) evaluations (per image) of finished generations",
            ["model"],
            registry=r,
        )
        self.batch_rows = Histogram(
            "diffsteer_unet_batch_rows",
            "Latent rows per backbone (UNet or transformer) call",
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "diffsteer_unet_batch_requests",
            "Requests sharing one backbone (UNet or transformer) call",
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.unet_seconds = Histogram(
            "diffsteer_unet_call_duration_seconds",
            "Duration of one (batched) backbone (UNet or transformer) call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("diffsteer_queue_depth", "Requests waiting for a worker", registry=r)
        self.running = Gauge("diffsteer_generations_running", "Generations running", registry=r)
        self.jobs_stored = Gauge("diffsteer_jobs_stored", "Jobs held by the job store", registry=r)
        self.models_loaded = Gauge("diffsteer_models_loaded", "Models loaded", registry=r)
        r.register(_GpuMemory())

    def observe_batch(self, rows: int, requests: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.unet_seconds.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
STATUSES = frozenset({200, 202, 204, 304, 400, 401, 403, 404, 405, 406, 413, 415, 422, 429, 499, 500, 503, 504})


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def status_label(status: int) -> str:
    return str(status) if status in STATUSES else f"{status // 100}xx"


class MetricsMiddleware:
    """Counts every HTTP request by route template, method and status, and times it (pure ASGI)."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], Metrics]):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            metrics = self.metrics()
            code = scope.get("diffsteer.status_override", status["code"])
            method = method_label(scope["method"])
            metrics.requests.labels(template, method, status_label(code)).inc()
            metrics.latency.labels(template, method).observe(time.perf_counter() - start)
