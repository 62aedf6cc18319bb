"""Errors as JSON: ``{"error": {"field": ..., "message": ...}}`` for every 4xx/5xx the service answers.

Validation errors name the offending field (``steps``, ``policy.scale``, ``lora.0.name``); bad input is
always a 4xx, never a 5xx. Under the OpenAI-compatible routes (``/v1/...``) the body also carries OpenAI's
``type``/``param``/``code`` keys, and validation errors are 400 as OpenAI answers them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from diffsteer.guidance.errors import InvalidInput

log = logging.getLogger("service")


class ServiceError(Exception):
    """An error with an HTTP status, an optional field and extra response headers."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.code = code


# pydantic puts the member of a union (``str``, ``list[str]``, ``function-after[...]``) into the location of
# an error inside it; those are not field names.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list|dict|tuple|set|bytes|.*\[.*\].*)$")


def field_of(loc: Sequence[Any]) -> str:
    """``("body", "lora", 0, "name")`` -> ``lora.0.name``; the body itself -> ``body``."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    parts = [p for p in parts if not _TYPE_TAG.match(p)]
    return ".".join(parts) or "body"


def describe_validation(errors: Sequence[dict[str, Any]]) -> tuple[str, str, bool]:
    """(field, message, is_malformed_json) of the first error; an InvalidInput raised in a validator keeps its field."""
    first = errors[0]
    inner = (first.get("ctx") or {}).get("error")
    if isinstance(inner, InvalidInput):
        field, message = inner.field, inner.reason
    else:
        field = field_of(first.get("loc", ()))
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error")
        return "body", f"malformed JSON: {detail or message}", True
    if first.get("type") == "missing" and field == "body":
        return "body", "a JSON request body is required", False
    extra = len(errors) - 1
    if extra:
        message = f"{message} (and {extra} more problem{'s' if extra > 1 else ''})"
    return field, message, False


def is_openai_route(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def error_response(
    request: Request,
    status: int,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"field": field, "message": message}
    if is_openai_route(request):
        kind = "invalid_request_error" if status < 500 else "server_error"
        if status == 401:
            kind = "authentication_error"
        elif status == 429:
            kind = "rate_limit_error"
        body.update(type=kind, param=field, code=code)
    elif code:
        body["code"] = code
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def allowed_methods(app: FastAPI, scope: dict[str, Any]) -> list[str]:
    """Every method some route of ``app`` answers at the request's path."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": "GET"})
        route_methods = getattr(route, "methods", None)
        if route_methods and match != Match.NONE:
            methods |= set(route_methods)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        field, message, malformed = describe_validation(exc.errors())
        status = 400 if malformed or is_openai_route(request) else 422
        return error_response(request, status, message, field)

    @app.exception_handler(pydantic.ValidationError)
    async def _pydantic(request: Request, exc: pydantic.ValidationError) -> JSONResponse:
        field, message, _ = describe_validation(exc.errors())
        return error_response(request, 400 if is_openai_route(request) else 422, message, field)

    @app.exception_handler(InvalidInput)
    async def _invalid(request: Request, exc: InvalidInput) -> JSONResponse:
        return error_response(request, 400 if is_openai_route(request) else 422, exc.reason, exc.field)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, exc.field, exc.headers, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        field = "body" if exc.status_code == 400 else None
        if exc.status_code == 405:  # Starlette's Allow names the first matching route's methods only
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        return error_response(request, exc.status_code, str(exc.detail), field, headers)

    app.add_middleware(UnexpectedErrors)


class UnexpectedErrors:
    """Any other exception: logged once (with its traceback) and answered 500 with the JSON error body.

    Not an ``exception_handler(Exception)``: Starlette runs that one in ServerErrorMiddleware and then re-raises,
    so the server logs every 500 a second time. Added first, this middleware sits innermost among the user
    middlewares, just outside the routes' own exception handlers.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # too late for an error response; the connection is closed
                return
            request = Request(scope)
            response = error_response(request, 500, f"internal error ({type(exc).__name__}); see the server log")
            await response(scope, receive, send)
