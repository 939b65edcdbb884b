"""``POST /search``: reading the body (JSON or multipart), validating it, and answering.

Every refusal is an :class:`.http_guard.ApiError` with one readable sentence: a body over the
size limit or too slow to arrive, JSON that is not an object (or nested too deeply, or holding a
number past Python's int-string limit), a lone surrogate, an unknown field, a k out of range,
not exactly one query, an unknown target, an empty or over-long text.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from .api_models import QueryOut, SearchRequest, SearchResponse
from .batcher import QueryBatcher
from .http_guard import ApiError, shown
from .image_guard import decode_query_image
from .item_store import ItemStore
from .searcher import Hit, Searcher, SearchError
from .server_config import ServerConfig

_ASCII_DIGITS = re.compile(r"[0-9]+")
_FORM_INT = re.compile(r"[+-]?[0-9]{1,18}")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes, and with 408
    (closing the connection) when it has not all arrived ``timeout_s`` seconds after the headers:
    a client trickling its body must not hold a connection forever."""
    close = {"Connection": "close"}  # the rest of the body is not read: the connection is done
    declared = request.headers.get("content-length", "")
    if _ASCII_DIGITS.fullmatch(declared) and (len(declared) > 18 or int(declared) > limit):
        raise ApiError(413, f"request body is {shown(declared)} bytes; the limit is {limit}", close)
    chunks: list[bytes] = []

    async def receive_all() -> None:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes", close)
            chunks.append(chunk)

    try:
        # wait_for, not asyncio.timeout: the latter is Python 3.11+, clipforge supports 3.10;
        # asyncio.TimeoutError is the builtin TimeoutError from 3.11 on.
        await asyncio.wait_for(receive_all(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {timeout_s:g} s", close
        ) from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


def _replay(body: bytes) -> Any:
    """An ASGI ``receive`` that hands over an already-read body, for Starlette's form parser."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def validation_message(e: ValidationError | RequestValidationError) -> str:
    parts: list[str] = []
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if loc[:1] == ["item"]:
            # one sentence for the union's two failures ("item.int: ...; item.str: ...")
            part = "item: must be an integer row id or a string key (not a bool or float)"
        else:
            part = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}"
        if part not in parts:
            parts.append(part)
    return "; ".join(parts)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _parse_json_fields(body: bytes) -> dict[str, Any]:
    """The fields of a JSON search body, or :class:`ApiError` (400 unreadable, 422 not an
    object)."""
    try:
        fields = json.loads(body)
    except RecursionError:
        raise ApiError(
            400, "the body is not valid JSON for this service: nested too deeply"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    except ValueError:
        # json parses integers with int(), which refuses over 4,300 digits (sys.int_info)
        raise ApiError(
            400, "the body is not valid JSON for this service: a number of over 4,300 digits"
        ) from None
    if not isinstance(fields, dict):
        raise ApiError(422, 'the JSON body must be an object like {"text": "..."}')
    return fields


def _check_unicode(fields: dict[str, Any]) -> None:
    """JSON's ``\\ud800`` escapes decode to lone surrogates, which no UTF-8 encoder (the
    tokenizer, the response) accepts: refuse them as the client's error."""
    for name, value in fields.items():
        if isinstance(value, str) and (m := _SURROGATE.search(value)):
            raise ApiError(
                422,
                f"{name if name.isidentifier() else shown(name, 40)}: not valid Unicode text "
                "(a lone surrogate "
                f"\\u{ord(m.group()):04x} at position {m.start()})",
            )


async def _parse_form_fields(
    request: Request, body: bytes, config: ServerConfig
) -> tuple[dict[str, Any], bytes | None, str | None]:
    """``(fields, uploaded image bytes, file name)`` of a multipart or urlencoded search."""
    form = await Request(request.scope, _replay(body)).form(
        max_files=1, max_fields=8, max_part_size=4 * config.max_text_chars + 1024
    )
    fields: dict[str, Any] = {}
    upload: bytes | None = None
    filename: str | None = None
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != "image":
                    raise ApiError(422, f"unexpected file field {shown(name)} (send 'image')")
                upload, filename = await value.read(), value.filename
            elif name == "image":
                raise ApiError(422, "image must be a file upload (curl: -F image=@FILE)")
            elif name == "k":
                # form fields are text: an ASCII integer becomes one; anything else ("--5",
                # 5,000 digits, "ten") stays text and fails validation as "not an integer"
                fields[name] = int(value) if _FORM_INT.fullmatch(value.strip()) else value
            elif name in SearchRequest.model_fields:
                fields[name] = value
            else:
                raise ApiError(422, f"unexpected form field {shown(name)}")
    finally:
        await form.close()
    if filename is not None and _SURROGATE.search(filename):
        filename = filename.encode("utf-8", "replace").decode("utf-8")
    return fields, upload, filename


# ----------------------------------------------------------------------------- answering


