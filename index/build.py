"""Build FAISS indexes from an embeddings directory (``EMB_DIR``) into an index directory.

The pipeline per modality (``image.index`` from ``img_emb``, ``text.index`` from ``text_emb``):

1. :func:`plan_index` picks the index kind (``--kind`` or automatically under ``--memory-budget``)
   and says why;
2. :func:`train_index` trains the quantizer(s) on a seeded random sample of the vectors, gathered
   from the memory-mapped part files (never the whole collection in RAM);
3. :func:`add_vectors` adds the vectors in chunks read from the memory-mapped parts;
4. :func:`tune_search_params` picks the smallest ``nprobe``/``efSearch`` whose recall@10 against
   exact search reaches ``--target-recall``, measured with queries that are *not* the indexed
   vectors: the other modality's embeddings (cross-modal: text queries for the image index and
   vice versa) or held-out queries when given;
5. :mod:`clipforge.index.store` writes the index files with sizes and sha256 into ``index.json``.

:func:`run_build` is the whole job (what ``clipforge-index build`` calls). With ``num_shards`` the
vectors are added shard by shard against one trained quantizer and merged into on-disk inverted
lists (:mod:`clipforge.index.merge`), for collections whose index does not fit in RAM.

GPU: when FAISS sees a GPU (or ``use_gpu=True``) k-means training, coarse assignment while adding,
and the exact ground-truth search run on it; the index written is the same CPU index either way.
Asking for a GPU that FAISS cannot see is an error, never a silent CPU run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from clipforge.data_tools.atomic import OutOfSpaceError, atomic_output
from clipforge.data_tools.outputs import make_dirs

from . import store

EMBEDDINGS_FORMAT = "clipforge-embeddings/1"
EMBEDDINGS_MANIFEST = "embeddings.json"
# modality -> (folder, file prefix) in EMB_DIR
EMB_LAYOUT = {"image": ("img_emb", "img_emb"), "text": ("text_emb", "text_emb")}
KINDS = ("flat", "hnsw", "ivf_flat", "ivf_sqfp16", "ivf_sq8", "ivf_pq")
# Spellings users may type (DESIGN.md writes "ivfpq").
KIND_ALIASES = {
    "exact": "flat",
    "ivfpq": "ivf_pq",
    "ivf-pq": "ivf_pq",
    "ivfflat": "ivf_flat",
    "ivf-flat": "ivf_flat",
    "ivf_sq16": "ivf_sqfp16",
    "ivf_fp16": "ivf_sqfp16",
    "ivf_sqfp16": "ivf_sqfp16",
}
GIB = 1 << 30

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class BuildConfig:
    """Everything that shapes an index build (the CLI flags map onto these fields)."""

    kind: str = "auto"
    """``auto`` or one of :data:`KINDS` (aliases such as ``ivfpq`` accepted)."""
    memory_budget: int | None = None
    """Upper bound in bytes on the index's size (= its RAM when loaded); None: no bound."""
    target_recall: float = 0.95
    """recall@10 against exact search that the search parameters are tuned to reach."""
    nlist: int | None = None
    """IVF cells; None: the power of two nearest 4*sqrt(N) (FAISS's guideline), >= 39 pts/cell."""
    hnsw_m: int = 32
    """HNSW graph degree (links per node on the base layer: 2*M)."""
    ef_construction: int = 40
    """HNSW efConstruction (FAISS's default)."""
    pq_m: int | None = None
    """IVF-PQ bytes per vector (sub-quantizers); None: the largest that fits the budget."""
    pq_nbits: int = 8
    """Bits per PQ sub-quantizer code (8: 256 centroids each; 4 trains much faster)."""
    opq: bool = True
    """Rotate with OPQ before IVF-PQ (cheap at search time, notably better PQ codes)."""
    flat_max_count: int = 20_000
    """auto: collections up to this size use exact search (it is fast enough and recall 1)."""
    train_points_per_cell: int = 40
    """Training sample = this many points per IVF cell (FAISS warns below 39), capped below."""
    max_train_points: int = 200_000
    """Cap on the training sample (k-means cost is sample x nlist x dim x iterations)."""
    kmeans_iterations: int = 10
    """k-means iterations for the IVF coarse quantizer."""
    opq_iterations: int = 25
    """OPQ rotation/PQ alternations (FAISS default 50; the gain flattens well before)."""
    chunk_size: int = 65_536
    """Rows per chunk read from the memory-mapped parts while adding / searching exactly."""
    tune_queries: int = 1000
    """Number of cross-modal queries sampled for tuning (when no held-out queries are given)."""
    seed: int = 1234
    """Seed of the training sample, query sample and k-means."""
    use_gpu: bool | None = None
    """None: GPU when FAISS sees one; True: require it (error if absent); False: CPU only."""
    num_shards: int | None = None
    """Build per-shard IVF indexes on one quantizer and merge them into on-disk lists."""

    def __post_init__(self) -> None:
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory_budget must be positive, got {self.memory_budget}")
        if self.num_shards is not None and self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        normalize_kind(self.kind)


