"""Build FAISS indexes from an embeddings directory (``EMB_DIR``) into an index directory.

The orchestration only; each step lives in the module of its job. Per modality
(``image.index`` from ``img_emb``, ``text.index`` from ``text_emb``):

1. :func:`.plan.plan_index` picks the index kind (``--kind`` or automatically under
   ``--memory-budget``) and says why;
2. :func:`.faiss_ops.train_index` trains the quantizer(s) on a seeded random sample of the
   vectors, gathered from the memory-mapped part files (:mod:`.emb_dir`; never the whole
   collection in RAM);
3. :func:`.faiss_ops.add_vectors` adds the vectors in chunks read from the memory-mapped parts
   (or, with ``num_shards``, :mod:`.merge` adds them shard by shard against one trained quantizer
   and merges them into on-disk inverted lists, for collections whose index does not fit in RAM);
4. :func:`.tune.tune_search_params` picks the smallest ``nprobe``/``efSearch`` whose recall@10
   against exact search reaches ``--target-recall``, measured with queries that are *not* the
   indexed vectors: the other modality's embeddings (cross-modal: text queries for the image
   index and vice versa) or held-out queries when given;
5. :mod:`.store` writes the index files with sizes and sha256 into ``index.json``
   (:class:`.store.ModalityIndexEntry` per modality).

:func:`run_build` is the whole job (what ``clipforge-index build`` calls): everything is built in
a staging folder inside OUT and moved into place when complete. Split across processes or
machines (:mod:`.parts`): :func:`run_build_part` is one ``--part I/N`` (part 0 trains, every part
adds its id range into its own shard) and :func:`run_merge_parts` is ``--merge-parts``, which
writes the same INDEX_DIR as ``run_build(..., num_shards=N)``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipforge.data_tools.atomic import OutOfSpaceError
from clipforge.data_tools.outputs import make_dirs

from . import merge, parts, store
from .emb_dir import (
    EMBEDDINGS_MANIFEST,
    VectorSource,
    metadata_file,
    open_vectors,
    read_embeddings_manifest,
    write_concatenated_metadata,
)
from .faiss_ops import GpuResources, Log, add_vectors, resolve_use_gpu, train_index
from .plan import (
    BuildConfig,
    IndexPlan,
    normalize_kind,
    parse_memory_size,
    plan_index,
    train_sample_size,
)
from .store import ModalityIndexEntry
from .tune import TuneResult, exact_knn, tune_search_params

STAGE_PREFIX = ".build-tmp-"
"""Staging folders inside OUT are named this + the builder's pid (dead ones are removed)."""


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
) -> ModalityIndexEntry:
    """Plan, train, add, tune and write ``{name}.index``; return its index.json entry."""
    t_start = time.perf_counter()
    use_gpu = resolve_use_gpu(config.use_gpu)
    plan = plan_index(source.count, source.dim, config)
    if use_gpu and plan.kind == "hnsw" and config.use_gpu:
        raise ValueError("--kind hnsw has no FAISS GPU build; drop --gpu or choose an IVF kind")
    # FAISS builds no HNSW on a GPU: an auto-GPU build of --kind hnsw quietly stays on the CPU.
    gpu = GpuResources() if use_gpu and plan.kind != "hnsw" else None
    log(f"[{name}] {plan.reason}")
    log(f"[{name}] factory {plan.factory!r}, device {'GPU' if gpu else 'CPU'}")

    d = Path(index_dir)
    fname = f"{name}.index"
    sharded = _sharded(config)
    if sharded and plan.search_param != "nprobe":
        raise ValueError(f"sharded/on-disk builds need an IVF kind, not {plan.kind!r}")

    index = train_index(plan, source, config, gpu=gpu, log=log)
    index, extra = _fill(index, source, d, name, config, gpu, log)
    tuned = _tune(index, plan, source, queries, name, config, gpu, log)
    del index  # release (and unmap) before hashing

    return _entry(
        d, fname, extra, plan, tuned, queries, config,
        train_sample=train_sample_size(plan, source.count, config),
        num_shards=config.num_shards if sharded else None,
        device="gpu" if gpu else "cpu",
        seconds=time.perf_counter() - t_start,
    )  # fmt: skip


