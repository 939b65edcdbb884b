"""Index quality: recall of a built index against exact search, speed and memory, in one table.

For each modality index in ``INDEX_DIR`` (``image.index`` answers text queries, ``text.index``
image queries), the queries are embeddings of the *other* modality -- cross-modal, as the index
is used -- and *held out*: the rows the build drew for tuning the search parameters (numpy
``default_rng(seed + 1)``, the build's default seed 1234 and ``tune_queries`` 1000 unless
index.json says otherwise) are excluded, so the figure is not the one the build optimised.
Ground truth is exact inner-product search over the indexed vectors (ties: smaller id first).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.eval.data import EvalDataError
from clipforge.eval.report import make_report


@dataclass(frozen=True)
class IndexQualityConfig:
    """What the index benchmark measures."""

    queries: int = 1000
    """Held-out cross-modal queries per index."""
    k: int = 10
    """Neighbours compared with exact search (recall@k = |ANN top-k ∩ exact top-k| / k)."""
    single_queries: int = 200
    """Queries timed one at a time on one thread (latency percentiles, single-query QPS)."""
    batch_repeats: int = 3
    """Batched timing: best of this many runs of all queries in one call."""
    seed: int = 0
    """Seed of the query draw."""
    embeddings_dir: str | None = None
    """The embeddings the index was built from (default: ``embeddings_dir`` in index.json)."""


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _index_bytes(index: Any) -> int:
    import faiss

    try:
        return int(faiss.serialize_index(index).nbytes)
    except RuntimeError:  # e.g. on-disk inverted lists: count the file size instead
        return 0


def held_out_ids(count: int, n: int, tuning_seed: int, tuning_n: int, seed: int) -> np.ndarray:
    """Up to ``n`` sorted row ids of ``count`` not among the build's tuning draw."""
    rng = np.random.default_rng(tuning_seed)
    tuned = rng.choice(count, size=min(tuning_n, count), replace=False)
    free = np.setdiff1d(np.arange(count), tuned)
    if len(free) == 0:
        return free
    pick = np.random.default_rng(seed).choice(len(free), size=min(n, len(free)), replace=False)
    return np.sort(free[pick])


def measure_index(
    index: Any, queries: np.ndarray, truth: np.ndarray, k: int, cfg: IndexQualityConfig
) -> dict[str, float]:
    """Recall vs ``truth`` (nq, k) and batched / single-query speed of a FAISS ``index``."""
    import faiss

    from clipforge.index.tune import recall_1_at_k, recall_at_k

    q = np.ascontiguousarray(queries, dtype=np.float32)  # (nq, D)
    _, found = index.search(q, k)  # (nq, k); also warms caches
    # the build's own Recall@k (clipforge.index.tune), so both report the same measure
    out = {"recall": recall_at_k(found, truth, k), "recall_1": recall_1_at_k(found, truth, k)}
    best = float("inf")
    for _ in range(cfg.batch_repeats):
        t0 = time.perf_counter()
        index.search(q, k)
        best = min(best, time.perf_counter() - t0)
    out["qps_batched"] = len(q) / best
    n_single = min(cfg.single_queries, len(q))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one query at a time on one thread: the latency a user sees
    try:
        lat = np.empty(n_single)
        for i in range(n_single):
            t0 = time.perf_counter()
            index.search(q[i : i + 1], k)
            lat[i] = time.perf_counter() - t0
    finally:
        faiss.omp_set_num_threads(threads)
    if n_single:
        out["qps_single"] = n_single / float(lat.sum())
        out["latency_p50_ms"] = float(np.percentile(lat, 50) * 1e3)
        out["latency_p99_ms"] = float(np.percentile(lat, 99) * 1e3)
    out["batch_threads"] = float(threads)
    return out


def run_index_quality(
    index_dir: str | os.PathLike[str],
    cfg: IndexQualityConfig = IndexQualityConfig(),
    command: list[str] | None = None,
) -> dict[str, Any]:
    """The index-quality result object (one entry per modality index)."""
    from clipforge.index.emb_dir import open_vectors
    from clipforge.index.store import modality_entry, open_index, read_index_manifest
    from clipforge.index.tune import exact_knn

    t0 = time.perf_counter()
    d = Path(index_dir)
    manifest = read_index_manifest(d)
    emb_dir = cfg.embeddings_dir or manifest.get("embeddings_dir")
    if not emb_dir or not Path(emb_dir).is_dir():
        raise EvalDataError(
            f"{d}: the embeddings it was built from ({emb_dir or 'not recorded'}) are not there; "
            f"exact search needs them"
        )
    if cfg.k < 1 or cfg.queries < 1:
        raise EvalDataError("--k and --queries must be >= 1")
    metrics: dict[str, Any] = {}
    for modality in manifest["modalities"]:
        entry = modality_entry(manifest, modality)
        other = "text" if modality == "image" else "image"
        try:
            qsrc = open_vectors(emb_dir, other)
        except (ValueError, FileNotFoundError):
            continue  # no cross-modal queries for this index
        source = open_vectors(emb_dir, modality)
        ids = held_out_ids(
            qsrc.count, cfg.queries, 1234 + 1, entry.num_recall_queries or 1000, cfg.seed
        )
        note = "held out from tuning"
        if len(ids) == 0:  # the build tuned on every row: say so rather than report nothing
            ids = np.arange(min(cfg.queries, qsrc.count))
            note = "NOT held out (the build tuned on all rows)"
        queries = qsrc.take(ids)  # (nq, D)
        k = min(cfg.k, source.count)
        _, truth = exact_knn(source, queries, k)
        rss0 = _rss_bytes()
        opened = open_index(d, modality)
        rss1 = _rss_bytes()
        m: dict[str, Any] = dict(measure_index(opened.index, queries, truth, k, cfg))
        m.update(
            {
                "factory": entry.factory or entry.kind or "?",
                "search_params": entry.search_params,
                "queries": len(queries),
                "query_kind": f"{other} embeddings, cross-modal, {note}",
                "k": k,
                "vectors": int(opened.index.ntotal),
                # The index's own footprint (vectors, codes, graph): its serialised size; the
                # process RSS growth on loading also counts allocator and metadata overhead.
                "memory_mb": _index_bytes(opened.index) / 2**20,
                "rss_growth_mb": max(rss1 - rss0, 0) / 2**20,
                "file_mb": (entry.size_bytes or 0) / 2**20,
                "build_recall_at_10": entry.measured_recall_at_10,
            }
        )
        metrics[f"{modality}.index"] = m
        del opened
    if not metrics:
        raise EvalDataError(f"{d}: no modality index with cross-modal queries to measure")
    return make_report(
        "index",
        metrics,
        {"hash": manifest.get("model_hash"), "source": manifest.get("model_source")},
        {"spec": str(d), "embeddings_dir": str(emb_dir), "count": manifest.get("count")},
        {"queries": cfg.queries, "k": cfg.k, "single_queries": cfg.single_queries},
        command,
        time.perf_counter() - t0,
    )
