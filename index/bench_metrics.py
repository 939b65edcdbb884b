"""Search-quality and speed metrics shared by clipforge's index benchmark and its peer scripts.

Deliberately free of clipforge imports (numpy + faiss only): the peer scripts run it under other
virtual environments (e.g. autofaiss's numpy<2 / faiss 1.13), so both sides are measured by the
very same code.
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    """|approx top10 ∩ exact top10| / 10, averaged over queries (PEERS.md's recall@10)."""
    f, t = found[:, :10], truth[:, :10]
    hits = (f[:, :, None] == t[:, None, :]) & (f[:, :, None] >= 0)  # (nq, 10, 10)
    return float(hits.any(axis=2).sum(axis=1).mean() / 10)


def recall_1_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of queries whose true nearest neighbour is in the approximate top 10."""
    return float((found[:, :10] == truth[:, :1]).any(axis=1).mean())


def evaluate_index(
    index: Any,
    queries: np.ndarray,
    truth: np.ndarray,
    batch_repeats: int = 3,
    single_queries: int | None = None,
) -> dict[str, float]:
    """Recall and speed of ``index`` (search params already set) on (nq, D) float32 ``queries``.

    Batched: all queries in one ``search`` call with FAISS's default threads (best of
    ``batch_repeats``). Single-query: one query per call on ONE thread (as PEERS.md measures),
    over the first ``single_queries`` queries (all by default), after one warm-up call.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    _, found = index.search(q, 10)  # (nq, 10); also warms caches/pages
    out: dict[str, float] = {
        "recall_at_10": recall_at_10(found, truth),
        "recall_1_at_10": recall_1_at_10(found, truth),
    }
    best = float("inf")
    for _ in range(batch_repeats):
        t0 = time.perf_counter()
        index.search(q, 10)
        best = min(best, time.perf_counter() - t0)
    out["batched_qps"] = len(q) / best
    out["batch_threads"] = faiss.omp_get_max_threads()

    n_single = len(q) if single_queries is None else min(single_queries, len(q))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.search(q[:1], 10)
        lat = np.empty(n_single)
        for i in range(n_single):
            t0 = time.perf_counter()
            index.search(q[i : i + 1], 10)
            lat[i] = time.perf_counter() - t0
    finally:
        faiss.omp_set_num_threads(threads)
    out["single_qps"] = n_single / float(lat.sum())
    out["p50_ms"] = float(np.percentile(lat, 50) * 1e3)
    out["p99_ms"] = float(np.percentile(lat, 99) * 1e3)
    return out
