"""Index planning: which FAISS index to build for N vectors of dimension D, its size, and why.

Pure arithmetic over the collection's shape and the :class:`BuildConfig`: nothing here trains,
reads vectors or touches FAISS, so a plan (and its reason, printed and stored in index.json) can
be computed and tested for a billion vectors as cheaply as for a thousand.

The rules of ``--kind auto`` (:func:`plan_index`), and why:

- up to ``flat_max_count`` vectors: exact search. At that size a brute-force scan takes well
  under a millisecond per query and its recall is 1, so an approximate index buys nothing.
- otherwise IVF, never HNSW: IVF trains on a sample, adds in bounded deterministic chunks,
  shards and merges into on-disk lists (:mod:`.merge`), and its codes can be far smaller than
  HNSW's float vectors plus graph links, so one kind scales from RAM to disk.
- the cells: the power of two nearest 4*sqrt(N) (FAISS's guideline: query cost is the coarse
  search over nlist centroids plus the scan of nprobe lists of ~N/nlist vectors, balanced near
  sqrt(N)), at most N/39 so that k-means sees FAISS's minimum of 39 points per centroid.
- the codes: the most precise that fit ``memory_budget``, because precision bounds the recall
  any nprobe can reach: SQfp16 (2 bytes/dim, exact for float16 embeddings), then SQ8 (1
  byte/dim), then OPQ+PQ with the most bits per vector that fit (lossy: recall may plateau).
  PQ spends them on as many sub-quantizers as fit (at least 2 dims each) with 8 to 12 bits a
  code: at 1M x 256 under autofaiss's 170 MiB, PQ128x10 (5 bits a dim) plateaus at recall@10
  0.91 where PQ128x8 stops at 0.84. Codes beyond 8 bits scan ~2.7x slower (FAISS's generic
  decoder, no SIMD kernel), but precision is what caps recall.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

KINDS = ("flat", "hnsw", "ivf_flat", "ivf_sqfp16", "ivf_sq8", "ivf_pq")
# Spellings users may type (the docs once wrote "ivfpq").
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
    """IVF-PQ sub-quantizers (each codes dim/M dims in ``pq_nbits`` bits); None: chosen with
    the bits, the pair with the most bits per vector that fits the budget."""
    pq_nbits: int | None = None
    """Bits per PQ sub-quantizer code (2**nbits centroids each; 8 has the fastest scan, 4
    trains much faster); None: 8 without a budget, else the most of :data:`PQ_NBITS_AUTO`
    that fit it and that the training sample allows (8 to 10 under the default caps)."""
    opq: bool = True
    """Rotate with OPQ before IVF-PQ (cheap at search time, notably better PQ codes)."""
    flat_max_count: int = 20_000
    """auto: collections up to this size use exact search (it is fast enough and recall 1)."""
    train_points_per_cell: int = 40
    """Training sample = this many points per IVF cell (FAISS warns below 39), capped below."""
    max_train_points: int = 200_000
    """Cap on the training sample of the IVF kinds but PQ (k-means cost is sample x nlist x
    dim x iterations); IVF-PQ's is ``max_pq_train_points``."""
    pq_train_points_per_centroid: int = 480
    """IVF-PQ's training sample holds at least this many rows per sub-quantizer centroid
    (2**nbits each): the coarse k-means trains on all of them, FAISS's codebook training on
    256 a centroid of them (its ``max_points_per_centroid``). At 1M x 256, PQ128x10 plateaus
    at recall@10 0.898 with a 163,840-row sample (160 a centroid), 0.911 with 491,520. Auto
    offers more than 8 bits only where the sample can be this large."""
    max_pq_train_points: int = 500_000
    """Cap on IVF-PQ's training sample."""
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
        if self.pq_nbits is not None and not 1 <= self.pq_nbits <= 16:
            raise ValueError(f"pq_nbits must be in 1..16 (FAISS PQ codes), got {self.pq_nbits}")
        for name in ("pq_train_points_per_centroid", "max_pq_train_points", "max_train_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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
    pq_nbits: int = 8
    """Bits per PQ code (ivf_pq): its training sample grows with the 2**nbits centroids."""


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

PQ_NBITS_AUTO = (8, 9, 10, 11, 12)
"""Bits per PQ code that auto chooses from. Beyond 12, a 2-dim sub-quantizer's 8,192+ centroids
make the per-query lookup tables (M x 2**nbits floats) outgrow the CPU caches and k-means
training slow, for little more recall."""


def _pq_choices(count: int, dim: int, config: BuildConfig) -> list[tuple[int, int]]:
    """``(sub-quantizers M, bits a code)`` to try, most bits per vector first (at equal bits,
    more sub-quantizers of fewer bits: the faster scan). Auto offers more than 8 bits only
    under a budget (without one nothing asks for finer, slower codes) and when the training
    sample can give each of the 2**nbits centroids ``pq_train_points_per_centroid`` rows. A
    fixed ``pq_nbits`` that the collection cannot train (fewer rows than centroids) is refused."""
    ms = [config.pq_m] if config.pq_m else _pq_m_choices(dim)
    sample = min(count, config.max_pq_train_points)
    if config.pq_nbits is not None:
        if sample < 1 << config.pq_nbits:
            raise ValueError(
                f"pq_nbits {config.pq_nbits} needs at least {1 << config.pq_nbits} training "
                f"vectors (one per centroid; {config.pq_train_points_per_centroid} each are "
                f"advised) but {count} x {dim} vectors give {sample}; lower pq_nbits"
            )
        nbits: tuple[int, ...] = (config.pq_nbits,)
    elif config.memory_budget is None:
        nbits = (8,)
    else:
        per = config.pq_train_points_per_centroid
        nbits = tuple(b for b in PQ_NBITS_AUTO if b == 8 or per << b <= sample)
    return sorted(((m, b) for m in ms for b in nbits), key=lambda mb: (-mb[0] * mb[1], -mb[0]))


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
    # the coarse centroids, and ~16 bytes a list: its length as written (8), more in RAM (each
    # list's two arrays) and on disk (24 bytes of on-disk list header)
    quantizer = nlist * dim * 4 + nlist * 16
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
    the memory budget — SQfp16 (2 bytes/dim), SQ8 (1 byte/dim), OPQ+PQ (M x nbits / 8 bytes a
    vector) (the module docstring says why). An explicit kind that does not fit the budget is
    an error.
    """
    if count <= 0:
        raise ValueError("the collection is empty (0 vectors): nothing to index")
    shape = _Shape(count, dim, config)
    kind = normalize_kind(config.kind)
    if kind == "auto":
        return _auto_plan(shape)
    return _explicit_plan(kind, shape)


@dataclass(frozen=True)
class _Shape:
    """The collection and the settings every planning rule reads."""

    count: int
    """Vectors to index."""
    dim: int
    """Their dimension."""
    config: BuildConfig
    """The build's settings (kind, budget, nlist, PQ, ...)."""

    def __post_init__(self) -> None:
        if self.nlist > self.count:
            raise ValueError(f"nlist {self.nlist} exceeds the number of vectors {self.count}")

    @property
    def nlist(self) -> int:
        """IVF cells: the configured number, else :func:`default_nlist`."""
        return self.config.nlist or default_nlist(self.count)

    @property
    def what(self) -> str:
        """The collection in words, for reasons and errors."""
        return f"{self.count} x {self.dim} vectors"

    @property
    def budget_str(self) -> str:
        """The memory budget in words."""
        budget = self.config.memory_budget
        return format_bytes(budget) if budget is not None else "none"

    def fits(self, nbytes: int) -> bool:
        """Whether an index of ``nbytes`` is within the memory budget (no budget: always)."""
        return self.config.memory_budget is None or nbytes <= self.config.memory_budget


def _pq_plan(shape: _Shape, reason_prefix: str) -> IndexPlan | None:
    """IVF-PQ with the most bits per vector that fit the budget (None: not even PQ1 fits).
    Every bit more halves a sub-quantizer's cell, so the most bits that fit are the most
    precise codes."""
    config, dim, nlist = shape.config, shape.dim, shape.nlist
    if config.pq_m and dim % config.pq_m:
        raise ValueError(f"pq_m {config.pq_m} does not divide the dimension {dim}")
    for m, nbits in _pq_choices(shape.count, dim, config):
        est = estimate_bytes(
            "ivf_pq", shape.count, dim, nlist=nlist, pq_m=m, opq=config.opq, pq_nbits=nbits
        )
        if shape.fits(est):
            return IndexPlan(
                kind="ivf_pq",
                factory=_ivf_factory("ivf_pq", dim, nlist, m, config.opq, nbits),
                estimated_bytes=est,
                nlist=nlist,
                search_param="nprobe",
                pq_nbits=nbits,
                reason=(
                    f"{reason_prefix}IVF{nlist} + {'OPQ-rotated ' if config.opq else ''}"
                    f"PQ{m}x{nbits} ({(m * nbits + 7) // 8} bytes/vector) "
                    f"needs ~{format_bytes(est)} <= budget {shape.budget_str}; "
                    "PQ codes lose precision, so recall may plateau below the target"
                ),
            )
    return None


def _explicit_plan(kind: str, shape: _Shape) -> IndexPlan:
    """The plan for a ``--kind`` the user named: built as asked, or refused if over budget
    (silently picking another kind would make the flag a suggestion)."""
    config, what, bstr, nlist = shape.config, shape.what, shape.budget_str, shape.nlist
    if kind == "ivf_pq":
        plan = _pq_plan(shape, f"--kind ivf_pq for {what}: ")
        if plan is None:
            raise ValueError(
                f"--kind ivf_pq does not fit the memory budget {bstr} for {what} even with "
                f"the smallest PQ (ids alone take {format_bytes(8 * shape.count)})"
            )
        return plan
    est = estimate_bytes(kind, shape.count, shape.dim, nlist=nlist, hnsw_m=config.hnsw_m)
    if not shape.fits(est):
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
        _ivf_factory(kind, shape.dim, nlist, 0, False),
        est,
        f"--kind {kind}: IVF{nlist} ({what}), ~{format_bytes(est)}",
        nlist=nlist,
        search_param="nprobe",
    )