def _entry(
    d: Path,
    fname: str,
    extra: Sequence[str],
    plan: IndexPlan,
    tuned: TuneResult,
    queries: Queries,
    config: BuildConfig,
    *,
    train_sample: int,
    num_shards: int | None,
    device: str,
    seconds: float,
) -> ModalityIndexEntry:
    """The index.json entry of a built ``d/fname`` (+ ``extra`` files), hashing its files."""
    sizes, digests = {}, {}
    for f in [fname, *extra]:
        sizes[f], digests[f] = store.file_record(d / f)
    return ModalityIndexEntry(
        file=fname,
        extra_files=tuple(extra),
        kind=plan.kind,
        factory=plan.factory,
        search_params=dict(tuned.params),
        reason=plan.reason,
        measured_recall_at_10=round(tuned.recall, 5),
        target_recall=config.target_recall,
        target_reached=tuned.reached,
        recall_queries=queries.description,
        num_recall_queries=len(queries.vectors),
        tuning=tuple(tuned.curve),
        nlist=plan.nlist,
        train_sample=train_sample,
        num_shards=num_shards,
        memory_budget=config.memory_budget,
        estimated_bytes=plan.estimated_bytes,
        size_bytes=sum(sizes.values()),
        file_sizes=sizes,
        sha256=digests,
        device=device,
        build_seconds=round(seconds, 2),
    )


def _sharded(config: BuildConfig) -> bool:
    """Whether the build adds shard by shard and merges into on-disk lists."""
    return config.num_shards is not None and config.num_shards > 1


def _fill(
    index: faiss.Index,
    source: VectorSource,
    d: Path,
    name: str,
    config: BuildConfig,
    gpu: GpuResources | None,
    log: Log,
) -> tuple[faiss.Index, list[str]]:
    """Add every vector to the trained ``index`` and write ``d/{name}.index``; return the index
    to tune (the merged one, memory-mapped, when sharded) and the extra files it refers to."""
    t0 = time.perf_counter()
    extra: list[str] = []
    if _sharded(config):
        assert config.num_shards is not None
        index, extra = merge.build_sharded_on_disk(
            index, source, d, name, config.num_shards, chunk_size=config.chunk_size, gpu=gpu,
            log=log,
        )  # fmt: skip
    else:
        add_vectors(index, source, config.chunk_size, gpu=gpu, log=log)
        store.write_faiss_index(index, d / f"{name}.index")
    log(f"  added {index.ntotal} vectors in {time.perf_counter() - t0:.1f} s")
    return index, extra


def _tune(
    index: faiss.Index,
    plan: IndexPlan,
    source: VectorSource,
    queries: Queries,
    name: str,
    config: BuildConfig,
    gpu: GpuResources | None,
    log: Log,
) -> TuneResult:
    """Tune ``index``'s search parameter to the target recall@10 against exact search."""
    t0 = time.perf_counter()
    # The ground truth is exact search over the same unit rows the index holds (emb_dir's
    # unit_rows), so recall measures the index's approximation and nothing else.
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
    return tuned


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
    config = _with_overrides(
        config or BuildConfig(), kind, memory_budget, target_recall, num_shards, use_gpu
    )
    resolve_use_gpu(config.use_gpu)  # fail before any work if a GPU was required but absent
    emb_dir = Path(embeddings_dir)
    inputs = _checked_inputs(emb_dir, config, modalities, dict(held_out_queries or {}), log)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")

    def build_one(
        m: str, source: VectorSource, queries: Queries, stage: Path
    ) -> ModalityIndexEntry:
        return build_modality_index(source, queries, stage, m, config, log=log)

    return _run_staged(emb_dir, out, inputs, created_by, build_one, log)


