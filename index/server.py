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
outside 1..min(count, max_k), an empty or over-long text, an upload over the size limit, bytes
that are not an image, an unknown item. A 500 means a bug.

The model runs on one dedicated thread (torch modules are not safe to call concurrently, and on
a CPU one forward pass already uses every core). Queries that arrive while it is busy wait in a
queue and are encoded together in the next forward pass (:class:`QueryBatcher`), so under load
the service does one batched encode per model turn instead of one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
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
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .embed import read_member_bytes
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


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one search service (``clipforge-index serve`` flags map onto these)."""

    index_dir: str
    """The ``INDEX_DIR`` to serve."""
    model: str | None = None
    """Query model (run dir / model folder / checkpoint); None: the index's ``model_source``."""
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

    def __post_init__(self) -> None:
        for name in (
            "max_k",
            "max_text_chars",
            "max_upload_bytes",
            "max_image_pixels",
            "max_batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ----------------------------------------------------------------------------- API models


class SearchRequest(BaseModel):
    """A JSON search: exactly one of ``text`` and ``item``."""

    # Unknown fields are refused: a misspelt "txt" or "top_k" must not silently search defaults.
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="Text query (text -> image / text -> caption).")
    item: int | str | None = Field(
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


class ApiError(Exception):
    """A request the service refuses: HTTP ``status`` with a readable ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


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
            raise ApiError(422, f"item must be a row id or a key, got {ref!r}")
        if isinstance(ref, str):
            if ref.startswith("key:"):
                return self._by_key_or_404(ref[4:])
            if ref.startswith("id:"):
                ref = ref[3:]
                if not ref.isdecimal():
                    raise ApiError(422, f"id:{ref} is not a decimal row id")
            else:
                i = self._key_index().get(ref)
                if i is not None:
                    return i
                if not ref.isdecimal():
                    raise ApiError(404, f"no item with key {ref!r}")
        i = int(ref)
        if not 0 <= i < self.count:
            raise ApiError(404, f"no item with id {i}: ids are 0..{self.count - 1}")
        return i

    def _key_index(self) -> dict[str, int]:
        with self._lock:  # built once, on the first key lookup, by whichever thread gets here
            if self._by_key is None:
                self._by_key = {k: i for i, k in enumerate(self.keys)}
            return self._by_key

    def _by_key_or_404(self, key: str) -> int:
        i = self._key_index().get(key)
        if i is None:
            raise ApiError(404, f"no item with key {key!r}")
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
            score=round(hit.score, 6),
            key=hit.key,
            caption=hit.caption,
            source=hit.source,
            image_url=f"/items/{hit.id}/image",
        )


# ----------------------------------------------------------------------------- request parsing


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdecimal() and int(declared) > limit:
        raise ApiError(413, f"request body is {int(declared)} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
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
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode uploaded bytes into a loaded PIL image, or raise :class:`ApiError` (400/413)."""
    if not data:
        raise ApiError(400, "the uploaded image is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise ApiError(413, f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
        im.load()
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise ApiError(400, "the uploaded file is not an image (unrecognised format)") from None
    except Exception as e:
        # Untrusted bytes: PIL's decoders raise OSError, SyntaxError, ValueError, EOFError,
        # struct.error, DecompressionBombError... depending on the format. Any of them means
        # "not an image we can read", which is the client's problem, never a 500.
        raise ApiError(400, f"the uploaded file is not a decodable image ({e})") from None
    return im


# ----------------------------------------------------------------------------- the app


@dataclass
class _State:
    config: ServerConfig
    searcher: Searcher
    items: ItemStore
    batcher: QueryBatcher
    started: float


def web_dir() -> Path:
    """The web page's static files inside the installed package."""
    return Path(str(resources.files("clipforge.index") / "web"))


def create_app(config: ServerConfig, searcher: Searcher | None = None) -> FastAPI:
    """The ASGI app. Opens the index and loads the model now (a bad index or model fails here,
    before any port is bound) and runs one warm-up query per target."""
    if searcher is None:
        searcher = Searcher.open(config.index_dir, model=config.model, device=config.device)
    index_dir = Path(config.index_dir)
    items = ItemStore(index_dir)
    # Load the model and every index now, and run each tower once, so that the first request
    # is not the one that pays for it.
    for target in searcher.targets:
        searcher.search_text("warm up", k=1, target=target)
    searcher.search_image(Image.new("RGB", (8, 8)), k=1, target=searcher.targets[0])
    state = _State(config, searcher, items, QueryBatcher(searcher, config.max_batch), time.time())
    max_k = min(config.max_k, searcher.count)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.batcher.close()

    app = FastAPI(
        title="clipforge search",
        summary=f"Text and image search over {index_dir.name} ({searcher.count} items)",
        version="1",
        lifespan=lifespan,
    )
    app.state.clipforge = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"detail": e.detail}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(e)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(e.detail)}, status_code=e.status_code)

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
        t0 = time.perf_counter()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            body = await _read_body(request, config.max_upload_bytes)
        except ClientDisconnect:
            raise ApiError(400, "the client disconnected before sending the whole body") from None
        upload: bytes | None = None
        filename: str | None = None
        if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            form = await Request(request.scope, _replay(body)).form(
                max_files=1, max_fields=8, max_part_size=4 * config.max_text_chars + 1024
            )
            fields: dict[str, Any] = {}
            try:
                for name, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        if name != "image":
                            raise ApiError(422, f"unexpected file field {name!r} (send 'image')")
                        upload, filename = await value.read(), value.filename
                    elif name == "image":
                        raise ApiError(422, "image must be a file upload (curl: -F image=@FILE)")
                    elif name == "k" and value.strip().lstrip("-").isdecimal():
                        fields[name] = int(value)  # form fields are text
                    elif name in SearchRequest.model_fields:
                        fields[name] = value
                    else:
                        raise ApiError(422, f"unexpected form field {name!r}")
            finally:
                await form.close()
        elif content_type == "application/json" or (not content_type and body):
            try:
                fields = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the body is not valid JSON ({e})") from None
            if not isinstance(fields, dict):
                raise ApiError(422, 'the JSON body must be an object like {"text": "..."}')
        else:
            raise ApiError(
                415,
                f"unsupported content type {content_type or '(none)'!r}: send application/json "
                "or multipart/form-data",
            )
        try:
            req = SearchRequest.model_validate(fields)
        except ValidationError as e:
            raise ApiError(422, _validation_message(e)) from None
        if req.k > max_k:
            raise ApiError(
                422,
                f"k: must be between 1 and {max_k} (the index holds {searcher.count} items, "
                f"the service returns at most {config.max_k})",
            )
        given = [
            n
            for n, v in (("text", req.text), ("item", req.item), ("image", upload))
            if v is not None
        ]
        if len(given) != 1:
            raise ApiError(
                422,
                "give exactly one query: text, item, or an image upload"
                + (f" (got {', '.join(given)})" if given else ""),
            )
        if req.target not in searcher.targets:
            raise ApiError(
                422, f"target: this index has no {req.target} index ({searcher.targets})"
            )

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
            image = await asyncio.to_thread(decode_image, data, config.max_image_pixels)
            query = QueryOut(type="item", item=i)
            hits = await _search(state, "image", image, req.k, req.target)
        else:
            assert upload is not None
            image = await asyncio.to_thread(decode_image, upload, config.max_image_pixels)
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
            "limits": {
                "max_k": max_k,
                "max_text_chars": config.max_text_chars,
                "max_upload_bytes": config.max_upload_bytes,
                "max_image_pixels": config.max_image_pixels,
            },
            "batching": state.batcher.stats.to_dict(),
            "uptime_s": round(time.time() - state.started, 1),
        }

    static = web_dir()

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=static), name="static")
    return app


async def _search(
    state: _State, kind: Literal["text", "image"], payload: str | Image.Image, k: int, target: str
) -> list[Hit]:
    try:
        return await state.batcher.search(kind, payload, k, target)
    except SearchError as e:
        raise ApiError(422, str(e)) from None


# ----------------------------------------------------------------------------- running


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    app = create_app(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {config.index_dir} on http://{shown}:{port}/ (API docs: /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn on a background thread; yields its base URL (``port=0``: a free
    port). Stops the server on exit. For tests, the load test and the demo."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
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
    "decode_image",
    "running_server",
    "serve",
    "web_dir",
]
