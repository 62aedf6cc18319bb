"""The HTTP server's protocol: uvicorn's h11 with a bound on how long a client may take to send a request head.

uvicorn bounds an idle keep-alive connection but not a connection that opens a request and sends its head a
byte at a time (a "slowloris"): each such client pins a socket and a file descriptor for as long as it likes.
Here a connection whose first request head is not complete within ``head_timeout_s`` is closed. With
``limit_concurrency`` (new requests beyond it get 503 at once) and h11's head size limit, the descriptors slow
clients can hold are bounded by the settings (``max_connections``, ``header_timeout_s``, ``max_header_bytes``).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadTimeoutH11Protocol(H11Protocol):
    head_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self._head_timer is not None:  # the first request's head arrived
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()


def protocol_with_head_timeout(seconds: float) -> type[HeadTimeoutH11Protocol]:
    """The protocol class with its head timeout (uvicorn takes a class, instantiated per connection)."""
    return type("HeadTimeoutH11Protocol", (HeadTimeoutH11Protocol,), {"head_timeout_s": seconds})
