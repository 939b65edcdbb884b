"""Embed a sharded collection with a trained model into ``EMB_DIR`` (the clip-retrieval layout).

The ``EMB_DIR`` layout, its part markers and its readers are :mod:`clipforge.index.emb_dir`
(shared with the build, which reads what this writes).

Parts: the shard list (in SHARDS order) is cut into groups of ``shards_per_part`` shards; part
``P`` is group ``P`` and belongs to rank ``P % world_size``. Numbering depends only on the shard
list, so a restarted run (any number of ranks) finds the parts that are complete -- those with a
marker whose recorded files are present -- and redoes the others from scratch. Every file is
written under a temporary name and renamed, and the marker is renamed into place last, so a part
killed half-way is never taken for a complete one.

Inside a rank, the data-loader workers take whole parts (worker ``w`` of ``W`` reads parts
``w, w+W, ...``), so each part's rows come from one worker in shard order, and skipped samples are
attributed exactly to the part they came from.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data_tools.atomic import (
    TMP_MARKER,
    OutOfSpaceError,
    atomic_output,
    remove_stale_temps,
    write_json_atomic,
)
from clipforge.data_tools.outputs import make_dirs
from clipforge.data_tools.reader import (
    ReaderConfig,
    ShardSource,
    ShardStream,
    SkipCounter,
    iter_tar_samples,
    parse_shard_spec,
)
from clipforge.data_tools.shardformat import (
    IMAGE_MEMBER_EXTENSIONS,
    is_remote,
    read_manifest,
    sha256_file,
)
from clipforge.pretrain.distributed import DistInfo, barrier, init_distributed, shutdown
from clipforge.pretrain.models import (
    OPEN_CLIP_CONFIG_NAME,
    OPEN_CLIP_WEIGHTS_NAME,
    LoadedModel,
    dual_encoder,
    export_open_clip,
    load_model,
    resolve_model_config,
)

from . import store
from .emb_dir import (
    DTYPES,
    EMB_LAYOUT,
    EMBEDDINGS_FORMAT,
    EMBEDDINGS_MANIFEST,
    METADATA_DIR,
    METADATA_SCHEMA,
    MODALITIES,
    PARTS_DIR,
    EmbedError,
    EmbedRun,
    PartMarker,
    iter_parts,
    marker_path,
    metadata_file,
    part_files,
    read_member_bytes,
    read_part_marker,
)

log = logging.getLogger(__name__)

__all__ = [
    "EmbedConfig",
    "EmbedError",
    "EmbedResult",
    "autocast_for",
    "embed",
    "iter_parts",
    "marker_path",
    "model_config",
    "plan_parts",
    "read_member_bytes",
    "read_part_marker",
    "record_model",
    "resolve_device",
    "write_embeddings_manifest",
]


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of one embedding run (``clipforge-index embed`` flags map onto these)."""

    model: str
    """Run directory, ``model/`` folder or checkpoint file (see ``pretrain.models.load_model``)."""
    data: str
    """SHARDS specification (folder, brace pattern, glob, ``::``-joined list)."""
    out: str
    """Output ``EMB_DIR``."""
    dtype: str = "float16"
    """Storage dtype of the embeddings: ``float16`` (half the disk) or ``float32``."""
    batch_size: int = 256
    """Samples per forward pass."""
    workers: int = 2
    """Data-loader processes per rank (decode + resize); capped at the number of parts to do."""
    modalities: tuple[str, ...] = MODALITIES
    """Which embeddings to write: ``image``, ``text`` or both."""
    device: str = "auto"
    """``auto`` (the rank's GPU if any, else CPU), ``cpu`` or ``cuda``; cuda absent is an error."""
    shards_per_part: int = 1
    """Shards per part file (the unit of resume and of work per rank)."""
    model_name: str | None = None
    """open_clip model name/config JSON, only for a bare weights file without config."""
    progress: str = "auto"
    """``auto`` (a bar on a TTY, plain lines otherwise), ``bar``, ``lines`` or ``none``."""
    overwrite: bool = False
    """Redo every part even when ``EMB_DIR`` holds complete ones (e.g. from another model)."""
    dist_timeout_s: int = 24 * 3600
    """Process-group timeout: ranks that finish early wait this long at the final barrier."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise EmbedError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise EmbedError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise EmbedError(f"workers must be >= 0, got {self.workers}")
        if self.shards_per_part < 1:
            raise EmbedError(f"shards_per_part must be >= 1, got {self.shards_per_part}")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if not self.modalities or bad or len(set(self.modalities)) != len(self.modalities):
            raise EmbedError(
                f"modalities must be a non-empty subset of {MODALITIES}, got {self.modalities}"
            )
        if self.progress not in ("auto", "bar", "lines", "none"):
            raise EmbedError(f"progress must be auto|bar|lines|none, got {self.progress!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise EmbedError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class EmbedResult:
    """What one rank did (``manifest`` is set on rank 0 only)."""

    out_dir: Path
    """The ``EMB_DIR``."""
    parts_written: tuple[int, ...]
    """Parts this rank embedded in this run."""
    parts_kept: tuple[int, ...]
    """This rank's parts found complete and skipped (resume)."""
    samples: int
    """Samples this rank embedded in this run."""
    seconds: float
    """Wall time of this rank's embedding loop (model loading excluded)."""
    skipped: dict[str, int]
    """Bad samples skipped by this rank in this run, by reason."""
    manifest: dict[str, Any] | None = None
    """The ``embeddings.json`` written (rank 0), else None."""
    world_size: int = 1
    """Ranks in the job."""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- layout helpers


