"""The same FastAPI app on Ray Serve: replicas of the whole app, each with its own engine on its own device.

``diffsteer serve --ray [--config FILE]`` starts it (a local Ray cluster, or the one at ``ray.address``);
a Ray user deploys it with ``serve run diffsteer.service.ray_serve:build_app config=FILE``. Everything a replica does is
``create_app(settings)``: the same routes, errors, metrics, auth and cross-request batching (which stays inside
each replica). What Ray adds:

- placement: ``ray.num_gpus_per_replica`` GPUs per replica (Ray sets ``CUDA_VISIBLE_DEVICES``, so each replica's
  ``cuda`` is its own device), or CPU replicas with ``ray.num_cpus_per_replica`` CPUs and as many torch threads;
- scaling: ``ray.num_replicas`` fixed, or autoscaling between ``ray.min_replicas`` and ``ray.max_replicas``
  around ``ray.target_ongoing_requests`` (default: the replica's concurrency);
- backpressure: ``max_ongoing_requests`` per replica is concurrency + queue_size + ``ray.stream_slots``, so a
  generation beyond a replica's queue reaches that replica's WorkQueue and gets our JSON 429 with Retry-After;
  Ray's own router queue (``ray.max_queued_requests``, unbounded by default) answers 429 too;
- the replica that answered in every response's ``X-Diffsteer-Replica`` header and in the
  ``diffsteer_replica_info`` metric (``/metrics`` is the answering replica's registry);
- job affinity: job ids start with ``REPLICA.``, and :class:`JobAffinityRouter` sends ``/jobs/{id}...`` and
  ``/ab/{id}...`` to the replica that holds the job (its events, previews and cancel live there).
"""

from __future__ import annotations

import logging
import pickle
import random
import re
from typing import Any

import torch
from prometheus_client import Gauge
from ray import serve
from ray.serve.config import AutoscalingConfig, BackpressureConfig, RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffsteer.service.app import create_app
from diffsteer.service.settings import ServiceSettings, load_settings

log = logging.getLogger("service.ray")

REPLICA_HEADER = "x-diffsteer-replica"
DEPLOYMENT_NAME = "diffsteer"
# /jobs/{REPLICA.token}[/events] and /ab/{REPLICA.token}[/...], under any route prefix
_JOB_PATH = re.compile(r"/(?:jobs|ab)/([a-z0-9]+)\.[A-Za-z0-9_-]+(?:/|$)")
_JOB_ROUTE_TEMPLATES = ("/jobs/", "/ab/")


def replica_of_path(path: str) -> str | None:
    """The replica id in a job route's job id, or None for any other path."""
    match = _JOB_PATH.search(path)
    return match.group(1) if match else None


def request_path(pending: PendingRequest) -> str | None:
    """The HTTP path of a request Ray's proxy routes to a job route, else None.

    The proxy labels a request with its route *template* (``/jobs/{job_id}``), so the job id is read from the
    request itself: the proxy's one argument, a pickled ``StreamingHTTPRequest`` holding the ASGI scope.
    """
    if not pending.metadata.route.startswith(_JOB_ROUTE_TEMPLATES) or not pending.args:
        return None
    arg = pending.args[0]
    try:
        if isinstance(arg, bytes):
            arg = pickle.loads(arg)
        return arg.asgi_scope["path"]
    except Exception:  # a handle call or another Ray version's format: no affinity, never a failed request
        log.warning("cannot read the path of a %s request; routing it without job affinity", pending.metadata.route)
        return None


