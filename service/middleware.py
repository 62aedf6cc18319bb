"""Pure ASGI middleware: the request body size limits (413): ``max_body_bytes`` for JSON bodies, and
``max_upload_bytes`` for the bodies that upload images (:func:`is_upload`)."""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# routes whose every body may upload images (A1111's img2img and png-info take base64 images in JSON)
UPLOAD_ROUTES = frozenset({"/v1/images/edits", "/sdapi/v1/img2img", "/sdapi/v1/png-info"})
# routes whose multipart forms upload images (their JSON bodies keep the JSON limit)
FORM_UPLOAD_ROUTES = frozenset({"/generate", "/jobs"})


def is_upload(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    """Whether a request's body is an upload: a POST to an upload route, or a multipart form to /generate or /jobs."""
    if scope.get("method") != "POST":
        return False
    path = scope.get("path", "").rstrip("/") or "/"
    if path in UPLOAD_ROUTES:
        return True
    media = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
    return path in FORM_UPLOAD_ROUTES and media == b"multipart/form-data"


class BodySizeLimit:
    """Answer 413 to a body above ``max_bytes``, or above ``max_upload_bytes`` for an upload (:func:`is_upload`;
    default: ``max_bytes``), naming the limit.

    A declared Content-Length above the limit is refused before the app runs; otherwise the body is read (up to
    the limit, so chunked bodies are covered too) before the app runs, and replayed to it. Later ``receive``
    calls (disconnect notices) pass through.

    Before answering 413 the rest of the body is read and discarded (up to ``drain_bytes``, within
    ``drain_s``): a server that closes a connection with unread data in its receive buffer makes the kernel
    send a TCP reset, and a client still writing its body (curl, requests, most HTTP/1.1 clients) then sees
    "connection reset" instead of the 413. Clients that sent ``Expect: 100-continue`` get the 413 at once
    (they have not sent the body). Bodies above ``drain_bytes`` are cut off as before.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        max_upload_bytes: int | None = None,
        drain_bytes: int = 64 * 2**20,
        drain_s: float = 30.0,
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_bytes if max_upload_bytes is None else max_upload_bytes
        self.drain_bytes = drain_bytes
        self.drain_s = drain_s

    async def _drain(self, receive: Receive, already: int, more_body: bool) -> None:
        async def read_rest() -> None:
            total, more = already, more_body
            while more and total <= self.drain_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    return
                total += len(message.get("body", b""))
                more = message.get("more_body", False)

        try:
            await asyncio.wait_for(read_rest(), self.drain_s)
        except asyncio.TimeoutError:
            pass

    async def _reject(self, scope: Scope, send: Send, limit: int, setting: str) -> None:
        scope["diffsteer.status_override"] = 413
        error = {"field": "body", "message": f"the request body is larger than {limit} bytes ({setting})"}
        if scope.get("path", "").startswith("/v1/"):
            error.update(type="invalid_request_error", param=None, code=None)
        data = json.dumps({"error": error}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        if is_upload(scope, headers):
            limit, setting = self.max_upload_bytes, "max_upload_bytes"
        else:
            limit, setting = self.max_bytes, "max_body_bytes"
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > limit:
            if headers.get(b"expect", b"").lower() != b"100-continue" and declared <= self.drain_bytes:
                await self._drain(receive, 0, True)
            await self._reject(scope, send, limit, setting)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                await self._drain(receive, total, message.get("more_body", False))
                await self._reject(scope, send, limit, setting)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
