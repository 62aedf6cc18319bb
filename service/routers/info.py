"""Listings and operations: ``/policies``, ``/models``, ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from diffsteer.guidance.registry import describe_policies, policy_schemas
from diffsteer.guidance.schedulers import scheduler_names
from diffsteer.service.deps import get_engine, get_jobs, require_api_key, require_api_key_for_metrics
from diffsteer.service.engine import Engine, jsonable
from diffsteer.service.jobs import JobStore
from diffsteer.service.schemas import HealthResponse, ModelsResponse, PoliciesResponse, ReadyResponse

listings = APIRouter(tags=["info"], dependencies=[Depends(require_api_key)])
operations = APIRouter(tags=["operations"])


@listings.get(
    "/policies", response_model=PoliciesResponse, summary="Every guidance policy with its parameters and JSON schema"
)
async def policies() -> JSONResponse:
    schemas = policy_schemas()
    rows = [{**row, "schema": schemas[row["name"]]} for row in describe_policies()]
    return JSONResponse(jsonable({"policies": rows, "schedulers": scheduler_names()}))


@listings.get(
    "/models", response_model=ModelsResponse, summary="The models a request may name, and the LoRA adapters available"
)
async def models(engine: Engine = Depends(get_engine)) -> JSONResponse:
    return JSONResponse(
        {"default": engine.default_model, "models": engine.describe_models(), "loras": engine.loras.names()}
    )


@operations.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@operations.get(
    "/readyz", response_model=ReadyResponse, summary="Readiness: the default model is loaded and the workers run"
)
async def readyz(engine: Engine = Depends(get_engine)) -> JSONResponse:
    if engine.ready:
        return JSONResponse({"status": "ready", "model": engine.default_model})
    if engine.load_error:
        reason = f"the default model failed to load: {engine.load_error}"
    elif engine.closing:
        reason = "shutting down"
    else:
        reason = "loading the default model"
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)


@operations.get(
    "/metrics",
    summary="Prometheus metrics",
    dependencies=[Depends(require_api_key_for_metrics)],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(engine: Engine = Depends(get_engine), jobs: JobStore = Depends(get_jobs)) -> Response:
    engine.tick()
    engine.metrics.jobs_stored.set(len(jobs))
    return Response(engine.metrics.exposition(), media_type=engine.metrics.content_type)