ModalityBuilder = Callable[[str, VectorSource, Queries, Path], ModalityIndexEntry]
"""Builds modality ``m``'s index from its vectors and tuning queries into a staging folder."""


def _run_staged(
    emb_dir: Path,
    out: Path,
    inputs: _Inputs,
    created_by: str | None,
    build_one: ModalityBuilder,
    log: Log,
) -> dict[str, Any]:
    """Build the whole INDEX_DIR in a staging folder inside ``out``, then install it."""
    # Built in a staging folder inside OUT, moved into place file by file when complete: a
    # failed or killed build leaves an existing index in OUT as it was.
    created = make_dirs(out)
    _remove_dead_stages(out)
    stage = out / f"{STAGE_PREFIX}{os.getpid()}"
    stage.mkdir()
    try:
        result = _build_into(stage, emb_dir, inputs, created_by, build_one, log)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        for d in reversed(created):  # folders this run made, if nothing else is in them
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(e, OutOfSpaceError):
            raise store.out_of_space_at(e, stage, out) from e
        raise
    _install(stage, out)
    built = ", ".join(f"{m}.index" for m in result["modalities"])
    log(f"wrote {out / store.MANIFEST_NAME} ({built})")
    return result


def _with_overrides(
    base: BuildConfig,
    kind: str | None,
    memory_budget: str | int | None,
    target_recall: float | None,
    num_shards: int | None,
    use_gpu: bool | None,
) -> BuildConfig:
    """``base`` with the given (not None) arguments replacing its fields."""
    return BuildConfig(
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


@dataclass(frozen=True)
class _Inputs:
    """Everything a build reads, opened and checked before anything is written."""

    manifest: dict[str, Any]
    """EMB_DIR's embeddings.json."""
    sources: dict[str, VectorSource]
    """The vectors of each modality to index."""
    queries: dict[str, Queries]
    """The tuning queries of each modality to index."""
    model_record: dict[str, Any] | None
    """embeddings.json's record of the model copy in EMB_DIR (None: made before it kept one)."""


def _checked_inputs(
    emb_dir: Path,
    config: BuildConfig,
    modalities: Sequence[str] | None,
    held_out: dict[str, np.ndarray | str | os.PathLike[str]],
    log: Log,
) -> _Inputs:
    """Open and check every input: a bad EMB_DIR or query file then creates nothing at all."""
    manifest = read_embeddings_manifest(emb_dir)
    available = list(manifest["modalities"])
    mods = (
        list(modalities)
        if modalities is not None
        else [m for m in store.MODALITIES if m in available]
    )
    if not mods:
        raise ValueError(f"{emb_dir / EMBEDDINGS_MANIFEST}: no modality to index")
    sources = {m: open_vectors(emb_dir, m, manifest) for m in mods}
    for m in held_out:
        if m not in mods:
            raise ValueError(f"held-out queries given for {m!r}, which is not being indexed")
    queries = {m: _tuning_queries(m, held_out, manifest, sources, emb_dir, config) for m in mods}
    for part in manifest["parts"]:
        path = emb_dir / metadata_file(part["part"])
        if not path.is_file():
            raise FileNotFoundError(f"metadata part file missing: {path}")
    model_record = _checked_model_record(emb_dir, manifest, log)
    return _Inputs(manifest, sources, queries, model_record)


def _build_into(
    stage: Path,
    emb_dir: Path,
    inputs: _Inputs,
    created_by: str | None,
    build_one: ModalityBuilder,
    log: Log,
) -> dict[str, Any]:
    """Write the whole index directory into ``stage``; return its index.json."""
    t0 = time.perf_counter()
    manifest = inputs.manifest
    meta_size, meta_sha = write_concatenated_metadata(
        emb_dir, manifest, stage / store.METADATA_NAME
    )
    entries = {
        m: build_one(m, source, inputs.queries[m], stage) for m, source in inputs.sources.items()
    }
    index_model = None
    if inputs.model_record is not None:
        index_model = _copy_model(emb_dir, inputs.model_record, stage)
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
        "modalities": {m: e.to_json() for m, e in entries.items()},
    }
    store.write_index_manifest(stage, result)
    return result


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
    for name in sorted(old_files - new_files):
        with contextlib.suppress(OSError):
            (out / name).unlink()


