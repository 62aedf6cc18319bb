"""Asynchronous jobs: an id at once, status and results by polling, progress as server-sent events.

A job wraps a queue :class:`~diffsteer.service.queue.Ticket`. The ticket's worker thread appends events (``queued``,
``started``, one ``step`` per denoising step, then ``succeeded`` / ``failed`` / ``cancelled``) to the job and
wakes the event streams waiting on it (``loop.call_soon_threadsafe``); every event has a sequence number, so a
stream can resume after ``Last-Event-ID``. Finished jobs are kept ``ttl_s`` seconds (and at most
``max_finished`` of them holding at most ``max_bytes`` of results, oldest dropped first), then purged with
their images.

Jobs have a kind (``generation``: ``/jobs``; ``ab``: ``/ab``, whose progress events are ``progress`` with the
A/B run's stage and counts) and an owner: the fingerprint of the API key that created them (None without
keys). A lookup names both, and a job of another kind or owner is not found, so ids never leak across keys.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.events import StepEvent
from diffsteer.service.engine import ModelUnavailable
from diffsteer.service.queue import Cancelled, Ticket, TimedOut

log = logging.getLogger("diffsteer.service.jobs")

TERMINAL = ("succeeded", "failed", "cancelled")


def describe_error(error: BaseException) -> tuple[str, dict[str, Any]]:
    """(job status, error body) for a ticket's exception."""
    if isinstance(error, Cancelled):
        return "cancelled", {"field": None, "message": f"cancelled: {error.reason}", "code": "cancelled"}
    if isinstance(error, TimedOut):
        return "failed", {"field": None, "message": str(error), "code": "timeout"}
    if isinstance(error, InvalidInput):
        return "failed", {"field": error.field, "message": error.reason, "code": "invalid_input"}
    if isinstance(error, ModelUnavailable):
        return "failed", {"field": "model", "message": str(error), "code": "model_unavailable"}
    return "failed", {
        "field": None,
        "message": f"internal error ({type(error).__name__}); see the server log",
        "code": "internal",
    }


class JobOutcome(Protocol):
    """What a job's ticket ends with (:class:`diffsteer.service.engine.Outcome`, :class:`diffsteer.service.ab.ABOutcome`)."""

    def response(self) -> dict[str, Any]:
        """The job's result body."""

    def summary(self) -> dict[str, Any]:
        """The data of the final ``succeeded`` event."""

    def final_progress(self) -> dict[str, Any]:
        """Updates to the progress body once finished."""


def generation_progress() -> dict[str, Any]:
    return {"step": 0, "total": None, "nfe": 0, "phase": "denoise"}