def plan_parts(shards: Sequence[str], shards_per_part: int = 1) -> list[tuple[str, ...]]:
    """Cut the shard list into parts, in order: part ``P`` = shards ``[P*s, (P+1)*s)``."""
    if shards_per_part < 1:
        raise EmbedError(f"shards_per_part must be >= 1, got {shards_per_part}")
    return [tuple(shards[i : i + shards_per_part]) for i in range(0, len(shards), shards_per_part)]


def _shard_id(url: str) -> str:
    """How a shard is named in metadata and markers: absolute path when local, URL otherwise."""
    return url if is_remote(url) else os.path.abspath(url)


# ----------------------------------------------------------------------------- the stream


class _PartStream(IterableDataset):
    """The reader's stream, iterated part by part: worker ``w`` reads whole parts ``w::W``.

    Runs the reader's decoding, skip policy and batching (:meth:`ShardStream.batches`) on each
    part's shards, so embedding sees exactly the samples training and eval see. Batches never
    span parts; after each part comes an end marker ``{"part_end": P, "members": ...}`` with
    the tar member offsets of its shards (scanned in the worker, off the model's critical path).
    Whole parts per worker (not the reader's shard-per-worker split) so that each part's rows
    come from one worker in shard order and its skipped samples are counted against it.
    """

    def __init__(
        self,
        parts: Sequence[tuple[int, tuple[str, ...]]],
        image_transform: Callable[[Any], torch.Tensor],
        batch_transform: Callable[[torch.Tensor], torch.Tensor] | None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None,
        batch_size: int,
        sample_counts: dict[str, int | None] | None = None,
    ) -> None:
        super().__init__()
        urls = tuple(u for _, shards in parts for u in shards)
        self.expected = dict(sample_counts or {})
        """Manifest sample count per shard URL (None or absent: unknown)."""
        self.reader = ShardStream(
            [ShardSource(urls)],
            image_transform,
            batch_transform,
            tokenizer,
            ReaderConfig(batch_size),
        )
        """Decodes and batches each part's samples (its own shard split is not used)."""
        self.parts = list(parts)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        config = self.reader.config
        for part, shards in self.parts[worker::num_workers]:
            skips = SkipCounter(config.on_error)
            members: dict[str, list[tuple[str, str, int, int]] | None] = {}
            raw = (
                s
                for url in shards
                for s in _recording_members(url, skips, members, self.expected.get(url))
            )
            seed = (config.seed, 0, part, 0)  # eval transforms draw nothing; kept stable
            for batch in self.reader.batches(raw, skips, worker, 0, seed):
                batch["part"] = part
                yield batch
            yield {"part_end": part, "members": members, "skipped": skips.take()}


