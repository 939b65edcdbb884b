"""Load test of the search service: N text searches at concurrency C, latency percentiles, req/s.

::

    clipforge-index loadtest --url http://127.0.0.1:8000        # a running service
    clipforge-index loadtest --index demo-index                  # starts its own on loopback

Every request is a ``POST /search`` with a text query drawn in turn from a fixed list (or, with
``--vectors``, a query embedding from a ``.npy``, in turn); a request
counts as an error unless it answers 200 with ``k`` hits. The run is bounded: a per-request timeout
and an overall deadline, after which the requests not yet sent are counted as not run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

DEFAULT_QUERIES: tuple[str, ...] = (
    "a red heart",
    "cat face",
    "pizza",
    "flag of Japan",
    "smiling face with sunglasses",
    "rocket",
    "soccer ball",
    "thumbs up",
    "a green apple",
    "the moon at night",
    "a dog",
    "birthday cake",
    "a musical note",
    "umbrella with rain drops",
    "crying face",
    "an airplane",
)
"""Text queries the load test cycles through (different texts: no response is cached)."""


class LoadTestError(ValueError):
    """The load test cannot run (no service at the URL, the service failed to start, ...)."""


@dataclass(frozen=True)
class LoadTestConfig:
    """Settings of one load test (``clipforge-index loadtest`` flags map onto these)."""

    url: str | None = None
    """Base URL of a running service; None: start one for ``index_dir`` on a loopback port."""
    index_dir: str | None = None
    """INDEX_DIR served by the service this load test starts (when ``url`` is None)."""
    requests: int = 500
    """Search requests to send in all."""
    concurrency: int = 16
    """Requests in flight at once (one client connection each)."""
    k: int = 10
    """Results per search."""
    target: str = "image"
    """``image`` (text -> image) or ``text`` (text -> caption)."""
    queries: tuple[str, ...] = DEFAULT_QUERIES
    """Texts sent in turn."""
    vectors: str | None = None
    """A ``.npy`` of query embeddings ``(Q, D)``: sent in turn as ``vector`` queries instead of
    the texts (no model pass: the search alone, e.g. of an index built from embeddings that has
    no model)."""
    mmap: bool = False
    """A service this load test starts memory-maps the index (``serve --mmap``)."""
    timeout_s: float = 60.0
    """Per-request timeout: a request slower than this is an error."""
    deadline_s: float = 600.0
    """Bound on the whole run: requests not sent by then are reported as not run."""
    startup_timeout_s: float = 180.0
    """How long a service started by the load test may take to answer ``/health``."""
    api_key: str | None = field(default=None, repr=False)
    """Sent as ``Authorization: Bearer <api_key>`` on every request (a service with a key)."""
    api_key_file: str | None = None
    """The file the key came from: a service the load test starts is given it too (else it
    inherits ``$CLIPFORGE_API_KEY`` from this process's environment)."""

    def __post_init__(self) -> None:
        if self.url is None and self.index_dir is None:
            raise LoadTestError("give the URL of a running service or an index to serve")
        if self.requests < 1 or self.concurrency < 1 or self.k < 1:
            raise LoadTestError("requests, concurrency and k must each be >= 1")
        if self.target not in ("image", "text"):
            raise LoadTestError(f"target must be image or text, got {self.target!r}")
        if not self.queries:
            raise LoadTestError("no queries to send")


@dataclass
class LoadTestResult:
    """What a load test measured (latencies in milliseconds)."""

    url: str
    """The service's base URL."""
    requests: int
    """Requests answered (successfully or not)."""
    errors: int
    """Requests that did not return 200 with k hits (including timeouts)."""
    not_run: int
    """Requests never sent because the deadline passed."""
    concurrency: int
    """Requests in flight at once."""
    elapsed_s: float
    """Wall time from the first request sent to the last answer."""
    latencies_ms: list[float] = field(repr=False)
    """Per-request latency of the successful requests, in completion order."""
    error_kinds: dict[str, int] = field(default_factory=dict)
    """Errors by kind (``HTTP 422``, ``timeout``, ``ConnectError``, ...)."""
    first_errors: list[str] = field(default_factory=list)
    """The first few error messages."""
    batching: dict[str, Any] = field(default_factory=dict)
    """Model forward passes during the run, from the service's /health (queries per pass)."""

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> str:
        lines = [
            f"load test: {self.requests} requests at concurrency {self.concurrency} -> {self.url}",
            f"  errors       {self.errors}"
            + (f" {dict(self.error_kinds)}" if self.errors else "")
            + (f"; {self.not_run} not run (deadline)" if self.not_run else ""),
            f"  throughput   {self.requests_per_s:.1f} requests/s ({self.elapsed_s:.1f} s)",
            f"  latency      p50 {self.percentile(50):.1f} ms   p90 {self.percentile(90):.1f} ms"
            f"   p99 {self.percentile(99):.1f} ms   max "
            f"{max(self.latencies_ms, default=float('nan')):.1f} ms",
        ]
        if self.batching:
            lines.append(
                f"  batching     {self.batching['queries']} queries in {self.batching['batches']} "
                f"model passes (mean {self.batching['mean_batch']:.1f}, largest "
                f"{self.batching['largest_batch']})"
            )
        lines.extend(f"  error: {e}" for e in self.first_errors)
        return "\n".join(lines)


async def _batching(client: httpx.AsyncClient) -> dict[str, Any] | None:
    try:
        r = await client.get("/health")
        return r.json().get("batching") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def _run(config: LoadTestConfig, url: str) -> LoadTestResult:
    # Idle connections are dropped after 2 s, well before any server's keep-alive timeout of
    # more (the service's default is 15 s): reusing one as the server closes it is a reset.
    limits = httpx.Limits(
        max_connections=config.concurrency, max_keepalive_connections=64, keepalive_expiry=2.0
    )
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    async with httpx.AsyncClient(
        base_url=url, timeout=config.timeout_s, limits=limits, headers=headers
    ) as client:
        try:
            health = await client.get("/health")
            health.raise_for_status()
        except httpx.HTTPError as e:
            raise LoadTestError(f"no search service answers at {url}/health ({e})") from None
        if health.json().get("auth") and not config.api_key:
            raise LoadTestError(
                f"the service at {url} requires an API key: give --api-key-file or set "
                "$CLIPFORGE_API_KEY"
            )
        before = await _batching(client)
        vectors = _load_vectors(config.vectors) if config.vectors else None
        next_i = 0
        latencies: list[float] = []
        kinds: Counter[str] = Counter()
        first: list[str] = []
        t0 = time.perf_counter()
        deadline = t0 + config.deadline_s

        def fail(kind: str, message: str) -> None:
            kinds[kind] += 1
            if len(first) < 5:
                first.append(message)

        async def worker() -> None:
            nonlocal next_i
            while next_i < config.requests and time.perf_counter() < deadline:
                i = next_i
                next_i += 1  # no await between the check and here: one coroutine per request id
                body: dict[str, Any] = {"k": config.k, "target": config.target}
                if vectors is not None:
                    body["vector"] = vectors[i % len(vectors)]
                else:
                    body["text"] = config.queries[i % len(config.queries)]
                start = time.perf_counter()
                try:
                    r = await client.post("/search", json=body)
                except httpx.TimeoutException:
                    fail("timeout", f"request {i}: no answer within {config.timeout_s} s")
                    continue
                except httpx.HTTPError as e:
                    fail(type(e).__name__, f"request {i}: {e}")
                    continue
                took = (time.perf_counter() - start) * 1000
                if r.status_code != 200:
                    detail = r.text[:200]
                    fail(f"HTTP {r.status_code}", f"request {i}: HTTP {r.status_code} {detail}")
                    continue
                hits = r.json().get("hits", [])
                if len(hits) != config.k:
                    fail("short", f"request {i}: {len(hits)} hits, expected {config.k}")
                    continue
                latencies.append(took)

        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        elapsed = time.perf_counter() - t0
        after = await _batching(client)
    batching: dict[str, Any] = {}
    if before is not None and after is not None:
        queries = after["queries"] - before["queries"]
        batches = after["batches"] - before["batches"]
        batching = {
            "queries": queries,
            "batches": batches,
            "mean_batch": queries / batches if batches else 0.0,
            "largest_batch": after["largest_batch"],
        }
    errors = sum(kinds.values())
    return LoadTestResult(
        url=url,
        requests=len(latencies) + errors,
        errors=errors,
        not_run=config.requests - next_i,
        concurrency=config.concurrency,
        elapsed_s=elapsed,
        latencies_ms=latencies,
        error_kinds=dict(kinds),
        first_errors=first,
        batching=batching,
    )


def _load_vectors(path: str) -> list[list[float]]:
    """The rows of a ``(Q, D)`` float ``.npy`` as JSON-ready lists."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise LoadTestError(f"--vectors {path}: not a readable .npy file ({e})") from None
    if array.ndim != 2 or len(array) == 0 or not np.issubdtype(array.dtype, np.floating):
        raise LoadTestError(
            f"--vectors {path}: need a (Q, D) float array, got {array.dtype} {array.shape}"
        )
    return [[float(x) for x in row] for row in array]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def started_service(
    index_dir: str,
    timeout_s: float = 180.0,
    log: Callable[[str], None] = print,
    api_key_file: str | None = None,
    extra_args: Sequence[str] = (),
    on_start: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """``clipforge-index serve`` for ``index_dir`` in a child process on a free loopback port
    (its own process, so the load generator does not share its interpreter); yields its URL.
    ``api_key_file``: the service requires that key (``$CLIPFORGE_API_KEY`` is inherited);
    ``extra_args``: more ``serve`` flags (e.g. ``--query-encoder onnx --onnx-export DIR``);
    ``on_start`` is called with the service's process id once it answers (to watch its memory).
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "clipforge.index", "serve", "--index", os.fspath(index_dir),
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    if api_key_file is not None:
        cmd += ["--api-key-file", os.fspath(api_key_file)]
    cmd += list(extra_args)
    log(f"starting the service: {' '.join(cmd[2:])}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                raise LoadTestError(f"the service exited with code {proc.returncode}:\n{out}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise LoadTestError(f"the service did not answer {url}/health in {timeout_s} s")
            time.sleep(0.25)
        if on_start is not None:
            on_start(proc.pid)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def run_loadtest(config: LoadTestConfig, log: Callable[[str], None] = print) -> LoadTestResult:
    """Run the load test against ``config.url``, or against a service it starts and stops."""
    if config.url is not None:
        return asyncio.run(_run(config, config.url.rstrip("/")))
    assert config.index_dir is not None
    with started_service(
        config.index_dir,
        config.startup_timeout_s,
        log,
        config.api_key_file,
        extra_args=["--mmap"] if config.mmap else [],
    ) as url:
        return asyncio.run(_run(config, url))
