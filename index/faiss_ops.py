"""FAISS operations of a build: the GPU, training an index on a sample, adding vectors.

GPU: when FAISS sees a GPU (or ``use_gpu=True``) k-means training, coarse assignment while adding,
and the exact ground-truth search (:mod:`.tune`) run on it; the index written is the same CPU
index either way. Asking for a GPU that FAISS cannot see is an error, never a silent CPU run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from .emb_dir import VectorSource
from .plan import BuildConfig, IndexPlan, train_sample_size

Log = Callable[[str], None]
"""Where a build reports progress (``print`` by default; tests pass a list's ``append``)."""


def resolve_use_gpu(use_gpu: bool | None) -> bool:
    """True when the build should use FAISS GPU; raises if a GPU was required but is absent."""
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is None:
        return ngpu > 0
    if use_gpu and ngpu == 0:
        raise RuntimeError(
            "GPU requested (use_gpu=True / --gpu) but FAISS sees no GPU "
            "(faiss.get_num_gpus() == 0); refusing to fall back to CPU silently — "
            "drop the flag to build on CPU"
        )
    return bool(use_gpu)


class GpuResources:
    """Lazily created FAISS GPU resources, shared by the steps of one build (train, add, the
    exact ground truth): FAISS allocates its scratch memory once per ``StandardGpuResources``,
    so one object per build rather than per step."""

    def __init__(self) -> None:
        self._res: Any = None

    @property
    def res(self) -> Any:
        """The ``faiss.StandardGpuResources`` (created on first use)."""
        if self._res is None:
            self._res = faiss.StandardGpuResources()
        return self._res

    def flat(self, dim: int, metric: int) -> faiss.Index:
        """An empty exact index of ``dim`` on GPU 0 (k-means' assignment index)."""
        return faiss.index_cpu_to_gpu(self.res, 0, faiss.IndexFlat(dim, metric))

    def copy(self, index: faiss.Index) -> faiss.Index:
        """A GPU-0 copy of a CPU ``index`` (the coarse quantizer, for assignment)."""
        return faiss.index_cpu_to_gpu(self.res, 0, index)


def train_index(
    plan: IndexPlan,
    source: VectorSource,
    config: BuildConfig,
    gpu: GpuResources | None = None,
    log: Log = print,
) -> faiss.Index:
    """A trained, empty index for ``plan`` (quantizers fit on a seeded sample of ``source``)."""
    # Any: the factory returns the downcast class (IndexHNSWFlat, IndexPreTransform...), whose
    # attributes the SWIG stubs do not know from the declared faiss.Index.
    index: Any = faiss.index_factory(source.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = config.ef_construction
    if index.is_trained:
        return index
    if isinstance(index, faiss.IndexPreTransform):
        chain: Any = index.chain  # a SWIG vector, not the list the stubs declare
        for i in range(chain.size()):
            vt = faiss.downcast_VectorTransform(chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                vt.niter = config.opq_iterations
    n = train_sample_size(plan, source.count, config)
    t0 = time.perf_counter()
    x = source.sample(n, seed=config.seed)  # (n, D) float32
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.niter = config.kmeans_iterations
        ivf.cp.seed = config.seed
        ivf.cp.max_points_per_centroid = max(256, n // max(plan.nlist or 1, 1) + 1)
        if plan.kind == "ivf_sqfp16":
            # Encode the vectors themselves, not residuals to the centroid: float16 inputs then
            # round-trip exactly, and the scan skips the per-cell residual term.
            ivf.by_residual = False
        ivfpq = faiss.downcast_index(ivf)
        if isinstance(ivfpq, faiss.IndexIVFPQ):
            # Polysemous training (a simulated-annealing code reordering, the factory default)
            # only serves Hamming-filtered search, which clipforge does not use; it dominates
            # PQ training time.
            ivfpq.do_polysemous_training = False  # type: ignore[attr-defined]  # not in stubs
    # must outlive train(): SWIG does not keep it alive for us
    clustering_index: faiss.Index | None = None
    if ivf is not None and gpu is not None:
        # k-means assignment on the GPU; the trained centroids land in the CPU quantizer.
        clustering_index = gpu.flat(ivf.d, ivf.metric_type)
        ivf.clustering_index = clustering_index
    index.train(x)
    if ivf is not None:
        ivf.clustering_index = None  # type: ignore[assignment]  # SWIG takes None (NULL)
    del clustering_index
    log(f"  trained {plan.factory} on {n} sampled vectors in {time.perf_counter() - t0:.1f} s")
    return index


def _add_chunk(
    index: faiss.Index, x: np.ndarray, first_id: int, assigner: faiss.Index | None
) -> None:
    """Add (n, D) float32 ``x`` with ids first_id.. ; IVF kinds with an external assigner."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        # Flat/HNSW have no id map: ids are the insertion order, so chunks must come in order.
        if index.ntotal != first_id:
            raise ValueError(f"chunk starting at id {first_id} added to an index of {index.ntotal}")
        index.add(x)
        return
    ids = np.arange(first_id, first_id + len(x), dtype=np.int64)
    if assigner is None:
        index.add_with_ids(x, ids)
        return
    # Coarse assignment by another index (a GPU copy of the quantizer), then encode on CPU: the
    # same lists and codes as index.add_with_ids, with the costly nearest-centroid search moved.
    xt = x
    if isinstance(index, faiss.IndexPreTransform):
        chain: Any = index.chain  # a SWIG vector, not the list the stubs declare
        for i in range(chain.size()):
            xt = chain.at(i).apply(xt)
    _, assign = assigner.search(np.ascontiguousarray(xt), 1)  # (n, 1) int64
    assign = np.ascontiguousarray(assign[:, 0])
    ivf.add_core(len(xt), faiss.swig_ptr(xt), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
    index.ntotal = ivf.ntotal


def add_vectors(
    index: faiss.Index,
    source: VectorSource,
    chunk_size: int,
    start: int = 0,
    stop: int | None = None,
    gpu: GpuResources | None = None,
    external_assign: bool = False,
    log: Log | None = None,
) -> None:
    """Add ids ``[start, stop)`` of ``source`` to ``index`` chunk by chunk (global ids).

    With ``gpu`` (or ``external_assign``, which exercises the same route on CPU) the coarse
    assignment of IVF indexes runs on a separate copy of the quantizer.
    """
    assigner = None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and (gpu is not None or external_assign):
        # Exact assignment over the centroids (a flat copy: also right when the CPU quantizer is
        # an HNSW, which FAISS cannot move to a GPU).
        flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
        flat.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))  # (nlist, d) centroids
        assigner = gpu.copy(flat) if gpu is not None else flat
    stop = source.count if stop is None else stop
    t0 = time.perf_counter()
    for first_id, x in source.iter_chunks(chunk_size, start, stop):
        _add_chunk(index, x, first_id, assigner)
        if log is not None and time.perf_counter() - t0 > 30:
            log(f"  added {first_id + len(x) - start}/{stop - start} vectors")
            t0 = time.perf_counter()