# ----------------------------------------------------------------------------- parts builds


@dataclass(frozen=True)
class PartResult:
    """What one ``--part I/N`` run did, per modality."""

    part: int
    """I."""
    num_parts: int
    """N."""
    trained: dict[str, bool]
    """modality -> whether this run trained its quantizer (part 0 only; False: kept)."""
    built: dict[str, bool]
    """modality -> whether this run added the part (False: a complete part was kept)."""
    markers: dict[str, parts.IndexPartMarker]
    """modality -> the part's completion marker."""


def run_build_part(
    embeddings_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    part: int,
    num_parts: int,
    *,
    kind: str | None = None,
    memory_budget: str | int | None = None,
    target_recall: float | None = None,
    modalities: Sequence[str] | None = None,
    held_out_queries: Mapping[str, np.ndarray | str | os.PathLike[str]] | None = None,
    use_gpu: bool | None = None,
    config: BuildConfig | None = None,
    wait_timeout_s: float = 7200.0,
    poll_s: float = 5.0,
    log: Log = print,
) -> PartResult:
    """One part of a build split across processes (``clipforge-index build --part I/N``).

    Part 0 trains each modality's quantizer (kept if a matching one is there already); the
    other parts wait up to ``wait_timeout_s`` for it. Each part then adds its contiguous id
    range into its own shard under ``OUT/parts/`` (kept if complete already). The flags must be
    those every other part and :func:`run_merge_parts` get (checked against part 0's record).
    """
    if not 0 <= part < num_parts:
        raise ValueError(f"--part {part}/{num_parts}: need 0 <= I < N")
    base = config or BuildConfig()
    if base.num_shards not in (None, num_parts):
        raise ValueError(
            f"--num-shards {base.num_shards} contradicts --part {part}/{num_parts} "
            "(a parts build has one shard per part)"
        )
    # plan as an N-shard build, even for N = 1: parts always merge into on-disk lists
    config = _with_overrides(base, kind, memory_budget, target_recall, max(num_parts, 2), use_gpu)
    use = resolve_use_gpu(config.use_gpu)
    emb_dir, out = Path(embeddings_dir), Path(out_dir)
    inputs = _checked_inputs(emb_dir, config, modalities, dict(held_out_queries or {}), log)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    parts.parts_dir(out).mkdir(parents=True, exist_ok=True)
    fingerprint = parts.emb_fingerprint(emb_dir, inputs.manifest)
    gpu = GpuResources() if use else None
    trained_now, built, markers = {}, {}, {}
    for m, source in inputs.sources.items():
        plan = plan_index(source.count, source.dim, config)
        if plan.search_param != "nprobe":
            raise ValueError(f"parts builds need an IVF kind, not {plan.kind!r}")
        if part == 0:
            log(f"[{m}] {plan.reason}")
            trained, trained_now[m] = parts.train_once(
                out, plan, source, m, num_parts, fingerprint, config, gpu, log
            )
        else:
            trained = parts.wait_for_trained(out, m, wait_timeout_s, poll_s, log)
            trained_now[m] = False
        parts.check_trained(trained, out, num_parts, fingerprint, config)
        markers[m], built[m] = parts.build_part(
            out, trained, source, part, config.chunk_size, gpu, log
        )
    return PartResult(part, num_parts, trained_now, built, markers)


