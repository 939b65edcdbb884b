"""The query batcher: every query the service answers goes through one model thread, and
queries that arrive while the model is busy are encoded together in its next forward pass.

Why a batcher at all: one forward pass of the text tower costs about the same for 1 query as for
a few dozen (on a CPU it already uses every core; on a GPU the kernels are far from full), so
under load encoding the queue as one batch multiplies throughput, where one pass per request
would queue requests behind each other. Why one thread: torch modules are not safe to call
concurrently, and FAISS searches from that same thread need no locking.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from .searcher import Hit, Searcher, SearchError


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
        # A batch holds one kind: text payloads are strings, image payloads PIL images.
        if kind == "text":
            emb = s.embed_text([str(p.payload) for p in batch])  # (Q, D)
        else:
            emb = s.embed_images([p.payload for p in batch])  # (Q, D)
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