def _recording_members(
    url: str,
    skips: SkipCounter,
    members: dict[str, list[tuple[str, str, int, int]] | None],
    expected: int | None = None,
) -> Iterator[Any]:
    """The reader's raw samples of one shard, recording ``(key, image member, data offset,
    size)`` of each on the way (``("", -1, -1)`` for a sample without an image; the shard's
    list is None for remote or compressed shards, which have no byte offsets), so the tar is
    read once for both the samples and their offsets."""
    scan: list[tuple[str, str, int, int]] = []
    members[url] = scan
    for sample in iter_tar_samples(url, skips, expected):
        ext = next((e for e in IMAGE_MEMBER_EXTENSIONS if e in sample.offsets), None)
        name, offset, size = sample.offsets[ext] if ext is not None else ("", -1, -1)
        if offset < 0 and ext is not None:
            members[url] = None  # not a local plain tar: no random access
        scan.append((sample.key, name, offset, size))
        yield sample


# ----------------------------------------------------------------------------- one part


@dataclass
class _PartBuffer:
    """Rows of one part accumulated until its end marker arrives."""

    image: list[np.ndarray] = field(default_factory=list)
    text: list[np.ndarray] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return len(self.keys)

    def add(self, batch: dict[str, Any], emb: dict[str, np.ndarray]) -> None:
        """Append one batch's rows: its (B, D) embeddings and its metadata."""
        if "image" in emb:
            self.image.append(emb["image"])
        if "text" in emb:
            self.text.append(emb["text"])
        self.keys.extend(batch["key"])
        self.captions.extend(batch["caption"])
        self.urls.extend(batch["url"])
        self.sources.extend(_source(m) for m in batch["meta"])


def _metadata_table(
    buf: _PartBuffer, members: dict[str, list[tuple[str, str, int, int]] | None]
) -> pa.Table:
    """The part's metadata rows, each matched to its tar member by walking the header scan."""
    cursor = dict.fromkeys(members, 0)
    member_col, offset_col, size_col = [], [], []
    for key, url in zip(buf.keys, buf.urls, strict=True):
        scan = members.get(url)
        found = ("", -1, -1)
        if scan is not None:
            i = cursor[url]
            while i < len(scan) and scan[i][0] != key:
                i += 1
            if i < len(scan):
                found = scan[i][1:]
                cursor[url] = i + 1
        member_col.append(found[0])
        offset_col.append(found[1])
        size_col.append(found[2])
    return pa.table(
        {
            "key": buf.keys,
            "caption": buf.captions,
            "shard": [_shard_id(u) for u in buf.urls],
            "member": member_col,
            "offset": offset_col,
            "size": size_col,
            "source": buf.sources,
        },
        schema=METADATA_SCHEMA,
    )


def _save_npy(path: Path, array: np.ndarray) -> None:
    # Serialised in memory, then written by Python's file object: np.save into a real file
    # uses fwrite, whose full-disk failure is an errno-less "N requested and M written" that
    # atomic_output could not tell from any other error; a Python write raises ENOSPC.
    buf = io.BytesIO()
    np.save(buf, array)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())


def _write_part(
    out: Path,
    part: int,
    shards: tuple[str, ...],
    buf: _PartBuffer,
    members: dict[str, Any],
    run: EmbedRun,
) -> PartMarker:
    """Write part ``part``'s files atomically, then its marker; return the marker. If any
    write fails (a full disk), the part's files this call already wrote are removed: a part is
    all its files and its marker, or nothing."""
    try:
        return _write_part_files(out, part, shards, buf, members, run)
    except BaseException:
        for rel in part_files(part, run.modalities):
            (out / rel).unlink(missing_ok=True)
        raise


def _write_part_files(
    out: Path,
    part: int,
    shards: tuple[str, ...],
    buf: _PartBuffer,
    members: dict[str, Any],
    run: EmbedRun,
) -> PartMarker:
    dim, dtype = run.dim, np.dtype(run.dtype)
    arrays = {
        "image": np.concatenate(buf.image) if buf.image else np.zeros((0, dim), np.float32),
        "text": np.concatenate(buf.text) if buf.text else np.zeros((0, dim), np.float32),
    }
    files: dict[str, dict[str, Any]] = {}
    for m in run.modalities:
        rel = part_files(part, [m])[0]
        arr = arrays[m].astype(dtype)  # (n_P, D)
        if arr.shape != (buf.count, dim):
            raise RuntimeError(f"part {part}: {m} array {arr.shape} != ({buf.count}, {dim})")
        _save_npy(out / rel, arr)
        files[rel] = {}
    meta_rel = metadata_file(part)
    table = _metadata_table(buf, members)
    with atomic_output(out / meta_rel) as tmp:
        pq.write_table(table, tmp)
    files[meta_rel] = {}
    for rel in files:
        files[rel] = {"size_bytes": (out / rel).stat().st_size, "sha256": sha256_file(out / rel)}
    marker = PartMarker(
        part=part,
        shards=tuple(_shard_id(u) for u in shards),
        count=buf.count,
        run=run,
        files=files,
        skipped=dict(buf.skipped),
    )
    # last: the part is now complete
    write_json_atomic(marker_path(out, part), marker.to_json())
    return marker


