"""The search service under hostile input, through the real app (TestClient) or the real uvicorn
server (``running_server``): malformed values get a 4xx JSON answer, a bug a JSON 500, images
small on disk but huge in work are refused or reduced before the model sees them, slow
connections time out, every response carries the security headers, and the API key, CORS and
rate-limit options do what they say."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipforge.index.cli import main as index_main
from clipforge.index.http_guard import SlidingWindowLimiter, is_loopback, load_api_key
from clipforge.index.loadtest import LoadTestConfig, LoadTestError, run_loadtest
from clipforge.index.searcher import Searcher
from clipforge.index.server import ServerConfig, create_app, running_server, serve

KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def searcher(demo_index: Path) -> Searcher:
    return Searcher.open(demo_index)


class _Recording:
    """The real Searcher, recording the size of every image the model is given, raising on the
    text "explode" (a bug below the route), and with an optional bonus on the top score (what
    float16 vectors can make of an item scored against itself)."""

    def __init__(self, inner: Searcher, top_bonus: float = 0.0) -> None:
        self._inner = inner
        self.image_sizes: list[tuple[int, int]] = []
        self.top_bonus = top_bonus

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def embed_text(self, texts: list[str]) -> Any:
        if "explode" in texts:
            raise RuntimeError("a bug below the route")
        return self._inner.embed_text(texts)

    def embed_images(self, images: list[Any]) -> Any:
        self.image_sizes.extend(im.size for im in images)
        return self._inner.embed_images(images)

    def search_embeddings(self, q: Any, k: int = 10, target: str = "image") -> Any:
        out = self._inner.search_embeddings(q, k, target)
        for hits in out:
            if hits and self.top_bonus:
                hits[0] = dataclasses.replace(hits[0], score=hits[0].score + self.top_bonus)
        return out


@pytest.fixture(scope="module")
def recording(searcher: Searcher) -> _Recording:
    return _Recording(searcher)


@pytest.fixture(scope="module")
def client(demo_index: Path, recording: _Recording) -> Iterator[TestClient]:
    config = ServerConfig(str(demo_index), max_k=50, image_work_side=64)
    with TestClient(create_app(config, searcher=recording)) as c:  # type: ignore[arg-type]
        yield c


def _json_post(client: TestClient, body: bytes) -> httpx.Response:
    return client.post("/search", content=body, headers={"content-type": "application/json"})


def _assert_json_error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert isinstance(detail, str) and words.lower() in detail.lower(), detail


# ----------------------------------------------------------------------------- malformed values

DIGITS = "9" * 5000  # past Python's int-string conversion limit (4,300 digits)


def test_lone_surrogates_are_refused(client: TestClient) -> None:
    # JSON's \ud800 escape is valid JSON but no UTF-8 text: the tokenizer and the response's
    # encoder would raise on it
    r = _json_post(client, b'{"text": "a \\ud800"}')
    _assert_json_error(r, 422, "lone surrogate \\ud800")
    assert r.json()["detail"].startswith("text:")
    _assert_json_error(_json_post(client, b'{"item": "\\udfff"}'), 422, "lone surrogate")


@pytest.mark.parametrize(
    ("send", "status", "words"),
    [
        (lambda c: _json_post(c, b'{"text": "a", "k": ' + DIGITS.encode() + b"}"), 400, "4,300"),
        (lambda c: _json_post(c, b'{"item": ' + DIGITS.encode() + b"}"), 400, "4,300"),
        (lambda c: c.post("/search", json={"item": DIGITS}), 404, "5000 digits"),
        (lambda c: c.post("/search", json={"item": f"id:{DIGITS}"}), 404, "5000 digits"),
        (lambda c: c.get(f"/items/{DIGITS}/image"), 404, "5000 digits"),
        (lambda c: c.get(f"/items/id:{DIGITS}"), 404, "5000 digits"),
        (lambda c: c.post("/search", data={"text": "a", "k": DIGITS}), 422, "k: "),
        (lambda c: c.post("/search", json={"item": 10**4000}), 404, "digits"),
    ],
)
def test_numbers_past_the_int_string_limit(client: TestClient, send: Any, status: int,
                                           words: str) -> None:  # fmt: skip
    _assert_json_error(send(client), status, words)


def test_form_k_that_is_not_an_integer(client: TestClient) -> None:
    for k in ("--5", "+-5", "5-", "٣", " 1 2"):
        r = client.post("/search", data={"text": "a red heart", "k": k})
        _assert_json_error(r, 422, "k: input should be a valid integer")
    r = client.post("/search", data={"text": "a red heart", "k": " 3 "})
    assert r.status_code == 200 and len(r.json()["hits"]) == 3


def test_deeply_nested_json(client: TestClient) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    _assert_json_error(_json_post(client, deep), 400, "nested too deeply")
    _assert_json_error(_json_post(client, b'{"text": ' + deep + b"}"), 400, "nested too deeply")
    # nesting that json can parse is refused by validation, as any wrong type
    _assert_json_error(_json_post(client, b'{"text": ' + b"[" * 500 + b"]" * 500 + b"}"), 422,
                       "text: input should be a valid string")  # fmt: skip


def test_item_has_strict_types(client: TestClient) -> None:
    for value in (True, 1.0, False, [1], {"id": 1}):
        r = client.post("/search", json={"item": value})
        _assert_json_error(r, 422, "item: must be an integer row id or a string key")
    assert client.post("/search", json={"item": 1, "k": 2}).json()["query"]["item"] == 1


def test_an_exception_escaping_a_route_is_a_json_500(
    demo_index: Path, recording: _Recording, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(ServerConfig(str(demo_index)), searcher=recording)  # type: ignore[arg-type]
    with running_server(app) as url, caplog.at_level(logging.ERROR):
        r = httpx.post(f"{url}/search", json={"text": "explode"}, timeout=60)
        _assert_json_error(r, 500, "internal error (RuntimeError)")
        assert r.headers["x-content-type-options"] == "nosniff"  # the guards still apply
        # the server keeps serving
        assert httpx.post(f"{url}/search", json={"text": "a dog"}, timeout=60).status_code == 200
    logged = [rec for rec in caplog.records if "unhandled error" in rec.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log


# ----------------------------------------------------------------------------- images


def _png(mode: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` (1-bit grey) but holds a few bytes of data:
    the header is all a size check may read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + chunk(b"IEND", b""))  # fmt: skip


def test_images_small_on_disk_but_huge_in_work(client: TestClient, recording: _Recording) -> None:
    before = len(recording.image_sizes)
    thin = _png("1", (200_000, 1))
    assert len(thin) < 200  # 103 bytes: passes any byte or pixel-count limit
    for data, status, words in [
        (thin, 413, "200000x1: a side over 16384"),
        (_png("1", (1_000_000, 1)), 413, "1000000x1"),
        (_png("1", (10_000, 10)), 422, "aspect ratio over 20:1"),
        (_png("1", (10, 300)), 422, "aspect ratio over 20:1"),
        # the README's example: PIL's own bomb check fires inside open(); still a 413
        (_png_header_only(30_000, 30_000), 413, "pixels"),
        (_png_header_only(8_000, 6_000), 413, "48000000 pixels; the limit is 40000000"),
    ]:
        r = client.post("/search", files={"image": ("q.png", data)})
        _assert_json_error(r, status, words)
    assert len(recording.image_sizes) == before  # none of them reached the model


def test_accepted_images_reach_the_model_reduced(client: TestClient,
                                                 recording: _Recording) -> None:  # fmt: skip
    # image_work_side is 64 here: a shorter side over 128 is reduced into 64..127
    jpeg, png = io.BytesIO(), io.BytesIO()
    # JPEG: decoded at 1/8 scale (200x150), then reduce(2); PNG: reduce(6)
    Image.new("RGB", (1600, 1200), (200, 30, 30)).save(jpeg, format="JPEG")
    Image.new("RGB", (700, 420), (30, 200, 30)).save(png, format="PNG")
    small = _png("RGB", (100, 60))  # under 2 x 64: as decoded
    sizes = []
    for name, data in (("a.jpg", jpeg.getvalue()), ("b.png", png.getvalue()), ("c.png", small)):
        n = len(recording.image_sizes)
        r = client.post("/search", files={"image": (name, data)}, data={"k": "2"})
        assert r.status_code == 200, r.text
        sizes.append(recording.image_sizes[n])
    assert sizes == [(100, 75), (117, 70), (100, 60)]
    # and an item's stored image ("more like this") goes through the same bounded decode
    n = len(recording.image_sizes)
    assert client.post("/search", json={"item": 5, "k": 1}).status_code == 200
    assert min(recording.image_sizes[n]) < 128


def test_more_like_an_item_scores_at_most_one(demo_index: Path, searcher: Searcher) -> None:
    # float16 vectors are unit length only to ~1e-4: the searcher can score an item against
    # itself as 1.000036; the service answers a cosine similarity, within [-1, 1]
    bonus = _Recording(searcher, top_bonus=3.6e-5)
    with TestClient(create_app(ServerConfig(str(demo_index)), searcher=bonus)) as c:  # type: ignore[arg-type]
        for i in (0, 7, 42):
            hits = c.post("/search", json={"item": i, "k": 3}).json()["hits"]
            raw = bonus.search_embeddings(searcher.embed_images(
                [Image.open(io.BytesIO(c.get(f"/items/{i}/image").content))]), 3)[0]  # fmt: skip
            assert raw[0].score > 1.0
            assert hits[0]["score"] == 1.0 and all(-1 <= h["score"] <= 1 for h in hits)
            assert [h["score"] for h in hits[1:]] == [round(h.score, 6) for h in raw[1:]]


# ----------------------------------------------------------------------------- slow clients


@pytest.fixture(scope="module")
def impatient_url(demo_index: Path, searcher: Searcher) -> Iterator[str]:
    config = ServerConfig(str(demo_index), header_timeout_s=0.5, body_timeout_s=0.5,
                          keep_alive_s=0.5)  # fmt: skip
    with running_server(create_app(config, searcher=searcher)) as url:
        yield url


def _exchange(url: str, data: bytes, wait_s: float = 15.0) -> bytes:
    """Send ``data`` on a raw connection, then read until the server closes it. The socket
    timeout is only the test's safety net: the server's own timeouts are 0.5 s."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        if data:
            sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):  # b"": the server closed the connection
            received += chunk
        return received