def normalize_kind(kind: str) -> str:
    """Canonical kind name; ValueError listing the valid ones otherwise."""
    k = kind.strip().lower()
    k = KIND_ALIASES.get(k, k)
    if k != "auto" and k not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose auto or one of {', '.join(KINDS)}")
    return k


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_memory_size(text: str | int | None) -> int | None:
    """Parse "4GB", "512MB", "1G", "1.5GiB", "1000000" into bytes (None stays None).

    K/M/G/T are binary multiples (1G = 2**30 bytes), the convention of autofaiss's
    ``max_index_memory_usage``, so one budget string means the same to both tools.
    """
    if text is None or isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse memory size {text!r}; use e.g. 4GB, 512MB, 1G")
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(value * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit])


def format_bytes(n: float) -> str:
    """Human-readable binary size."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


# --------------------------------------------------------------------------------------------
# reading EMB_DIR


def read_embeddings_manifest(embeddings_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``EMB_DIR/embeddings.json``; empty collections are refused here."""
    path = Path(embeddings_dir) / EMBEDDINGS_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an embeddings directory (run embed)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated or altered?): {e}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != EMBEDDINGS_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {EMBEDDINGS_FORMAT!r}")
    for key in ("dim", "count", "parts", "modalities"):
        if key not in manifest:
            raise ValueError(f"{path}: required field {key!r} is missing")
    counted = sum(int(p["count"]) for p in manifest["parts"])
    if counted != manifest["count"]:
        raise ValueError(
            f"{path}: parts' counts sum to {counted} but 'count' is {manifest['count']}"
        )
    if manifest["count"] == 0:
        raise ValueError(f"{path}: the collection is empty (count 0): nothing to index")
    return manifest


@dataclass(frozen=True)
class VectorPart:
    """One ``.npy`` part file of a modality."""

    path: Path
    """The ``.npy`` file (read memory-mapped)."""
    count: int
    """Rows in this part."""
    offset: int
    """Global id of its first row (parts are concatenated in manifest order)."""


def unit_rows(x: np.ndarray) -> np.ndarray:
    """A float32 copy of ``x`` (n, D) with each non-zero row rescaled to unit L2 norm.

    Embeddings are stored L2-normalised, but float16 storage rounds each row's norm to within
    ~1e-4 of 1: indexed as read, an item scored against its own (fresh float32) embedding gave
    1.00007 for a cosine similarity. Every vector that enters an index or its ground truth goes
    through here, so inner products are cosines of unit vectors.
    """
    x = np.asarray(x, dtype=np.float32)  # (n, D); may be a read-only memory map
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)  # zero rows stay zero


