"""Index candidates at one memory budget: size, recall@10, QPS and build time of each.

The equal-memory half of ``python -m benchmarks.index_vs_autofaiss --candidates``: on the
benchmark's clustered data, every candidate FAISS factory is built on ONE shared IVF coarse
quantizer (trained once by clipforge's own :func:`clipforge.index.faiss_ops.train_index`, as
``clipforge-index build`` trains it), so the sweep pays k-means once and the candidates differ
only in their codes, their coarse search (flat or HNSW over the same centroids) and their
re-ranking stage. For each candidate: train its codes on the build's training sample, add every
vector (ids = row numbers), write it to disk (its size is the file's), tune ``nprobe`` with the
held-out tuning queries (:func:`clipforge.index.tune.tune_search_params`; a ``Refine`` stage is
tried with ``k_factor_rf`` 4 and 16), then score the evaluation queries with clipforge's one
Recall@10 and time them with :func:`benchmarks.index_timing.time_index`.

Candidate build times exclude the shared k-means (printed once): add it to compare a candidate
with a whole ``clipforge-index build``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipforge.index import emb_dir, store, tune
from clipforge.index.faiss_ops import Log, train_index
from clipforge.index.plan import BuildConfig, IndexPlan, default_nlist, train_sample_size

from .index_timing import time_index


def default_candidates(count: int, dim: int) -> list[str]:
    """The factories the sweep tries for ``count`` x ``dim`` (nlist as the planner picks it)."""
    nl = default_nlist(count)
    m = dim // 2  # 2 dims per 8-bit sub-quantizer: the finest PQ FAISS has fast kernels for
    return [
        f"IVF{nl},PQ{m}",  # 8-bit IVF-PQ, without the planner's OPQ rotation
        # 10-bit codes (5 bits a dim, 160 B at 256-d): the planner's codes at 1M under 170 MiB,
        # here without its OPQ and on the shared coarse sample (160 rows a PQ centroid where
        # the planner's build gives 480); scanned by FAISS's generic (non-SIMD) decoder
        f"IVF{nl},PQ{m}x10",
        f"IVF{nl}_HNSW32,PQ{m}",  # the 8-bit codes, HNSW search over the centroids
        f"IVF{nl},PQ{m}x4fs",  # 4-bit fast-scan PQ: half the bytes, SIMD-scanned
        f"IVF{nl},PQ{m // 2}x4fs,Refine(SQ4)",  # fast-scan shortlist re-ranked on 4-bit SQ
        f"IVF{nl},SQ4",  # 4-bit scalar codes
        # RaBitQ (Gao & Long 2024) with 4 bits a dimension: a random rotation, then each
        # residual's codes with per-vector correction factors that make the inner-product
        # estimate unbiased: SQ4's 4 bits a dimension plus a few bytes of factors per vector
        # (160 against 140 MB at 1M x 256), a far smaller error
        f"IVF{nl},RaBitQ4",
        f"IVF{nl},RaBitQfs4",  # the same codes laid out for the SIMD fast-scan kernels
    ]


def _shared_coarse(
    source: emb_dir.VectorSource, nlist: int, config: BuildConfig, log: Log
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(centroids (nlist, D), training sample (n, D), seconds)`` of clipforge's IVF training."""
    plan = IndexPlan("ivf_flat", f"IVF{nlist},Flat", 0, "shared coarse quantizer", nlist=nlist,
                     search_param="nprobe")  # fmt: skip
    t0 = time.perf_counter()
    trained: Any = train_index(plan, source, config, log=log)
    centroids = trained.quantizer.reconstruct_n(0, nlist)  # (nlist, D)
    sample = source.sample(train_sample_size(plan, source.count, config), seed=config.seed)
    return centroids, sample, time.perf_counter() - t0


def _build_candidate(
    factory: str, source: emb_dir.VectorSource, centroids: np.ndarray, sample: np.ndarray,
    chunk_size: int,
) -> faiss.Index:  # fmt: skip
    index: Any = faiss.index_factory(source.dim, factory, faiss.METRIC_INNER_PRODUCT)
    base = index.base_index if isinstance(index, faiss.IndexRefine) else index
    ivf: Any = faiss.extract_index_ivf(base)
    ivf.quantizer.add(centroids)  # trained quantizer with nlist entries: train() skips k-means
    pq = faiss.downcast_index(ivf)
    if isinstance(pq, faiss.IndexIVFPQ):
        pq.do_polysemous_training = False  # type: ignore[attr-defined]  # as clipforge builds
    index.train(sample)
    for first_id, x in source.iter_chunks(chunk_size):
        ids = np.arange(first_id, first_id + len(x), dtype=np.int64)
        base.add_with_ids(x, ids)
        if base is not index:
            index.refine_index.add(x)  # the refine codes are addressed by row number = id
    index.ntotal = base.ntotal
    return index


