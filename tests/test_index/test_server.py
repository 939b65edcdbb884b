"""The search service: API answers against the library, stored images by random access, every bad
request a 4xx with a message, batching of concurrent queries, the load test, the CLI."""

from __future__ import annotations

import asyncio
import io
import tarfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipforge.index.cli import main as index_main
from clipforge.index.loadtest import LoadTestConfig, LoadTestError, run_loadtest
from clipforge.index.searcher import Searcher
from clipforge.index.server import (
    IMAGE_MEDIA_TYPES,
    QueryBatcher,
    ServerConfig,
    create_app,
    running_server,
)


@pytest.fixture(scope="module")
def searcher(demo_index: Path) -> Searcher:
    return Searcher.open(demo_index)


@pytest.fixture(scope="module")
def app(demo_index: Path, searcher: Searcher) -> Any:
    # Small limits, so that the limit tests need no large bodies.
    config = ServerConfig(str(demo_index), max_k=50, max_text_chars=200, max_upload_bytes=300_000)
    return create_app(config, searcher=searcher)


@pytest.fixture(scope="module")
def client(app: Any) -> Any:
    with TestClient(app) as c:
        yield c


def _member_bytes(shard: str, member: str) -> bytes:
    with tarfile.open(shard) as tar:
        f = tar.extractfile(member)
        assert f is not None
        return f.read()


def test_text_search_matches_the_library(client: TestClient, searcher: Searcher) -> None:
    r = client.post("/search", json={"text": "a red heart", "k": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"type": "text", "text": "a red heart"}
    assert body["target"] == "image" and body["k"] == 8
    expected = searcher.search_text("a red heart", k=8)
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected]
    np.testing.assert_allclose([h["score"] for h in body["hits"]], [h.score for h in expected],
                               atol=1e-5)  # fmt: skip
    assert [h["caption"] for h in body["hits"]] == [h.caption for h in expected]
    assert all(h["image_url"] == f"/items/{h['id']}/image" for h in body["hits"])

    r = client.post("/search", json={"text": "pizza", "k": 3, "target": "text"})
    assert r.status_code == 200
    expected = searcher.search_text("pizza", k=3, target="text")
    assert [h["id"] for h in r.json()["hits"]] == [h.id for h in expected]


