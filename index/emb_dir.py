"""The embeddings directory, ``EMB_DIR``: its layout, its contracts, and reading it back.

``index embed`` writes it and ``index build`` reads it; both use the names and records here, so
the writer never depends on the reader (nor the other way round)::

    img_emb/img_emb_{P}.npy         (n_P, D) float16|float32, L2-normalised image embeddings
    text_emb/text_emb_{P}.npy       (n_P, D) caption embeddings, row i = the same sample
    metadata/metadata_{P}.parquet   key, caption, shard, member, offset, size, source (row-aligned)
    parts/part_{P}.json             completion marker of part P (:class:`PartMarker`, written last)
    model/                          the exact weights embedded with (open_clip export), by rank 0
    embeddings.json                 written at the end by rank 0 from the markers

This is the layout clip-retrieval and autofaiss use, cut into parts so that many ranks can write
it and a restarted run keeps what is complete. Reading never loads a whole modality into RAM:
:class:`VectorSource` memory-maps the part files and hands out chunks, rows or a seeded sample.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.data_tools.atomic import atomic_output

from . import store

log = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "clipforge-embeddings/1"
EMBEDDINGS_MANIFEST = "embeddings.json"
# modality -> (folder, file prefix) in EMB_DIR
EMB_LAYOUT = {"image": ("img_emb", "img_emb"), "text": ("text_emb", "text_emb")}
PART_FORMAT = "clipforge-embeddings-part/1"
PARTS_DIR = "parts"
METADATA_DIR = "metadata"
MODALITIES = ("image", "text")
DTYPES = ("float16", "float32")
METADATA_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("shard", pa.string()),
        ("member", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("source", pa.string()),
    ]
)


class EmbedError(ValueError):
    """Bad embed input or an ``EMB_DIR`` that cannot be resumed (the message names what)."""


# ----------------------------------------------------------------------------- layout


def part_files(part: int, modalities: Sequence[str]) -> list[str]:
    """Paths (relative to ``EMB_DIR``) of part ``part``'s data files, marker excluded."""
    files = [f"{EMB_LAYOUT[m][0]}/{EMB_LAYOUT[m][1]}_{part}.npy" for m in modalities]
    return [*files, metadata_file(part)]


def metadata_file(part: int) -> str:
    """Path (relative to ``EMB_DIR``) of part ``part``'s metadata table."""
    return f"{METADATA_DIR}/metadata_{part}.parquet"


def marker_path(out_dir: str | os.PathLike[str], part: int) -> Path:
    """The completion marker of part ``part``."""
    return Path(out_dir) / PARTS_DIR / f"part_{part}.json"


def read_member_bytes(shard: str | os.PathLike[str], offset: int, size: int) -> bytes:
    """The ``size`` bytes at ``offset`` of a local shard: an image member by random access
    (the ``shard``/``offset``/``size`` columns of the metadata address it)."""
    if offset < 0 or size < 0:
        raise EmbedError(f"{shard}: no byte offset recorded (remote or compressed shard)")
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise EmbedError(f"{shard}: {size} bytes at offset {offset} requested, {len(data)} read")
    return data


# ----------------------------------------------------------------------------- contracts


