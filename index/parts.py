"""A build split into parts run as separate processes (SLURM array tasks, torchrun ranks),
possibly on different machines sharing a file system: ``clipforge-index build --part I/N``.

The scheme is :mod:`.merge`'s sharded build with each shard in its own process:

1. part 0 trains each modality's quantizer/codebooks once and saves the empty trained index
   (``parts/{m}.trained.index``) and then its marker (:class:`TrainedMarker`); parts 1..N-1 wait
   for that marker (:func:`wait_for_trained`, with a timeout that says what it waited for);
2. every part adds its contiguous id range (:func:`.merge.shard_ranges`) to a copy of the trained
   index and writes its own shard of inverted lists, ``parts/{m}.part-I-of-N.index``, by temp
   name + rename, then its completion marker (:class:`IndexPartMarker`) last;
3. ``build --merge-parts`` (one process) checks every part (:func:`checked_part_files`) and
   merges them into the same INDEX_DIR a one-machine ``--num-shards N`` build writes.

Why markers and not just files: a shard file can be complete yet belong to another build (an
older trained quantizer, another EMB_DIR, other flags). Each marker records what its file was
made from, so a re-run keeps exactly the parts that still fit (a killed part has no marker and
is redone alone) and the merge refuses a mix instead of merging incompatible lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from clipforge.data_tools.atomic import write_json_atomic

from . import merge, store
from .emb_dir import EMBEDDINGS_MANIFEST, VectorSource, part_files
from .faiss_ops import GpuResources, Log, train_index
from .plan import BuildConfig, IndexPlan, train_sample_size

PARTS_DIR = "parts"
"""Folder inside INDEX_DIR holding the trained quantizers, shards and markers of a parts build
(removed by a successful merge)."""
TRAINED_FORMAT = "clipforge-index-trained/1"
PART_FORMAT = "clipforge-index-part/1"
# BuildConfig fields that may differ between the steps of one parts build: where a step runs and
# how many rows it reads at once change nothing in what it writes.
_LOCAL_FIELDS = ("use_gpu", "chunk_size")


class PartsError(ValueError):
    """A parts build that cannot go on as asked (the message names the file and what differs)."""


# ----------------------------------------------------------------------------- layout


def parts_dir(out_dir: str | os.PathLike[str]) -> Path:
    """``INDEX_DIR/parts``."""
    return Path(out_dir) / PARTS_DIR


def trained_file(out_dir: str | os.PathLike[str], modality: str) -> Path:
    """The trained, empty index of ``modality`` (its marker is the same name + ``.json``)."""
    return parts_dir(out_dir) / f"{modality}.trained.index"


def part_file(out_dir: str | os.PathLike[str], modality: str, part: int, num_parts: int) -> Path:
    """Part ``part``'s shard of ``modality`` (its marker is the same name + ``.json``)."""
    return parts_dir(out_dir) / f"{modality}.part-{part}-of-{num_parts}.index"


def marker_of(path: Path) -> Path:
    """The completion marker beside a parts file."""
    return path.with_name(path.name + ".json")


