"""Write image-caption sources as webdataset shards (``clipforge-data write``).

Stages: read source rows (main process, cheap) -> group rows into shard tasks (shard ``i`` holds
input rows ``[i*S, (i+1)*S)``) -> keep the tasks of this part (``i % N == I``) -> worker processes
decode, convert, resize, encode and write each shard under a temporary name -> per-shard record,
then rename -> ``manifest.json`` + ``stats.json``.

Error policy: a bad input row never stops the run; it is skipped and counted by reason. Keys are
``<shard:06d><position in shard>``, positions counted over input rows, so keys do not depend on
which rows failed or on the number of workers.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from tqdm import tqdm

from clipforge.data_tools.atomic import atomic_output, remove_stale_temps, write_json_atomic
from clipforge.data_tools.images import (
    IMAGE_FORMATS,
    RESIZE_MODES,
    ImageDecodeError,
    ResizeMode,
    decode_image_sized,
    encode_image,
    resize_image,
    to_rgb,
)
from clipforge.data_tools.outputs import outputs_removed_on_failure
from clipforge.data_tools.shardformat import (
    MANIFEST_NAME,
    STATS_NAME,
    Manifest,
    ManifestError,
    ShardEntry,
    add_member,
    read_manifest,
    sha256_file,
)
from clipforge.data_tools.sources import SourceRow, iter_source
from clipforge.data_tools.stats import StatsAccumulator

log = logging.getLogger(__name__)

RECORDS_DIR = ".clipforge/shards"


@dataclass(frozen=True)
class WriteConfig:
    """Settings of ``clipforge-data write``."""

    image_size: int = 224
    """Target size in pixels (meaning depends on ``resize_mode``)."""
    resize_mode: str = "center_crop"
    """``center_crop`` (square), ``keep_ratio`` (longest side), ``pad`` (square) or ``none``."""
    image_format: str = "jpg"
    """Encoding of the stored images: ``jpg``, ``webp`` or ``png``."""
    quality: int = 95
    """JPEG/WebP quality, 1-100 (PNG is lossless)."""
    min_size: int = 0
    """Skip images whose shorter side (as read) is below this many pixels."""
    shard_size: int = 10000
    """Input rows per shard; the last shard may be smaller, failures make shards smaller."""
    workers: int = 1
    """Worker processes that encode shards in parallel."""
    prefix: str = "shard"
    """Shard file names are ``<prefix>-<index:06d>.tar``."""
    part_index: int = 0
    """This task writes only shards with ``index % part_count == part_index``."""
    part_count: int = 1
    """Number of disjoint parts the input is split into (SLURM array size / world size)."""
    background: tuple[int, int, int] = (255, 255, 255)
    """RGB colour that transparency is composited onto and that ``pad`` fills with."""
    image_column: str | None = None
    """Table column holding image paths (None: guess from common names)."""
    caption_column: str | None = None
    """Table column holding captions (None: guess from common names)."""
    label_from_folder: bool = False
    """Folder sources: store each image's class sub-folder (``cats`` for ``SRC/cats/x.jpg``) in
    its .json as ``category``, the label field ``clipforge-eval zeroshot`` reads."""
    resume: bool = True
    """Keep shards already complete in OUT_DIR instead of rewriting them."""
    log_failures: int = 20
    """How many failed inputs to name in the log (all are counted in stats.json)."""

    def __post_init__(self) -> None:
        problems = []
        if self.image_size <= 0:
            problems.append(f"image_size must be > 0, got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            problems.append(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.image_format not in IMAGE_FORMATS:
            problems.append(f"image_format {self.image_format!r} is not one of {IMAGE_FORMATS}")
        if not 1 <= self.quality <= 100:
            problems.append(f"quality must be in 1..100, got {self.quality}")
        if self.min_size < 0:
            problems.append(f"min_size must be >= 0, got {self.min_size}")
        if self.shard_size <= 0:
            problems.append(f"shard_size must be > 0, got {self.shard_size}")
        if self.workers <= 0:
            problems.append(f"workers must be > 0, got {self.workers}")
        if self.part_count <= 0 or not 0 <= self.part_index < self.part_count:
            problems.append(
                f"part must be I/N with 0 <= I < N, got {self.part_index}/{self.part_count}"
            )
        if not self.prefix or "/" in self.prefix:
            problems.append(f"prefix must be a non-empty file name part, got {self.prefix!r}")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            problems.append(f"background must be 3 values in 0..255, got {self.background}")
        if problems:
            raise ValueError("invalid write config: " + "; ".join(problems))

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def key(self, shard_index: int, position: int) -> str:
        width = max(4, len(str(self.shard_size - 1)))
        return f"{shard_index:06d}{position:0{width}d}"


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_shards` did."""

    manifest: Manifest
    stats: dict[str, Any]
    written: int
    """Shards written by this call."""
    reused: int
    """Complete shards found in OUT_DIR and kept (resume)."""
    manifest_path: Path


