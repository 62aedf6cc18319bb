"""What the routes share: reading a request body (JSON, or a multipart form whose fields are read as
:func:`form_fields` describes), and waiting for a generation (disconnects cancel, timeouts answer 504, full queue
429).

Multipart forms (``/generate``, ``/jobs``, ``/v1/images/edits``): text fields (``prompt``, ``model``, a policy spec
string, base64 images...) as they are, other fields their JSON value (``num_images=2``, ``seeds=[1,2]``, a policy
object); ``null`` is the same as leaving a field out; bracket keys, as the official OpenAI client flattens objects
and lists (``policy[name]=cfg``, ``policy[scale]=4``, ``lora[][name]=style``), are read back into objects and lists;
a list field given as repeated parts (``prompt=a``, ``prompt=b``: OpenAPI's encoding of arrays) is that list.
Images come as file parts (PNG, JPEG, WebP), each field at most once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import pydantic
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from diffsteer.guidance.errors import InvalidInput
from diffsteer.service.device import WorkerClosed
from diffsteer.service.engine import Attach, Engine, ModelUnavailable, Outcome, Plan
from diffsteer.service.errors import ServiceError, describe_validation
from diffsteer.service.queue import Cancelled, ShuttingDown, Ticket, TimedOut
from diffsteer.service.schemas import MAX_BODY_NESTING

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


# --- request bodies: JSON or a multipart form ---------------------------------------------------------------

MULTIPART = "multipart/form-data"
# fields whose form value is their text (the others': their JSON value)
TEXT_FIELDS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "size",
        "model",
        "quality",
        "style",
        "user",
        "safety_identifier",
        "moderation",
        "background",
        "scheduler",
        "response_format",
        "output_format",
        "input_fidelity",
        "inpainting_fill",
        "init_image",
        "mask",
    }
)
LIST_FIELDS = frozenset({"seeds", "lora", "prompt"})  # fields that take a list: a repeated part is one
MAX_FORM_FIELDS = 256
MAX_FORM_FILES = 4
_FORM_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


def media_type(request: Request) -> str:
    """The request's content type without parameters, lower case ("" when absent)."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def is_json(media: str) -> bool:
    """Whether a body of this content type is read as JSON (no content type is, as FastAPI reads it)."""
    kind, _, subtype = media.partition("/")
    return not media or (kind == "application" and (subtype == "json" or subtype.endswith("+json")))


def open_form(request: Request, max_part_bytes: int):
    """The multipart form of ``request`` (``async with``), bounded in fields, files and text part size."""
    return request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=max_part_bytes)


def _text_or_json(name: str, text: str) -> Any:
    """A form field's value: text fields as they are; others their JSON value when the text is JSON."""
    if name in TEXT_FIELDS or (name in ("policy", "name") and not text.lstrip().startswith("{")):
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _assign(target: dict[str, Any], name: str, path: list[str], values: list[str], field: str) -> None:
    """Put ``values`` (a form key's, in order) at ``name`` + ``path`` (its bracket segments: ``[]`` a list,
    ``[key]`` an object), as the official client flattens objects and lists."""
    if not path:
        if name in target:
            raise InvalidInput(field, "is given more than once")
        if len(values) > 1:
            raise InvalidInput(field, f"is given {len(values)} times; give it once")
        target[name] = _text_or_json(name, values[0])
        return
    head, rest = path[0], path[1:]
    if head == "":
        items = target.setdefault(name, [])
        if not isinstance(items, list):
            raise InvalidInput(field, "mixes a list with another kind of value")
        if not rest:
            items.extend(_text_or_json(name, v) for v in values)
            return
        if rest[0] == "":
            raise InvalidInput(field, "lists of lists are not supported in a form; send the field as JSON")
        for i, value in enumerate(values):
            if i == len(items):
                items.append({})
            if not isinstance(items[i], dict):
                raise InvalidInput(field, "mixes a list of objects with other values")
            _assign(items[i], rest[0], rest[1:], [value], field)
        return
    node = target.setdefault(name, {})
    if not isinstance(node, dict):
        raise InvalidInput(field, "mixes an object with another kind of value")
    _assign(node, head, rest, values, field)


