"""Jobs: ``POST /jobs`` (an id at once), ``GET /jobs/{id}``, ``GET /jobs/{id}/events`` (SSE), ``DELETE /jobs/{id}``.

Event stream: ``queued``, ``started``, ``step`` (``{"step", "total", "nfe", "elapsed_s"}``, plus with
``?preview=true`` a ``preview`` list of base64 PNGs, one per image: a linear latent->RGB approximation of the
current latents x_t at latent resolution, see :mod:`diffsteer.service.preview`), then one of ``succeeded`` /
``failed`` / ``cancelled``, after which the stream ends. Events carry ids; ``Last-Event-ID`` resumes.
A comment line is sent every 15 s of silence to keep proxies from closing the stream.

With API keys configured, a job is visible only with the key that created it (404 otherwise, as for an
unknown id). The lookup, event stream and cancel/delete helpers here serve ``/ab`` too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from diffsteer.service.deps import get_engine, get_jobs, job_owner, planned, require_api_key
from diffsteer.service.engine import Engine, Plan
from diffsteer.service.errors import ServiceError
from diffsteer.service.jobs import Job, JobStore
from diffsteer.service.routers.generate import ERRORS, GENERATION_BODY
from diffsteer.service.schemas import JobStatus

log = logging.getLogger("diffsteer.service.jobs")
router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])

KEEPALIVE_S = 15.0


def find_job(jobs: JobStore, job_id: str, kind: str, owner: str | None) -> Job:
    """The job, or 404 (also for another API key's job: the same answer as for an unknown id)."""
    job = jobs.get(job_id, kind=kind, owner=owner)
    if job is None:
        raise ServiceError(
            404, f"no job {job_id!r} (unknown, or finished and purged)", field="job_id", code="not_found"
        )
    return job


@router.post(
    "",
    status_code=202,
    response_model=JobStatus,
    responses=ERRORS,
    summary="Start a generation job",
    openapi_extra=GENERATION_BODY,
)
async def create_job(
    plan: Plan = Depends(planned),
    engine: Engine = Depends(get_engine),
    jobs: JobStore = Depends(get_jobs),
    owner: str | None = Depends(job_owner),
) -> JSONResponse:
    job = jobs.create(owner=owner)
    try:
        engine.submit(plan, attach=job.attach)
    except ServiceError:  # refused (429, 503): no job is left behind
        jobs.remove(job.id)
        raise
    return JSONResponse(job.status_body(jobs.ttl_s), status_code=202, headers={"Location": f"/jobs/{job.id}"})


@router.get("/{job_id}", response_model=JobStatus, summary="A job's status, and its results once finished")
async def get_job(
    job_id: str, jobs: JobStore = Depends(get_jobs), owner: str | None = Depends(job_owner)
) -> JSONResponse:
    job = find_job(jobs, job_id, "generation", owner)
    return JSONResponse(job.status_body(jobs.ttl_s))


@router.delete(
    "/{job_id}",
    response_model=JobStatus,
    summary="Cancel a job (it stops within one denoising step); a finished job is deleted",
)
async def delete_job(
    job_id: str, jobs: JobStore = Depends(get_jobs), owner: str | None = Depends(job_owner)
) -> JSONResponse:
    return cancel_or_delete(jobs, find_job(jobs, job_id, "generation", owner), "cancelled by DELETE /jobs")


def cancel_or_delete(jobs: JobStore, job: Job, reason: str) -> JSONResponse:
    """Cancel a running or queued job (202); forget a finished one (200)."""
    ticket = job.ticket
    if job.finished or ticket is None:
        jobs.remove(job.id)
        return JSONResponse(job.status_body(jobs.ttl_s))
    ticket.cancel(reason)
    return JSONResponse(job.status_body(jobs.ttl_s), status_code=202)


def _sse(event: dict) -> str:
    data = json.dumps(event["data"], separators=(",", ":"))
    return f"id: {event['id']}\nevent: {event['event']}\ndata: {data}\n\n"


def resume_point(last_event_id: str | None) -> int:
    try:
        return max(0, int(last_event_id)) if last_event_id else 0
    except ValueError:
        raise ServiceError(
            422, f"must be an event id (an integer), got {last_event_id!r}", field="Last-Event-ID"
        ) from None


EventTransform = Callable[[dict], Awaitable[dict]]


def event_stream(job: Job, start: int, transform: EventTransform | None = None) -> StreamingResponse:
    """The job's events after ``start`` as server-sent events, until its final event."""

    async def stream():
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        job.subscribe(loop, wake)
        last = start
        try:
            yield "retry: 2000\n\n"
            while True:
                wake.clear()
                for event in job.events_after(last):
                    last = event["id"]
                    if transform is not None:
                        event = await transform(event)
                    yield _sse(event)
                if job.finished and not job.events_after(last):
                    return
                try:
                    await asyncio.wait_for(wake.wait(), timeout=KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            job.unsubscribe(loop, wake)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.get(
    "/{job_id}/events",
    summary="Progress as server-sent events",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    preview: bool = Query(False, description="Attach low-res previews (latent->RGB approximation) to step events."),
    last_event_id: str | None = Header(None, description="Resume after this event id."),
    jobs: JobStore = Depends(get_jobs),
    engine: Engine = Depends(get_engine),
    owner: str | None = Depends(job_owner),
) -> Response:
    job = find_job(jobs, job_id, "generation", owner)
    start = resume_point(last_event_id)
    if not preview or engine.settings.preview == "none":
        return event_stream(job, start)

    async def with_preview(event: dict) -> dict:
        return await _with_preview(engine, job, event) if event["event"] == "step" else event

    return event_stream(job, start, with_preview)


async def _with_preview(engine: Engine, job: Job, event: dict) -> dict:
    """Attach a preview to the freshest step only (a slow reader never gets stale previews computed). A step's
    preview is rendered once per job, however many streams read it (``job.preview``: step and its task)."""
    latest, model = job.latest_latents, job.model
    step = event["data"]["step"]
    if latest is None or model is None or latest[0] != step:
        return event
    cached = job.preview
    if cached is None or cached[0] != step:  # no await between the check and the store: one task per step
        task = asyncio.ensure_future(_render_preview(engine, model, latest[1]))
        job.preview = cached = (step, task)
    previews = await asyncio.shield(cached[1])
    if previews is None:
        return event
    data = {**event["data"], "preview": previews, "preview_kind": "latent-rgb-approximation"}
    return {**event, "data": data}


async def _render_preview(engine: Engine, model, latents) -> list[str] | None:
    try:
        pngs = await run_in_threadpool(engine.preview, model, latents)
    except Exception:  # a preview must never break the stream
        log.exception("preview failed")
        return None
    return [base64.b64encode(p).decode("ascii") for p in pngs]