def write_shards(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: WriteConfig = WriteConfig(),
    progress: bool = True,
) -> WriteResult:
    """Write ``src`` (a folder or table, see :mod:`sources`) as shards into ``out_dir``.

    A run that fails leaves no folder it created behind unless it holds finished work (complete
    shards, which a re-run keeps)."""
    rows = iter_source(src, config.image_column, config.caption_column, config.label_from_folder)
    # The first row proves the source readable (a missing path, an unknown suffix or column
    # raise here) before anything is created. An empty source is refused as a whole, not per
    # part: a part may get no shard at all (more parts than shards) and still writes its (empty)
    # part manifest, so merge-manifests works.
    first = next(rows, None)
    if first is None:
        raise ValueError(f"source {src} holds no images (nothing to write)")
    with outputs_removed_on_failure() as created:
        created.mkdir(Path(out_dir) / RECORDS_DIR)
        return _write_shards(Path(out_dir), config, progress, first, rows)


def _write_shards(
    out: Path,
    config: WriteConfig,
    progress: bool,
    first: SourceRow,
    rest: Iterator[SourceRow],
) -> WriteResult:
    records: dict[int, dict[str, Any]] = {}
    written = reused = 0
    source = itertools.chain([first], rest)
    bar = tqdm(desc="write", unit="img", disable=not progress, dynamic_ncols=True)
    ctx = multiprocessing.get_context("spawn")  # fork + threads (tqdm) can deadlock
    with ProcessPoolExecutor(max_workers=config.workers, mp_context=ctx) as pool:
        pending: dict[Future[dict[str, Any]], int] = {}

        def collect(done: Iterable[Future[dict[str, Any]]]) -> None:
            for fut in done:
                index = pending.pop(fut)
                record = fut.result()
                records[index] = record
                _log_failures(record, config.log_failures)
                bar.update(record["inputs"])

        for index, rows in _shard_tasks(source, config):
            existing = _complete_record(out, config.shard_name(index)) if config.resume else None
            if existing is not None:
                records[index] = existing
                reused += 1
                bar.update(len(rows))
                continue
            if len(pending) >= 2 * config.workers:  # bounded: rows of few shards in memory
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                collect(done)
            pending[pool.submit(_write_shard, str(out), index, rows, config)] = index
            written += 1
        collect(list(pending))
    bar.close()

    ordered = [records[i] for i in sorted(records)]
    manifest = Manifest(
        tuple(ShardEntry(r["name"], r["samples"], r["bytes"], r["sha256"]) for r in ordered),
        writer={
            k: v
            for k, v in asdict(config).items()
            if k not in ("workers", "resume", "log_failures", "part_index")
        },
    )
    suffix = "" if config.part_count == 1 else f".part-{config.part_index}-of-{config.part_count}"
    manifest_path = out / f"manifest{suffix}.json"
    stats = _stats_from_records(ordered)
    for final in (out / f"stats{suffix}.json", manifest_path):
        remove_stale_temps(final)  # left by a run killed while writing them
    write_json_atomic(out / f"stats{suffix}.json", stats)
    write_json_atomic(manifest_path, manifest.to_json())
    return WriteResult(manifest, stats, written, reused, manifest_path)


