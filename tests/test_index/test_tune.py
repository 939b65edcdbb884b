"""Tuning nprobe: the smallest setting that reaches the target, and a stop at a recall plateau."""

from __future__ import annotations

import faiss
import numpy as np

from clipforge.index import tune
from clipforge.index.plan import IndexPlan

from .synthetic import clustered_vectors, normalize


def _data(seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = normalize(rng.standard_normal((64, 32)))
    db = clustered_vectors(rng, 10_000, centres, 0.75)  # (N, 32)
    q = clustered_vectors(rng, 200, centres, 0.75)  # (200, 32), not in db
    truth = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :10]  # exact top 10
    return db, q, truth


def _ivf(factory: str, db: np.ndarray) -> faiss.Index:
    index = faiss.index_factory(db.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if isinstance(index, faiss.IndexIVFPQ):
        index.do_polysemous_training = False  # slow, and only for Hamming-filtered search
    index.train(db[:8000])
    index.add(db)
    return index


def test_a_recall_plateau_stops_the_doubling_before_nlist() -> None:
    db, q, truth = _data()
    index = _ivf("IVF128,PQ4", db)  # 4-byte codes on 32 dims: recall plateaus well below 0.99
    plan = IndexPlan("ivf_pq", "IVF128,PQ4", 0, "test", nlist=128, search_param="nprobe")
    got = tune.tune_search_params(index, plan, q, truth, target_recall=0.99)
    assert got.reached is False
    tried = sorted(int(c["nprobe"]) for c in got.curve)
    # it stopped where a doubling gained < PLATEAU_GAIN, without scanning every list
    assert max(tried) < 128, tried
    by_nprobe = {int(c["nprobe"]): c["recall"] for c in got.curve}
    last, before = tried[-1], tried[-2]
    assert by_nprobe[last] - by_nprobe[before] < tune.PLATEAU_GAIN
    # the kept setting is the smallest within PLATEAU_SLACK of the best recall seen, bisected
    # between the doublings (one less was tried and falls short), and the index is left at it
    enough = max(by_nprobe.values()) - tune.PLATEAU_SLACK
    chosen = got.params["nprobe"]
    assert chosen == min(v for v, r in by_nprobe.items() if r >= enough)
    assert chosen == 1 or by_nprobe[chosen - 1] < enough, by_nprobe
    assert faiss.extract_index_ivf(index).nprobe == chosen


def test_a_reachable_target_is_still_reached_with_the_smallest_nprobe() -> None:
    db, q, truth = _data()
    index = _ivf("IVF128,Flat", db)
    plan = IndexPlan("ivf_flat", "IVF128,Flat", 0, "test", nlist=128, search_param="nprobe")
    got = tune.tune_search_params(index, plan, q, truth, target_recall=0.95)
    assert got.reached and got.recall >= 0.95
    n = got.params["nprobe"]
    assert faiss.extract_index_ivf(index).nprobe == n  # left at the chosen value
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", n - 1)
    _, found = index.search(q, 10)
    assert n == 1 or tune.recall_at_k(found, truth) < 0.95  # one less misses the target
