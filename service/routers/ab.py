"""A/B evaluations: ``POST /ab`` (an id at once), ``GET /ab/{id}``, ``GET /ab/{id}/events`` (SSE),
``DELETE /ab/{id}``, and the run's files: ``GET /ab/{id}/report.html``, ``/ab/{id}/results.json``,
``/ab/{id}/images/...png``, ``/ab/{id}/plots/...png`` (the report's relative links resolve to these).

Events: ``queued``, ``started``, ``progress`` (:class:`diffsteer.evaluation.ab.ABProgress`: stage, images done of
total, and within a batch its denoising step, a few per second at most), then ``succeeded`` (with the report
and results URLs and the run's counts) / ``failed`` / ``cancelled``. The whole router answers 403 when the
server has no ``ab_dir``. See :mod:`diffsteer.service.ab` for validation, scheduling and files.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from diffsteer.service import ab
from diffsteer.service.deps import get_engine, get_jobs, job_owner, require_api_key
from diffsteer.service.engine import Engine
from diffsteer.service.errors import ServiceError
from diffsteer.service.jobs import JobStore
from diffsteer.service.routers.common import QUEUED_REQUEST_ERRORS
from diffsteer.service.routers.jobs import cancel_or_delete, event_stream, find_job, resume_point
from diffsteer.service.schemas import ABJobStatus, ABRequest

ERRORS = {**QUEUED_REQUEST_ERRORS, 403: {"description": "A/B runs are not enabled on this server (no ab_dir)"}}
# report.html is generated from request data (prompts, arm names): escaped by the report, and fenced in anyway
REPORT_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


def ab_root(engine: Engine = Depends(get_engine)) -> Path:
    folder = engine.settings.ab_dir
    if folder is None or engine.ab_queue is None:
        raise ServiceError(403, "A/B runs are not enabled on this server (no ab_dir configured)", code="ab_disabled")
    return Path(folder).expanduser().resolve()


router = APIRouter(prefix="/ab", tags=["ab"], dependencies=[Depends(require_api_key), Depends(ab_root)])


@router.post(
    "",
    status_code=202,
    response_model=ABJobStatus,
    responses=ERRORS,
    summary="Start an A/B evaluation of guidance policies (paired arms, statistics, an HTML report)",
)
async def create_ab(
    body: ABRequest,
    root: Path = Depends(ab_root),
    engine: Engine = Depends(get_engine),
    jobs: JobStore = Depends(get_jobs),
    owner: str | None = Depends(job_owner),
) -> JSONResponse:
    job_id = jobs.new_id()
    folder = root / job_id
    plan = await run_in_threadpool(ab.plan_run, engine, body, folder)
    await run_in_threadpool(ab.write_owner, folder, owner)
    job = jobs.create(kind="ab", owner=owner, job_id=job_id, progress=ab.initial_progress(plan))
    try:
        engine.submit_ab(functools.partial(ab.run_job, engine, plan, job_id), f"ab {job_id}", attach=job.attach)
    except ServiceError:  # refused (429, 503): neither the job nor its folder is left behind
        jobs.remove(job.id)
        await run_in_threadpool(ab.delete_folder, folder)
        raise
    return JSONResponse(job.status_body(jobs.ttl_s), status_code=202, headers={"Location": f"/ab/{job.id}"})


@router.get("/{job_id}", response_model=ABJobStatus, summary="An A/B run's status, and its results once finished")
async def get_ab(
    job_id: str, jobs: JobStore = Depends(get_jobs), owner: str | None = Depends(job_owner)
) -> JSONResponse:
    return JSONResponse(find_job(jobs, job_id, "ab", owner).status_body(jobs.ttl_s))


@router.delete(
    "/{job_id}",
    response_model=ABJobStatus,
    summary="Cancel an A/B run (it stops within one denoising step); a finished one is deleted, files too",
)
async def delete_ab(
    job_id: str,
    root: Path = Depends(ab_root),
    jobs: JobStore = Depends(get_jobs),
    owner: str | None = Depends(job_owner),
) -> JSONResponse:
    job = find_job(jobs, job_id, "ab", owner)
    finished = job.finished or job.ticket is None
    response = cancel_or_delete(jobs, job, "cancelled by DELETE /ab")
    if finished:
        await run_in_threadpool(ab.delete_folder, root / job.id)
    return response


@router.get(
    "/{job_id}/events",
    summary="An A/B run's progress as server-sent events",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def ab_events(
    job_id: str,
    last_event_id: str | None = Header(None, description="Resume after this event id."),
    jobs: JobStore = Depends(get_jobs),
    owner: str | None = Depends(job_owner),
) -> Response:
    job = find_job(jobs, job_id, "ab", owner)
    return event_stream(job, resume_point(last_event_id))


@router.get(
    "/{job_id}/{path:path}",
    summary="A file of an A/B run: report.html, results.json, images/..., plots/...",
    responses={200: {"content": {"text/html": {}, "application/json": {}, "image/png": {}}}},
)
async def ab_file(
    job_id: str, path: str, root: Path = Depends(ab_root), owner: str | None = Depends(job_owner)
) -> Response:
    folder = await run_in_threadpool(ab.owned_folder, root, job_id, owner)
    file = await run_in_threadpool(ab.served_file, folder, path)
    if path == "results.json":
        text = await run_in_threadpool(file.read_text, encoding="utf-8")
        return JSONResponse(ab.public_results(json.loads(text), job_id))
    headers = REPORT_HEADERS if file.suffix == ".html" else {"X-Content-Type-Options": "nosniff"}
    return FileResponse(file, headers=headers)