def run_candidates(
    paths: dict[str, Path],
    budget_bytes: int,
    work_dir: Path,
    factories: list[str] | None = None,
    target_recall: float = 0.9,
    log: Log = print,
) -> dict[str, Any]:
    """Build, size, tune and time every candidate; ``{"coarse_seconds", "rows"}``."""
    source = emb_dir.open_vectors(paths["emb_dir"], "image")
    config = BuildConfig()
    nlist = default_nlist(source.count)
    factories = factories or default_candidates(source.count, source.dim)
    centroids, sample, coarse_s = _shared_coarse(source, nlist, config, log)
    log(f"candidates: shared IVF{nlist} coarse quantizer trained in {coarse_s:.0f} s")
    tune_q = np.load(paths["tune_queries"])
    queries = np.load(paths["queries"])
    truth = np.load(paths["truth"])
    _, tune_truth = tune.exact_knn(source, tune_q, 10)
    rows: list[dict[str, Any]] = []
    work_dir.mkdir(parents=True, exist_ok=True)
    for factory in factories:
        t0 = time.perf_counter()
        try:
            index = _build_candidate(factory, source, centroids, sample, config.chunk_size)
        except (RuntimeError, ValueError) as e:
            rows.append({"factory": factory, "error": f"{type(e).__name__}: {e}"})
            continue
        build_s = time.perf_counter() - t0
        path = work_dir / "candidate.index"
        size, _ = store.write_faiss_index(index, path)
        path.unlink()
        plan = IndexPlan("ivf", factory, size, "candidate", nlist=nlist, search_param="nprobe")
        refine_factors = [4, 16] if isinstance(index, faiss.IndexRefine) else [None]
        for kf in refine_factors:
            if kf is not None:
                store.apply_search_params(index, {"k_factor_rf": kf})
            t1 = time.perf_counter()
            tuned = tune.tune_search_params(index, plan, tune_q, tune_truth, target_recall)
            tune_s = time.perf_counter() - t1
            found, speed = time_index(index, queries)
            params = {**tuned.params, **({"k_factor_rf": kf} if kf is not None else {})}
            row = {
                "factory": factory, "search_params": params, "size_bytes": size,
                "fits_budget": size <= budget_bytes, "build_seconds": build_s,
                "tune_seconds": tune_s, "tuning_recall_at_10": tuned.recall,
                "recall_at_10": tune.recall_at_k(found, truth, 10), **speed,
            }  # fmt: skip
            rows.append(row)
            log(f"  {factory} {params}: {size / 1e6:.0f} MB, recall@10 {row['recall_at_10']:.3f}, "
                f"{speed['single_qps']:.0f} single-query QPS, build {build_s:.0f} s")  # fmt: skip
        del index
    return {"coarse_seconds": coarse_s, "nlist": nlist, "target_recall": target_recall,
            "rows": rows}  # fmt: skip


def format_candidates(
    result: dict[str, Any], budget_bytes: int,
    others: list[tuple[str, dict[str, Any] | None]] | None = None,
) -> str:  # fmt: skip
    """One line per candidate, then per ``(name, figures)`` of ``others`` (whole builds timed
    the same way: clipforge's own build, the peer): size, recall, QPS, build time."""
    head = (f"{'candidate':<40} {'params':<28} {'size':>8} {'fits':>5} {'recall@10':>9} "
            f"{'QPS 1q':>7} {'QPS batch':>9} {'p99 ms':>7} {'build s':>8}")  # fmt: skip
    lines = [
        f"candidates at budget {budget_bytes / 1e6:.0f} MB (shared IVF{result['nlist']} k-means "
        f"{result['coarse_seconds']:.0f} s, not in build s); nprobe tuned for recall@10 "
        f"{result['target_recall']} on held-out queries",
        head,
    ]

    def line(name: str, r: dict[str, Any]) -> str:
        sp = r.get("search_params") or {}
        params = sp if isinstance(sp, str) else ",".join(f"{k}={v}" for k, v in sp.items())
        return (f"{name[:40]:<40} {params[:28]:<28} {r['size_bytes'] / 1e6:>6.0f}MB "
                f"{'yes' if r['size_bytes'] <= budget_bytes else 'NO':>5} "
                f"{r['recall_at_10']:>9.3f} {r['single_qps']:>7.0f} {r['batched_qps']:>9.0f} "
                f"{r['p99_ms']:>7.2f} {r['build_seconds']:>8.0f}")  # fmt: skip

    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['factory']:<40} FAILED: {r['error'][:200]}")
        else:
            lines.append(line(r["factory"], r))
    for name, r in others or []:
        if r is not None and "error" not in r:
            lines.append(line(f"{name}: {r['factory']}", r))
    lines.append(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
                 f"on {os.cpu_count()} cores at the end")  # fmt: skip
    return "\n".join(lines)