def form_fields(form: FormData, skip: tuple[str, ...] = (), files: tuple[str, ...] = ()) -> dict[str, Any]:
    """A multipart form's fields (all but ``skip``, the route's file parts) as a request body: see the module
    docstring. A file part under any other name is refused naming it (``files``: the names that take files)."""
    grouped: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if key in skip:
            continue
        if not isinstance(value, str):
            accepted = f"; the files this route takes: {', '.join(files)}" if files else ""
            raise InvalidInput(key, f"expected a text field, got a file{accepted}")
        grouped.setdefault(key, []).append(value)
    data: dict[str, Any] = {}
    for key, values in grouped.items():
        match = _FORM_KEY.match(key)
        if match is None:
            raise InvalidInput(key, "is not a field name (brackets as in name[key] or name[])")
        name, path = match.group(1), re.findall(r"\[([^\[\]]*)\]", match.group(2))
        if len(path) > MAX_BODY_NESTING:
            raise InvalidInput(name, f"nested more than {MAX_BODY_NESTING} levels deep")
        if not path and values == ["null"]:
            continue  # null: the same as leaving the field out
        if not path and name in LIST_FIELDS:  # repeated parts are a list (OpenAPI's multipart encoding of arrays)
            items = [_text_or_json(name, v) for v in values]
            one = len(items) == 1 and (isinstance(items[0], list) or name in TEXT_FIELDS)
            data[name] = items[0] if one else items
            continue
        _assign(data, name, path, values, name)
    return data


async def read_upload(form: FormData, name: str, *, required: bool, aliases: tuple[str, ...] = ()) -> bytes | None:
    """The bytes of the form's one file ``name`` (or under one of ``aliases``: the official OpenAI client sends a
    list of images as ``image[]``); None when absent and not ``required``."""
    parts = [part for key in (name, *aliases) for part in form.getlist(key)]
    if not parts:
        if required:
            raise InvalidInput(name, "is required, as a file part of the multipart form")
        return None
    if len(parts) > 1:
        raise InvalidInput(name, f"takes one image file; got {len(parts)}")
    part = parts[0]
    if not isinstance(part, UploadFile):
        raise InvalidInput(name, "expected a file part (with a filename), got a text field")
    data = await part.read()
    if not data:
        if not required and not part.filename:
            return None  # a browser form's empty file input
        raise InvalidInput(name, "is an empty file")
    return data


async def json_or_form_body(request: Request, image_fields: tuple[str, ...], max_part_bytes: int) -> Any:
    """A request body as data to validate: JSON (application/json, or no content type), or a multipart form whose
    ``image_fields`` may be file parts, which become the base64 text a JSON body would carry (they may also be
    text parts: base64 or a data URL). Malformed JSON is a 400; another content type, or no body, a 422."""
    media = media_type(request)
    if media == MULTIPART:
        async with open_form(request, max_part_bytes) as form:
            files = tuple(n for n in image_fields if any(not isinstance(p, str) for p in form.getlist(n)))
            data = form_fields(form, skip=files, files=image_fields)
            for name in files:
                upload = await read_upload(form, name, required=False)
                if upload is not None:
                    data[name] = base64.b64encode(upload).decode("ascii")
        return data
    if not is_json(media):
        raise InvalidInput("body", f"expected application/json or {MULTIPART}, got {media}")
    raw = await request.body()
    if not raw:
        raise InvalidInput("body", f"a request body is required (JSON, or a {MULTIPART} form)")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ServiceError(400, f"malformed JSON: nested more than {MAX_BODY_NESTING} levels deep", "body") from None
    except ValueError as e:
        raise ServiceError(400, f"malformed JSON: {e}", "body") from None
