"""The search service: an HTTP API and a web page over one index directory.

::

    clipforge-index serve --index demo-index            # http://127.0.0.1:8000/

    POST /search            JSON {"text": "a red heart", "k": 10, "target": "image"}
                            JSON {"item": 42} or {"item": "KEY"}     (more like an indexed item)
                            multipart/form-data: image=@query.png [k, target]
    GET  /items/{ref}       an item's metadata (ref: a key or row id; key:K / id:N explicit)
    GET  /items/{ref}/image the item's stored image bytes, with their content type
    GET  /health            status, collection size, model, limits, batching figures
    GET  /openapi.json      the OpenAPI schema (interactive docs at /docs)
    GET  /                  the web page (static files from clipforge/index/web/)

Every bad request gets a 4xx with a JSON body ``{"detail": "<one readable sentence>"}``: a k
outside 1..min(count, max_k), an empty or over-long text, a lone surrogate, a number past
Python's int-string limit, JSON nested too deeply, an upload over the size limit, bytes that are
not an image, an image whose size would cost too much work (:mod:`.image_guard`), an unknown
item. A 500 means a bug; it is logged with its traceback and answered as JSON too.

Around the routes (:mod:`.http_guard`): security headers and a Content-Security-Policy on every
response, CORS for named origins only, an optional API key (``Authorization: Bearer``), an
optional per-client rate limit. Under uvicorn (:func:`uvicorn_config`): a deadline for request
headers (:mod:`.http_timeouts`), one for the search body, and uvicorn's keep-alive timeout.

The model runs on one dedicated thread (torch modules are not safe to call concurrently, and on
a CPU one forward pass already uses every core). Queries that arrive while it is busy wait in a
queue and are encoded together in the next forward pass (:class:`QueryBatcher`), so under load
the service does one batched encode per model turn instead of one per request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .emb_dir import read_member_bytes
from .http_guard import (
    ApiError,
    ApiKeyMiddleware,
    CatchAllMiddleware,
    RateLimitMiddleware,
    SecurityHeadersMiddleware,
    error_body,
    is_loopback,
)
from .image_guard import ImageLimits, decode_query_image
from .searcher import Hit, Searcher, SearchError
from .store import METADATA_NAME

log = logging.getLogger(__name__)

IMAGE_MEDIA_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
}
"""Content type of a stored image by its tar member extension."""


# ----------------------------------------------------------------------------- configuration


QUERY_ENCODERS = ("torch", "onnx", "onnx-int8")


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one search service (``clipforge-index serve`` flags map onto these)."""

    index_dir: str
    """The ``INDEX_DIR`` to serve."""
    model: str | None = None
    """Query model (run dir / model folder / checkpoint); None: the index's own copy
    (``INDEX_DIR/model/``), or ``model_source`` for indexes built before it was kept."""
    device: str = "cpu"
    """Device of the query model."""
    max_k: int = 1000
    """Largest ``k`` a request may ask for (also capped by the collection size)."""
    max_text_chars: int = 1000
    """Longest text query in characters (the tokenizer keeps ~77 tokens anyway; this bounds the
    work and memory one request can cause)."""
    max_upload_bytes: int = 10 * 1024 * 1024
    """Largest request body: an uploaded image with its form fields, or a JSON query."""
    max_image_pixels: int = 40_000_000
    """Largest uploaded image in pixels (checked from the header before decoding, so a small
    file that decompresses to gigabytes is refused instead of exhausting memory)."""
    max_batch: int = 64
    """Most queued queries encoded together in one forward pass."""
    max_image_side: int = 16_384
    """Longest side of an uploaded image in pixels (from the header, before decoding)."""
    max_image_aspect: float = 20.0
    """Largest aspect ratio of an uploaded image: the model scales the shorter side up to its
    input size, so a 200,000 x 1 image would become 44.8 million x 224 pixels."""
    image_work_side: int = 1024
    """Images with a shorter side over twice this are reduced (JPEG: decoded at 1/2..1/8 scale)
    to a shorter side of this .. twice this before the model's own resize."""
    api_key: str | None = field(default=None, repr=False)
    """When set, every route but /health, the page and its assets and the API description needs
    ``Authorization: Bearer <api_key>``."""
    cors_origins: tuple[str, ...] = ()
    """Origins allowed to call the API from their pages (CORS); none by default."""
    max_requests_per_minute: int | None = None
    """Requests one client address may make in any 60 s (429 with Retry-After beyond)."""
    header_timeout_s: float = 10.0
    """Seconds a request may take to deliver its headers (408 and the connection closed)."""
    body_timeout_s: float = 60.0
    """Seconds a search request may take to deliver its body (408 and the connection closed)."""
    query_encoder: str = "torch"
    """What encodes text queries: ``torch``, or the exported ONNX text graph run by
    onnxruntime, ``onnx`` (fp32, the same vectors) or ``onnx-int8`` (int8 weights)."""
    onnx_export: str | None = None
    """The ``clipforge-export onnx`` directory of the index's model (for ``onnx*``)."""
    keep_alive_s: float = 15.0
    """Seconds an idle kept-alive connection stays open (uvicorn's ``timeout_keep_alive``).
    Longer than client pools keep idle connections (httpx: 5 s): at uvicorn's default of 5 s
    both sides time out together, and a client reusing the connection as the server closes it
    gets a reset (measured: 1 ReadError in a 2,000-request load test)."""

    def __post_init__(self) -> None:
        for name in (
            "max_k",
            "max_text_chars",
            "max_upload_bytes",
            "max_image_pixels",
            "max_batch",
            "max_image_side",
            "image_work_side",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_image_aspect >= 1:
            raise ValueError(f"max_image_aspect must be >= 1, got {self.max_image_aspect}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_requests_per_minute is not None and self.max_requests_per_minute < 1:
            raise ValueError(
                f"max_requests_per_minute must be >= 1, got {self.max_requests_per_minute}"
            )
        if self.query_encoder not in QUERY_ENCODERS:
            raise ValueError(
                f"query_encoder must be one of {QUERY_ENCODERS}, got {self.query_encoder!r}"
            )
        if self.query_encoder != "torch" and not self.onnx_export:
            raise ValueError(
                f"query_encoder {self.query_encoder!r} needs onnx_export: the directory "
                "clipforge-export onnx wrote for the index's model"
            )
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (None turns the key off)")
        for origin in self.cors_origins:
            if origin == "*" or not origin.startswith(("http://", "https://")):
                raise ValueError(
                    f"CORS origin {origin!r} must be a scheme://host[:port] origin, "
                    "like https://example.org ('*' is refused: name the origins)"
                )

    @property
    def image_limits(self) -> ImageLimits:
        """The bounds on one query image."""
        return ImageLimits(
            max_pixels=self.max_image_pixels,
            max_side=self.max_image_side,
            max_aspect=self.max_image_aspect,
            work_side=self.image_work_side,
        )


# ----------------------------------------------------------------------------- API models


class SearchRequest(BaseModel):
    """A JSON search: exactly one of ``text`` and ``item``."""

    # Unknown fields are refused: a misspelt "txt" or "top_k" must not silently search defaults.
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="Text query (text -> image / text -> caption).")
    # strict: JSON true or 1.0 is not item 1
    item: StrictInt | StrictStr | None = Field(
        None,
        description="An indexed item whose stored image is the query ('more like this'): an "
        "integer row id, or a string: the item's key (else a decimal row id; 'key:K' and 'id:N' "
        "say which explicitly).",
    )
    # strict: JSON true is not k=1 (form fields are converted from text before validation)
    k: int = Field(10, ge=1, strict=True, description="Results (1 .. min(count, max_k)).")
    target: Literal["image", "text"] = Field(
        "image", description="Search the image embeddings (default) or the caption embeddings."
    )


class HitOut(BaseModel):
    """One result. Shard paths and byte offsets stay on the server; ``image_url`` serves the
    image."""

    id: int = Field(description="Row id in the index.")
    score: float = Field(description="Cosine similarity to the query (higher is closer).")
    key: str = Field(description="Sample key in its shard.")
    caption: str = Field(description="The sample's caption.")
    source: str = Field(description="The sample's original source path ('' if unknown).")
    image_url: str = Field(description="Path of the item's image on this server.")


class QueryOut(BaseModel):
    """What was searched for."""

    type: Literal["text", "image", "item"]
    text: str | None = None
    item: int | None = Field(None, description="Row id of the query item (type 'item').")
    filename: str | None = Field(None, description="Uploaded file name (type 'image').")


class SearchResponse(BaseModel):
    """Results of one search, best first."""

    query: QueryOut
    target: Literal["image", "text"]
    k: int
    took_ms: float = Field(description="Server time for this request in milliseconds.")
    hits: list[HitOut]


class ItemOut(BaseModel):
    """An indexed item's metadata."""

    id: int
    key: str
    caption: str
    source: str
    image_url: str
    has_image: bool = Field(description="Whether the stored image bytes can be served.")


class ErrorOut(BaseModel):
    """Every error response."""

    detail: str = Field(description="What was wrong, in one sentence.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorOut} for c in (400, 404, 413, 415, 422)
}

# The search body is read by hand (JSON or multipart, one endpoint), so its schema is declared
# here for /openapi.json rather than inferred from a parameter.
_SEARCH_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": SearchRequest.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "query image"},
                    "text": {"type": "string"},
                    "item": {"type": "string"},
                    "k": {"type": "integer", "default": 10, "minimum": 1},
                    "target": {"type": "string", "enum": ["image", "text"], "default": "image"},
                },
            }
        },
    },
}