def test_captions_find_their_images(client: TestClient, searcher: Searcher) -> None:
    # The served results mean something: the trained demo model (text->image R@10 ~0.96 over all
    # captions) finds most captions' own images in the top 10 through the API.
    ids = range(0, searcher.count, searcher.count // 40)
    captions = {i: client.get(f"/items/{i}").json()["caption"] for i in ids}
    found = [
        i in [h["id"] for h in client.post("/search", json={"text": c, "k": 10}).json()["hits"]]
        for i, c in captions.items()
    ]
    assert sum(found) >= 0.8 * len(found), f"{sum(found)} of {len(found)}"


def test_item_images_are_the_shard_members(client: TestClient, searcher: Searcher) -> None:
    for hit in searcher.search_text("cat face", k=3):
        r = client.get(f"/items/{hit.id}/image")
        assert r.status_code == 200
        ext = hit.member.rsplit(".", 1)[-1]
        assert r.headers["content-type"] == IMAGE_MEDIA_TYPES[ext]
        # random access by offset returns exactly the tar member, and it decodes
        assert r.content == _member_bytes(hit.shard, hit.member)
        assert Image.open(io.BytesIO(r.content)).size[0] > 0
        # the same item by key, by explicit key:/id: forms; its metadata
        assert client.get(f"/items/{hit.key}/image").content == r.content
        assert client.get(f"/items/key:{hit.key}/image").content == r.content
        assert client.get(f"/items/id:{hit.id}/image").content == r.content
        meta = client.get(f"/items/{hit.key}").json()
        assert meta == {"id": hit.id, "key": hit.key, "caption": hit.caption,
                        "source": hit.source, "image_url": f"/items/{hit.id}/image",
                        "has_image": True}  # fmt: skip


def test_image_queries_find_the_item_itself(client: TestClient, searcher: Searcher) -> None:
    hit = searcher.search_text("rocket", k=1)[0]
    data = client.get(f"/items/{hit.id}/image").content
    # an uploaded image: multipart with k and target as form fields
    r = client.post("/search", files={"image": ("q.webp", data)}, data={"k": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"type": "image", "filename": "q.webp"}
    assert body["hits"][0]["id"] == hit.id and body["hits"][0]["score"] > 0.999
    # "more like this": the stored image of an indexed item, by id and by key
    for ref in (hit.id, hit.key):
        r = client.post("/search", json={"item": ref, "k": 4})
        assert r.status_code == 200, r.text
        assert r.json()["query"] == {"type": "item", "item": hit.id}
        assert [h["id"] for h in r.json()["hits"]] == [h["id"] for h in body["hits"]]
    # image -> caption
    r = client.post("/search", json={"item": hit.id, "k": 2, "target": "text"})
    expected = searcher.search_image(Image.open(io.BytesIO(data)), k=2, target="text")
    assert [h["id"] for h in r.json()["hits"]] == [h.id for h in expected]


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


BAD_REQUESTS = [
    # (request kwargs, status, words the message must contain)
    ({"json": {"text": ""}}, 422, "empty"),
    ({"json": {"text": "   "}}, 422, "empty"),
    ({"json": {"text": "x" * 201}}, 422, "limit is 200"),
    ({"json": {"text": "a", "k": 0}}, 422, "k"),
    ({"json": {"text": "a", "k": 51}}, 422, "between 1 and 50"),
    ({"json": {"text": "a", "k": -3}}, 422, "k"),
    ({"json": {"text": "a", "k": "ten"}}, 422, "k"),
    ({"json": {"text": "a", "k": True}}, 422, "k"),
    ({"json": {"text": "a", "k": 2.5}}, 422, "k"),
    ({"json": {"text": "a", "target": "audio"}}, 422, "target"),
    ({"json": {"text": 7}}, 422, "text"),
    ({"json": {"txt": "typo"}}, 422, "txt"),
    ({"json": {}}, 422, "exactly one"),
    ({"json": {"text": "a", "item": 3}}, 422, "exactly one"),
    ({"json": ["a red heart"]}, 422, "object"),
    ({"json": {"item": 10**9}}, 404, "no item with id"),
    ({"json": {"item": "no-such-key"}}, 404, "no item with key"),
    ({"json": {"item": "id:x1"}}, 422, "row id"),
    ({"content": b'{"text": "a"', "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ({"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ({"content": b"a red heart", "headers": {"content-type": "text/plain"}}, 415, "content type"),
    ({"files": {"image": ("x.png", b"not an image at all")}}, 400, "not an image"),
    ({"files": {"image": ("x.png", _png((32, 32))[:60])}}, 400, "image"),
    ({"files": {"image": ("x.png", b"")}}, 400, "empty"),
    ({"files": {"image": ("x.png", b"\x89PNG" + b"\0" * 400_000)}}, 413, "limit"),
    ({"files": {"photo": ("x.png", _png((8, 8)))}}, 422, "image"),
    ({"files": {"image": ("x.png", _png((8, 8)))}, "data": {"text": "a"}}, 422, "exactly one"),
    ({"files": {"image": ("x.png", _png((8, 8)))}, "data": {"k": "many"}}, 422, "k"),
    ({"files": {"image": ("x.png", _png((8, 8)))}, "data": {"extra": "1"}}, 422, "extra"),
]


@pytest.mark.parametrize(("kwargs", "status", "words"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_message(
    client: TestClient, kwargs: dict[str, Any], status: int, words: str
) -> None:
    r = client.post("/search", **kwargs)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and words.lower() in detail.lower(), detail


def test_pixel_limit_is_checked_before_decoding(demo_index: Path, searcher: Searcher) -> None:
    app = create_app(ServerConfig(str(demo_index), max_image_pixels=1000), searcher=searcher)
    with TestClient(app) as c:
        r = c.post("/search", files={"image": ("big.png", _png((40, 40)))})
        assert r.status_code == 413 and "pixels" in r.json()["detail"]
        assert c.post("/search", files={"image": ("ok.png", _png((30, 30)))}).status_code == 200


def test_bad_item_refs_and_paths(client: TestClient) -> None:
    for path in ("/items/999999/image", "/items/nope/image", "/items/nope"):
        r = client.get(path)
        assert r.status_code == 404 and "no item" in r.json()["detail"]
    assert client.get("/search").status_code == 405
    assert client.get("/no/such/page").json() == {"detail": "Not Found"}


def test_health_page_and_openapi(client: TestClient) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["count"] == 1911 and h["targets"] == ["image", "text"]
    assert h["limits"]["max_k"] == 50
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text and 'id="query"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert "text" in content["application/json"]["schema"]["properties"]
    assert {"/search", "/items/{ref}/image", "/items/{ref}", "/health"} <= set(spec["paths"])


class _GatedSearcher:
    """A Searcher whose first text encode waits for the test, so that queries queue up behind it
    deterministically; records every encode's batch."""

    def __init__(self, inner: Searcher) -> None:
        self.inner = inner
        self.batches: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def embed_text(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        if "boom" in texts:
            raise ValueError("boom is not a query")
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(60)
        return self.inner.embed_text(texts)

    def search_embeddings(self, q: np.ndarray, k: int, target: str) -> Any:
        return self.inner.search_embeddings(q, k, target)


def test_queued_queries_share_one_encode(searcher: Searcher) -> None:
    gated = _GatedSearcher(searcher)
    batcher = QueryBatcher(gated, max_batch=4)  # type: ignore[arg-type]
    texts = ["cat face", "pizza", "rocket", "boom", "flag of Japan", "a dog", "thumbs up"]

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(batcher.search("text", "a red heart", 5, "image"))
        while not gated.entered.is_set():  # the first query is being encoded, alone
            await asyncio.sleep(0.01)
        rest = [
            asyncio.ensure_future(batcher.search("text", t, 3 if i % 2 else 5, "image"))
            for i, t in enumerate(texts)
        ]
        await asyncio.sleep(0)  # every query is now queued behind the first
        gated.release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    try:
        results = asyncio.run(scenario())
    finally:
        batcher.close()
    # 1 alone, then the 7 queued ones in passes of at most 4; the pass holding "boom" fails and
    # is retried query by query, so only "boom" gets an error.
    assert gated.batches[0] == ["a red heart"]
    assert gated.batches[1] == ["cat face", "pizza", "rocket", "boom"]
    assert gated.batches[2:6] == [["cat face"], ["pizza"], ["rocket"], ["boom"]]
    assert gated.batches[6] == ["flag of Japan", "a dog", "thumbs up"]
    assert isinstance(results[4], ValueError)
    for i, (text, res) in enumerate(zip(["a red heart", *texts], results, strict=True)):
        if text == "boom":
            continue
        k = 3 if i > 0 and (i - 1) % 2 else 5
        assert [h.id for h in res] == [h.id for h in searcher.search_text(text, k=k)], text
    assert batcher.stats.largest_batch == 3  # successful passes only: the failed one is retried


def test_loadtest_against_a_running_server(app: Any) -> None:
    with running_server(app) as url:
        result = run_loadtest(LoadTestConfig(url=url, requests=48, concurrency=8, k=5))
    assert result.errors == 0 and result.not_run == 0, result.first_errors
    assert result.requests == 48 and len(result.latencies_ms) == 48
    assert result.batching["queries"] == 48
    text = result.summary()
    for word in ("errors       0", "requests/s", "p50", "p99"):
        assert word in text


def test_loadtest_counts_errors(app: Any) -> None:
    with running_server(app) as url:
        # k above the service's max_k (50): every request is refused with a 422
        result = run_loadtest(LoadTestConfig(url=url, requests=10, concurrency=3, k=60))
    assert result.errors == 10 and result.error_kinds == {"HTTP 422": 10}
    assert "between 1 and 50" in result.first_errors[0]


def test_cli_loadtest_starts_its_own_service(
    demo_index: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["loadtest", "--index", str(demo_index), "--requests", "24", "--concurrency", "4"]
    assert index_main(argv) == 0
    out = capsys.readouterr().out
    assert "starting the service" in out
    assert "24 requests at concurrency 4" in out and "errors       0" in out


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert index_main(["serve", "--index", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("clipforge-index: error: ")
    assert index_main(["loadtest", "--url", "http://127.0.0.1:9", "--requests", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipforge-index: error: ") and "no search service" in err


def test_vector_queries_match_the_library_and_bad_vectors_are_refused(
    client: TestClient, searcher: Searcher
) -> None:
    query = searcher.embed_text(["pizza"])[0] * 3.0  # (D,) any length: the service normalises
    r = client.post("/search", json={"vector": [float(x) for x in query], "k": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["type"] == "vector"
    expected = searcher.search_embeddings(query, k=6)[0]
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected])
    assert [h["id"] for h in body["hits"]] == [h.id for h in searcher.search_text("pizza", k=6)]

    d = searcher.dim
    for vector, message in (
        ([0.5] * (d - 1), f"{d - 1} values; this index's embeddings have {d}"),
        ([0.0] * d, "all zeros"),
    ):
        r = client.post("/search", json={"vector": vector})
        assert r.status_code == 422 and message in r.json()["detail"], r.text
    r = client.post(
        "/search",
        content=('{"vector": [NaN' + ", 1.0" * (d - 1) + "]}").encode(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and "finite" in r.json()["detail"], r.text
    r = client.post("/search", json={"vector": [1.0] * d, "text": "pizza"})
    assert r.status_code == 422 and "got text, vector" in r.json()["detail"], r.text


def test_loadtest_with_query_vectors(app: Any, searcher: Searcher, tmp_path: Path) -> None:
    vectors = tmp_path / "q.npy"
    np.save(vectors, np.asarray(searcher.embed_text(["pizza", "rocket", "a dog"])))
    with running_server(app) as url:
        result = run_loadtest(
            LoadTestConfig(url=url, requests=30, concurrency=4, k=5, vectors=str(vectors))
        )
    assert result.errors == 0 and result.requests == 30, result.first_errors
    assert result.batching["queries"] == 0  # no model pass: vectors go straight to the index
    np.save(vectors, np.zeros((2, 3, 4)))
    with running_server(app) as url, pytest.raises(LoadTestError, match="a \\(Q, D\\) float"):
        run_loadtest(LoadTestConfig(url=url, requests=3, vectors=str(vectors)))


def test_serve_mmap_opens_the_searcher_memory_mapped(
    demo_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipforge.index.server as server

    opened: list[bool] = []
    real_open = Searcher.open

    def recording_open(*args: Any, **kwargs: Any) -> Searcher:
        opened.append(kwargs.get("mmap", False))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(server.Searcher, "open", recording_open)
    served: list[ServerConfig] = []
    monkeypatch.setattr(server, "serve", lambda config, host, port: served.append(config))
    assert index_main(["serve", "--index", str(demo_index), "--mmap"]) == 0
    assert served[0].mmap is True
    for mmap in (True, False):
        state = server.open_service(ServerConfig(str(demo_index), mmap=mmap))
        state.batcher.close()
    assert opened == [True, False]


def test_an_index_without_a_query_model_serves_vector_queries(tmp_path: Path) -> None:
    from .synthetic import load_all, write_synthetic_embeddings

    emb = write_synthetic_embeddings(tmp_path / "emb", part_counts=(300,))
    out = tmp_path / "index"
    assert index_main(["build", "--embeddings", str(emb), "--out", str(out), "--kind", "flat"]) == 0
    searcher = Searcher.open(out)
    assert not searcher.has_query_model
    vectors = load_all(emb)  # (300, 32)
    with TestClient(create_app(ServerConfig(str(out)))) as c:
        r = c.post("/search", json={"vector": [float(x) for x in vectors[7]], "k": 3})
        assert r.status_code == 200, r.text
        assert r.json()["hits"][0]["id"] == 7  # its own vector comes back first
        expected = searcher.search_embeddings(vectors[7], k=3)[0]
        assert [h["id"] for h in r.json()["hits"]] == [h.id for h in expected]
        r = c.post("/search", json={"text": "pizza"})
        assert r.status_code == 422 and "model" in r.json()["detail"], r.text