class VectorSource:
    """The vectors of one modality: memory-mapped part files addressed by global row id,
    read as float32 unit rows (:func:`unit_rows`).

    Nothing here reads more than one chunk (or the requested rows) into RAM at a time.
    """

    def __init__(self, parts: Sequence[VectorPart], dim: int) -> None:
        self.parts = list(parts)
        self.dim = dim
        self.count = sum(p.count for p in self.parts)

    @classmethod
    def from_files(
        cls,
        paths: Sequence[str | os.PathLike[str]],
        dim: int | None = None,
        counts: Sequence[int] | None = None,
    ) -> VectorSource:
        """Open part files (headers only), checking 2-D shape, float dtype, dim and counts."""
        parts: list[VectorPart] = []
        offset = 0
        for i, p in enumerate(paths):
            path = Path(p)
            if not path.is_file():
                raise FileNotFoundError(f"embedding part file missing: {path}")
            arr = np.load(path, mmap_mode="r")
            if arr.ndim != 2:
                raise ValueError(f"{path}: expected a 2-D (n, dim) array, got shape {arr.shape}")
            if arr.dtype not in (np.float16, np.float32):
                raise ValueError(f"{path}: dtype {arr.dtype} is not float16/float32")
            if dim is None:
                dim = int(arr.shape[1])
            if arr.shape[1] != dim:
                raise ValueError(
                    f"{path}: dimension {arr.shape[1]} does not match the collection's {dim}"
                )
            if counts is not None and arr.shape[0] != counts[i]:
                raise ValueError(
                    f"{path}: {arr.shape[0]} rows but {EMBEDDINGS_MANIFEST} lists {counts[i]}"
                )
            parts.append(VectorPart(path=path, count=int(arr.shape[0]), offset=offset))
            offset += int(arr.shape[0])
        if dim is None:
            raise ValueError("no embedding part files given")
        return cls(parts, dim)

    @staticmethod
    def _map(part: VectorPart) -> np.ndarray:
        return np.load(part.path, mmap_mode="r")  # (count, D) float16/float32, memory-mapped

    def iter_chunks(
        self, chunk_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_id, x)`` with ``x`` (<= chunk_size, D) float32 for ids [start, stop)."""
        stop = self.count if stop is None else stop
        for part in self.parts:
            lo, hi = max(start, part.offset), min(stop, part.offset + part.count)
            if lo >= hi:
                continue
            arr = self._map(part)
            for a in range(lo, hi, chunk_size):
                b = min(a + chunk_size, hi)
                x = np.ascontiguousarray(arr[a - part.offset : b - part.offset], dtype=np.float32)
                yield a, unit_rows(x)  # (b - a, D) float32

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any order) as (len(ids), D) float32, read from the mapped parts."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        for part in self.parts:
            lo = np.searchsorted(sorted_ids, part.offset)
            hi = np.searchsorted(sorted_ids, part.offset + part.count)
            if lo < hi:
                # sorted fancy indexing on a memmap touches only the pages of those rows
                out[order[lo:hi]] = self._map(part)[sorted_ids[lo:hi] - part.offset]
        return unit_rows(out)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """A seeded random sample of ``min(n, count)`` distinct rows, (n, D) float32."""
        rng = np.random.default_rng(seed)
        n = min(n, self.count)
        ids = np.sort(rng.choice(self.count, size=n, replace=False))
        return self.take(ids)


def open_vectors(
    embeddings_dir: str | os.PathLike[str],
    modality: str,
    manifest: Mapping[str, Any] | None = None,
) -> VectorSource:
    """The memory-mapped vectors of ``modality`` ("image" or "text") in ``embeddings_dir``."""
    d = Path(embeddings_dir)
    manifest = manifest or read_embeddings_manifest(d)
    if modality not in EMB_LAYOUT:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(EMB_LAYOUT)}")
    if modality not in manifest["modalities"]:
        raise ValueError(
            f"{d / EMBEDDINGS_MANIFEST} has no {modality!r} embeddings "
            f"(modalities: {manifest['modalities']})"
        )
    folder, prefix = EMB_LAYOUT[modality]
    parts = manifest["parts"]
    paths = [d / folder / f"{prefix}_{p['part']}.npy" for p in parts]
    return VectorSource.from_files(
        paths, dim=int(manifest["dim"]), counts=[int(p["count"]) for p in parts]
    )


def write_concatenated_metadata(
    embeddings_dir: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    out_path: str | os.PathLike[str],
) -> tuple[int, str]:
    """Concatenate ``metadata/metadata_{P}.parquet`` in part order into ``out_path``.

    Streams one part at a time (metadata only, no embeddings), checks each part's row count and
    schema, writes atomically, and returns ``(size_bytes, sha256)``.
    """
    d = Path(embeddings_dir)
    schema = None
    with atomic_output(out_path) as tmp:
        writer: pq.ParquetWriter | None = None
        try:
            for part in manifest["parts"]:
                path = d / "metadata" / f"metadata_{part['part']}.parquet"
                if not path.is_file():
                    raise FileNotFoundError(f"metadata part file missing: {path}")
                table = pq.read_table(path)
                if table.num_rows != int(part["count"]):
                    raise ValueError(
                        f"{path}: {table.num_rows} rows but {EMBEDDINGS_MANIFEST} lists "
                        f"{part['count']} for part {part['part']} (rows must align with the .npy)"
                    )
                if schema is None:
                    schema = table.schema
                    writer = pq.ParquetWriter(str(tmp), schema)
                elif not table.schema.equals(schema):
                    try:
                        table = table.cast(schema)
                    except (ValueError, TypeError) as e:
                        raise ValueError(
                            f"{path}: schema {table.schema} differs from the first part's {schema}"
                        ) from e
                assert writer is not None
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
    return store.file_record(out_path)


# --------------------------------------------------------------------------------------------
# choosing the index


@dataclass(frozen=True)
class IndexPlan:
    """What to build for one collection and why."""

    kind: str
    """One of :data:`KINDS`."""
    factory: str
    """The FAISS ``index_factory`` string (metric: inner product)."""
    estimated_bytes: int
    """Estimated size of the index in RAM / on disk."""
    reason: str
    """Why this kind and size (printed and stored in index.json)."""
    nlist: int | None = None
    """IVF cells (IVF kinds)."""
    search_param: str | None = None
    """The FAISS ParameterSpace name tuned for recall: nprobe, efSearch, or None (exact)."""


def default_nlist(count: int) -> int:
    """Power of two nearest 4*sqrt(N), at most N/39 (FAISS wants >= 39 training points/cell)."""
    target = 4.0 * math.sqrt(count)
    nlist = 2 ** round(math.log2(max(target, 1.0)))
    while nlist > 1 and nlist * 39 > count:
        nlist //= 2
    return max(nlist, 1)


def _pq_m_choices(dim: int) -> list[int]:
    """PQ byte counts that divide ``dim`` (largest first), at least 2 dims per sub-quantizer."""
    return [m for m in range(dim // 2, 0, -1) if dim % m == 0 and m in _PQ_M_OK]


# FAISS has fast PQ distance kernels for these sub-quantizer counts.
_PQ_M_OK = {1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96, 128, 192, 256}


def estimate_bytes(
    kind: str,
    count: int,
    dim: int,
    nlist: int = 0,
    hnsw_m: int = 32,
    pq_m: int = 0,
    opq: bool = False,
    pq_nbits: int = 8,
) -> int:
    """Estimated index size in bytes (codes + ids + graph/quantizer + trained tables)."""
    quantizer = nlist * dim * 4
    ids = 8 * count  # IVF stores int64 ids next to the codes
    if kind == "flat":
        return count * dim * 4
    if kind == "hnsw":
        # base layer 2M int32 links; upper layers add ~1/(M-1) of that; plus level bookkeeping
        links = 2 * hnsw_m * 4 * (1 + 1 / max(hnsw_m - 1, 1))
        return int(count * (dim * 4 + links + 12))
    if kind == "ivf_flat":
        return count * dim * 4 + ids + quantizer
    if kind == "ivf_sqfp16":
        return count * dim * 2 + ids + quantizer
    if kind == "ivf_sq8":
        return count * dim + ids + quantizer + 2 * dim * 4
    if kind == "ivf_pq":
        pq_tables = (1 << pq_nbits) * dim * 4
        code = (pq_m * pq_nbits + 7) // 8
        return count * code + ids + quantizer + pq_tables + (dim * dim * 4 if opq else 0)
    raise ValueError(f"unknown kind {kind!r}")


def _ivf_factory(kind: str, dim: int, nlist: int, pq_m: int, opq: bool, nbits: int = 8) -> str:
    # Beyond ~32k cells a flat coarse quantizer dominates query time: use HNSW over centroids.
    coarse = f"IVF{nlist}_HNSW32" if nlist > 32768 else f"IVF{nlist}"
    codes = {"ivf_flat": "Flat", "ivf_sqfp16": "SQfp16", "ivf_sq8": "SQ8"}.get(kind)
    if codes is not None:
        return f"{coarse},{codes}"
    pq = f"PQ{pq_m}" if nbits == 8 else f"PQ{pq_m}x{nbits}"
    return f"OPQ{pq_m},{coarse},{pq}" if opq else f"{coarse},{pq}"


def plan_index(count: int, dim: int, config: BuildConfig) -> IndexPlan:
    """Choose the index kind and factory for ``count`` vectors of ``dim`` under the config.

    auto: exact search for small collections; otherwise IVF with the most precise codes that fit
    the memory budget — SQfp16 (2 bytes/dim), SQ8 (1 byte/dim), OPQ+PQ (M bytes/vector). IVF
    rather than HNSW: it trains on a sample, adds in bounded deterministic chunks, shards and
    merges on disk, and its codes can be much smaller than HNSW's float vectors + graph links.
    An explicit kind that does not fit the budget is an error.
    """
    if count <= 0:
        raise ValueError("the collection is empty (0 vectors): nothing to index")
    kind = normalize_kind(config.kind)
    budget = config.memory_budget
    bstr = format_bytes(budget) if budget is not None else "none"
    nlist = config.nlist or default_nlist(count)
    if nlist > count:
        raise ValueError(f"nlist {nlist} exceeds the number of vectors {count}")
    what = f"{count} x {dim} vectors"

    def fits(nbytes: int) -> bool:
        return budget is None or nbytes <= budget

    def pq_plan(reason_prefix: str) -> IndexPlan | None:
        choices = [config.pq_m] if config.pq_m else _pq_m_choices(dim)
        for m in choices:
            if dim % m:
                raise ValueError(f"pq_m {m} does not divide the dimension {dim}")
            est = estimate_bytes(
                "ivf_pq", count, dim, nlist=nlist, pq_m=m, opq=config.opq, pq_nbits=config.pq_nbits
            )
            if fits(est):
                return IndexPlan(
                    kind="ivf_pq",
                    factory=_ivf_factory("ivf_pq", dim, nlist, m, config.opq, config.pq_nbits),
                    estimated_bytes=est,
                    nlist=nlist,
                    search_param="nprobe",
                    reason=(
                        f"{reason_prefix}IVF{nlist} + {'OPQ-rotated ' if config.opq else ''}"
                        f"PQ{m}x{config.pq_nbits} ({m * config.pq_nbits / 8:g} bytes/vector) "
                        f"needs ~{format_bytes(est)} <= budget {bstr}; "
                        "PQ codes lose precision, so recall may plateau below the target"
                    ),
                )
        return None

    if kind != "auto":
        if kind == "ivf_pq":
            plan = pq_plan(f"--kind ivf_pq for {what}: ")
            if plan is None:
                raise ValueError(
                    f"--kind ivf_pq does not fit the memory budget {bstr} for {what} even with "
                    f"the smallest PQ (ids alone take {format_bytes(8 * count)})"
                )
            return plan
        est = estimate_bytes(kind, count, dim, nlist=nlist, hnsw_m=config.hnsw_m)
        if not fits(est):
            raise ValueError(
                f"--kind {kind} needs ~{format_bytes(est)} for {what}, over the memory budget "
                f"{bstr}; raise --memory-budget or use --kind auto"
            )
        if kind == "flat":
            return IndexPlan("flat", "Flat", est, f"--kind flat: exact search over {what}")
        if kind == "hnsw":
            return IndexPlan(
                "hnsw",
                f"HNSW{config.hnsw_m},Flat",
                est,
                f"--kind hnsw: HNSW{config.hnsw_m} graph over float32 vectors ({what})",
                search_param="efSearch",
            )
        return IndexPlan(
            kind,
            _ivf_factory(kind, dim, nlist, 0, False),
            est,
            f"--kind {kind}: IVF{nlist} ({what}), ~{format_bytes(est)}",
            nlist=nlist,
            search_param="nprobe",
        )

    # auto
    flat_est = estimate_bytes("flat", count, dim)
    sharded = config.num_shards is not None and config.num_shards > 1
    if count <= config.flat_max_count and fits(flat_est) and not sharded:
        return IndexPlan(
            "flat",
            "Flat",
            flat_est,
            f"auto: {what} <= {config.flat_max_count}: exact search is fast at this size "
            f"(~{format_bytes(flat_est)}, recall 1.0)",
        )
    for kind, why in (
        (
            "ivf_sqfp16",
            "float16 codes (2 bytes/dim): near-lossless (exact for float16 embeddings), so "
            "recall is limited only by nprobe",
        ),
        (
            "ivf_sq8",
            "8-bit codes (1 byte/dim, per-dimension ranges): high recall at half the size of "
            "float16",
        ),
    ):
        est = estimate_bytes(kind, count, dim, nlist=nlist)
        if fits(est):
            return IndexPlan(
                kind,
                _ivf_factory(kind, dim, nlist, 0, False),
                est,
                (
                    f"auto: {what}"
                    + (
                        f" > {config.flat_max_count} (exact search too slow)"
                        if fits(flat_est)
                        else f"; exact search would need {format_bytes(flat_est)} > budget {bstr}"
                    )
                    + f"; IVF{nlist} (~4*sqrt(N) cells, scan nprobe of them) with {why}: "
                    f"~{format_bytes(est)} <= budget {bstr}"
                ),
                nlist=nlist,
                search_param="nprobe",
            )
    sq8 = estimate_bytes("ivf_sq8", count, dim, nlist=nlist)
    plan = pq_plan(f"auto: {what}; IVF-SQ8 would need {format_bytes(sq8)} > budget {bstr}, so ")
    if plan is None:
        raise ValueError(
            f"memory budget {bstr} is too small for {what}: even the smallest IVF-PQ needs "
            f"~{format_bytes(estimate_bytes('ivf_pq', count, dim, nlist, pq_m=1))} "
            f"(ids alone take {format_bytes(8 * count)})"
        )
    return plan


# --------------------------------------------------------------------------------------------
# GPU


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


class _Gpu:
    """Lazily created FAISS GPU resources, shared by the steps of one build."""

    def __init__(self) -> None:
        self._res: Any = None

    @property
    def res(self) -> Any:
        if self._res is None:
            self._res = faiss.StandardGpuResources()
        return self._res

    def flat(self, dim: int, metric: int) -> faiss.Index:
        return faiss.index_cpu_to_gpu(self.res, 0, faiss.IndexFlat(dim, metric))

    def copy(self, index: faiss.Index) -> faiss.Index:
        return faiss.index_cpu_to_gpu(self.res, 0, index)


# --------------------------------------------------------------------------------------------
# train / add / exact search / tune


def train_sample_size(plan: IndexPlan, count: int, config: BuildConfig) -> int:
    """Rows used to train: ``train_points_per_cell`` per IVF cell (PQ: >= 40 per PQ centroid)."""
    if plan.kind in ("flat", "hnsw"):
        return 0
    want = config.train_points_per_cell * (plan.nlist or 1)
    if plan.kind == "ivf_pq":
        want = max(want, 40 << config.pq_nbits)  # each sub-quantizer has 2**nbits centroids
    return min(count, max(want, 1000), max(config.max_train_points, 1000))


def train_index(
    plan: IndexPlan,
    source: VectorSource,
    config: BuildConfig,
    gpu: _Gpu | None = None,
    log: Log = print,
) -> faiss.Index:
    """A trained, empty index for ``plan`` (quantizers fit on a seeded sample of ``source``)."""
    index = faiss.index_factory(source.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = config.ef_construction
    if index.is_trained:
        return index
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
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
            ivfpq.do_polysemous_training = False
    clustering_index = None  # must outlive train(): SWIG does not keep it alive for us
    if ivf is not None and gpu is not None:
        # k-means assignment on the GPU; the trained centroids land in the CPU quantizer.
        clustering_index = gpu.flat(ivf.d, ivf.metric_type)
        ivf.clustering_index = clustering_index
    index.train(x)
    if ivf is not None:
        ivf.clustering_index = None
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
        for i in range(index.chain.size()):
            xt = index.chain.at(i).apply(xt)
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
    gpu: _Gpu | None = None,
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


def exact_knn(
    source: VectorSource,
    queries: np.ndarray,
    k: int = 10,
    chunk_size: int = 65_536,
    gpu: _Gpu | None = None,
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
    """|approx top-k ∩ exact top-k| / k, averaged over queries (PEERS.md's recall@10)."""
    f = found[:, :k]
    t = truth[:, :k]
    hits = (f[:, :, None] == t[:, None, :]) & (f[:, :, None] >= 0)  # (nq, k, k)
    return float(hits.any(axis=2).sum(axis=1).mean() / k)


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

    If the target is out of reach (lossy codes), the smallest setting within 0.002 of the best
    recall seen is kept, and ``reached`` is False.
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
    if name == "nprobe":
        lo_v, hi_v = 1, int(plan.nlist or 1)
    else:  # efSearch: at least k candidates, and a generous ceiling
        lo_v, hi_v = k, max(4096, k)
    v, prev = lo_v, None
    while True:
        if measure(v) >= target_recall:
            break
        if v >= hi_v:
            best = max(cache.values())
            chosen = min(x for x, r in cache.items() if r >= best - 0.002)
            return TuneResult({name: chosen}, cache[chosen], False, curve)
        prev, v = v, min(v * 2, hi_v)
    # bisect (prev fails, v passes) for the smallest passing value
    lo, hi = (prev, v) if prev is not None else (v, v)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(mid) >= target_recall:
            hi = mid
        else:
            lo = mid
    ps.set_index_parameter(index, name, float(hi))
    curve.sort(key=lambda c: c[name])
    return TuneResult({name: hi}, cache[hi], True, curve)


# --------------------------------------------------------------------------------------------
# building one modality and the whole directory


@dataclass
class Queries:
    """Tuning queries for one index and how they were obtained (stored in index.json)."""

    vectors: np.ndarray
    """(nq, D) float32 query vectors — never rows of the indexed collection itself."""
    description: str
    """e.g. "text embeddings (cross-modal)" or "held-out queries (file.npy)"."""


def build_modality_index(
    source: VectorSource,
    queries: Queries,
    index_dir: str | os.PathLike[str],
    name: str,
    config: BuildConfig,
    log: Log = print,
) -> dict[str, Any]:
    """Plan, train, add, tune and write ``{name}.index``; return its index.json entry."""
    t_start = time.perf_counter()
    use_gpu = resolve_use_gpu(config.use_gpu)
    plan = plan_index(source.count, source.dim, config)
    if use_gpu and plan.kind == "hnsw" and config.use_gpu:
        raise ValueError("--kind hnsw has no FAISS GPU build; drop --gpu or choose an IVF kind")
    gpu = _Gpu() if use_gpu and plan.kind != "hnsw" else None
    log(f"[{name}] {plan.reason}")
    log(f"[{name}] factory {plan.factory!r}, device {'GPU' if gpu else 'CPU'}")

    d = Path(index_dir)
    fname = f"{name}.index"
    extra: list[str] = []
    sharded = config.num_shards is not None and config.num_shards > 1
    if sharded and plan.search_param != "nprobe":
        raise ValueError(f"sharded/on-disk builds need an IVF kind, not {plan.kind!r}")

    index = train_index(plan, source, config, gpu=gpu, log=log)
    t0 = time.perf_counter()
    if sharded:
        from . import merge

        assert config.num_shards is not None
        index, extra = merge.build_sharded_on_disk(
            index,
            source,
            d,
            name,
            config.num_shards,
            chunk_size=config.chunk_size,
            gpu=gpu,
            log=log,
        )
    else:
        add_vectors(index, source, config.chunk_size, gpu=gpu, log=log)
        store.write_faiss_index(index, d / fname)
    log(f"  added {index.ntotal} vectors in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    _, truth = exact_knn(source, queries.vectors, 10, config.chunk_size, gpu=gpu)
    tuned = tune_search_params(index, plan, queries.vectors, truth, config.target_recall)
    log(
        f"[{name}] recall@10 {tuned.recall:.4f} with {tuned.params or 'exact search'} "
        f"({len(queries.vectors)} {queries.description}; tuned in "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    if not tuned.reached:
        log(
            f"[{name}] WARNING: target recall@10 {config.target_recall} not reached by "
            f"{plan.kind} (best {tuned.recall:.4f}); a larger --memory-budget allows more "
            "precise codes"
        )
    del index  # release (and unmap) before hashing

    files = [fname, *extra]
    sizes, digests = {}, {}
    for f in files:
        sizes[f], digests[f] = store.file_record(d / f)
    return {
        "file": fname,
        "extra_files": extra,
        "kind": plan.kind,
        "factory": plan.factory,
        "search_params": tuned.params,
        "reason": plan.reason,
        "measured_recall_at_10": round(tuned.recall, 5),
        "target_recall": config.target_recall,
        "target_reached": tuned.reached,
        "recall_queries": queries.description,
        "num_recall_queries": len(queries.vectors),
        "tuning": tuned.curve,
        "nlist": plan.nlist,
        "train_sample": train_sample_size(plan, source.count, config),
        "num_shards": config.num_shards if sharded else None,
        "memory_budget": config.memory_budget,
        "estimated_bytes": plan.estimated_bytes,
        "size_bytes": sum(sizes.values()),
        "file_sizes": sizes,
        "sha256": digests,
        "device": "gpu" if gpu else "cpu",
        "build_seconds": round(time.perf_counter() - t_start, 2),
    }


def _load_queries(value: np.ndarray | str | os.PathLike[str], dim: int) -> Queries:
    if isinstance(value, np.ndarray):
        q, desc = value, "held-out queries (array)"
    else:
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"held-out query file not found: {path}")
        q, desc = np.load(path), f"held-out queries ({path.name})"
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"{desc}: shape {q.shape} does not match dimension {dim}")
    if len(q) == 0:
        raise ValueError(f"{desc}: no query vectors")
    return Queries(np.ascontiguousarray(q, dtype=np.float32), desc)


def run_build(
    embeddings_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    kind: str | None = None,
    memory_budget: str | int | None = None,
    target_recall: float | None = None,
    modalities: Sequence[str] | None = None,
    held_out_queries: Mapping[str, np.ndarray | str | os.PathLike[str]] | None = None,
    num_shards: int | None = None,
    use_gpu: bool | None = None,
    created_by: str | None = None,
    config: BuildConfig | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Build ``INDEX_DIR`` from ``EMB_DIR``: one index per modality + metadata + index.json.

    ``kind``/``memory_budget``/``target_recall``/``num_shards``/``use_gpu`` override ``config``
    when given (the CLI passes its flags here; defaults: auto, no budget, recall 0.95).
    ``modalities`` defaults to all in embeddings.json.
    ``held_out_queries`` maps an indexed modality ("image") to held-out query vectors (array or
    ``.npy`` path) for tuning it; otherwise the other modality's embeddings are the queries
    (cross-modal). Returns the manifest written to ``index.json``.
    """
    base = config or BuildConfig()
    config = BuildConfig(
        **{
            **base.__dict__,
            "kind": normalize_kind(kind) if kind is not None else base.kind,
            "memory_budget": parse_memory_size(memory_budget)
            if memory_budget is not None
            else base.memory_budget,
            "target_recall": target_recall if target_recall is not None else base.target_recall,
            "num_shards": num_shards if num_shards is not None else base.num_shards,
            "use_gpu": use_gpu if use_gpu is not None else base.use_gpu,
        }
    )
    resolve_use_gpu(config.use_gpu)  # fail before any work if a GPU was required but absent
    emb_dir = Path(embeddings_dir)
    manifest = read_embeddings_manifest(emb_dir)
    available = list(manifest["modalities"])
    mods = (
        list(modalities)
        if modalities is not None
        else [m for m in store.MODALITIES if m in available]
    )
    if not mods:
        raise ValueError(f"{emb_dir / EMBEDDINGS_MANIFEST}: no modality to index")
    held_out = dict(held_out_queries or {})
    sources = {m: open_vectors(emb_dir, m, manifest) for m in mods}
    for m in held_out:
        if m not in mods:
            raise ValueError(f"held-out queries given for {m!r}, which is not being indexed")

    # Every input is checked before anything is created: a bad EMB_DIR or query file leaves
    # no INDEX_DIR behind, and an existing index in OUT stays as it was.
    queries = {m: _tuning_queries(m, held_out, manifest, sources, emb_dir, config) for m in mods}
    for part in manifest["parts"]:
        path = emb_dir / "metadata" / f"metadata_{part['part']}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"metadata part file missing: {path}")
    model_record = _checked_model_record(emb_dir, manifest, log)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")

    # Built in a staging folder inside OUT, moved into place file by file when complete.
    created = make_dirs(out)
    _remove_dead_stages(out)
    stage = out / f"{STAGE_PREFIX}{os.getpid()}"
    stage.mkdir()
    try:
        t0 = time.perf_counter()
        meta_size, meta_sha = write_concatenated_metadata(
            emb_dir, manifest, stage / store.METADATA_NAME
        )
        infos = {
            m: build_modality_index(sources[m], queries[m], stage, m, config, log=log) for m in mods
        }
        index_model = None
        if model_record is not None:
            index_model = _copy_model(emb_dir, model_record, stage)
        result = {
            "format": store.INDEX_FORMAT,
            "model_hash": manifest.get("model_hash"),
            "model_source": manifest.get("model_source"),
            # The query model's own copy (INDEX_DIR/model/): what Searcher.open loads by default.
            "model": index_model,
            "dim": int(manifest["dim"]),
            "metric": "inner_product",
            "count": int(manifest["count"]),
            "created_by": created_by,
            "embeddings_dir": str(emb_dir.resolve()),
            "build_seconds": round(time.perf_counter() - t0, 2),
            "metadata": {"file": store.METADATA_NAME, "sha256": meta_sha, "size_bytes": meta_size},
            "modalities": infos,
        }
        store.write_index_manifest(stage, result)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        for d in reversed(created):  # folders this run made, if nothing else is in them
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(e, OutOfSpaceError):
            raise store.out_of_space_at(e, stage, out) from e
        raise
    _install(stage, out)
    log(f"wrote {out / store.MANIFEST_NAME} ({', '.join(f'{m}.index' for m in infos)})")
    return result


STAGE_PREFIX = ".build-tmp-"


def _tuning_queries(
    m: str,
    held_out: Mapping[str, np.ndarray | str | os.PathLike[str]],
    manifest: Mapping[str, Any],
    sources: Mapping[str, VectorSource],
    emb_dir: Path,
    config: BuildConfig,
) -> Queries:
    """The queries that tune modality ``m``'s index: held-out ones, else the other modality's
    embeddings (cross-modal), never the indexed vectors (which would overstate recall)."""
    if m in held_out:
        return _load_queries(held_out[m], int(manifest["dim"]))
    other = "text" if m == "image" else "image"
    if other not in manifest["modalities"]:
        raise ValueError(
            f"cannot tune the {m} index: {emb_dir / EMBEDDINGS_MANIFEST} has no {other} "
            "embeddings for cross-modal queries; pass held-out queries "
            "(the indexed vectors themselves would overstate recall)"
        )
    qsrc = sources[other] if other in sources else open_vectors(emb_dir, other, manifest)
    nq = min(config.tune_queries, qsrc.count)
    return Queries(qsrc.sample(nq, seed=config.seed + 1), f"{other} embeddings (cross-modal)")


def _checked_model_record(emb_dir: Path, manifest: Mapping[str, Any], log: Log) -> dict | None:
    """embeddings.json's record of the weights embed used, its files checked present."""
    rec = manifest.get("model")
    if rec is None:
        log(
            f"note: {emb_dir / EMBEDDINGS_MANIFEST} records no copy of its model (made before "
            "embed kept one): the index will load its model from model_source, "
            f"{manifest.get('model_source')}, which must not change"
        )
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("files"), dict) or not rec["files"]:
        raise ValueError(f"{emb_dir / EMBEDDINGS_MANIFEST}: malformed 'model' record")
    if rec.get("model_hash") != manifest.get("model_hash"):
        raise ValueError(
            f"{emb_dir / EMBEDDINGS_MANIFEST}: the recorded model's hash "
            f"{rec.get('model_hash')} is not the embeddings' {manifest.get('model_hash')}"
        )
    for rel, f in rec["files"].items():
        path = emb_dir / rel
        if not path.is_file() or path.stat().st_size != f.get("size_bytes"):
            raise FileNotFoundError(
                f"{path}: the model the embeddings were made with is missing or resized"
            )
    return rec


def _copy_model(emb_dir: Path, rec: Mapping[str, Any], stage: Path) -> dict[str, Any]:
    """Hard-link (same file system) or copy EMB_DIR's recorded model into the index, checking
    each file's sha256 against embeddings.json (so the index gets exactly those weights)."""
    linked = True
    for rel, f in rec["files"].items():
        linked &= store.link_or_copy(emb_dir / rel, stage / rel)
        size, digest = store.file_record(stage / rel)
        if (size, digest) != (f["size_bytes"], f["sha256"]):
            raise ValueError(
                f"{emb_dir / rel}: sha256 {digest} is not {f['sha256']} recorded in "
                f"{emb_dir / EMBEDDINGS_MANIFEST}: the model was altered since embed"
            )
    return {**rec, "linked": linked}


def _remove_dead_stages(out: Path) -> None:
    """Staging folders of killed builds (their pid is no longer running)."""
    for d in out.glob(f"{STAGE_PREFIX}*"):
        pid = d.name.removeprefix(STAGE_PREFIX)
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def _install(stage: Path, out: Path) -> None:
    """Move a complete build from ``stage`` into ``out``: the old ``index.json`` goes first and
    the new one comes last (so ``out`` is never a manifest over a mix), each file by rename
    (an open memory map of a replaced file stays valid); then files only the old index used."""
    old_files: set[str] = set()
    old_manifest = out / store.MANIFEST_NAME
    if old_manifest.is_file():
        with contextlib.suppress(ValueError, OSError):
            old = store.read_index_manifest(out)
            old_files = {old["metadata"]["file"]}
            for info in old["modalities"].values():
                old_files |= set(info.get("sha256", {}))
            old_files |= set((old.get("model") or {}).get("files", {}))
        old_manifest.unlink()
    new_files = set()
    for path in sorted(stage.rglob("*")):
        if path.is_dir() or (path.name == store.MANIFEST_NAME and path.parent == stage):
            continue
        rel = path.relative_to(stage)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, out / rel)
        new_files.add(rel.as_posix())
    os.replace(stage / store.MANIFEST_NAME, out / store.MANIFEST_NAME)
    shutil.rmtree(stage, ignore_errors=True)
    for rel in sorted(old_files - new_files):
        with contextlib.suppress(OSError):
            (out / rel).unlink()