# ----------------------------------------------------------------------------- batching


@dataclass
class BatchStats:
    """How many queries the model served in how many forward passes."""

    queries: int = 0
    """Queries encoded."""
    batches: int = 0
    """Forward passes (encode calls)."""
    largest_batch: int = 0
    """Most queries in one forward pass."""

    def to_dict(self) -> dict[str, float]:
        mean = self.queries / self.batches if self.batches else 0.0
        return {
            "queries": self.queries,
            "batches": self.batches,
            "largest_batch": self.largest_batch,
            "mean_batch": round(mean, 2),
        }


@dataclass
class _Pending:
    kind: Literal["text", "image"]
    payload: str | Image.Image
    k: int
    target: str
    future: asyncio.Future[list[Hit]] = field(repr=False)


class QueryBatcher:
    """Runs queries on one model thread, encoding those that queue up meanwhile as one batch.

    No timer: an idle service encodes a lone query at once; under load every forward pass takes
    everything that arrived during the previous one (up to ``max_batch``), which is where
    batching pays. Texts and images are encoded in separate passes (different towers).
    """

    def __init__(self, searcher: Searcher, max_batch: int) -> None:
        self._searcher = searcher
        self._max_batch = max_batch
        # One thread: the only one that touches the model and the FAISS indexes. Created on
        # demand, so that an app whose lifespan ended (close()) can be served again.
        self._executor: ThreadPoolExecutor | None = None
        self._queue: deque[_Pending] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self.stats = BatchStats()

    async def search(
        self, kind: Literal["text", "image"], payload: str | Image.Image, k: int, target: str
    ) -> list[Hit]:
        """Queue one query and wait for its hits."""
        loop = asyncio.get_running_loop()
        pending = _Pending(kind, payload, k, target, loop.create_future())
        self._queue.append(pending)
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await pending.future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            kind = self._queue[0].kind
            batch: list[_Pending] = []
            rest: deque[_Pending] = deque()
            while self._queue:
                p = self._queue.popleft()
                if p.future.done():  # the client went away before its turn
                    continue
                (batch if p.kind == kind and len(batch) < self._max_batch else rest).append(p)
            self._queue = rest + self._queue
            if not batch:
                continue
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="clipforge-model")
            try:
                results = await loop.run_in_executor(self._executor, self._run, kind, batch)
            except Exception as e:  # _run catches per query; this is the executor itself failing
                results = [e] * len(batch)
            for p, r in zip(batch, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(r, BaseException):
                    p.future.set_exception(r)
                else:
                    p.future.set_result(r)

    def _run(
        self, kind: Literal["text", "image"], batch: Sequence[_Pending]
    ) -> list[list[Hit] | BaseException]:
        """On the model thread: one encode for the batch, one index search per (target, k)."""
        try:
            return self._run_batch(kind, batch)
        except Exception:
            if len(batch) == 1:
                raise
        # One bad query must not fail the others: retry each alone, keeping its own error.
        out: list[list[Hit] | BaseException] = []
        for p in batch:
            try:
                out.extend(self._run_batch(kind, [p]))
            except Exception as e:
                out.append(e)
        return out

    def _run_batch(
        self, kind: Literal["text", "image"], batch: Sequence[_Pending]
    ) -> list[list[Hit] | BaseException]:
        s = self._searcher
        payloads = [p.payload for p in batch]
        emb = s.embed_text(payloads) if kind == "text" else s.embed_images(payloads)  # (Q, D)
        self.stats.queries += len(batch)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        out: list[list[Hit] | BaseException] = [SearchError("not searched")] * len(batch)
        groups: dict[tuple[str, int], list[int]] = {}
        for i, p in enumerate(batch):
            groups.setdefault((p.target, p.k), []).append(i)
        for (target, k), rows in groups.items():
            for i, hits in zip(rows, s.search_embeddings(emb[rows], k, target), strict=True):
                out[i] = hits
        return out

    def close(self) -> None:
        """Stop the model thread (after the pass in progress); a later query starts a new one."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- stored items

_ASCII_DIGITS = re.compile(r"[0-9]+")
_FORM_INT = re.compile(r"[+-]?[0-9]{1,18}")


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages quoting client input
    (a 5,000-digit id or key is named by its start and length; an int too long for ``str()``
    never reaches ``repr``)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"(an integer of about {int(value.bit_length() * 0.30103)} digits)"
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}… ({len(str(value))} characters)"


class ItemStore:
    """Row id / key -> metadata and stored image bytes, by random access into the shards.

    Reads the metadata columns once; an image request is then one ``seek`` + ``read`` of the
    member's bytes at the offset recorded at embed time (no tar scan per request).
    """

    def __init__(self, index_dir: Path) -> None:
        cols = ["key", "caption", "source", "shard", "member", "offset", "size"]
        path = index_dir / METADATA_NAME
        present = set(pq.read_schema(path).names)
        table = pq.read_table(path, columns=[c for c in cols if c in present])
        n = table.num_rows
        self.count = n

        def col(name: str, default: Any) -> list[Any]:
            return table.column(name).to_pylist() if name in present else [default] * n

        self.keys: list[str] = [str(k) for k in col("key", "")]
        self.captions: list[str] = [str(c or "") for c in col("caption", "")]
        self.sources: list[str] = [str(s or "") for s in col("source", "")]
        self.shards: list[str] = col("shard", "")
        self.members: list[str] = [str(m or "") for m in col("member", "")]
        self.offsets = np.asarray(
            [-1 if o is None else o for o in col("offset", -1)], dtype=np.int64
        )
        self.sizes = np.asarray([-1 if s is None else s for s in col("size", -1)], dtype=np.int64)
        self._by_key: dict[str, int] | None = None
        self._lock = threading.Lock()

    def resolve(self, ref: int | str) -> int:
        """Row id of ``ref``. An int is a row id. A string is a key when some item has that key
        (keys are often decimal, e.g. ``0000000133``), else a row id when decimal; ``key:K``
        and ``id:N`` say which explicitly."""
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise ApiError(422, f"item must be a row id or a key, got {_shown(ref)}")
        if isinstance(ref, str):
            if ref.startswith("key:"):
                return self._by_key_or_404(ref[4:])
            if ref.startswith("id:"):
                ref = ref[3:]
                if not _ASCII_DIGITS.fullmatch(ref):
                    raise ApiError(422, f"id:{_shown(ref)} is not a decimal row id")
            else:
                i = self._key_index().get(ref)
                if i is not None:
                    return i
                if not _ASCII_DIGITS.fullmatch(ref):
                    raise ApiError(404, f"no item with key {_shown(ref)}")
            if len(ref.lstrip("0")) > 18:
                # int() of over 4,300 digits raises; any id this long is out of range anyway
                raise ApiError(
                    404,
                    f"no item with id {ref[:20]}… ({len(ref)} digits): ids are 0..{self.count - 1}",
                )
            ref = int(ref)
        if not 0 <= ref < self.count:
            raise ApiError(404, f"no item with id {_shown(ref)}: ids are 0..{self.count - 1}")
        return ref

    def _key_index(self) -> dict[str, int]:
        with self._lock:  # built once, on the first key lookup, by whichever thread gets here
            if self._by_key is None:
                self._by_key = {k: i for i, k in enumerate(self.keys)}
            return self._by_key

    def _by_key_or_404(self, key: str) -> int:
        i = self._key_index().get(key)
        if i is None:
            raise ApiError(404, f"no item with key {_shown(key)}")
        return i

    def has_image(self, i: int) -> bool:
        return self.offsets[i] >= 0 and self.sizes[i] >= 0 and bool(self.shards[i])

    def image(self, i: int) -> tuple[bytes, str]:
        """``(bytes, media type)`` of item ``i``'s stored image."""
        if not self.has_image(i):
            raise ApiError(
                404,
                f"item {i} ({self.keys[i]!r}) has no stored image offset (its shard was remote "
                "or compressed when embedded)",
            )
        try:
            data = read_member_bytes(self.shards[i], int(self.offsets[i]), int(self.sizes[i]))
        except (OSError, ValueError) as e:
            log.warning("item %d: %s", i, e)
            raise ApiError(404, f"the image of item {i} ({self.keys[i]!r}) is unavailable") from e
        ext = self.members[i].rsplit(".", 1)[-1].lower() if "." in self.members[i] else ""
        return data, IMAGE_MEDIA_TYPES.get(ext, "application/octet-stream")

    def hit_out(self, hit: Hit) -> HitOut:
        return HitOut(
            id=hit.id,
            # Stored float16 vectors are unit length only to ~1e-4, so an item scored against
            # itself can come out as 1.000036: a cosine similarity is within [-1, 1].
            score=round(min(1.0, max(-1.0, hit.score)), 6),
            key=hit.key,
            caption=hit.caption,
            source=hit.source,
            image_url=f"/items/{hit.id}/image",
        )


# ----------------------------------------------------------------------------- request parsing


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes, and with 408
    (closing the connection) when it has not all arrived ``timeout_s`` seconds after the headers:
    a client trickling its body must not hold a connection forever."""
    close = {"Connection": "close"}  # the rest of the body is not read: the connection is done
    declared = request.headers.get("content-length", "")
    if _ASCII_DIGITS.fullmatch(declared) and (len(declared) > 18 or int(declared) > limit):
        raise ApiError(
            413, f"request body is {_shown(declared)} bytes; the limit is {limit}", close
        )
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise ApiError(413, f"request body exceeds the limit of {limit} bytes", close)
                chunks.append(chunk)
    except TimeoutError:
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


def _validation_message(e: ValidationError | RequestValidationError) -> str:
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
                f"{name if name.isidentifier() else _shown(name, 40)}: not valid Unicode text "
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
                    raise ApiError(422, f"unexpected file field {_shown(name)} (send 'image')")
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
                raise ApiError(422, f"unexpected form field {_shown(name)}")
    finally:
        await form.close()
    if filename is not None and _SURROGATE.search(filename):
        filename = filename.encode("utf-8", "replace").decode("utf-8")
    return fields, upload, filename


async def _search_request(state: _State, request: Request) -> SearchResponse:
    """POST /search: parse (JSON or multipart), validate, queue for the model, answer."""
    t0 = time.perf_counter()
    config, searcher, items = state.config, state.searcher, state.items
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await _read_body(request, config.max_upload_bytes, config.body_timeout_s)
    upload: bytes | None = None
    filename: str | None = None
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        fields, upload, filename = await _parse_form_fields(request, body, config)
    elif content_type == "application/json" or (not content_type and body):
        fields = _parse_json_fields(body)
    else:
        raise ApiError(
            415,
            f"unsupported content type {_shown(content_type or '(none)')}: send "
            "application/json or multipart/form-data",
        )
    _check_unicode(fields)
    try:
        req = SearchRequest.model_validate(fields)
    except ValidationError as e:
        raise ApiError(422, _validation_message(e)) from None
    max_k = state.max_k
    if req.k > max_k:
        raise ApiError(
            422,
            f"k: must be between 1 and {max_k} (the index holds {searcher.count} items, "
            f"the service returns at most {config.max_k})",
        )
    given = [
        n for n, v in (("text", req.text), ("item", req.item), ("image", upload)) if v is not None
    ]
    if len(given) != 1:
        raise ApiError(
            422,
            "give exactly one query: text, item, or an image upload"
            + (f" (got {', '.join(given)})" if given else ""),
        )
    if req.target not in searcher.targets:
        raise ApiError(422, f"target: this index has no {req.target} index ({searcher.targets})")

    limits = config.image_limits
    if req.text is not None:
        text = req.text.strip()
        if not text:
            raise ApiError(422, "text: the query is empty")
        if len(text) > config.max_text_chars:
            raise ApiError(
                422, f"text: {len(text)} characters; the limit is {config.max_text_chars}"
            )
        query = QueryOut(type="text", text=text)
        hits = await _search(state, "text", text, req.k, req.target)
    elif req.item is not None:
        i = await asyncio.to_thread(items.resolve, req.item)  # 1st key lookup builds a map
        data, _ = await asyncio.to_thread(items.image, i)
        image = await asyncio.to_thread(decode_query_image, data, limits)
        query = QueryOut(type="item", item=i)
        hits = await _search(state, "image", image, req.k, req.target)
    else:
        assert upload is not None
        image = await asyncio.to_thread(decode_query_image, upload, limits)
        query = QueryOut(type="image", filename=filename)
        hits = await _search(state, "image", image, req.k, req.target)
    took = (time.perf_counter() - t0) * 1000
    return SearchResponse(
        query=query,
        target=req.target,
        k=req.k,
        took_ms=round(took, 2),
        hits=[items.hit_out(h) for h in hits],
    )


# ----------------------------------------------------------------------------- the app


@dataclass
class _State:
    config: ServerConfig
    searcher: Searcher
    items: ItemStore
    batcher: QueryBatcher
    started: float
    max_k: int
    """Largest k a request may ask for: ``max_k`` capped by the collection size."""


def web_dir() -> Path:
    """The web page's static files inside the installed package."""
    return Path(str(resources.files("clipforge.index") / "web"))


def create_app(config: ServerConfig, searcher: Searcher | None = None) -> FastAPI:
    """The ASGI app. Opens the index and loads the model now (a bad index or model fails here,
    before any port is bound) and runs one warm-up query per target."""
    if searcher is None:
        searcher = Searcher.open(config.index_dir, model=config.model, device=config.device)
    if config.query_encoder != "torch":
        assert config.onnx_export is not None  # checked by ServerConfig
        searcher.use_onnx_text_encoder(config.onnx_export, int8=config.query_encoder == "onnx-int8")
    index_dir = Path(config.index_dir)
    items = ItemStore(index_dir)
    # Load the model and every index now, and run each tower once, so that the first request
    # is not the one that pays for it.
    for target in searcher.targets:
        searcher.search_text("warm up", k=1, target=target)
    searcher.search_image(Image.new("RGB", (8, 8)), k=1, target=searcher.targets[0])
    max_k = min(config.max_k, searcher.count)
    batcher = QueryBatcher(searcher, config.max_batch)
    state = _State(config, searcher, items, batcher, time.time(), max_k)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.batcher.close()

    app = FastAPI(
        title="clipforge search",
        summary=f"Text and image search over {index_dir.name} ({searcher.count} items)",
        version="1",
        lifespan=lifespan,
        # /docs is served below with a Content-Security-Policy that admits its CDN scripts
        docs_url=None,
        redoc_url=None,
    )
    app.state.clipforge = state
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    _add_guards(app, config)

    # ------------------------------------------------------------------ search

    @app.post(
        "/search",
        response_model=SearchResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        openapi_extra={"requestBody": _SEARCH_BODY},
        summary="Search by text, uploaded image, or indexed item",
    )
    async def search(request: Request) -> SearchResponse:
        return await _search_request(state, request)

    # ------------------------------------------------------------------ items

    @app.get("/items/{ref:path}/image", responses=_ERRORS, summary="An item's stored image")
    def item_image(ref: str) -> Response:
        data, media_type = items.image(items.resolve(ref))
        # Items of an index never change; a rebuilt index may renumber them, hence no "immutable".
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    @app.get("/items/{ref:path}", response_model=ItemOut, responses=_ERRORS, summary="An item")
    def item(ref: str) -> ItemOut:
        i = items.resolve(ref)
        return ItemOut(
            id=i,
            key=items.keys[i],
            caption=items.captions[i],
            source=items.sources[i],
            image_url=f"/items/{i}/image",
            has_image=items.has_image(i),
        )

    # ------------------------------------------------------------------ health + page

    @app.get("/health", summary="Service status and collection description")
    def health() -> dict[str, Any]:
        m = searcher.manifest
        return {
            "status": "ok",
            "index": index_dir.name,
            "count": searcher.count,
            "dim": searcher.dim,
            "targets": searcher.targets,
            "kinds": {t: m["modalities"][t].get("kind") for t in searcher.targets},
            "model_hash": searcher.model_hash,
            "query_encoder": searcher.query_encoder,
            "limits": {
                "max_k": max_k,
                "max_text_chars": config.max_text_chars,
                "max_upload_bytes": config.max_upload_bytes,
                "max_image_pixels": config.max_image_pixels,
            },
            "batching": state.batcher.stats.to_dict(),
            "auth": config.api_key is not None,
            "max_requests_per_minute": config.max_requests_per_minute,
            "uptime_s": round(time.time() - state.started, 1),
        }

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return _docs_page(app)

    static = web_dir()

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=static), name="static")
    return app