def _check_marker(
    marker: PartMarker, out: Path, part: int, shards: tuple[str, ...], run: EmbedRun
) -> None:
    """A complete part of another run (other shards, model, dtype, modalities) is an error:
    mixing it in would silently produce a collection no single run made."""
    where = f"{marker_path(out, part)}"
    found = marker.to_json()
    expected = {"shards": [_shard_id(u) for u in shards], **run.to_json()}
    for name in ("shards", "model_hash", "dtype", "modalities", "dim"):
        if found[name] != expected[name]:
            raise EmbedError(
                f"{where}: this EMB_DIR holds a part made with {name}={found[name]!r}, this "
                f"run has {name}={expected[name]!r}; use another --out, or --overwrite to redo "
                "every part"
            )


# ----------------------------------------------------------------------------- progress


class _Progress:
    """samples/s on a tqdm bar (TTY) or as a plain line every ``every_s`` seconds."""

    def __init__(
        self, mode: str, total: int | None, enabled: bool, label: str, every_s: float = 10.0
    ) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.total = total
        self.every_s = every_s
        self.label = label
        self.n = 0
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc=label, unit="sample", unit_scale=True, dynamic_ncols=True
            )

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.mode == "lines" and now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self.t0, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        print(f"{self.label}: {self.n}{of} samples, {rate:.1f} samples/s", file=sys.stderr,
              flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines":
            self._line(time.perf_counter())


# ----------------------------------------------------------------------------- the run


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when visible else ``cpu``; asking for CUDA without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmbedError(f"--device {device} was asked but no CUDA device is visible")
    return device


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on GPUs (tensor-core speed; embeddings are normalised in float32 after)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _encode_batch(
    loaded: LoadedModel,
    batch: dict[str, Any],
    modalities: Sequence[str],
    device: torch.device,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None,
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with torch.inference_mode(), autocast_for(device):
        if "image" in modalities:
            images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W)
            if normalize is not None:  # uint8 -> normalised float, here on the GPU
                images = normalize(images)
            feats = dual_encoder(loaded.model).encode_image(images)  # (B, D)
            out["image"] = F.normalize(feats.float(), dim=-1).cpu().numpy()  # (B, D) unit rows
        if "text" in modalities:
            tokens = batch["text"].to(device, non_blocking=True)  # (B, context_length)
            feats = dual_encoder(loaded.model).encode_text(tokens)  # (B, D)
            out["text"] = F.normalize(feats.float(), dim=-1).cpu().numpy()  # (B, D) unit rows
    return out


def _manifest_total(shards: Sequence[str]) -> int | None:
    """Samples in ``shards`` per their folders' manifests (None if any is unknown)."""
    total = 0
    by_folder: dict[Path, dict[str, int] | None] = {}
    for url in shards:
        if is_remote(url):
            return None
        folder = Path(url).parent
        if folder not in by_folder:
            try:
                m = read_manifest(folder)
            except ValueError:
                m = None
            by_folder[folder] = None if m is None else {s.name: s.samples for s in m.shards}
        counts = by_folder[folder]
        if counts is None or Path(url).name not in counts:
            return None
        total += counts[Path(url).name]
    return total


def embed(
    config: EmbedConfig,
    loaded: LoadedModel | None = None,
    dist_info: DistInfo | None = None,
) -> EmbedResult:
    """Embed ``config.data`` into ``config.out``; every rank of a torchrun job calls this.

    ``loaded``: an already loaded model (its device is used; ``config.model`` then only names
    it in ``embeddings.json``). ``dist_info``: an existing process setup; by default one is
    initialised from the launch environment (and torn down at the end).
    """
    device_name = resolve_device(config.device)
    own_dist = dist_info is None
    info = dist_info or init_distributed(
        "cuda" if device_name.startswith("cuda") else "cpu", timeout_s=config.dist_timeout_s
    )
    try:
        return _embed(config, loaded, info, device_name)
    finally:
        if own_dist:
            shutdown(info)


def _embed(
    config: EmbedConfig, loaded: LoadedModel | None, info: DistInfo, device_name: str
) -> EmbedResult:
    # Every input is checked (shards listed, model loaded) before anything is created, so a bad
    # --data or --model leaves no empty EMB_DIR behind.
    sources = parse_shard_spec(config.data)
    urls = [u for src in sources for u in src.urls]
    # Manifest sample counts, so that a truncated shard counts the samples it lost, not 1.
    counts = {u: c for s in sources for u, c in zip(s.urls, s.sample_counts, strict=False)}
    parts = plan_parts(urls, config.shards_per_part)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise EmbedError(f"--out {out} exists and is not a folder")
    if loaded is None:
        # torchrun: the rank's own GPU (info.device); single process: an explicit cuda:N wins.
        device = torch.device(device_name) if device_name.startswith("cuda:") else info.device
        loaded = load_model(config.model, device, config.model_name)
    # Read now, while the model's source is what was loaded: training may re-export or prune it
    # before the end of the run, when the weights are recorded.
    model_cfg = model_config(loaded, config.model_name)
    run = EmbedRun(
        dim=_embed_dim(loaded),
        dtype=config.dtype,
        modalities=tuple(config.modalities),
        model_hash=loaded.model_hash,
    )
    subdirs = [out / d for d in (*(f for f, _ in EMB_LAYOUT.values()), METADATA_DIR, PARTS_DIR)]
    fresh = [d for d in subdirs if not d.exists()]
    created = make_dirs(out)
    try:
        if info.is_main and config.overwrite:
            (out / EMBEDDINGS_MANIFEST).unlink(missing_ok=True)
        return _embed_parts(config, loaded, info, out, parts, run, model_cfg, counts)
    except BaseException:
        # A failed run leaves no folder it made empty. Complete parts stay (a re-run resumes
        # from them); partial files never had a final name (atomic_output removed them).
        if info.is_main:
            for d in [*fresh, *reversed(created)]:
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty
        raise


def _embed_parts(
    config: EmbedConfig,
    loaded: LoadedModel,
    info: DistInfo,
    out: Path,
    parts: list[tuple[str, ...]],
    run: EmbedRun,
    model_cfg: dict[str, Any],
    counts: dict[str, int | None],
) -> EmbedResult:
    kept, todo = _sort_parts(config, info, out, parts, run)
    t0 = time.perf_counter()
    written: list[int] = []
    skipped: Counter[str] = Counter()
    samples = 0
    if todo:
        written, skipped, samples = _embed_todo(config, loaded, info, out, parts, todo, run, counts)
    seconds = time.perf_counter() - t0
    if skipped:
        n_bad = sum(skipped.values())
        log.warning("rank %d skipped %d bad sample(s): %s", info.rank, n_bad, dict(skipped))

    barrier(info)
    manifest = None
    if info.is_main:
        # Last, after every part: a run that fails earlier spends no time or space on it.
        record = record_model(out, loaded, model_cfg)
        manifest = write_embeddings_manifest(out, parts, config, loaded, info.world_size, record)
    barrier(info)  # nobody returns (and e.g. reads embeddings.json) before it exists
    return EmbedResult(
        out, tuple(written), tuple(kept), samples, seconds, dict(skipped), manifest, info.world_size
    )


def _sort_parts(
    config: EmbedConfig, info: DistInfo, out: Path, parts: list[tuple[str, ...]], run: EmbedRun
) -> tuple[list[int], list[int]]:
    """This rank's parts as ``(kept, todo)``: complete ones of this same run are kept (resume),
    the others are cleared of a killed writer's leftovers and redone."""
    mine = [p for p in range(len(parts)) if p % info.world_size == info.rank]
    kept, todo = [], []
    for p in mine:
        marker = None if config.overwrite else read_part_marker(out, p)
        if marker is not None:
            _check_marker(marker, out, p, parts[p], run)
            kept.append(p)
        else:
            todo.append(p)
    if kept:
        log.info("rank %d: %d part(s) already complete, kept: %s", info.rank, len(kept), kept)
    for p in todo:  # leftovers of a killed writer of this part (temps carry a dead pid)
        for rel in [*part_files(p, MODALITIES), f"{PARTS_DIR}/part_{p}.json"]:
            remove_stale_temps(out / rel)
        marker_path(out, p).unlink(missing_ok=True)
    return kept, todo


def _embed_todo(
    config: EmbedConfig,
    loaded: LoadedModel,
    info: DistInfo,
    out: Path,
    parts: list[tuple[str, ...]],
    todo: list[int],
    run: EmbedRun,
    counts: dict[str, int | None],
) -> tuple[list[int], Counter[str], int]:
    """Embed parts ``todo`` and write each when its end marker arrives; return
    ``(parts written, skipped samples by reason, samples embedded)``."""
    device = next(loaded.model.parameters()).device
    per_sample, per_batch = loaded.image_transforms()
    tokenizer = loaded.tokenizer if "text" in config.modalities else None
    # On a GPU, uint8 batches travel (4x fewer bytes) and are normalised there; on a CPU the
    # workers normalise, off the main process that runs the model.
    on_device = device.type == "cuda"
    stream = _PartStream(
        [(p, parts[p]) for p in todo],
        per_sample,
        None if on_device else per_batch,
        tokenizer,
        config.batch_size,
        counts,
    )
    workers = min(config.workers, len(todo))
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    total = _manifest_total([u for p in todo for u in parts[p]])
    # Rank 0 shows its own progress (the others' would interleave); all ranks run alike.
    label = "embed" if info.world_size == 1 else f"embed (rank 0 of {info.world_size})"
    progress = _Progress(config.progress, total, enabled=info.is_main, label=label)
    written: list[int] = []
    skipped: Counter[str] = Counter()
    samples = 0
    buffers: dict[int, _PartBuffer] = {}
    try:
        for batch in loader:
            part = batch["part"] if "part" in batch else batch["part_end"]
            buf = buffers.setdefault(part, _PartBuffer())
            buf.skipped.update(batch["skipped"])
            skipped.update(batch["skipped"])
            if "part_end" in batch:
                _write_part(out, part, parts[part], buffers.pop(part), batch["members"], run)
                written.append(part)
                continue
            if not batch["caption"]:
                continue  # an empty batch only hands over skip counts
            emb = _encode_batch(
                loaded, batch, config.modalities, device, per_batch if on_device else None
            )
            buf.add(batch, emb)
            samples += len(batch["key"])
            progress.update(len(batch["key"]))
    finally:
        progress.close()
    return written, skipped, samples


def model_config(loaded: LoadedModel, model_name: str | None = None) -> dict[str, Any]:
    """The ``open_clip_config.json`` content (``model_cfg``, ``preprocess_cfg``) of a loaded
    model, read from where :func:`load_model` found it: beside an exported model's weights,
    from ``model_name``, or inside a clipforge step checkpoint."""
    src = Path(loaded.source)
    beside = src.with_name(OPEN_CLIP_CONFIG_NAME)
    if src.name == OPEN_CLIP_WEIGHTS_NAME and beside.is_file():
        blob = json.loads(beside.read_text(encoding="utf-8"))
        return {"model_cfg": blob["model_cfg"], "preprocess_cfg": blob.get("preprocess_cfg", {})}
    if model_name is not None:
        return {"model_cfg": resolve_model_config(model_name)[1], "preprocess_cfg": {}}
    try:  # a step checkpoint: memory-mapped, so its optimizer state is not read
        obj = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError) as e:
        raise EmbedError(f"{src}: cannot read the model's config from it ({e})") from None
    if not (isinstance(obj, dict) and "model_cfg" in obj):
        raise EmbedError(f"{src}: holds no model_cfg; pass --model-name")
    return {"model_cfg": obj["model_cfg"], "preprocess_cfg": obj.get("preprocess_cfg", {})}