def emb_fingerprint(emb_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> str:
    """sha256 identifying an EMB_DIR's contents without reading its vectors: embeddings.json,
    every data file's name and size, and embed's part markers (which hold each file's sha256).

    The path is left out on purpose: machines may mount the shared file system at other paths.
    """
    d = Path(emb_dir)
    h = hashlib.sha256((d / EMBEDDINGS_MANIFEST).read_bytes())
    for p in manifest["parts"]:
        for rel in part_files(int(p["part"]), list(manifest["modalities"])):
            f = d / rel
            h.update(f"{rel}:{f.stat().st_size if f.is_file() else -1};".encode())
        embed_marker = d / "parts" / f"part_{p['part']}.json"
        if embed_marker.is_file():
            h.update(embed_marker.read_bytes())
    return h.hexdigest()


def config_record(config: BuildConfig) -> dict[str, Any]:
    """The build settings every step of a parts build must share (JSON-ready)."""
    return {k: v for k, v in asdict(config).items() if k not in _LOCAL_FIELDS}


def _differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"field: recorded -> current"`` for every setting that differs."""
    keys = sorted(set(recorded) | set(current))
    return [
        f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}"
        for k in keys
        if recorded.get(k) != current.get(k)
    ]


# ----------------------------------------------------------------------------- contracts


def _get(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``data[name]`` checked to be a ``kind`` (bools are not ints); else :class:`PartsError`."""
    if name not in data:
        raise PartsError(f"{where}: required field {name!r} is missing")
    value = data[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise PartsError(f"{where}: field {name!r} has the wrong type ({value!r:.80})")
    return value


def _check_format(data: Any, fmt: str, where: str) -> None:
    if not isinstance(data, dict):
        raise PartsError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != fmt:
        raise PartsError(f"{where}: format {data.get('format')!r} is not {fmt!r}")


@dataclass(frozen=True)
class TrainedMarker:
    """``parts/{m}.trained.index.json``: part 0 trained this modality's quantizer; every part
    starts from that file and every shard records its sha256."""

    modality: str
    """``image`` or ``text``."""
    num_parts: int
    """N of ``--part I/N``: the parts this build is split into."""
    kind: str
    """The planned index kind (an IVF kind)."""
    factory: str
    """The FAISS factory string trained."""
    file: str
    """The trained index file, relative to ``parts/``."""
    size_bytes: int
    """Its size."""
    sha256: str
    """Its sha256 (a part checks it before adding; shards record it)."""
    emb_fingerprint: str
    """:func:`emb_fingerprint` of the EMB_DIR trained from."""
    count: int
    """Vectors of the modality in EMB_DIR (the ids the parts split)."""
    dim: int
    """Their dimension."""
    train_sample: int
    """Vectors the quantizer was trained on."""
    config: dict[str, Any]
    """:func:`config_record` of the build flags (every later step must match)."""
    device: str
    """Where it was trained: ``cpu`` or ``gpu``."""
    train_seconds: float
    """Wall time of the training."""

    def __post_init__(self) -> None:
        if self.num_parts < 1 or self.count < 0 or self.dim < 1 or self.size_bytes < 0:
            raise PartsError(f"trained marker of {self.modality}: bad counts in {self}")

    def to_json(self) -> dict[str, Any]:
        """The marker's JSON object."""
        return {"format": TRAINED_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> TrainedMarker:
        """Parse and check a marker; :class:`PartsError` naming ``where`` and the field."""
        _check_format(data, TRAINED_FORMAT, where)
        types: dict[str, type | tuple[type, ...]] = {
            "config": dict, "train_seconds": (float, int), "device": str, "modality": str,
            "kind": str, "factory": str, "file": str, "sha256": str, "emb_fingerprint": str,
        }  # fmt: skip
        values = {f.name: _get(data, f.name, types.get(f.name, int), where) for f in fields(cls)}
        return cls(**values)


@dataclass(frozen=True)
class IndexPartMarker:
    """``parts/{m}.part-I-of-N.index.json``: part I of ``modality`` is complete (written after
    its shard, so a killed part has none and is redone)."""

    modality: str
    """``image`` or ``text``."""
    part: int
    """I of ``--part I/N``."""
    num_parts: int
    """N."""
    start: int
    """First global id of the part's contiguous range."""
    stop: int
    """One past its last id (ranges are contiguous so merged lists keep ascending ids)."""
    file: str
    """The shard file, relative to ``parts/``."""
    size_bytes: int
    """Its size (a re-run redoes a part whose file has another size)."""
    sha256: str
    """Its sha256 (the merge checks it)."""
    trained_sha256: str
    """sha256 of the trained index the shard started from."""
    emb_fingerprint: str
    """:func:`emb_fingerprint` of the EMB_DIR its vectors came from."""
    device: str
    """Where it was added: ``cpu`` or ``gpu``."""
    add_seconds: float
    """Wall time of the adding."""

    def __post_init__(self) -> None:
        if not 0 <= self.part < self.num_parts:
            raise PartsError(f"part marker: part {self.part} out of range for {self.num_parts}")
        if not 0 <= self.start <= self.stop:
            raise PartsError(f"part marker: bad id range [{self.start}, {self.stop})")

    def to_json(self) -> dict[str, Any]:
        """The marker's JSON object."""
        return {"format": PART_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> IndexPartMarker:
        """Parse and check a marker; :class:`PartsError` naming ``where`` and the field."""
        _check_format(data, PART_FORMAT, where)
        strs = {"modality", "file", "sha256", "trained_sha256", "emb_fingerprint", "device"}
        values = {
            f.name: _get(
                data,
                f.name,
                str if f.name in strs else (float, int) if f.name == "add_seconds" else int,
                where,
            )
            for f in fields(cls)
        }
        try:
            return cls(**values)
        except PartsError as e:
            raise PartsError(f"{where}: {e}") from e


def _read_json(path: Path) -> Any | None:
    """The JSON in ``path``; None when it is missing or unreadable (half-copied, say)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


# ----------------------------------------------------------------------------- training once


def read_trained(out_dir: str | os.PathLike[str], modality: str) -> TrainedMarker | None:
    """The trained marker of ``modality``, or None while there is none (or none readable)."""
    path = marker_of(trained_file(out_dir, modality))
    data = _read_json(path)
    return None if data is None else TrainedMarker.from_json(data, str(path))


def check_trained(
    marker: TrainedMarker,
    out_dir: str | os.PathLike[str],
    num_parts: int,
    fingerprint: str,
    config: BuildConfig,
) -> None:
    """Refuse to go on from a trained quantizer made for another build (N, EMB_DIR, flags)."""
    where = marker_of(trained_file(out_dir, marker.modality))
    problems = []
    if marker.num_parts != num_parts:
        problems.append(f"it was trained for {marker.num_parts} parts, this step has {num_parts}")
    if marker.emb_fingerprint != fingerprint:
        problems.append("it was trained from another EMB_DIR (or one changed since)")
    diff = _differences(marker.config, config_record(config))
    if diff:
        problems.append("other build flags: " + "; ".join(diff))
    if problems:
        raise PartsError(
            f"{where}: {'; '.join(problems)}. Give every part and the merge the same "
            f"--embeddings and flags, or remove {parts_dir(out_dir)} to start the build over"
        )


def train_once(
    out_dir: str | os.PathLike[str],
    plan: IndexPlan,
    source: VectorSource,
    modality: str,
    num_parts: int,
    fingerprint: str,
    config: BuildConfig,
    gpu: GpuResources | None,
    log: Log,
) -> tuple[TrainedMarker, bool]:
    """Part 0's step: train ``modality``'s quantizer unless a matching one is already there.

    Returns the marker and whether this call trained (False: kept from an earlier run).
    """
    path = trained_file(out_dir, modality)
    kept = read_trained(out_dir, modality)
    if kept is not None:
        check_trained(kept, out_dir, num_parts, fingerprint, config)
        if path.is_file() and store.file_record(path) == (kept.size_bytes, kept.sha256):
            log(f"[{modality}] kept the trained quantizer {path}")
            return kept, False
    t0 = time.perf_counter()
    index = train_index(plan, source, config, gpu=gpu, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    merge.save_trained(index, path)
    size, digest = store.file_record(path)
    marker = TrainedMarker(
        modality=modality,
        num_parts=num_parts,
        kind=plan.kind,
        factory=plan.factory,
        file=path.name,
        size_bytes=size,
        sha256=digest,
        emb_fingerprint=fingerprint,
        count=source.count,
        dim=source.dim,
        train_sample=train_sample_size(plan, source.count, config),
        config=config_record(config),
        device="gpu" if gpu else "cpu",
        train_seconds=round(time.perf_counter() - t0, 2),
    )
    write_json_atomic(marker_of(path), marker.to_json())  # last: the others wait for it
    return marker, True


def wait_for_trained(
    out_dir: str | os.PathLike[str],
    modality: str,
    timeout_s: float,
    poll_s: float = 5.0,
    log: Log = print,
) -> TrainedMarker:
    """Parts 1..N-1: wait until part 0's trained marker of ``modality`` appears (and its file
    matches it); :class:`TimeoutError` saying what was awaited after ``timeout_s``."""
    path = trained_file(out_dir, modality)
    deadline = time.monotonic() + timeout_s
    told = False
    while True:
        marker = read_trained(out_dir, modality)
        # the file is checked too: on a shared file system it may still be arriving
        if (
            marker is not None
            and path.is_file()
            and store.file_record(path) == (marker.size_bytes, marker.sha256)
        ):
            return marker
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"waited {timeout_s:g} s for part 0 to train the {modality} quantizer "
                f"({marker_of(path)} did not appear): run --part 0/N (it trains, the others "
                "wait), or raise --wait-timeout, then re-run this part"
            )
        if not told:
            log(f"[{modality}] waiting for part 0's trained quantizer {marker_of(path)}")
            told = True
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))


# ----------------------------------------------------------------------------- a part's share


def read_part(
    out_dir: str | os.PathLike[str], modality: str, part: int, num_parts: int
) -> IndexPartMarker | None:
    """Part ``part``'s marker when the part is complete: the marker readable and its shard
    present with the recorded size; None otherwise (such a part is redone, not trusted)."""
    path = part_file(out_dir, modality, part, num_parts)
    data = _read_json(marker_of(path))
    if data is None:
        return None
    try:
        marker = IndexPartMarker.from_json(data, str(marker_of(path)))
    except PartsError:
        return None
    if not path.is_file() or path.stat().st_size != marker.size_bytes:
        return None
    return marker


def build_part(
    out_dir: str | os.PathLike[str],
    trained: TrainedMarker,
    source: VectorSource,
    part: int,
    chunk_size: int,
    gpu: GpuResources | None,
    log: Log,
) -> tuple[IndexPartMarker, bool]:
    """Add part ``part``'s id range to the trained index and write its shard + marker, unless a
    complete shard made from the same trained index and EMB_DIR is there already.

    Returns the marker and whether this call built it (False: kept).
    """
    m, n = trained.modality, trained.num_parts
    path = part_file(out_dir, m, part, n)
    start, stop = merge.shard_ranges(source.count, n)[part]
    kept = read_part(out_dir, m, part, n)
    if (
        kept is not None
        and kept.trained_sha256 == trained.sha256
        and kept.emb_fingerprint == trained.emb_fingerprint
        and (kept.start, kept.stop) == (start, stop)
    ):
        log(f"[{m}] part {part}/{n} is complete, kept ({path.name})")
        return kept, False
    marker_of(path).unlink(missing_ok=True)  # no stale marker beside a shard being rewritten
    t0 = time.perf_counter()
    merge.build_shard(
        trained_file(out_dir, m), source, part, n, path, chunk_size=chunk_size, gpu=gpu
    )
    size, digest = store.file_record(path)
    marker = IndexPartMarker(
        modality=m,
        part=part,
        num_parts=n,
        start=start,
        stop=stop,
        file=path.name,
        size_bytes=size,
        sha256=digest,
        trained_sha256=trained.sha256,
        emb_fingerprint=trained.emb_fingerprint,
        device="gpu" if gpu else "cpu",
        add_seconds=round(time.perf_counter() - t0, 2),
    )
    write_json_atomic(marker_of(path), marker.to_json())
    log(f"[{m}] part {part}/{n}: ids [{start}, {stop}) added in {marker.add_seconds:.1f} s")
    return marker, True


# ----------------------------------------------------------------------------- the merge


def checked_part_files(
    out_dir: str | os.PathLike[str], trained: TrainedMarker
) -> list[IndexPartMarker]:
    """Every part's marker of ``trained.modality``, each shard verified (size, sha256, the same
    trained index and EMB_DIR); one :class:`PartsError` listing every part that is not."""
    m, n = trained.modality, trained.num_parts
    ranges = merge.shard_ranges(trained.count, n)
    missing: list[int] = []
    wrong: list[str] = []
    markers = []
    for p in range(n):
        path = part_file(out_dir, m, p, n)
        marker = read_part(out_dir, m, p, n)
        if marker is None:
            missing.append(p)
            continue
        if marker.trained_sha256 != trained.sha256:
            wrong.append(f"{marker_of(path)} was built from another trained quantizer")
        elif marker.emb_fingerprint != trained.emb_fingerprint:
            wrong.append(f"{marker_of(path)} was built from another EMB_DIR")
        elif (marker.start, marker.stop) != ranges[p]:
            wrong.append(f"{marker_of(path)} holds ids [{marker.start}, {marker.stop}), not "
                         f"[{ranges[p][0]}, {ranges[p][1]})")  # fmt: skip
        elif store.file_record(path)[1] != marker.sha256:
            wrong.append(f"{path} is altered (sha256 differs from its marker)")
        else:
            markers.append(marker)
    problems = []
    if missing:
        redo = ", ".join(f"--part {p}/{n}" for p in missing)
        problems.append(
            f"{m}: part(s) {', '.join(map(str, missing))} of {n} missing or incomplete "
            f"in {parts_dir(out_dir)}: run {redo}"
        )
    if wrong:
        problems.append(
            f"{m}: " + "; ".join(wrong) + " (re-run those parts with the same flags to redo them)"
        )
    if problems:
        raise PartsError("cannot merge the parts: " + " | ".join(problems))
    return markers


def trained_index_path(out_dir: str | os.PathLike[str], trained: TrainedMarker) -> Path:
    """The trained index file of a marker, checked against its recorded size and sha256."""
    path = trained_file(out_dir, trained.modality)
    if not path.is_file() or store.file_record(path) != (trained.size_bytes, trained.sha256):
        raise PartsError(f"{path} is missing or altered since part 0 trained it")
    return path