def _json_error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    # error_body escapes non-ASCII: a detail quoting a client's lone surrogate still encodes
    return Response(error_body(detail), status, headers, media_type="application/json")


async def _api_error(request: Request, e: ApiError) -> Response:
    return _json_error(e.status, e.detail, e.headers)


async def _invalid(request: Request, e: RequestValidationError) -> Response:
    return _json_error(422, _validation_message(e))


async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
    return _json_error(e.status_code, str(e.detail), dict(e.headers or {}))


def _add_guards(app: FastAPI, config: ServerConfig) -> None:
    """The middleware stack of :mod:`clipforge.index.http_guard`, innermost first (Starlette's
    ``add_middleware`` puts each new one outside the previous)."""
    app.add_middleware(CatchAllMiddleware)
    if config.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, key=config.api_key)
    if config.max_requests_per_minute is not None:
        app.add_middleware(RateLimitMiddleware, per_minute=config.max_requests_per_minute)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    app.add_middleware(SecurityHeadersMiddleware)


_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def _docs_page(app: FastAPI) -> HTMLResponse:
    """FastAPI's Swagger UI page, with a Content-Security-Policy admitting exactly what it loads:
    its scripts and stylesheet from the CDN FastAPI names, and its one inline script by hash."""
    page = get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json",
                               title=f"{app.title} - Swagger UI")  # fmt: skip
    html = bytes(page.body).decode("utf-8")
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(m.encode("utf-8")).digest()).decode() + "'"
        for m in _INLINE_SCRIPT.findall(html)
    )
    cdn = "https://cdn.jsdelivr.net"
    csp = (
        f"default-src 'none'; script-src {cdn} {hashes}; style-src {cdn}; "
        f"img-src 'self' data: {cdn} https://fastapi.tiangolo.com; connect-src 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    )
    return HTMLResponse(html, headers={"Content-Security-Policy": csp})


async def _search(
    state: _State, kind: Literal["text", "image"], payload: str | Image.Image, k: int, target: str
) -> list[Hit]:
    try:
        return await state.batcher.search(kind, payload, k, target)
    except SearchError as e:
        raise ApiError(422, str(e)) from None


# ----------------------------------------------------------------------------- running


def uvicorn_config(app: FastAPI, **kwargs: Any) -> Any:
    """uvicorn's settings for ``app``: its header deadline protocol, keep-alive and h11 limits
    from the app's :class:`ServerConfig`, quiet logs. ``kwargs`` go to ``uvicorn.Config``."""
    import uvicorn

    from .http_timeouts import protocol_class

    config: ServerConfig = app.state.clipforge.config
    return uvicorn.Config(
        app,
        http=protocol_class(config.header_timeout_s),
        timeout_keep_alive=config.keep_alive_s,
        # request line + headers over 16 KiB: 400 (h11 buffers at most this for one event)
        h11_max_incomplete_event_size=16 * 1024,
        log_level="warning",
        access_log=False,
        **kwargs,
    )


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    if config.api_key is None and not is_loopback(host):
        print(
            f"WARNING: serving on {host}, reachable from other machines, without an API key: "
            "anyone who can connect can search the collection and read every image "
            "(--api-key-file F or $CLIPFORGE_API_KEY requires one)",
            file=sys.stderr,
            flush=True,
        )
    app = create_app(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {config.index_dir} on http://{shown}:{port}/ (API docs: /docs)", flush=True)
    uvicorn.Server(uvicorn_config(app, host=host, port=port)).run()


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn on a background thread; yields its base URL (``port=0``: a free
    port). Stops the server on exit. For tests, the load test and the demo."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server on {host}:{bound} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{f'[{host}]' if ':' in host else host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


__all__ = [
    "ApiError",
    "BatchStats",
    "ItemStore",
    "QueryBatcher",
    "SearchRequest",
    "SearchResponse",
    "ServerConfig",
    "create_app",
    "decode_query_image",
    "running_server",
    "serve",
    "uvicorn_config",
    "web_dir",
]