def _existing_record(out: Path, model_hash: str) -> dict[str, Any] | None:
    """The model record of a previous complete run into ``out`` if it holds these weights."""
    try:
        rec = json.loads((out / EMBEDDINGS_MANIFEST).read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(rec, dict) or rec.get("model_hash") != model_hash:
        return None
    for rel, f in rec.get("files", {}).items():
        path = out / rel
        if not path.is_file() or path.stat().st_size != f.get("size_bytes"):
            return None
    return rec


def record_model(
    out_dir: str | os.PathLike[str], loaded: LoadedModel, model_cfg: dict[str, Any]
) -> dict[str, Any]:
    """Record the exact weights of ``loaded`` in ``OUT/model/`` (an open_clip export) and return
    the record for ``embeddings.json``: ``{"dir", "model_hash", "linked", "files"}``.

    An exported model's weights file is hard-linked when it is on the same file system (no
    space used; a later re-export renames a new file over the run's name, leaving these bytes
    alone), else copied; a checkpoint's weights are exported from memory. Either way the copy
    is loaded back and must have ``loaded``'s weights hash: if the source changed since it was
    loaded (training continued), the weights in memory -- the ones that made the embeddings --
    are exported instead. Written in a temporary folder and renamed: never half a model.
    """
    out = Path(out_dir)
    final = out / store.MODEL_DIR
    previous = _existing_record(out, loaded.model_hash)
    if previous is not None:
        return previous
    work = out / f".{store.MODEL_DIR}{TMP_MARKER}{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    src = Path(loaded.source)
    try:
        linked = False
        if src.name == OPEN_CLIP_WEIGHTS_NAME and src.is_file():
            linked = store.link_or_copy(src, work / OPEN_CLIP_WEIGHTS_NAME)
            write_json_atomic(work / OPEN_CLIP_CONFIG_NAME, model_cfg)
        if not linked or load_model(work).model_hash != loaded.model_hash:
            linked = False
            cfg, pre = model_cfg["model_cfg"], model_cfg.get("preprocess_cfg")
            export_open_clip(loaded.model, cfg, work, pre)
            got = load_model(work).model_hash
            if got != loaded.model_hash:
                raise RuntimeError(f"exported weights hash {got} != {loaded.model_hash}")
        old = out / f".{store.MODEL_DIR}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(work, final)
        shutil.rmtree(old, ignore_errors=True)
    except OutOfSpaceError as e:
        raise store.out_of_space_at(e, work, final) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rels = [f"{store.MODEL_DIR}/{n}" for n in (OPEN_CLIP_CONFIG_NAME, OPEN_CLIP_WEIGHTS_NAME)]
    return {
        "dir": store.MODEL_DIR,
        "model_hash": loaded.model_hash,
        "linked": linked,
        "files": store.files_record(out, rels),
    }


def _embed_dim(loaded: LoadedModel) -> int:
    """Output dimension of the model's towers (one tiny text forward: works for every tower)."""
    with torch.inference_mode():
        device = next(loaded.model.parameters()).device
        tokens = loaded.tokenizer(["a"]).to(device)
        return int(dual_encoder(loaded.model).encode_text(tokens).shape[-1])


def _source(meta: Any) -> str:
    if isinstance(meta, dict):
        src = meta.get("source")
        return "" if src is None else str(src)
    return ""


def write_embeddings_manifest(
    out_dir: str | os.PathLike[str],
    parts: Sequence[tuple[str, ...]],
    config: EmbedConfig,
    loaded: LoadedModel,
    world_size: int = 1,
    model_record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``embeddings.json`` from the parts' markers (every part must be complete).

    ``model_record``: what :func:`record_model` wrote (the exact weights, in ``EMB_DIR/model/``).
    """
    out = Path(out_dir)
    markers = []
    for p in range(len(parts)):
        marker = read_part_marker(out, p)
        if marker is None:
            raise EmbedError(
                f"{marker_path(out, p)} is missing: part {p} is not complete (did rank "
                f"{p % world_size} fail?); re-run the same command to finish it"
            )
        markers.append(marker)
    skipped: Counter[str] = Counter()
    for m in markers:
        skipped.update(m.skipped)
    manifest = {
        "format": EMBEDDINGS_FORMAT,
        "model_hash": loaded.model_hash,
        # What the user named (run dir / checkpoint): load_model(model_source) reloads it.
        "model_source": os.path.abspath(config.model),
        # The weights themselves, as they were when embedded (model_source may change since).
        "model": model_record,
        "dim": markers[0].run.dim if markers else _embed_dim(loaded),
        "dtype": config.dtype,
        "modalities": list(config.modalities),
        "count": sum(m.count for m in markers),
        "parts": [{"part": m.part, "count": m.count, "shards": list(m.shards)} for m in markers],
        "data": config.data,
        "skipped": dict(sorted(skipped.items())),
    }
    write_json_atomic(out / EMBEDDINGS_MANIFEST, manifest)
    return manifest