def _shard_tasks(
    rows: Iterable[SourceRow], config: WriteConfig
) -> Iterator[tuple[int, list[SourceRow]]]:
    """Group rows into (shard index, rows) for the shards of this part."""
    current: list[SourceRow] = []
    index = 0
    for i, row in enumerate(rows):
        index = i // config.shard_size
        if index % config.part_count == config.part_index:
            current.append(row)
        if (i + 1) % config.shard_size == 0:
            if current:
                yield index, current
            current = []
    if current:
        yield index, current


def _complete_record(out: Path, name: str) -> dict[str, Any] | None:
    """The record of an already complete shard, or None if it must be (re)written."""
    record_path = out / RECORDS_DIR / f"{name}.json"
    shard_path = out / name
    if not (record_path.exists() and shard_path.exists()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("bytes") == shard_path.stat().st_size else None


def _write_shard(
    out_dir: str, index: int, rows: list[SourceRow], config: WriteConfig
) -> dict[str, Any]:
    """Worker: encode one shard's rows into ``<out>/<name>`` atomically; return its record."""
    out = Path(out_dir)
    name = config.shard_name(index)
    # Temp files of a killed earlier run of this shard (this part owns the shard name).
    remove_stale_temps(out / name)
    remove_stale_temps(out / RECORDS_DIR / f"{name}.json")
    acc = StatsAccumulator()
    samples = 0
    with atomic_output(out / name) as tmp_tar:
        with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
            for position, row in enumerate(rows):
                sample = _encode_row(row, config, acc)
                if sample is None:
                    continue
                image_bytes, caption, meta = sample
                key = config.key(index, position)
                meta = {"key": key, **meta}
                add_member(tar, f"{key}.{config.image_format}", image_bytes)
                add_member(tar, f"{key}.txt", caption.encode("utf-8"))
                add_member(
                    tar,
                    f"{key}.json",
                    json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8"),
                )
                samples += 1
        record = {
            "name": name,
            "samples": samples,
            "inputs": len(rows),
            "bytes": tmp_tar.stat().st_size,
            "sha256": sha256_file(tmp_tar),
            "stats": acc.to_state(),
        }
        # The record lands before the shard: a shard under its final name always has a record.
        write_json_atomic(out / RECORDS_DIR / f"{name}.json", record)
    return record


_META_FIELDS = ("key", "source", "original_width", "original_height", "width", "height")


def _encode_row(
    row: SourceRow, config: WriteConfig, acc: StatsAccumulator
) -> tuple[bytes, str, dict[str, Any]] | None:
    """Turn one row into (image bytes, caption, metadata), or count why it cannot be used."""
    if row.error is not None:
        acc.add_failure(row.error, row.source, row.detail)
        return None
    caption = (row.caption or "").strip()
    if not caption:
        acc.add_failure("empty_caption", row.source, "caption is empty")
        return None
    assert row.image_path is not None
    try:
        data = Path(row.image_path).read_bytes()
    except FileNotFoundError:
        acc.add_failure("missing_image", row.source, f"{row.image_path} not found")
        return None
    except OSError as e:
        acc.add_failure("unreadable_image", row.source, f"{type(e).__name__}: {e}")
        return None
    try:
        # JPEGs may be decoded reduced (draft mode): sizes below are the original's, not img.size
        img, (width, height) = decode_image_sized(
            data, draft_size=None if config.resize_mode == "none" else config.image_size
        )
    except ImageDecodeError as e:
        acc.add_failure("corrupt_image", row.source, str(e))
        return None
    original_format = (img.format or "unknown").lower()
    if min(width, height) < config.min_size:
        acc.add_failure("too_small", row.source, f"{width}x{height} < min_size {config.min_size}")
        return None
    try:
        out_img = resize_image(
            to_rgb(img, config.background),
            config.image_size,
            cast(ResizeMode, config.resize_mode),  # checked when the config was built
            config.background,
        )
        image_bytes = encode_image(
            out_img,
            config.image_format,  # type: ignore[arg-type]
            config.quality,
        )
    except (OSError, ValueError) as e:  # e.g. truncated data that only fails on full decode
        acc.add_failure("corrupt_image", row.source, f"{type(e).__name__}: {e}")
        return None
    acc.add_sample(caption, width, height, original_format, len(image_bytes))
    meta: dict[str, Any] = {
        "source": row.source,
        "original_width": width,
        "original_height": height,
        "width": out_img.size[0],
        "height": out_img.size[1],
    }
    clashing = {k: v for k, v in row.extra.items() if k in _META_FIELDS}
    meta.update({k: v for k, v in row.extra.items() if k not in _META_FIELDS})
    if clashing:
        meta["extra"] = clashing
    return image_bytes, caption, meta


def _log_failures(record: dict[str, Any], limit: int) -> None:
    examples = record["stats"]["failure_examples"]
    for ex in examples[:limit]:
        log.warning(
            "%s: skipped %s (%s): %s", record["name"], ex["where"], ex["reason"], ex["detail"]
        )
    failed = sum(record["stats"]["failures"].values())
    if failed > min(limit, len(examples)):
        log.warning("%s: %d inputs skipped in all (see stats.json)", record["name"], failed)


def _stats_from_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    total = StatsAccumulator()
    per_shard = []
    for r in records:
        acc = StatsAccumulator.from_state(r["stats"])
        total.merge(acc)
        per_shard.append(
            {
                "name": r["name"],
                "samples": r["samples"],
                "inputs": r["inputs"],
                "failed": sum(acc.failures.values()),
                "bytes": r["bytes"],
            }
        )
    return {
        "inputs": sum(r["inputs"] for r in records),
        "shards": len(records),
        "bytes": sum(r["bytes"] for r in records),
        **total.summary(),
        "per_shard": per_shard,
    }


def merge_part_manifests(out_dir: str | os.PathLike[str]) -> WriteResult:
    """Join the ``manifest.part-I-of-N.json`` files of ``out_dir`` into ``manifest.json``.

    Fails (naming them) when parts are missing or disagree on N or writer settings.
    """
    out = Path(out_dir)
    part_files = sorted(out.glob("manifest.part-*-of-*.json"))
    if not part_files:
        raise ManifestError(f"{out}: no manifest.part-I-of-N.json files to merge")
    counts: set[int] = set()
    seen: set[int] = set()
    writers: list[dict[str, Any]] = []
    shards: list[ShardEntry] = []
    for path in part_files:
        stem = path.name[len("manifest.part-") : -len(".json")]
        i_str, _, n_str = stem.partition("-of-")
        if not (i_str.isdigit() and n_str.isdigit()):
            raise ManifestError(f"{path}: not a part manifest name (manifest.part-I-of-N.json)")
        counts.add(int(n_str))
        seen.add(int(i_str))
        part = read_manifest(out, path.name)
        assert part is not None
        writers.append(part.writer)
        shards.extend(part.shards)
    if len(counts) != 1:
        raise ManifestError(f"{out}: part files disagree on the number of parts: {sorted(counts)}")
    (n,) = counts
    missing = sorted(set(range(n)) - seen)
    if missing:
        raise ManifestError(f"{out}: parts {missing} of {n} have no manifest yet (not finished?)")
    if any(w != writers[0] for w in writers):
        raise ManifestError(f"{out}: parts were written with different settings")
    shards.sort(key=lambda s: s.name)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ManifestError(f"{out}: the same shard is listed by two parts")
    writer = {k: v for k, v in writers[0].items() if k != "part_count"}
    manifest = Manifest(tuple(shards), writer)
    records = []
    for s in shards:
        record_path = out / RECORDS_DIR / f"{s.name}.json"
        try:
            records.append(json.loads(record_path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ManifestError(f"{record_path}: shard record unreadable ({e})") from None
    stats = _stats_from_records(records)
    write_json_atomic(out / STATS_NAME, stats)
    write_json_atomic(out / MANIFEST_NAME, manifest.to_json())
    return WriteResult(manifest, stats, 0, len(shards), out / MANIFEST_NAME)