def run_merge_parts(
    embeddings_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    kind: str | None = None,
    memory_budget: str | int | None = None,
    target_recall: float | None = None,
    modalities: Sequence[str] | None = None,
    held_out_queries: Mapping[str, np.ndarray | str | os.PathLike[str]] | None = None,
    use_gpu: bool | None = None,
    created_by: str | None = None,
    config: BuildConfig | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Merge the parts of ``OUT/parts/`` into ``OUT`` (``clipforge-index build --merge-parts``).

    Writes what a one-machine ``run_build(..., num_shards=N)`` writes (the same files, byte for
    byte, from the same trained quantizer), then removes ``OUT/parts``. Refuses, naming them,
    parts that are missing or incomplete, or made from another trained quantizer or EMB_DIR,
    and flags that differ from the parts'. Returns the index.json written.
    """
    emb_dir, out = Path(embeddings_dir), Path(out_dir)
    base = config or BuildConfig()
    manifest = read_embeddings_manifest(emb_dir)
    mods = list(modalities) if modalities is not None else [
        m for m in store.MODALITIES if m in manifest["modalities"]
    ]  # fmt: skip
    trained: dict[str, parts.TrainedMarker] = {}
    for m in mods:
        marker = parts.read_trained(out, m)
        if marker is None:
            raise parts.PartsError(
                f"cannot merge the parts: {parts.marker_of(parts.trained_file(out, m))} is "
                f"missing: part 0 has not trained the {m} quantizer (run --part 0/N first)"
            )
        trained[m] = marker
    num_parts = next(iter(trained.values())).num_parts if trained else 1
    config = _with_overrides(
        base, kind, memory_budget, target_recall, base.num_shards or max(num_parts, 2), use_gpu
    )
    use = resolve_use_gpu(config.use_gpu)
    inputs = _checked_inputs(emb_dir, config, mods, dict(held_out_queries or {}), log)
    fingerprint = parts.emb_fingerprint(emb_dir, inputs.manifest)
    shards: dict[str, list[parts.IndexPartMarker]] = {}
    for m, marker in trained.items():
        parts.check_trained(marker, out, num_parts, fingerprint, config)
        shards[m] = parts.checked_part_files(out, marker)
    gpu = GpuResources() if use else None

    def merge_one(
        m: str, source: VectorSource, queries: Queries, stage: Path
    ) -> ModalityIndexEntry:
        t0 = time.perf_counter()
        plan = plan_index(source.count, source.dim, config)
        if plan.factory != trained[m].factory:
            raise parts.PartsError(f"[{m}] planned {plan.factory!r}, part 0 trained "
                                   f"{trained[m].factory!r}")  # fmt: skip
        fname, ivfdata = f"{m}.index", f"{m}.ivfdata"
        files = [parts.parts_dir(out) / s.file for s in shards[m]]
        trained_path = parts.trained_index_path(out, trained[m])
        ntotal = merge.merge_on_disk(trained_path, files, stage / fname, stage / ivfdata)
        if ntotal != source.count:
            raise RuntimeError(f"merged {ntotal} {m} vectors, expected {source.count}")
        log(f"[{m}] merged {num_parts} parts in {time.perf_counter() - t0:.1f} s")
        index = faiss.read_index(
            str(stage / fname), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        )
        tuned = _tune(index, plan, source, queries, m, config, gpu, log)
        del index  # release (and unmap) before hashing
        devices = {trained[m].device, *(s.device for s in shards[m])}
        return _entry(
            stage, fname, [ivfdata], plan, tuned, queries, config,
            train_sample=trained[m].train_sample,
            num_shards=num_parts,
            device=devices.pop() if len(devices) == 1 else "mixed",
            # the compute the index took: training + every part + this merge and tuning
            seconds=trained[m].train_seconds + sum(s.add_seconds for s in shards[m])
            + time.perf_counter() - t0,
        )  # fmt: skip

    result = _run_staged(emb_dir, out, inputs, created_by, merge_one, log)
    shutil.rmtree(parts.parts_dir(out), ignore_errors=True)  # merged: INDEX_DIR as one build's
    return result