@dataclass
class Job:
    id: str
    ticket: Ticket | None  # from Job.attach (before the ticket is queued) until it finishes
    kind: str = "generation"  # or "ab"
    owner: str | None = None  # fingerprint of the creating API key
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    finished_mono: float | None = None
    status: str = "queued"
    progress: dict[str, Any] = field(default_factory=generation_progress)
    result_body: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None
    latest_latents: tuple[int, Any] | None = None
    preview: tuple[int, Any] | None = None  # (step, task rendering its previews), shared by every event stream
    size_bytes: int = 0  # what the finished job holds in memory (its result body), for the store's byte cap
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=set)

    def attach(self, ticket: Ticket) -> None:
        """Follow ``ticket``: every event it emits from now on (call it before the ticket is queued)."""
        self.ticket = ticket
        ticket.listeners.append(self.on_ticket)

    # -- worker side -------------------------------------------------------------------------------------
    def _add(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            self.events.append({"id": len(self.events) + 1, "event": kind, "data": data})
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed
                pass

    def on_ticket(self, kind: str, data: Any) -> None:
        if self.finished:  # a late notice from a worker that was cancelled meanwhile
            return
        if kind == "started":
            self.status = "running"
            self.started_at = time.time()
            self._add("started", {"status": "running"})
        elif kind == "prepared":
            self.model = data[0]
        elif kind == "step":
            event: StepEvent = data
            phase = getattr(event, "phase", "denoise")
            self.progress = {"step": event.step, "total": event.total, "nfe": event.nfe, "phase": phase}
            self.latest_latents = (event.step, event.latents) if event.latents is not None else None
            self._add(
                "step",
                {
                    "step": event.step,
                    "total": event.total,
                    "nfe": event.nfe,
                    "elapsed_s": round(event.elapsed, 4),
                    "phase": phase,
                },
            )
        elif kind == "progress":  # an A/B run's progress, already JSON-ready
            self.progress = data
            self._add("progress", data)
        elif kind == "finished":
            error = data.exception()
            if error is None:
                outcome: JobOutcome = data.result()
                self.result_body = outcome.response()  # what GET returns; the pixels and PIL images are dropped
                self.status = "succeeded"
                self.progress = {**self.progress, **outcome.final_progress()}
                final = {"status": "succeeded", **outcome.summary()}
            else:
                self.status, self.error = describe_error(error)
                if self.error["code"] == "internal":
                    log.error("job %s failed", self.id, exc_info=error)
                final = {"status": self.status, "error": self.error}
            self.finished_at = time.time()
            self.finished_mono = time.monotonic()
            self.latest_latents = None
            self.preview = None
            self.size_bytes = body_bytes(self.result_body)
            self.ticket = None  # its future holds the full outcome (pixels, PIL images): let it go
            self._add(self.status, final)

    # -- reader side -------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def events_after(self, last_id: int) -> list[dict[str, Any]]:
        with self._lock:
            return self.events[last_id:]

    def subscribe(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        with self._lock:
            self._waiters.add((loop, event))

    def unsubscribe(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        with self._lock:
            self._waiters.discard((loop, event))

    def status_body(self, ttl_s: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "expires_at": self.finished_at + ttl_s if self.finished_at is not None else None,
            "progress": self.progress,
            "result": self.result_body,
            "error": {"field": self.error["field"], "message": self.error["message"]} if self.error else None,
        }


def body_bytes(value: Any) -> int:
    """Approximate memory of a JSON-like body: the length of its strings (base64 images dominate) plus a few
    bytes per other value."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + body_bytes(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(body_bytes(v) for v in value)
    return 8


class JobStore:
    def __init__(self, ttl_s: float, max_finished: int, id_prefix: str = "", max_bytes: int | None = None):
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self.max_bytes = max_bytes
        # Under Ray Serve, "REPLICA." (token_urlsafe has no dots): the request router sends a job's routes to the
        # replica that holds it (service/ray_serve.py).
        self.id_prefix = id_prefix
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def new_id(self) -> str:
        return self.id_prefix + secrets.token_urlsafe(16)

    def create(
        self,
        *,
        kind: str = "generation",
        owner: str | None = None,
        job_id: str | None = None,
        progress: dict[str, Any] | None = None,
    ) -> Job:
        """A stored job, ``queued``, that follows the ticket :meth:`Job.attach` is given (pass it to
        ``Engine.submit``, which attaches it before the ticket can run; remove the job if the engine refuses
        it); ``progress``: the initial progress body."""
        job = Job(job_id or self.new_id(), None, kind, owner, progress=progress or generation_progress())
        job._add("queued", {"status": "queued"})
        with self._lock:
            self._jobs[job.id] = job
        return job

    def get(self, job_id: str, *, kind: str, owner: str | None) -> Job | None:
        """The job if it exists, is of ``kind`` and belongs to ``owner``; else None."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.kind != kind or job.owner != owner:
            return None
        return job

    def remove(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.pop(job_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    def purge(self, now: float | None = None) -> int:
        """Drop finished jobs older than the TTL, and the oldest beyond ``max_finished``; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            finished = sorted(
                (j for j in self._jobs.values() if j.finished_mono is not None), key=lambda j: j.finished_mono
            )
            drop = [j for j in finished if now - j.finished_mono > self.ttl_s]
            keep = [j for j in finished if j not in drop]
            drop += keep[: max(0, len(keep) - self.max_finished)]
            keep = keep[max(0, len(keep) - self.max_finished) :]
            if self.max_bytes is not None:
                total = sum(j.size_bytes for j in keep)
                for job in keep:  # oldest first
                    if total <= self.max_bytes:
                        break
                    drop.append(job)
                    total -= job.size_bytes
            for job in drop:
                self._jobs.pop(job.id, None)
        return len(drop)

    def cancel_all(self, reason: str) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            ticket = job.ticket
            if ticket is not None:
                ticket.cancel(reason)