def _status_and_body(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        chunks = []
        while body:
            size, _, rest = body.partition(b"\r\n")
            n = int(size, 16)
            chunks.append(rest[:n])
            body = rest[n + 2 :] if n else b""
        body = b"".join(chunks)
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_partial_headers_time_out(impatient_url: str) -> None:
    for sent in (b"", b"PO", b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Ty"):
        status, body = _status_and_body(_exchange(impatient_url, sent))
        assert status == 408 and "headers did not arrive" in body["detail"], sent
    # a kept-alive connection: the next request's headers get the same deadline
    host, port = impatient_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(b"GET /items/3 HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b"}"):  # the whole JSON answer, connection still open
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    status, body = _status_and_body(rest)
    assert status == 408 and "headers did not arrive" in body["detail"]


def test_unparseable_requests_get_a_json_400(impatient_url: str) -> None:
    # headers still incomplete past h11's 16 KiB buffer: refused, not buffered further
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000
    for sent in (b"NOT HTTP AT ALL\r\n\r\n", huge):
        raw = _exchange(impatient_url, sent)
        status, body = _status_and_body(raw)
        assert status == 400 and body["detail"].startswith("invalid HTTP request"), raw[:300]
        assert b"application/json" in raw.split(b"\r\n\r\n")[0]


def test_slow_body_times_out(impatient_url: str) -> None:
    head = (b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")  # fmt: skip
    status, body = _status_and_body(_exchange(impatient_url, head + b'{"text": "a'))
    assert status == 408 and "body did not arrive within 0.5 s" in body["detail"]


def test_idle_keep_alive_connection_is_closed(impatient_url: str) -> None:
    raw = _exchange(impatient_url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in raw  # then closed, idle


# ----------------------------------------------------------------------------- headers and CORS


def test_security_headers_on_every_response(client: TestClient) -> None:
    responses = [
        client.get("/"),
        client.get("/static/app.js"),
        client.get("/health"),
        client.get("/items/3/image"),
        client.get("/items/nope"),
        client.post("/search", json={"text": ""}),
        client.get("/no/such/page"),
    ]
    for r in responses:
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp, r.url
        assert "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
        assert "access-control-allow-origin" not in r.headers  # CORS is off by default
    # the page loads nothing inline: its script and stylesheet are files of this origin
    page = responses[0].text
    assert '<script src="/static/app.js"' in page and "<script>" not in page
    assert "<style" not in page and " style=" not in page and "onclick" not in page
    docs = client.get("/docs")
    assert docs.status_code == 200 and "sha256-" in docs.headers["content-security-policy"]
    r = client.get("/", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_only_for_the_named_origins(demo_index: Path, searcher: Searcher) -> None:
    allowed = "https://search.example"
    config = ServerConfig(str(demo_index), cors_origins=(allowed, "http://localhost:3000"))
    with TestClient(create_app(config, searcher=searcher)) as c:
        r = c.post("/search", json={"text": "cat face", "k": 1}, headers={"Origin": allowed})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed
        assert r.headers["x-content-type-options"] == "nosniff"
        preflight = c.options("/search", headers={
            "Origin": allowed, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == allowed
        other = c.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with pytest.raises(ValueError, match="'\\*' is refused"):
        ServerConfig(str(demo_index), cors_origins=("*",))


# ----------------------------------------------------------------------------- API key


DATA_ROUTES = [
    ("POST", "/search", {"text": "pizza"}),
    ("GET", "/items/3", None),
    ("GET", "/items/3/image", None),
]
REFUSED_AUTH = [
    ({}, "needs an API key"),
    ({"Authorization": "Bearer wrong"}, "not valid"),
    ({"Authorization": KEY}, "needs an API key"),  # no scheme
    ({"Authorization": f"Basic {KEY}"}, "needs an API key"),
]


def test_api_key_guards_every_data_route(demo_index: Path, searcher: Searcher) -> None:
    app = create_app(ServerConfig(str(demo_index), api_key=KEY), searcher=searcher)
    good = {"Authorization": f"Bearer {KEY}"}
    with TestClient(app) as c:
        for method, path, body in DATA_ROUTES:
            for headers, words in REFUSED_AUTH:
                r = c.request(method, path, json=body, headers=headers)
                _assert_json_error(r, 401, words)
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert r.headers["x-content-type-options"] == "nosniff"
            assert c.request(method, path, json=body, headers=good).status_code == 200
        # public: no collection data there
        for path in ("/health", "/", "/static/app.js", "/static/style.css", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        assert c.get("/health").json()["auth"] is True


def test_api_key_sources(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text(f"  {KEY}\n")
    assert load_api_key(f, environ={}) == KEY
    assert load_api_key(None, environ={"CLIPFORGE_API_KEY": KEY}) == KEY
    assert load_api_key(f, environ={"CLIPFORGE_API_KEY": "other"}) == KEY  # the file wins
    assert load_api_key(None, environ={}) is None
    for content, words in ((b"\n", "is empty"), (b"a b", "spaces"), (b"\xff\xfe", "not ASCII")):
        f.write_bytes(content)
        with pytest.raises(ValueError, match=words):
            load_api_key(f, environ={})
    with pytest.raises(ValueError, match="cannot read the API key file"):
        load_api_key(tmp_path / "missing", environ={})


def test_serve_option_errors_and_the_open_host_warning(
    demo_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--index", str(demo_index), "--api-key-file", str(tmp_path / "missing")]
    assert index_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipforge-index: error: cannot read the API key file")
    assert index_main(["serve", "--index", str(demo_index), "--cors-origin", "*"]) == 2
    assert "'*' is refused" in capsys.readouterr().err
    assert all(map(is_loopback, ("127.0.0.1", "127.5.0.1", "::1", "[::1]", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "192.168.1.4", "example.org")))


def test_open_host_without_a_key_warns(
    demo_index: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    ran: list[Any] = []
    # stop at the point of binding: this test must not listen on a non-loopback address
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: ran.append(self.config))
    serve(ServerConfig(str(demo_index)), host="0.0.0.0", port=8000)
    err = capsys.readouterr().err
    assert "WARNING: serving on 0.0.0.0" in err and "without an API key" in err
    assert ran[0].host == "0.0.0.0" and ran[0].timeout_keep_alive == 15.0
    for host, key in (("127.0.0.1", None), ("0.0.0.0", KEY)):
        serve(ServerConfig(str(demo_index), api_key=key), host=host, port=8000)
        assert "WARNING" not in capsys.readouterr().err


def test_loadtest_sends_the_key(demo_index: Path, searcher: Searcher, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    app = create_app(ServerConfig(str(demo_index), api_key=KEY), searcher=searcher)
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    with running_server(app) as url:
        result = run_loadtest(LoadTestConfig(url=url, requests=12, concurrency=3, api_key=KEY))
        assert result.errors == 0 and result.requests == 12, result.first_errors
        with pytest.raises(LoadTestError, match="requires an API key"):
            run_loadtest(LoadTestConfig(url=url, requests=2))
        argv = ["loadtest", "--url", url, "--requests", "8", "--concurrency", "2",
                "--api-key-file", str(key_file)]  # fmt: skip
        assert index_main(argv) == 0
        assert "errors       0" in capsys.readouterr().out


# ----------------------------------------------------------------------------- rate limit


def test_rate_limit_answers_429_with_retry_after(demo_index: Path, searcher: Searcher) -> None:
    app = create_app(ServerConfig(str(demo_index), max_requests_per_minute=3), searcher=searcher)
    with TestClient(app) as c:
        assert [c.get(f"/items/{i}").status_code for i in range(3)] == [200, 200, 200]
        r = c.post("/search", json={"text": "pizza"})
        _assert_json_error(r, 429, "the limit is 3 per minute")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["x-content-type-options"] == "nosniff"
        # the status line and the page are not counted
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


def test_sliding_window_limiter() -> None:
    now = [1000.0]
    limiter = SlidingWindowLimiter(2, window_s=60.0, clock=lambda: now[0])
    assert limiter.acquire("a") is None and limiter.acquire("a") is None
    assert limiter.acquire("a") == pytest.approx(60.0)
    assert limiter.acquire("b") is None  # per client
    now[0] += 30
    assert limiter.acquire("a") == pytest.approx(30.0)  # refusals are not counted
    now[0] += 30.001
    assert limiter.acquire("a") is None  # the first two slid out of the window
    assert limiter.acquire("a") is None and limiter.acquire("a") is not None


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["serve", "loadtest"])
def test_every_option_shows_its_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        index_main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    # one entry per option: "  --name ARG  help text (default: X)", help lines wrapped
    entries = re.split(r"\n  (?=-)", text.split("options:\n", 1)[1])
    entries = [" ".join(e.split()) for e in entries if not e.lstrip().startswith("-h,")]
    assert len(entries) >= (12 if command == "serve" else 9)
    missing = [e for e in entries if "(default:" not in e]
    assert not missing, missing


def test_timeouts_do_not_cut_normal_requests(impatient_url: str) -> None:
    # a client that sends promptly is served whatever the (short) deadlines
    with httpx.Client(base_url=impatient_url, timeout=60) as c:
        for _ in range(3):
            assert c.post("/search", json={"text": "rocket", "k": 2}).status_code == 200
            time.sleep(0.1)  # a kept-alive connection used again within keep_alive_s
