"""FastAPI dependencies: the engine, API-key authentication, and request validation against the limits.

API keys come in ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or HTTP Basic auth with the key as password
(what A1111 clients send); each configured key is compared with ``hmac.compare_digest`` (all of them, so the
time taken does not depend on which key matched). A key never reaches a log line or an error message.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from diffsteer.service.engine import Engine, Plan
from diffsteer.service.errors import ServiceError
from diffsteer.service.jobs import JobStore
from diffsteer.service.owners import key_fingerprint
from diffsteer.service.routers.common import json_or_form_body
from diffsteer.service.schemas import GenerateRequest

IMAGE_FIELDS = ("init_image", "mask")  # the generation fields a multipart form may send as file parts


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return value.strip()
        if scheme == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            return decoded.partition(":")[2]
    key = request.headers.get("x-api-key")
    return key.strip() if key is not None else None


def key_is_valid(candidate: str, keys: list[str]) -> bool:
    given = candidate.encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode("utf-8"))
    return matched


def _check(request: Request, engine: Engine) -> None:
    keys = [k.get_secret_value() for k in engine.settings.api_keys]
    if not keys:
        return
    candidate = presented_key(request)
    if candidate is None or not key_is_valid(candidate, keys):
        raise ServiceError(
            401,
            "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)",
            headers={"WWW-Authenticate": 'Bearer realm="diffsteer"'},
            code="invalid_api_key",
        )


async def require_api_key(request: Request, engine: Engine = Depends(get_engine)) -> None:
    _check(request, engine)


async def job_owner(request: Request, engine: Engine = Depends(get_engine)) -> str | None:
    """Who owns the jobs a request creates and may see: its API key's fingerprint; None without keys configured.
    (Used after :func:`require_api_key`, so the key is a valid one.)"""
    if not engine.settings.api_keys:
        return None
    key = presented_key(request)
    return key_fingerprint(key, engine.owner_secret) if key is not None else None


async def require_api_key_for_metrics(request: Request, engine: Engine = Depends(get_engine)) -> None:
    if engine.settings.metrics_require_key:
        _check(request, engine)


async def planned(request: Request, engine: Engine = Depends(get_engine)) -> Plan:
    """The request (a JSON :class:`GenerateRequest`, or the same fields as a multipart form with ``init_image`` and
    ``mask`` as file parts) validated against the server's limits, models and LoRA folder (InvalidInput -> 422)."""
    data = await json_or_form_body(request, IMAGE_FIELDS, engine.settings.max_upload_bytes)
    return await run_in_threadpool(lambda: engine.plan(GenerateRequest.model_validate(data)))
