"""Waiting for a generation from a request handler: disconnects cancel, timeouts answer 504, full queue 429."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pydantic
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from diffsteer.guidance.errors import InvalidInput
from diffsteer.service.device import WorkerClosed
from diffsteer.service.engine import Attach, Engine, ModelUnavailable, Outcome, Plan
from diffsteer.service.errors import ServiceError, describe_validation
from diffsteer.service.queue import Cancelled, ShuttingDown, Ticket, TimedOut

log = logging.getLogger("service")

# OpenAPI responses of every route that queues work (merged with each route's own)
QUEUED_REQUEST_ERRORS = {
    401: {"description": "Missing or invalid API key"},
    413: {"description": "Request body too large"},
    422: {"description": "Invalid input: the body names the field"},
    429: {"description": "Queue full; see Retry-After"},
}

CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; only ever seen in metrics


class ClientGone(Exception):
    pass


class ClientFieldError(InvalidInput):
    """Bad input already named in a compatibility route's own field names (A1111's ``scheduler``, its schedule
    type), which :func:`run_translated` must not rename as if it were ours."""


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the request body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def run_plan(request: Request, engine: Engine, plan: Plan, attach: Attach | None = None) -> Outcome:
    """Queue ``plan`` (:meth:`Engine.submit`: 429/503 when refused; ``attach``: the caller's hold on the ticket,
    e.g. A1111's progress) and wait for its outcome; cancels the work when the client disconnects or time runs
    out."""
    ticket = engine.submit(plan, attach=attach)
    future = asyncio.wrap_future(ticket.future)
    future.add_done_callback(_retrieve)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        timeout = max(0.0, ticket.deadline - time.monotonic()) + 0.25
        done, _ = await asyncio.wait({future, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        ticket.cancel("the request handler was cancelled")
        raise
    finally:
        watcher.cancel()
    if future in done or ticket.future.done():
        return outcome_or_raise(ticket)
    if watcher in done:
        ticket.cancel("the client disconnected")
        log.info("client disconnected; generation %d cancelled", ticket.number)
        request.scope["diffsteer.status_override"] = CLIENT_CLOSED
        raise ClientGone()
    ticket.expire()
    return outcome_or_raise(ticket)


async def run_translated(
    request: Request,
    engine: Engine,
    build: Callable[[], Any],
    rename: Callable[[str], str],
    attach: Attach | None = None,
) -> Outcome | None:
    """A compatibility route's generation: ``build()`` makes the GenerateRequest, which is planned and run like
    ``/generate``; bad input is re-raised under the client API's own field names (``rename``). None when the
    client went away."""
    try:
        plan = await run_in_threadpool(engine.plan, build())
    except pydantic.ValidationError as e:
        field, message, _ = describe_validation(e.errors())
        raise InvalidInput(rename(field), message) from None
    except ClientFieldError:
        raise
    except InvalidInput as e:
        raise InvalidInput(rename(e.field), e.reason) from None
    try:
        return await run_plan(request, engine, plan, attach)
    except ClientGone:
        return None


def outcome_or_raise(ticket: Ticket) -> Outcome:
    error = ticket.future.exception()
    if error is None:
        return ticket.future.result()
    if isinstance(error, TimedOut):
        raise ServiceError(504, str(error), code="timeout")
    if isinstance(error, Cancelled):
        raise ServiceError(503, f"the generation was cancelled: {error.reason}", code="cancelled")
    if isinstance(error, InvalidInput):
        raise error
    if isinstance(error, ModelUnavailable | WorkerClosed | ShuttingDown):
        raise ServiceError(503, str(error), code="unavailable")
    raise error


def negotiate(accept: str | None, default_format: str) -> str | None:
    """The image format to answer with raw bytes, or None for JSON, from the Accept header (q-values honoured)."""
    if not accept:
        return None
    best: tuple[float, int, str | None] | None = None
    for position, part in enumerate(accept.split(",")):
        media, *params = [p.strip() for p in part.split(";")]
        media = media.lower()
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        if media in ("application/json", "application/*", "*/*"):
            choice: str | None = None
        elif media in ("image/png", "image/jpeg", "image/webp"):
            choice = media.split("/")[1]
        elif media == "image/*":
            choice = default_format
        else:
            continue
        if best is None or q > best[0]:
            best = (q, position, choice)
    return None if best is None else best[2]
