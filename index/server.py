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
queue and are encoded together in the next forward pass (:class:`.batcher.QueryBatcher`), so
under load the service does one batched encode per model turn instead of one per request.

This module is the app and its routes, each a thin call into its own module: the settings
(:mod:`.server_config`), the API models (:mod:`.api_models`), request parsing and answering
(:mod:`.search_request`), the batcher (:mod:`.batcher`), the items (:mod:`.item_store`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api_models import (
    ERROR_RESPONSES,
    SEARCH_BODY_SCHEMA,
    ItemOut,
    SearchRequest,
    SearchResponse,
)
from .batcher import BatchStats, QueryBatcher
from .http_guard import (
    ApiError,
    ApiKeyMiddleware,
    CatchAllMiddleware,
    RateLimitMiddleware,
    SecurityHeadersMiddleware,
    error_body,
    is_loopback,
)
from .image_guard import decode_query_image
from .item_store import IMAGE_MEDIA_TYPES, ItemStore
from .search_request import ServiceState, handle_search, validation_message
from .searcher import Searcher
from .server_config import QUERY_ENCODERS, ServerConfig

log = logging.getLogger(__name__)


def web_dir() -> Path:
    """The web page's static files inside the installed package."""
    return Path(str(resources.files("clipforge.index") / "web"))


def open_service(config: ServerConfig, searcher: Searcher | None = None) -> ServiceState:
    """Open the index and load the model (a bad index or model fails here, before any port is
    bound), then run each tower once, so that the first request is not the one that pays."""
    if searcher is None:
        searcher = Searcher.open(
            config.index_dir, model=config.model, device=config.device, mmap=config.mmap
        )
    if config.query_encoder != "torch":
        assert config.onnx_export is not None  # checked by ServerConfig
        searcher.use_onnx_text_encoder(config.onnx_export, int8=config.query_encoder == "onnx-int8")
    items = ItemStore(Path(config.index_dir))
    if searcher.has_query_model:
        for target in searcher.targets:
            searcher.search_text("warm up", k=1, target=target)
        searcher.search_image(Image.new("RGB", (8, 8)), k=1, target=searcher.targets[0])
    else:  # text and image queries answer 422 naming the missing model; vectors work
        log.warning(
            "%s has no query model (no model/ copy, model_source %r not here): serving vector "
            "queries only (pass --model for text and image queries)",
            config.index_dir,
            searcher.manifest.get("model_source"),
        )
        searcher.search_embeddings(np.ones(searcher.dim, np.float32), k=1)
    max_k = min(config.max_k, searcher.count)
    batcher = QueryBatcher(searcher, config.max_batch)
    return ServiceState(config, searcher, items, batcher, time.time(), max_k)


def create_app(config: ServerConfig, searcher: Searcher | None = None) -> FastAPI:
    """The ASGI app. Opens the index and loads the model now (:func:`open_service`)."""
    state = open_service(config, searcher)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.batcher.close()

    app = FastAPI(
        title="clipforge search",
        summary=(
            f"Text and image search over {Path(config.index_dir).name} "
            f"({state.searcher.count} items)"
        ),
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
    _add_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: ServiceState) -> None:
    """The routes: each one line over a module-level function."""

    @app.post(
        "/search",
        response_model=SearchResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": SEARCH_BODY_SCHEMA},
        summary="Search by text, uploaded image, or indexed item",
    )
    async def search(request: Request) -> SearchResponse:
        return await handle_search(state, request)

    @app.get("/items/{ref:path}/image", responses=ERROR_RESPONSES, summary="An item's stored image")
    def item_image(ref: str) -> Response:
        return item_image_response(state.items, ref)

    @app.get(
        "/items/{ref:path}", response_model=ItemOut, responses=ERROR_RESPONSES, summary="An item"
    )
    def item(ref: str) -> ItemOut:
        return item_out(state.items, ref)

    @app.get("/health", summary="Service status and collection description")
    def health() -> dict[str, Any]:
        return health_report(state)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return _docs_page(app)

    static = web_dir()

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=static), name="static")


def item_image_response(items: ItemStore, ref: str) -> Response:
    """GET /items/{ref}/image: the stored bytes with their content type."""
    data, media_type = items.image(items.resolve(ref))
    # Items of an index never change; a rebuilt index may renumber them, hence no "immutable".
    return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})


def item_out(items: ItemStore, ref: str) -> ItemOut:
    """GET /items/{ref}: the item's metadata."""
    i = items.resolve(ref)
    return ItemOut(
        id=i,
        key=str(items.keys[i]),
        caption=str(items.captions[i]),
        source=str(items.sources[i]),
        image_url=f"/items/{i}/image",
        has_image=items.has_image(i),
    )


def health_report(state: ServiceState) -> dict[str, Any]:
    """GET /health: status, the collection, the model, the limits, the batching figures."""
    searcher, config = state.searcher, state.config
    entries = searcher.entries
    return {
        "status": "ok",
        "index": Path(config.index_dir).name,
        "count": searcher.count,
        "dim": searcher.dim,
        "targets": searcher.targets,
        "kinds": {t: entries[t].kind for t in searcher.targets},
        "model_hash": searcher.model_hash,
        "query_encoder": searcher.query_encoder,
        "limits": {
            "max_k": state.max_k,
            "max_text_chars": config.max_text_chars,
            "max_upload_bytes": config.max_upload_bytes,
            "max_image_pixels": config.max_image_pixels,
        },
        "batching": state.batcher.stats.to_dict(),
        "auth": config.api_key is not None,
        "max_requests_per_minute": config.max_requests_per_minute,
        "uptime_s": round(time.time() - state.started, 1),
    }


def _json_error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    # error_body escapes non-ASCII: a detail quoting a client's lone surrogate still encodes
    return Response(error_body(detail), status, headers, media_type="application/json")


async def _api_error(request: Request, e: ApiError) -> Response:
    return _json_error(e.status, e.detail, e.headers)


async def _invalid(request: Request, e: RequestValidationError) -> Response:
    return _json_error(422, validation_message(e))


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
        # uvicorn annotates int but hands it to loop.call_later, which takes fractions of seconds
        timeout_keep_alive=config.keep_alive_s,  # type: ignore[arg-type]
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
    "IMAGE_MEDIA_TYPES",
    "QUERY_ENCODERS",
    "ApiError",
    "BatchStats",
    "ItemStore",
    "QueryBatcher",
    "SearchRequest",
    "SearchResponse",
    "ServerConfig",
    "create_app",
    "decode_query_image",
    "open_service",
    "running_server",
    "serve",
    "uvicorn_config",
    "web_dir",
]