class JobAffinityRouter(RequestRouter):
    """A job's routes go to the replica holding the job; every other request to the less loaded of two random
    replicas (power of two choices; the base class probes their queue lengths)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        path = request_path(pending_request) if pending_request is not None else None
        owner = replica_of_path(path) if path is not None else None
        if owner is not None:
            for replica in self.curr_replicas.values():
                if replica.replica_id.unique_id == owner:
                    return [[replica]]  # wait for it even when busy: no other replica knows the job
            # the replica is gone, and its jobs with it: any replica answers the 404
        # in random order: the base class keeps the first of equally loaded replicas
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]


class ReplicaHeader:
    """Adds ``X-Diffsteer-Replica: ID`` to every response (pure ASGI)."""

    def __init__(self, app: ASGIApp, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def replica_settings(settings: ServiceSettings) -> ServiceSettings:
    """What a replica runs with: on a CPU replica, torch uses the CPUs Ray reserved for it (unless set)."""
    if settings.torch_threads is None and not gpus_per_replica(settings):
        threads = max(1, int(settings.ray.num_cpus_per_replica))
        return settings.model_copy(update={"torch_threads": threads})
    return settings


def replica_app(settings: ServiceSettings, replica: str):
    """``create_app`` for one replica: job ids carry the replica, responses and metrics name it."""
    app = create_app(replica_settings(settings))
    app.state.jobs.id_prefix = f"{replica}."
    info = Gauge(
        "diffsteer_replica_info",
        "The Ray Serve replica that serves these metrics",
        ["replica"],
        registry=app.state.engine.metrics.registry,
    )
    info.labels(replica).set(1)
    app.add_middleware(ReplicaHeader, replica=replica)
    return app


@serve.ingress()
class DiffsteerReplica:
    """One replica: the whole app (engine, job store, device worker) built at replica start."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings

    def __serve_build_asgi_app__(self):
        replica = serve.get_replica_context().replica_id.unique_id
        log.info("diffsteer replica %s starting", replica)
        return replica_app(self.settings, replica)


def gpus_per_replica(settings: ServiceSettings) -> float:
    if settings.ray.num_gpus_per_replica is not None:
        return settings.ray.num_gpus_per_replica
    if settings.device is not None and settings.device.startswith("cpu"):
        return 0.0

    return 1.0 if torch.cuda.is_available() else 0.0


def deployment_options(settings: ServiceSettings) -> dict[str, Any]:
    """``serve.deployment`` options from the settings (the same file ``diffsteer serve`` reads)."""
    ray = settings.ray
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": ray.num_cpus_per_replica, "num_gpus": gpus_per_replica(settings)},
        "max_ongoing_requests": settings.concurrency + settings.queue_size + ray.stream_slots,
        "max_queued_requests": ray.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
        "request_router_config": RequestRouterConfig(request_router_class=JobAffinityRouter),
        # a replica loads its model at start (readiness = /readyz's condition); allow for slow first loads
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": 30,
    }
    if ray.autoscaling:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=ray.min_replicas,
            max_replicas=ray.max_replicas,
            target_ongoing_requests=ray.target_ongoing_requests or float(settings.concurrency),
        )
    else:
        options["num_replicas"] = ray.num_replicas
    return options


def deployment(settings: ServiceSettings):
    """The bound Ray Serve application for ``settings``."""
    return serve.deployment(DiffsteerReplica).options(**deployment_options(settings)).bind(settings)


def build_app(args: dict[str, str]):
    """``serve run diffsteer.service.ray_serve:build_app [config=FILE]``: settings from the file, then DIFFSTEER_* variables."""
    unknown = set(args) - {"config"}
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)}; accepted: config=FILE")
    return deployment(load_settings(args.get("config")))


def run(settings: ServiceSettings, *, blocking: bool = True) -> None:
    """``diffsteer serve --ray``: join or start a Ray cluster, start Serve's HTTP proxy on host:port, deploy."""
    import ray

    if not ray.is_initialized():
        if settings.ray.address is None:
            ray.init(num_cpus=settings.ray.num_cpus, include_dashboard=False)
        else:
            ray.init(address=settings.ray.address)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(deployment(settings), name="diffsteer", route_prefix=settings.ray.route_prefix, blocking=blocking)
