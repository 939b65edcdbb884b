"""Search speed of a FAISS index, measured the same way for clipforge and for a peer tool.

Deliberately free of clipforge imports (numpy + faiss only): the peer side
(:mod:`benchmarks.peer_autofaiss`) runs it under another virtual environment (autofaiss's
numpy<2 / faiss 1.13), so both tools are timed by the very same code. Recall is not computed
here: each side hands back the ids it found, and the benchmark scores them all with clipforge's
one Recall@k (``clipforge.index.tune.recall_at_k``).
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np


def time_index(
    index: Any,
    queries: np.ndarray,
    k: int = 10,
    batch_repeats: int = 3,
    single_queries: int | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """``(found, speed)`` of ``index`` (search params already set) on (nq, D) ``queries``.

    ``found`` (nq, k) int64: the ids of one batched search (which also warms caches and pages).
    Batched: all queries in one ``search`` call with FAISS's default threads (best of
    ``batch_repeats``). Single-query: one query per call on ONE thread, the latency one user
    sees, over the first ``single_queries`` queries (all by default), after one warm-up call.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)  # (nq, D)
    _, found = index.search(q, k)  # (nq, k)
    out: dict[str, float] = {}
    best = float("inf")
    for _ in range(batch_repeats):
        t0 = time.perf_counter()
        index.search(q, k)
        best = min(best, time.perf_counter() - t0)
    out["batched_qps"] = len(q) / best
    out["batch_threads"] = faiss.omp_get_max_threads()

    n_single = len(q) if single_queries is None else min(single_queries, len(q))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.search(q[:1], k)
        lat = np.empty(n_single)
        for i in range(n_single):
            t0 = time.perf_counter()
            index.search(q[i : i + 1], k)
            lat[i] = time.perf_counter() - t0
    finally:
        faiss.omp_set_num_threads(threads)
    out["single_qps"] = n_single / float(lat.sum())
    out["p50_ms"] = float(np.percentile(lat, 50) * 1e3)
    out["p99_ms"] = float(np.percentile(lat, 99) * 1e3)
    return found, out