# The scalar-quantised IVF kinds auto tries, most precise first, with why each is chosen.
_SQ_CHOICES = (
    (
        "ivf_sqfp16",
        "float16 codes (2 bytes/dim): near-lossless (exact for float16 embeddings), so "
        "recall is limited only by nprobe",
    ),
    (
        "ivf_sq8",
        "8-bit codes (1 byte/dim, per-dimension ranges): high recall at half the size of float16",
    ),
)


def _auto_plan(shape: _Shape) -> IndexPlan:
    """``--kind auto``: exact search when small, else IVF with the most precise codes that fit."""
    config, what, bstr, nlist = shape.config, shape.what, shape.budget_str, shape.nlist
    flat_est = estimate_bytes("flat", shape.count, shape.dim)
    sharded = config.num_shards is not None and config.num_shards > 1
    # A sharded build merges IVF lists on disk: a flat index has no lists to merge.
    if shape.count <= config.flat_max_count and shape.fits(flat_est) and not sharded:
        return IndexPlan(
            "flat",
            "Flat",
            flat_est,
            f"auto: {what} <= {config.flat_max_count}: exact search is fast at this size "
            f"(~{format_bytes(flat_est)}, recall 1.0)",
        )
    for kind, why in _SQ_CHOICES:
        est = estimate_bytes(kind, shape.count, shape.dim, nlist=nlist)
        if shape.fits(est):
            too_slow = (
                f" > {config.flat_max_count} (exact search too slow)"
                if shape.fits(flat_est)
                else f"; exact search would need {format_bytes(flat_est)} > budget {bstr}"
            )
            return IndexPlan(
                kind,
                _ivf_factory(kind, shape.dim, nlist, 0, False),
                est,
                f"auto: {what}{too_slow}; IVF{nlist} (~4*sqrt(N) cells, scan nprobe of them) "
                f"with {why}: ~{format_bytes(est)} <= budget {bstr}",
                nlist=nlist,
                search_param="nprobe",
            )
    sq8 = estimate_bytes("ivf_sq8", shape.count, shape.dim, nlist=nlist)
    plan = _pq_plan(
        shape, f"auto: {what}; IVF-SQ8 would need {format_bytes(sq8)} > budget {bstr}, so "
    )
    if plan is None:
        smallest = estimate_bytes("ivf_pq", shape.count, shape.dim, nlist, pq_m=1)
        raise ValueError(
            f"memory budget {bstr} is too small for {what}: even the smallest IVF-PQ needs "
            f"~{format_bytes(smallest)} (ids alone take {format_bytes(8 * shape.count)})"
        )
    return plan


def train_sample_size(plan: IndexPlan, count: int, config: BuildConfig) -> int:
    """Rows used to train: ``train_points_per_cell`` per IVF cell, capped by
    ``max_train_points``; IVF-PQ at least ``pq_train_points_per_centroid`` per PQ centroid,
    capped by ``max_pq_train_points``."""
    if plan.kind in ("flat", "hnsw"):
        return 0
    want = config.train_points_per_cell * (plan.nlist or 1)
    cap = config.max_train_points
    if plan.kind == "ivf_pq":
        # each sub-quantizer has 2**nbits centroids
        want = max(want, config.pq_train_points_per_centroid << plan.pq_nbits)
        cap = config.max_pq_train_points
    return min(count, max(want, 1000), max(cap, 1000))
