"""The index directory: writing FAISS index files with checksums, and loading them back verified.

Layout of ``INDEX_DIR`` (the contract shared with embed/searcher/cli)::

    index.json         manifest: model, dim, metric, count, per-modality index description
    metadata.parquet   all parts' metadata concatenated in id order (id = global row number)
    image.index        FAISS index built from the image embeddings (text -> image search)
    text.index         FAISS index built from the text embeddings (image -> text search)
    *.ivfdata          on-disk inverted lists of a merged (sharded) index, if any
    model/             the exact query-model weights the embeddings were made with (an open_clip
                       export: open_clip_config.json + open_clip_pytorch_model.bin), so the index
                       stays searchable when its run is trained further or its checkpoint pruned

Every file that :func:`open_index` loads is checked against the size and sha256 recorded in
``index.json`` first, so a truncated, altered or missing file fails with
:class:`IndexIntegrityError` naming the file instead of a crash (or silently wrong results) inside
FAISS.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import faiss
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.data_tools.atomic import (
    OutOfSpaceError,
    atomic_output,
    temp_path_for,
    write_json_atomic,
)
from clipforge.data_tools.shardformat import sha256_file

INDEX_FORMAT = "clipforge-index/1"
MANIFEST_NAME = "index.json"
METADATA_NAME = "metadata.parquet"
MODALITIES = ("image", "text")
MODEL_DIR = "model"


class IndexIntegrityError(ValueError):
    """An index directory file is missing, truncated, altered, or the manifest is malformed."""


# index.json's modality entries: field -> the JSON types it may hold. float fields take JSON
# integers too (json writes 1.0 as 1.0, but a hand-written file may say 1).
_ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "file": (str,),
    "extra_files": (list,),
    "kind": (str,),
    "factory": (str,),
    "search_params": (dict,),
    "reason": (str,),
    "measured_recall_at_10": (float, int),
    "target_recall": (float, int),
    "target_reached": (bool,),
    "recall_queries": (str,),
    "num_recall_queries": (int,),
    "tuning": (list,),
    "nlist": (int,),
    "train_sample": (int,),
    "num_shards": (int,),
    "memory_budget": (int,),
    "estimated_bytes": (int,),
    "size_bytes": (int,),
    "file_sizes": (dict,),
    "sha256": (dict,),
    "device": (str,),
    "build_seconds": (float, int),
}
_ENTRY_REQUIRED = ("file", "sha256")


@dataclass(frozen=True)
class ModalityIndexEntry:
    """One modality's entry of ``index.json["modalities"]``: its files and how it was built.

    Only ``file`` and ``sha256`` are required on load (what opening the index needs); the rest
    describe the build and are None (or empty) in entries written without them.
    """

    file: str
    """The FAISS index file, relative to INDEX_DIR (``image.index`` / ``text.index``)."""
    sha256: dict[str, str]
    """sha256 of every file of this index (``file`` and ``extra_files``)."""
    extra_files: tuple[str, ...] = ()
    """Files the index refers to besides ``file``: the ``.ivfdata`` of an on-disk merge."""
    kind: str | None = None
    """The index kind (``flat``, ``hnsw``, ``ivf_sqfp16``, ...; see :mod:`.plan`)."""
    factory: str | None = None
    """The FAISS ``index_factory`` string."""
    search_params: dict[str, float] = field(default_factory=dict)
    """Tuned FAISS ParameterSpace settings applied on load, e.g. ``{"nprobe": 12}``."""
    reason: str | None = None
    """Why this kind and size were chosen (the plan's reason)."""
    measured_recall_at_10: float | None = None
    """recall@10 against exact search with ``search_params``, on the tuning queries."""
    target_recall: float | None = None
    """The recall@10 the tuning aimed for."""
    target_reached: bool | None = None
    """Whether ``measured_recall_at_10`` reached ``target_recall``."""
    recall_queries: str | None = None
    """What the tuning queries were (cross-modal embeddings or a held-out file)."""
    num_recall_queries: int | None = None
    """How many tuning queries."""
    tuning: tuple[dict[str, float], ...] = ()
    """Every setting tried with its recall."""
    nlist: int | None = None
    """IVF cells (IVF kinds)."""
    train_sample: int | None = None
    """Vectors the quantizer was trained on (0: nothing to train)."""
    num_shards: int | None = None
    """Shards of a sharded on-disk build (None: built in RAM)."""
    memory_budget: int | None = None
    """The build's memory budget in bytes (None: none)."""
    estimated_bytes: int | None = None
    """The plan's size estimate."""
    size_bytes: int | None = None
    """Total size of the index's files."""
    file_sizes: dict[str, int] = field(default_factory=dict)
    """Size of every file of this index (checked before its sha256)."""
    device: str | None = None
    """Where it was trained and filled: ``cpu`` or ``gpu``."""
    build_seconds: float | None = None
    """Wall time of this modality's build."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in index.json (its keys in the order they have always had)."""
        out: dict[str, Any] = {}
        for name in _ENTRY_TYPES:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> ModalityIndexEntry:
        """Parse and check an entry; :class:`IndexIntegrityError` naming ``where`` (the file
        and the modality) and the bad field otherwise. Unknown keys are ignored."""
        if not isinstance(data, Mapping):
            raise IndexIntegrityError(f"{where}: expected an object, got {type(data).__name__}")
        for name in _ENTRY_REQUIRED:
            if name not in data:
                raise IndexIntegrityError(f"{where}: required field {name!r} is missing")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data or (data[f.name] is None and f.name not in _ENTRY_REQUIRED):
                continue
            value, types = data[f.name], _ENTRY_TYPES[f.name]
            bad_bool = isinstance(value, bool) and bool not in types
            if not isinstance(value, types) or bad_bool:
                want = " or ".join(t.__name__ for t in types)
                raise IndexIntegrityError(
                    f"{where}: field {f.name!r} must be {want}, got {value!r:.80}"
                )
            values[f.name] = tuple(value) if isinstance(value, list) else value
        for name in (values["file"], *values.get("extra_files", ())):
            if not isinstance(name, str) or name not in values["sha256"]:
                raise IndexIntegrityError(f"{where}: field 'sha256' has no entry for {name!r}")
        return cls(**values)


@dataclass
class OpenIndex:
    """One modality's index loaded from an index directory, ready to search."""

    index: faiss.Index
    """The FAISS index with the tuned search parameters (nprobe/efSearch/...) already applied."""
    info: dict[str, Any]
    """The modality's entry of ``index.json["modalities"]`` as stored (kind, factory, ...)."""
    manifest: dict[str, Any]
    """The whole ``index.json``."""
    metadata: pa.Table
    """``metadata.parquet``: row ``i`` describes index id ``i``."""
    entry: ModalityIndexEntry
    """``info`` parsed and checked (read this one: its fields are typed)."""


def file_record(path: str | os.PathLike[str]) -> tuple[int, str]:
    """``(size_bytes, sha256)`` of a file, as stored in ``index.json``."""
    return os.path.getsize(path), sha256_file(path)


def verify_file(
    path: str | os.PathLike[str], expected_sha256: str, expected_size: int | None = None
) -> None:
    """Raise :class:`IndexIntegrityError` naming ``path`` unless it exists with this size/sha256.

    The size is compared first: a truncated file is then reported as such (cheaply) rather than as
    a generic checksum mismatch.
    """
    p = Path(path)
    if not p.is_file():
        raise IndexIntegrityError(f"index file missing: {p}")
    size = p.stat().st_size
    if expected_size is not None and size != expected_size:
        raise IndexIntegrityError(
            f"index file {p} is {size} bytes, index.json records {expected_size}: "
            f"{'truncated' if size < expected_size else 'altered'} file"
        )
    actual = sha256_file(p)
    if actual != expected_sha256:
        raise IndexIntegrityError(
            f"index file {p} is altered: sha256 {actual} != {expected_sha256} recorded in "
            f"{MANIFEST_NAME}"
        )


def read_index_manifest(index_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and sanity-check ``INDEX_DIR/index.json`` (format, required fields)."""
    path = Path(index_dir) / MANIFEST_NAME
    if not path.is_file():
        raise IndexIntegrityError(f"not a clipforge index directory: {path} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexIntegrityError(f"{path} is not valid JSON (truncated or altered?): {e}") from e
    if not isinstance(manifest, dict):
        raise IndexIntegrityError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    fmt = manifest.get("format")
    if fmt != INDEX_FORMAT:
        raise IndexIntegrityError(f"{path}: format {fmt!r} is not {INDEX_FORMAT!r}")
    for name in ("dim", "count", "metric", "metadata", "modalities"):
        if name not in manifest:
            raise IndexIntegrityError(f"{path}: required field {name!r} is missing")
    if not isinstance(manifest["modalities"], dict) or not manifest["modalities"]:
        raise IndexIntegrityError(f"{path}: 'modalities' must be a non-empty object")
    for name, info in manifest["modalities"].items():
        ModalityIndexEntry.from_json(info, f"{path}: modalities.{name}")  # checked on load
    return manifest


def write_index_manifest(index_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Write ``index.json`` atomically (written last, so its presence marks a complete index)."""
    path = Path(index_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


def link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> bool:
    """Put ``src``'s bytes at ``dst`` (replaced atomically): a hard link when both are on one
    file system (no space used), else a copy. Returns True when linked.

    A link shares the file, not a name: the writers that replace ``src`` later (a re-export of
    a run's ``model/``) rename a new file over it, which leaves the linked bytes as they were.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another file system (EXDEV), or one without hard links: copy
        with atomic_output(dst) as out:
            shutil.copyfile(src, out)
        return False
    os.replace(tmp, dst)
    return True


def files_record(root: str | os.PathLike[str], rels: list[str]) -> dict[str, dict[str, Any]]:
    """``{rel: {"size_bytes", "sha256"}}`` of files under ``root`` (as manifests store them)."""
    out: dict[str, dict[str, Any]] = {}
    for rel in rels:
        size, digest = file_record(Path(root) / rel)
        out[rel] = {"size_bytes": size, "sha256": digest}
    return out


def out_of_space_at(
    e: OutOfSpaceError, staging: str | os.PathLike[str], final: str | os.PathLike[str]
) -> OutOfSpaceError:
    """``e`` re-addressed from a file in the ``staging`` folder to its place under ``final``:
    the user is told the name they asked for, not a temporary one."""
    try:
        rel = Path(e.path).relative_to(staging)
    except ValueError:
        return e
    return OutOfSpaceError(Path(final) / rel, e.free_bytes, e.written_bytes)


def write_faiss_index(index: faiss.Index, path: str | os.PathLike[str]) -> tuple[int, str]:
    """Write ``index`` to ``path`` via a temp name + rename; return ``(size_bytes, sha256)``."""
    with atomic_output(path) as tmp:
        faiss.write_index(index, str(tmp))
    return file_record(path)


def apply_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set search-time parameters (``nprobe``, ``efSearch``, ``k_factor_rf``, ...) on ``index``.

    Uses FAISS's ``ParameterSpace`` names, which reach through wrappers such as
    ``IndexPreTransform`` (OPQ) and ``IndexRefine`` to the index that owns the parameter.
    """
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            ps.set_index_parameter(index, name, float(value))
        except RuntimeError as e:
            raise ValueError(
                f"search parameter {name}={value!r} does not apply to {type(index).__name__}: {e}"
            ) from e


def modality_info(manifest: dict[str, Any], modality: str) -> dict[str, Any]:
    """The manifest entry for ``modality``, with an error listing the indexed ones otherwise."""
    mods = manifest["modalities"]
    if modality not in mods:
        raise ValueError(
            f"index has no {modality!r} modality; it indexes {sorted(mods)} "
            f"({'image.index' if modality == 'image' else 'text.index'} was not built)"
        )
    return mods[modality]


def modality_entry(manifest: dict[str, Any], modality: str) -> ModalityIndexEntry:
    """:func:`modality_info` parsed into its typed contract."""
    info = modality_info(manifest, modality)
    return ModalityIndexEntry.from_json(info, f"{MANIFEST_NAME}: modalities.{modality}")


def verify_index_dir(
    index_dir: str | os.PathLike[str], modalities: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Verify metadata and the index files of ``modalities`` (all if None); return the manifest."""
    d = Path(index_dir)
    manifest = read_index_manifest(d)
    meta = manifest["metadata"]
    verify_file(d / meta["file"], meta["sha256"], meta.get("size_bytes"))
    for name in modalities if modalities is not None else tuple(manifest["modalities"]):
        entry = modality_entry(manifest, name)
        for fname, digest in entry.sha256.items():
            verify_file(d / fname, digest, entry.file_sizes.get(fname))
    return manifest


def _read_faiss(path: Path, mmap: bool, on_disk: bool) -> faiss.Index:
    flags = 0
    if mmap:
        # IO_FLAG_MMAP maps inverted lists / flat codes instead of copying them into RAM.
        flags |= faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    if on_disk:
        # The merged index records its .ivfdata path as written; SAME_DIR resolves it next to the
        # .index file so the index directory can be moved or copied.
        flags |= faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:  # checksums passed, so this is a FAISS version/format problem
        raise IndexIntegrityError(f"FAISS cannot read {path}: {e}") from e


def contiguous(table: pa.Table) -> pa.Table:
    """``table`` with one chunk per column. A parquet file reads as one chunk per row group,
    and ``take`` on a chunked column concatenates its chunks first: at 10M rows (80 chunks)
    every search's metadata lookup cost 38 ms, 0.07 ms on the combined table. String columns
    too large for 32-bit offsets become ``large_string`` (the values read the same)."""
    try:
        return table.combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowCapacityError):
        wide = pa.schema(
            [f.with_type(pa.large_string()) if f.type == pa.string() else f for f in table.schema]
        )
        return table.cast(wide).combine_chunks()


def open_index(
    index_dir: str | os.PathLike[str],
    modality: str = "image",
    mmap: bool = False,
    verify: bool = True,
) -> OpenIndex:
    """Load ``modality``'s index and the metadata from ``index_dir``, verifying checksums.

    ``mmap=True`` memory-maps the index data instead of reading it into RAM (an index with on-disk
    inverted lists, ``extra_files`` non-empty, is always memory-mapped). ``verify=False`` skips the
    sha256 pass (sizes are still checked) for callers that verified the directory already.
    A memory-mapped index must not be rewritten in place while open (SIGBUS); clipforge's own
    writers replace files by rename, which leaves open mappings intact.
    """
    d = Path(index_dir)
    manifest = read_index_manifest(d)
    info = modality_info(manifest, modality)
    entry = modality_entry(manifest, modality)
    sizes = entry.file_sizes
    files = [entry.file, *entry.extra_files]
    meta = manifest["metadata"]
    to_check = [(d / f, entry.sha256[f], sizes.get(f)) for f in files]
    to_check.append((d / meta["file"], meta["sha256"], meta.get("size_bytes")))
    for path, digest, size in to_check:
        if verify:
            verify_file(path, digest, size)
        elif not path.is_file() or (size is not None and path.stat().st_size != size):
            raise IndexIntegrityError(f"index file {path} is missing or has the wrong size")

    index = _read_faiss(d / entry.file, mmap=mmap, on_disk=bool(entry.extra_files))
    if index.ntotal != manifest["count"]:
        raise IndexIntegrityError(
            f"{d / entry.file} holds {index.ntotal} vectors, index.json count is "
            f"{manifest['count']}"
        )
    if index.d != manifest["dim"]:
        raise IndexIntegrityError(
            f"{d / entry.file} has dimension {index.d}, index.json dim is {manifest['dim']}"
        )
    apply_search_params(index, entry.search_params)
    metadata = contiguous(pq.read_table(d / meta["file"], memory_map=True))
    if metadata.num_rows != manifest["count"]:
        raise IndexIntegrityError(
            f"{d / meta['file']} has {metadata.num_rows} rows, index.json count is "
            f"{manifest['count']}"
        )
    return OpenIndex(index=index, info=info, manifest=manifest, metadata=metadata, entry=entry)
