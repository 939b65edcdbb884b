"""Exact search, recall, and tuning the search parameters of a built index.

:func:`recall_at_k` is clipforge's one Recall@k: the build tunes with it, ``clipforge-eval
index`` reports it and the benchmarks score every tool with it. ``recall@k = |approximate top-k
∩ exact top-k| / k`` averaged over queries, with the exact top-k from :func:`exact_knn` (ties:
the smaller id first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np

from .emb_dir import VectorSource
from .faiss_ops import GpuResources
from .plan import IndexPlan


def exact_knn(
    source: VectorSource,
    queries: np.ndarray,
    k: int = 10,
    chunk_size: int = 65_536,
    gpu: GpuResources | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries`` (nq, D) over all of ``source``, chunk by chunk.

    Returns ``(D, I)``, both (nq, k), best first; ties broken by the smaller id.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)  # (nq, D)
    nq = len(q)
    best_d = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.full((nq, 0), -1, dtype=np.int64)
    for first_id, x in source.iter_chunks(chunk_size):
        kk = min(k, len(x))
        if gpu is not None:
            d, i = faiss.knn_gpu(gpu.res, q, x, kk, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            d, i = faiss.knn(q, x, kk, metric=faiss.METRIC_INNER_PRODUCT)
        cat_d = np.concatenate([best_d, d], axis=1)  # (nq, <=2k)
        cat_i = np.concatenate([best_i, i + first_id], axis=1)
        order = np.lexsort((cat_i, -cat_d), axis=1)[:, :k]
        best_d = np.take_along_axis(cat_d, order, axis=1)
        best_i = np.take_along_axis(cat_i, order, axis=1)
    return best_d, best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """|approx top-k ∩ exact top-k| / k, averaged over queries.

    ``found`` (nq, >=k) and ``truth`` (nq, >=k) are row ids; FAISS's -1 (fewer than k results)
    never counts as a hit, even against a -1 in ``truth``.
    """
    f = found[:, :k]  # (nq, k)
    t = truth[:, :k]  # (nq, k)
    hits = (f[:, :, None] == t[:, None, :]) & (f[:, :, None] >= 0)  # (nq, k, k)
    return float(hits.any(axis=2).sum(axis=1).mean() / k)


def recall_1_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Fraction of queries whose true nearest neighbour (``truth[:, 0]``) is in ``found[:, :k]``."""
    return float((found[:, :k] == truth[:, :1]).any(axis=1).mean())


PLATEAU_GAIN = 0.002
"""Tuning stops doubling nprobe/efSearch when a doubling gains less recall@k than this."""
PLATEAU_SLACK = 0.002
"""On a plateau, the smallest setting within this much of the best recall@k seen is kept."""


@dataclass(frozen=True)
class TuneResult:
    """Outcome of tuning one search parameter for a target recall."""

    params: dict[str, int]
    """Chosen ParameterSpace settings, e.g. {"nprobe": 12}."""
    recall: float
    """recall@10 measured with those settings."""
    reached: bool
    """Whether ``recall`` >= the target."""
    curve: list[dict[str, float]] = field(default_factory=list)
    """Every setting tried with its recall (stored in index.json for inspection)."""


def tune_search_params(
    index: faiss.Index,
    plan: IndexPlan,
    queries: np.ndarray,
    truth: np.ndarray,
    target_recall: float,
    k: int = 10,
) -> TuneResult:
    """Smallest nprobe/efSearch with recall@k >= target (doubling, then bisection).

    If the target is out of reach (lossy codes: a doubling gains < :data:`PLATEAU_GAIN`, or the
    largest setting falls short), the smallest setting within :data:`PLATEAU_SLACK` of the best
    recall the doublings saw is kept (bisected between them), and ``reached`` is False. Either way
    the index is left set to the chosen value, so what is timed next is what was chosen.
    """
    name = plan.search_param
    q = np.ascontiguousarray(queries, dtype=np.float32)
    ps = faiss.ParameterSpace()
    curve: list[dict[str, float]] = []
    cache: dict[int, float] = {}

    def measure(v: int) -> float:
        if v not in cache:
            if name is not None:
                ps.set_index_parameter(index, name, float(v))
            _, found = index.search(q, k)
            cache[v] = recall_at_k(found, truth, k)
            curve.append({name or "exact": v, "recall": round(cache[v], 5)})
        return cache[v]

    if name is None:
        r = measure(0)
        return TuneResult({}, r, r >= target_recall, curve)

    def settle(v: int, reached: bool) -> TuneResult:
        """Leave the index at ``v`` (what is timed next is what was chosen) and report it."""
        ps.set_index_parameter(index, name, float(v))
        curve.sort(key=lambda c: c[name])
        return TuneResult({name: v}, cache[v], reached, curve)

    if name == "nprobe":
        lo_v, hi_v = 1, int(plan.nlist or 1)
    else:  # efSearch: at least k candidates, and a generous ceiling
        lo_v, hi_v = k, max(4096, k)
    v, prev = lo_v, None
    while True:
        if measure(v) >= target_recall:
            break
        # Lossy codes (PQ) cap recall: once doubling the setting gains under PLATEAU_GAIN the
        # target is out of reach, and doubling on to nlist would scan the whole collection per
        # query (hours at 10M) to learn nothing more.
        plateaued = prev is not None and cache[v] - cache[prev] < PLATEAU_GAIN
        if v >= hi_v or plateaued:
            # On a plateau the doubling overshoots: nprobe 8 may hold what 16 does and more
            # than 4, and 6 may hold it too at a quarter less work a query.
            enough = max(cache.values()) - PLATEAU_SLACK
            chosen = min(x for x, r in cache.items() if r >= enough)
            below = [x for x in cache if x < chosen]  # each recalls < enough
            return settle(_bisect(measure, max(below, default=chosen), chosen, enough), False)
        prev, v = v, min(v * 2, hi_v)
    # bisect (prev fails, v passes) for the smallest passing value
    return settle(_bisect(measure, prev if prev is not None else v, v, target_recall), True)


def _bisect(measure: Callable[[int], float], lo: int, hi: int, enough: float) -> int:
    """Smallest setting in (lo, hi] whose recall is >= ``enough``, given that ``hi``'s is
    (recall grows with the setting)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(mid) >= enough:
            hi = mid
        else:
            lo = mid
    return hi
