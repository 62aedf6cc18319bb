"""The FastAPI application: ``create_app(settings)``; ``diffsteer serve`` runs it under uvicorn.

Routers per concern (``service/routers``): native generation and jobs, A/B evaluations, listings and
operations, and the OpenAI and A1111 compatible APIs. Dependencies (``service/deps.py``) do authentication
and validation against the configured limits; the engine (``service/engine.py``) owns models, queues and
device worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from diffsteer.guidance.models import ModelCache
from diffsteer.service.engine import Engine
from diffsteer.service.errors import install_error_handlers
from diffsteer.service.jobs import JobStore
from diffsteer.service.metrics import MetricsMiddleware
from diffsteer.service.middleware import BodySizeLimit
from diffsteer.service.openapi import install_openapi
from diffsteer.service.routers import a1111, ab, generate, info, jobs, openai_images, playground
from diffsteer.service.settings import ServiceSettings

log = logging.getLogger("service")

HOUSEKEEPING_S = 0.25


def create_app(settings: ServiceSettings | None = None, *, models: ModelCache | None = None) -> FastAPI:
    """The app for ``settings`` (default: from the environment). ``models``: a shared model cache (tests)."""
    settings = settings or ServiceSettings()
    engine = Engine(settings, models)
    job_store = JobStore(settings.job_ttl_s, settings.max_stored_jobs, max_bytes=settings.max_stored_job_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        task = asyncio.create_task(_housekeeping(engine, job_store))
        log.info(
            "diffsteer service started: model=%s batching=%s concurrency=%d queue=%d auth=%s",
            engine.default_model,
            settings.batching,
            settings.concurrency,
            settings.queue_size,
            "on" if settings.api_keys else "off",
        )
        try:
            yield
        finally:
            task.cancel()
            job_store.cancel_all("the server is shutting down")
            await asyncio.to_thread(engine.close)

    app = FastAPI(
        title="diffsteer",
        version="0.1.0",
        summary="Text-to-image generation with pluggable guidance policies.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.jobs = job_store
    app.state.settings = settings
    install_error_handlers(app)
    install_openapi(
        app,
        settings,
        engine.loras.names,
        lambda: engine.allowed_models,
        lambda: engine.model_defaults(engine.default_model).max_size,
    )
    routers = (
        generate.router,
        jobs.router,
        ab.router,
        info.listings,
        info.operations,
        openai_images.router,
        a1111.router,
        playground.router,
    )
    for router in routers:
        app.include_router(router)
    app.mount(playground.ASSETS_PATH, playground.assets(), name="playground")

    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Accept", "Last-Event-ID"],
        )
    app.add_middleware(MetricsMiddleware, metrics=lambda: engine.metrics)  # outermost: sees every answer
    return app


async def _housekeeping(engine: Engine, job_store: JobStore) -> None:
    while True:
        try:
            engine.tick()
            job_store.purge()
            engine.metrics.jobs_stored.set(len(job_store))
        except Exception:  # never let housekeeping die
            log.exception("housekeeping failed")
        await asyncio.sleep(HOUSEKEEPING_S)