@dataclass
class ServiceState:
    """What the routes of one service share (``app.state.clipforge``)."""

    config: ServerConfig
    """The service's settings."""
    searcher: Searcher
    """The index and the query model."""
    items: ItemStore
    """Metadata and stored images by row id or key."""
    batcher: QueryBatcher
    """The one model thread, batching queued queries."""
    started: float
    """``time.time()`` when the service was created (for /health's uptime)."""
    max_k: int
    """Largest k a request may ask for: ``max_k`` capped by the collection size."""


@dataclass(frozen=True)
class ParsedSearch:
    """A search request that passed every check: exactly one query, k and target in range."""

    request: SearchRequest
    """The validated fields (text or item, k, target)."""
    upload: bytes | None
    """The uploaded image's bytes (multipart), when that is the query."""
    filename: str | None
    """The uploaded file's name, as the client sent it."""


async def parse_search(state: ServiceState, request: Request) -> ParsedSearch:
    """Read and check a ``POST /search`` body (JSON or multipart) against the service's limits."""
    config, searcher = state.config, state.searcher
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, config.max_upload_bytes, config.body_timeout_s)
    upload: bytes | None = None
    filename: str | None = None
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        fields, upload, filename = await _parse_form_fields(request, body, config)
    elif content_type == "application/json" or (not content_type and body):
        fields = _parse_json_fields(body)
    else:
        raise ApiError(
            415,
            f"unsupported content type {shown(content_type or '(none)')}: send "
            "application/json or multipart/form-data",
        )
    _check_unicode(fields)
    try:
        req = SearchRequest.model_validate(fields)
    except ValidationError as e:
        raise ApiError(422, validation_message(e)) from None
    if req.k > state.max_k:
        raise ApiError(
            422,
            f"k: must be between 1 and {state.max_k} (the index holds {searcher.count} items, "
            f"the service returns at most {config.max_k})",
        )
    queries = (("text", req.text), ("item", req.item), ("vector", req.vector), ("image", upload))
    given = [n for n, v in queries if v is not None]
    if len(given) != 1:
        raise ApiError(
            422,
            "give exactly one query: text, item, vector, or an image upload"
            + (f" (got {', '.join(given)})" if given else ""),
        )
    if req.vector is not None:
        if len(req.vector) != searcher.dim:
            raise ApiError(
                422,
                f"vector: {len(req.vector)} values; this index's embeddings have {searcher.dim}",
            )
        if not all(math.isfinite(x) for x in req.vector):
            raise ApiError(422, "vector: every value must be a finite number")
        if not any(req.vector):
            raise ApiError(422, "vector: all zeros has no direction to search")
    if req.target not in searcher.targets:
        raise ApiError(422, f"target: this index has no {req.target} index ({searcher.targets})")
    return ParsedSearch(req, upload, filename)


async def answer_search(state: ServiceState, parsed: ParsedSearch) -> tuple[QueryOut, list[Hit]]:
    """Encode the query (on the batcher's model thread) and search; ``(query, hits)``."""
    config, items, req = state.config, state.items, parsed.request
    limits = config.image_limits
    if req.text is not None:
        text = req.text.strip()
        if not text:
            raise ApiError(422, "text: the query is empty")
        if len(text) > config.max_text_chars:
            raise ApiError(
                422, f"text: {len(text)} characters; the limit is {config.max_text_chars}"
            )
        return QueryOut(type="text", text=text, item=None, filename=None), await _search(
            state, "text", text, req
        )
    if req.vector is not None:
        # no model pass: searched on a worker thread, beside the model thread's queue
        vector = np.asarray(req.vector, dtype=np.float32)  # (D,)
        try:
            found = await asyncio.to_thread(
                state.searcher.search_embeddings, vector, req.k, req.target
            )
        except SearchError as e:
            raise ApiError(422, str(e)) from None
        return QueryOut(type="vector", text=None, item=None, filename=None), found[0]
    if req.item is not None:
        i = await asyncio.to_thread(items.resolve, req.item)  # 1st key lookup builds a map
        data, _ = await asyncio.to_thread(items.image, i)
        image = await asyncio.to_thread(decode_query_image, data, limits)
        return QueryOut(type="item", text=None, item=i, filename=None), await _search(
            state, "image", image, req
        )
    assert parsed.upload is not None
    image = await asyncio.to_thread(decode_query_image, parsed.upload, limits)
    query = QueryOut(type="image", text=None, item=None, filename=parsed.filename)
    return query, await _search(state, "image", image, req)


async def handle_search(state: ServiceState, request: Request) -> SearchResponse:
    """POST /search: parse (JSON or multipart), validate, queue for the model, answer."""
    t0 = time.perf_counter()
    parsed = await parse_search(state, request)
    query, hits = await answer_search(state, parsed)
    took = (time.perf_counter() - t0) * 1000
    return SearchResponse(
        query=query,
        target=parsed.request.target,
        k=parsed.request.k,
        took_ms=round(took, 2),
        hits=[state.items.hit_out(h) for h in hits],
    )


async def _search(
    state: ServiceState,
    kind: Literal["text", "image"],
    payload: str | Image.Image,
    req: SearchRequest,
) -> list[Hit]:
    try:
        return await state.batcher.search(kind, payload, req.k, req.target)
    except SearchError as e:
        raise ApiError(422, str(e)) from None
