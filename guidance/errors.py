"""One error type for bad input, shared by the Python API, the CLI and the HTTP service.

Every message names the offending field and, where there is a closed set, the accepted values, so the
CLI can print it as is and the service can answer it as a 4xx without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable

import pydantic


class InvalidInput(ValueError):
    """Bad input: ``field`` names what was wrong, the message says why and what is accepted."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}")


def unknown_choice(field: str, value: object, accepted: Iterable[str]) -> InvalidInput:
    accepted = sorted(accepted)
    return InvalidInput(field, f"unknown value {value!r}; accepted values: {', '.join(accepted)}")


def from_pydantic(error: pydantic.ValidationError, prefix: str = "") -> InvalidInput:
    """Flatten a pydantic ValidationError into one InvalidInput naming the (first) failing field.

    An InvalidInput raised inside a validator (e.g. while parsing a policy spec) keeps its own field name.
    """
    messages: list[tuple[str, str]] = []
    for item in error.errors():
        inner = (item.get("ctx") or {}).get("error")
        if isinstance(inner, InvalidInput):
            messages.append((inner.field, inner.reason))
            continue
        loc = ".".join(str(p) for p in item.get("loc", ()))
        field = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "input")
        messages.append((field, item.get("msg", "invalid value").removeprefix("Value error, ")))
    field, reason = messages[0]
    others = "; ".join(f"{f}: {m}" for f, m in messages[1:])
    return InvalidInput(field, f"{reason}; {others}" if others else reason)