def _field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``data[name]`` checked to be a ``kind``; else an :class:`EmbedError` naming file + field."""
    if name not in data:
        raise EmbedError(f"{where}: required field {name!r} is missing")
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise EmbedError(f"{where}: field {name!r} has the wrong type ({value!r})")
    return value


@dataclass(frozen=True)
class EmbedRun:
    """What makes the parts of one embedding run compatible with each other: a complete part
    found in ``EMB_DIR`` is kept only when its marker agrees with the run on every field."""

    dim: int
    """Embedding dimension of the model's towers."""
    dtype: str
    """Storage dtype of the ``.npy`` parts (one of :data:`DTYPES`)."""
    modalities: tuple[str, ...]
    """Which embeddings each part holds (a subset of :data:`MODALITIES`, in that order)."""
    model_hash: str
    """Weights hash of the model that embedded (``pretrain.models.LoadedModel.model_hash``)."""

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise EmbedError(f"embedding run: dim must be >= 1, got {self.dim}")
        if self.dtype not in DTYPES:
            raise EmbedError(f"embedding run: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not self.modalities or any(m not in MODALITIES for m in self.modalities):
            raise EmbedError(f"embedding run: modalities {self.modalities} not in {MODALITIES}")

    def to_json(self) -> dict[str, Any]:
        """The fields as a part marker records them."""
        return {
            "dim": self.dim,
            "dtype": self.dtype,
            "modalities": list(self.modalities),
            "model_hash": self.model_hash,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "embedding run") -> EmbedRun:
        """Read the fields back (from a marker, say), naming ``where`` and the field if bad."""
        return cls(
            dim=_field(data, "dim", int, where),
            dtype=_field(data, "dtype", str, where),
            modalities=tuple(_field(data, "modalities", list, where)),
            model_hash=_field(data, "model_hash", str, where),
        )


@dataclass(frozen=True)
class PartMarker:
    """``parts/part_{P}.json``: part ``P`` is complete (renamed into place after its files)."""

    part: int
    """The part number (its shards are group ``part`` of the shard list)."""
    shards: tuple[str, ...]
    """The part's shards: absolute paths when local, URLs otherwise."""
    count: int
    """Rows in each of the part's files."""
    run: EmbedRun
    """The run it belongs to (dim, dtype, modalities, model)."""
    files: dict[str, dict[str, Any]]
    """``{relative path: {"size_bytes", "sha256"}}`` of its data files."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad samples skipped in the part's shards, by reason."""

    def to_json(self) -> dict[str, Any]:
        """The marker's JSON object (the keys markers have always had)."""
        run = self.run.to_json()
        return {
            "format": PART_FORMAT,
            "part": self.part,
            "shards": list(self.shards),
            "count": self.count,
            "dim": run["dim"],
            "dtype": run["dtype"],
            "modalities": run["modalities"],
            "model_hash": run["model_hash"],
            "skipped": dict(sorted(self.skipped.items())),
            "files": self.files,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> PartMarker:
        """Parse a marker; :class:`EmbedError` naming ``where`` and the bad field otherwise."""
        if not isinstance(data, dict):
            raise EmbedError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != PART_FORMAT:
            raise EmbedError(f"{where}: format {data.get('format')!r} is not {PART_FORMAT!r}")
        files = _field(data, "files", dict, where)
        for rel, rec in files.items():
            if not isinstance(rec, dict) or not isinstance(rec.get("size_bytes"), int):
                raise EmbedError(f"{where}: field 'files' entry {rel!r} has no size_bytes")
        return cls(
            part=_field(data, "part", int, where),
            shards=tuple(_field(data, "shards", list, where)),
            count=_field(data, "count", int, where),
            run=EmbedRun.from_json(data, where),
            files=files,
            skipped=dict(data.get("skipped") or {}),
        )


def read_part_marker(out_dir: str | os.PathLike[str], part: int) -> PartMarker | None:
    """Part ``part``'s marker, or None when the part is not complete (no or unreadable marker,
    or a recorded file missing or of another size): such a part is redone, not trusted."""
    out = Path(out_dir)
    path = marker_path(out, part)
    try:
        marker = PartMarker.from_json(json.loads(path.read_text()), str(path))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        log.warning("%s is unreadable: part %d will be redone", path, part)
        return None
    except EmbedError as e:
        log.warning("%s is not a part marker (%s): part %d will be redone", path, e, part)
        return None
    for rel, rec in marker.files.items():
        f = out / rel
        if not f.is_file() or f.stat().st_size != rec.get("size_bytes"):
            log.warning("%s: %s is missing or resized: part %d will be redone", path, rel, part)
            return None
    return marker


# ----------------------------------------------------------------------------- reading


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
                path = d / metadata_file(part["part"])
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


def iter_parts(
    emb_dir: str | os.PathLike[str],
) -> Iterator[tuple[int, dict[str, np.ndarray], pa.Table]]:
    """``(part, {modality: (n_P, D) array}, metadata)`` for each part of a finished ``EMB_DIR``
    (arrays memory-mapped)."""
    d = Path(emb_dir)
    manifest = json.loads((d / EMBEDDINGS_MANIFEST).read_text())
    for p in manifest["parts"]:
        arrays = {
            m: np.load(d / part_files(p["part"], [m])[0], mmap_mode="r")
            for m in manifest["modalities"]
        }
        yield p["part"], arrays, pq.read_table(d / metadata_file(p["part"]))
