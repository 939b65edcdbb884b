"""Stream samples from webdataset shards: the input pipeline of pretrain, index and eval.

Stages, each a generator over the previous one (see :class:`ShardStream`):

1. shard list   -- this (rank, worker)'s shards: a disjoint slice for an exact pass, or an
                   endless seeded draw with replacement (weighted across sources) when resampled;
2. tar members  -- members grouped into samples by key; unreadable or truncated shards counted;
3. shuffle      -- a seeded shuffle buffer over undecoded samples (cheap to hold);
4. skip         -- on resume, the samples this worker already delivered are dropped undecoded;
5. decode       -- image -> RGB (alpha composited) -> per-sample transform; caption -> str;
6. batch        -- stack images, per-batch transform, tokenize all captions in one call.

Error policy: a bad sample (undecodable image, missing image or caption, non-UTF-8 caption) or a
bad shard is skipped and counted by reason -- never silently, never with a sleep -- unless
``on_error="raise"``. Counts travel with each batch (``batch["skipped"]``) from the worker
processes and are summed by :class:`ShardLoader` into ``loader.skipped``. A damaged shard counts
the samples it lost when its ``manifest.json`` knows how many it holds (else 1). A resampled
stream whose shards keep failing (``ReaderConfig.max_consecutive_shard_failures`` in a row in
one worker) stops with :class:`ShardsUnreadableError` instead of drawing forever.

Data-loader workers die with their parent: on Linux the kernel kills them
(``PR_SET_PDEATHSIG``), and everywhere each worker checks its parent pid between shards.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import os
import random
import signal
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data_tools.hard_negatives import HardNegativeBatcher
from clipforge.data_tools.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, to_rgb
from clipforge.data_tools.shardformat import (
    IMAGE_MEMBER_EXTENSIONS,
    ManifestError,
    ShardReadError,
    is_remote,
    iter_tar_entries,
    read_manifest,
    split_member_name,
)

SKIP_REASONS = (
    "corrupt_image",
    "missing_image",
    "missing_caption",
    "bad_caption",
    "truncated_shard",
    "unreadable_shard",
)


ShardSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
"""A SHARDS specification: see :func:`parse_shard_spec`."""


class ShardSpecError(ValueError):
    """A SHARDS specification names nothing, or something that is not a shard."""


class DataError(RuntimeError):
    """A bad sample or shard under ``on_error="raise"`` (the message names shard and key)."""


class ShardsUnreadableError(ShardSpecError):
    """A resampled stream drew ``max_consecutive_shard_failures`` shards in a row that yielded no
    sample: the data cannot be read (the message names a failing shard and the skip counts)."""


# ----------------------------------------------------------------------------- shard specs


@dataclass(frozen=True)
class ShardSource:
    """One data source: a list of shard URLs with a mixing weight."""

    urls: tuple[str, ...]
    """Shard paths or URLs (``pipe:``, ``http(s)://``, ... are opened with webdataset's gopen)."""
    weight: float = 1.0
    """Relative share of samples drawn from this source when resampling."""
    sample_counts: tuple[int | None, ...] = ()
    """Samples per shard from ``manifest.json`` (None where unknown)."""

    @property
    def samples(self) -> int | None:
        """Total samples, when the manifest knows every shard."""
        if not self.sample_counts or any(c is None for c in self.sample_counts):
            return None
        return sum(c for c in self.sample_counts if c is not None)


def parse_shard_spec(spec: ShardSpec) -> list[ShardSource]:
    """Turn a SHARDS specification into sources.

    ``spec`` is one or more items (a list, or one string joined with ``::``); an item is a folder
    (every ``*.tar`` in it), a brace pattern (``data/train-{000000..000099}.tar``), a glob, a file
    or a URL, optionally followed by ``@WEIGHT`` for mixing (``a/{0..9}.tar@1::b/{0..9}.tar@3``).
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    items = spec.split("::") if isinstance(spec, str) else [os.fspath(i) for i in spec]
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise ShardSpecError("no shards given (empty SHARDS specification)")
    return [_parse_source(item) for item in items]


def _parse_source(item: str) -> ShardSource:
    weight = 1.0
    head, at, tail = item.rpartition("@")
    if at and "/" not in tail:
        try:
            weight = float(tail)
        except ValueError:
            raise ShardSpecError(f"{item!r}: mixing weight {tail!r} is not a number") from None
        if not (weight > 0 and math.isfinite(weight)):
            raise ShardSpecError(f"{item!r}: mixing weight must be > 0, got {tail}")
        item = head
    urls = _expand(item)
    return ShardSource(tuple(urls), weight, tuple(_manifest_counts(urls)))


def _expand(item: str) -> list[str]:
    if is_remote(item):
        return list(braceexpand.braceexpand(item))
    path = Path(item)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise ShardSpecError(_not_shards_message(item, path))
        return urls
    urls = []
    for expanded in braceexpand.braceexpand(item):
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        urls.extend(matches)
    missing = [u for u in urls if not Path(u).is_file()]
    if not urls or missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ShardSpecError(f"{item}: no such shard file(s): {shown or item}")
    return urls


def _not_shards_message(item: str, folder: Path) -> str:
    """Why a folder without shards cannot be read, and what to do when it holds raw data."""
    image_suffixes = {"." + e for e in IMAGE_EXTENSIONS}
    raw = ""
    # The first few files are enough to tell (a folder of a million images is not walked).
    for n, p in enumerate(folder.rglob("*")):
        if n >= 10_000:
            break
        suffix = p.suffix.lower()
        if suffix in image_suffixes or suffix == ".txt":
            raw = f"images and captions (e.g. {p.relative_to(folder).as_posix()})"
            break
        if suffix in (".csv", ".tsv", ".jsonl", ".parquet"):
            raw = f"a table of images and captions ({p.relative_to(folder).as_posix()})"
            break
    if not raw:
        return f"{item}: folder holds no .tar shards"
    return (
        f"{item}: folder holds {raw}, not .tar shards: write them as shards first with "
        f"`clipforge-data write {item} SHARDS_DIR` and pass SHARDS_DIR"
    )


def _manifest_counts(urls: list[str]) -> list[int | None]:
    """Per-shard sample counts from the manifests beside local shards (None where unknown)."""
    by_folder: dict[Path, dict[str, int]] = {}
    counts: list[int | None] = []
    for url in urls:
        if is_remote(url):
            counts.append(None)
            continue
        folder = Path(url).parent
        if folder not in by_folder:
            try:
                manifest = read_manifest(folder)
            except ManifestError:
                manifest = None  # a damaged manifest only costs us the counts; verify reports it
            by_folder[folder] = (
                {} if manifest is None else {s.name: s.samples for s in manifest.shards}
            )
        counts.append(by_folder[folder].get(Path(url).name))
    return counts


def check_exact_pass(num_shards: int, world_size: int, num_workers: int) -> None:
    """An exact pass splits shards over ranks x workers; fewer shards than that cannot work."""
    readers = world_size * max(num_workers, 1)
    if num_shards < readers:
        raise ShardSpecError(
            f"an exact pass needs at least one shard per reader: {num_shards} shard(s) for "
            f"{world_size} rank(s) x {max(num_workers, 1)} worker(s) = {readers} readers. "
            f"Use fewer workers, write smaller shards (--shard-size), or resample."
        )


# ----------------------------------------------------------------------------- stages


@dataclass
class _RawSample:
    key: str
    url: str
    members: dict[str, bytes] = field(default_factory=dict)
    offsets: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    """Per extension: (member name, data offset in the shard file or -1, size in bytes)."""


class SkipCounter:
    """Per-worker skip counter; ``take()`` hands over the counts since the last call.

    Public so that a stream built on the reader's stages (index embed's per-part stream) counts
    and raises by the same ``on_error`` policy as the reader itself."""

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error
        self.pending: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        """Everything counted by this worker (for error messages; ``pending`` is handed over)."""
        self.last_problem = ""
        """``where: reason: detail`` of the latest problem counted."""

    def add(self, reason: str, where: str, detail: str, count: int = 1) -> None:
        """Count ``count`` lost samples under ``reason`` (or raise, under ``on_error="raise"``)."""
        if self.on_error == "raise":
            raise DataError(f"{where}: {reason}: {detail}")
        self.pending[reason] += count
        self.total[reason] += count
        self.last_problem = f"{where}: {reason}: {detail}"

    def take(self) -> dict[str, int]:
        out, self.pending = dict(self.pending), Counter()
        return out


def iter_tar_samples(
    url: str, skips: SkipCounter, expected: int | None = None
) -> Iterator[_RawSample]:
    """Stage 2: the samples of one shard. A truncated or unreadable shard is counted, not fatal:
    as the samples it lost (``expected``, the manifest's count, less those read) when
    ``expected`` is known, else as 1."""
    current: _RawSample | None = None
    yielded = 0
    try:
        for name, data, offset in iter_tar_entries(url):
            key, ext = split_member_name(name)
            if not ext or key.rsplit("/", 1)[-1].startswith("__"):
                continue  # e.g. webdataset's __index__ members
            if current is None or key != current.key:
                if current is not None:
                    yielded += 1
                    yield current
                current = _RawSample(key, url)
            current.members[ext.lower()] = data
            current.offsets[ext.lower()] = (name, offset, len(data))
    except ShardReadError as e:
        # The last, possibly incomplete sample of a damaged shard is dropped: it is not trusted.
        lost = 1 if expected is None else max(expected - yielded, 1)
        skips.add(e.kind, url, e.detail, lost)
        return
    if current is not None:
        yield current


def shuffle_buffer(
    samples: Iterator[_RawSample], size: int, rng: random.Random
) -> Iterator[_RawSample]:
    """Stage 3: a shuffle buffer of ``size`` samples (``size <= 1``: no shuffling)."""
    if size <= 1:
        yield from samples
        return
    buf: list[_RawSample] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = rng.randrange(size)
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


# ----------------------------------------------------------------------------- the dataset


def _stable_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process (unlike ``hash`` of a str)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class ReaderConfig:
    """How a :class:`ShardStream` reads."""

    batch_size: int = 64
    """Samples per batch."""
    resampled: bool = False
    """Endless seeded draws of shards with replacement (training) instead of one exact pass."""
    shuffle_buffer: int = 0
    """Shuffle buffer size in samples (0: read in shard order)."""
    seed: int = 0
    """Seed of shard order, shuffle buffer and augmentation."""
    drop_last: bool = False
    """Drop a worker's final incomplete batch (exact pass)."""
    on_error: str = "skip"
    """``skip``: count bad samples and go on; ``raise``: stop at the first one."""
    caption_key: str = "txt"
    """Member extension holding the caption."""
    max_consecutive_shard_failures: int = 64
    """Resampled streams only: stop with :class:`ShardsUnreadableError` after this many shards
    in a row, in one worker, yielded no sample (unreadable, truncated before the first sample,
    or empty). A shard that yields a sample resets the count. An exact pass ends by itself (and
    its caller reports "no samples"); a resampled one would otherwise draw bad shards forever.
    With a fraction ``p`` of bad shards a healthy stream trips it with probability ``p**64``."""

    def __post_init__(self) -> None:
        if self.max_consecutive_shard_failures < 1:
            raise ValueError(
                "max_consecutive_shard_failures must be >= 1, got "
                f"{self.max_consecutive_shard_failures}"
            )
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")


@dataclass(frozen=True)
class ReaderPlan:
    """What one reader (a rank's logical worker) reads in an exact pass that was re-split over
    a new number of readers (a resume on another world size; see
    :mod:`clipforge.data_tools.resplit`): first the rest of each earlier reader's stream it
    inherited, then its share of the shards nobody had started, through its own shuffle
    buffer."""

    replays: tuple[Replay, ...] = ()
    """Earlier readers' unfinished streams, replayed in this order."""
    shards: tuple[str, ...] = ()
    """Shards no earlier reader had opened, read after the replays."""


@dataclass(frozen=True)
class Replay:
    """The rest of an earlier reader's stream: its plan read again undecoded, with its own
    shuffle seed (so its buffer yields the same order), minus the samples it had delivered."""

    plan: ReaderPlan
    """What the earlier reader read (its shards; or its own plan, re-split before)."""
    seed: tuple[int, ...]
    """The earlier reader's stream seed ``(seed, epoch, rank, worker)``."""
    skip: int
    """Raw samples it had delivered: dropped undecoded."""
    pulled: int | None = None
    """Raw samples it had pulled into its shuffle buffer (``skip`` + buffer size) when its
    shards were cut to the ones it had opened: ``plan.shards`` must hold at least that many,
    or the manifest counts the cut was made by were wrong (then a warning: the pass is no
    longer exact). None: the plan is the earlier reader's whole list, nothing to check."""


def plan_to_dict(plan: ReaderPlan) -> dict[str, Any]:
    """Plain containers (what a checkpoint stores and ``torch.load(weights_only=True)`` reads)."""
    return {
        "replays": [
            {
                "plan": plan_to_dict(r.plan),
                "seed": list(r.seed),
                "skip": r.skip,
                "pulled": r.pulled,
            }
            for r in plan.replays
        ],
        "shards": list(plan.shards),
    }


def plan_from_dict(d: dict[str, Any]) -> ReaderPlan:
    """The inverse of :func:`plan_to_dict`."""
    replays = tuple(
        Replay(plan_from_dict(r["plan"]), tuple(r["seed"]), int(r["skip"]), r.get("pulled"))
        for r in d.get("replays", ())
    )
    return ReaderPlan(replays, tuple(d.get("shards", ())))


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream is: restart a :class:`ShardStream` from here to continue exactly."""

    epoch: int = 0
    """Exact pass: the epoch being read. Resampled: the stream's round, 0 from the start and
    the step of the resume whenever a resume on another world size re-seeded the streams."""
    consumed: tuple[int, ...] = ()
    """Per logical worker: raw samples (post-shuffle, pre-decode) behind its delivered batches."""
    next_worker: int = 0
    """The logical worker whose batch comes next (DataLoader workers take turns)."""
    plans: tuple[tuple[int, tuple[ReaderPlan, ...]], ...] = ()
    """Exact pass re-split over another world size: (epoch, one plan per logical worker) for
    the epochs that are read by plan instead of by the usual shard split (empty: none)."""

    def plan_for(self, epoch: int, worker: int) -> ReaderPlan | None:
        """The plan of ``worker`` in ``epoch``, or None when that epoch splits as usual."""
        for e, plans in self.plans:
            if e == epoch:
                return plans[worker]
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain containers, for a checkpoint."""
        return {
            "epoch": self.epoch,
            "consumed": list(self.consumed),
            "next_worker": self.next_worker,
            "plans": [[e, [plan_to_dict(p) for p in ps]] for e, ps in self.plans],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamPosition:
        """The inverse of :meth:`to_dict` (checkpoints older than ``plans`` have none)."""
        plans = tuple(
            (int(e), tuple(plan_from_dict(p) for p in ps)) for e, ps in d.get("plans", ())
        )
        return cls(int(d["epoch"]), tuple(d["consumed"]), int(d["next_worker"]), plans)


def exact_pass_shards(
    urls: Sequence[str], epoch: int, seed: int, shuffle_buffer: int, reader: int, readers: int
) -> list[str]:
    """The shards reader ``reader`` of ``readers`` (rank x workers + worker) reads in one
    exact pass of ``epoch``: the shard order is shuffled per epoch (the same on every rank)
    when samples are, then dealt out round-robin."""
    ordered = list(urls)
    if shuffle_buffer > 1:
        random.Random(repr((seed, epoch))).shuffle(ordered)
    return ordered[reader::readers]


class ShardStream(IterableDataset):
    """Batches of decoded, transformed samples from shards, split by rank and worker.

    Each batch is a dict: ``image`` ``(B, 3, H, W)`` (after the batch transform), ``text``
    (tokens, or the list of captions when no tokenizer is given), ``caption``, ``key``, ``url``,
    ``meta`` (each sample's parsed .json or None), ``skipped`` (counts by reason since the
    previous batch of this worker), ``worker`` and ``consumed`` (for :class:`StreamPosition`).
    In a DataLoader worker, :class:`ShardsUnreadableError` arrives as a last batch holding its
    message under ``error`` (which :class:`ShardLoader` raises), not as a wrapped traceback.
    ``caption_transform(caption, meta)`` rewrites each caption, given the sample's parsed .json
    (None when absent), e.g. :class:`clipforge.data_tools.transforms.CaptionPartsSubset`.
    ``hard_negatives`` adds each sample's mined negative captions, tokenized, as
    ``hard_negatives`` (B, k, L), ``hard_negatives_mask`` (B, k) and ``hard_negatives_missing``
    (see :class:`clipforge.data_tools.hard_negatives.HardNegativeBatcher`; needs ``tokenizer``).
    """

    def __init__(
        self,
        sources: Sequence[ShardSource],
        image_transform: Callable[[Image.Image], torch.Tensor],
        batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        config: ReaderConfig = ReaderConfig(),
        rank: int = 0,
        world_size: int = 1,
        position: StreamPosition = StreamPosition(),
        caption_transform: Callable[[str, Any], str] | None = None,
        hard_negatives: HardNegativeBatcher | None = None,
    ) -> None:
        super().__init__()
        if hard_negatives is not None and tokenizer is None:
            raise ValueError("hard negatives are attached tokenized: give the stream a tokenizer")
        if not sources:
            raise ShardSpecError("no shard sources given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.sources = list(sources)
        self.image_transform = image_transform
        self.batch_transform = batch_transform
        self.tokenizer = tokenizer
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.position = position
        self.caption_transform = caption_transform
        self.hard_negatives = hard_negatives

    @property
    def num_shards(self) -> int:
        return sum(len(s.urls) for s in self.sources)

    def set_position(self, position: StreamPosition) -> None:
        """Where the next iteration starts (call before creating the DataLoader iterator)."""
        self.position = position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers = 1 if info is None else info.num_workers
        physical = 0 if info is None else info.id
        # Rotate worker identities so that after a resume the DataLoader's first worker is the
        # logical worker whose batch was due next.
        worker = (physical + self.position.next_worker) % num_workers
        consumed = self.position.consumed[worker] if self.position.consumed else 0
        epoch = self.position.epoch
        seed = (self.config.seed, epoch, self.rank, worker)
        rng = random.Random(repr(seed))
        skips = SkipCounter(self.config.on_error)

        parent = None if info is None else (_PARENT if _PARENT is not None else os.getppid())
        plan = None if self.config.resampled else self.position.plan_for(epoch, worker)
        if plan is not None:  # an exact pass re-split over this world size
            raw = self._plan_samples(plan, seed, skips, worker, parent)
        else:
            urls = self._shard_urls(rng, worker, num_workers, epoch)
            raw = self._read_shards(urls, skips, worker, parent)
            raw = shuffle_buffer(raw, self.config.shuffle_buffer, rng)
        try:
            yield from self.batches(raw, skips, worker, consumed, seed)
        except ShardsUnreadableError as e:
            if info is None:
                raise
            # In a worker process, raising would reach the parent wrapped in a traceback dump;
            # the loader turns this batch back into the one-line error.
            yield {"error": str(e), "skipped": skips.take(), "worker": worker, "caption": []}

    def _read_shards(
        self, urls: Iterator[str], skips: SkipCounter, worker: int, parent_pid: int | None
    ) -> Iterator[_RawSample]:
        """Stage 2 over this worker's shards, counting shards in a row that yield nothing."""
        # sample_counts is empty for a source built without manifests: no counts, not an error
        expected = {
            u: c for s in self.sources for u, c in zip(s.urls, s.sample_counts, strict=False)
        }
        failures = 0
        for url in urls:
            # The watchdog: torch's own check runs between batches only, and a stream of bad
            # shards never finishes one (PR_SET_PDEATHSIG covers Linux; this, everything).
            if parent_pid is not None and os.getppid() != parent_pid:
                os._exit(1)
            n = 0
            for sample in iter_tar_samples(url, skips, expected.get(url)):
                n += 1
                yield sample
            if n:
                failures = 0
                continue
            failures += 1
            if self.config.resampled and failures >= self.config.max_consecutive_shard_failures:
                raise ShardsUnreadableError(
                    f"the data yields no samples: {failures} shards in a row yielded nothing "
                    f"on rank {self.rank}, worker {worker} (last: "
                    f"{skips.last_problem or url + ': no samples in the shard'}; skipped: "
                    f"{dict(skips.total)}); check the data with `clipforge-data verify SHARDS`"
                )

    def _shard_urls(
        self, rng: random.Random, worker: int, num_workers: int, epoch: int
    ) -> Iterator[str]:
        if self.config.resampled:
            weights = [s.weight for s in self.sources]
            while True:
                (source,) = rng.choices(self.sources, weights=weights)
                yield rng.choice(source.urls)
        urls = [u for s in self.sources for u in s.urls]
        check_exact_pass(len(urls), self.world_size, num_workers)
        cfg = self.config
        reader, readers = self.rank * num_workers + worker, self.world_size * num_workers
        yield from exact_pass_shards(urls, epoch, cfg.seed, cfg.shuffle_buffer, reader, readers)

    def _plan_samples(
        self,
        plan: ReaderPlan,
        seed: tuple[int, ...],
        skips: SkipCounter,
        worker: int,
        parent_pid: int | None,
    ) -> Iterator[_RawSample]:
        """Stages 2-3 of a re-split pass: the inherited streams, then the new shards through
        this reader's own shuffle buffer (seeded by ``seed``)."""
        for replay in plan.replays:
            n = 0
            inner = self._plan_samples(replay.plan, replay.seed, skips, worker, parent_pid)
            for sample in inner:
                n += 1
                if n > replay.skip:  # delivered by the earlier reader: dropped undecoded
                    yield sample
            if replay.pulled is not None and n < replay.pulled:
                warnings.warn(
                    f"re-split exact pass: shards {list(replay.plan.shards)} held {n} samples, "
                    f"fewer than the {replay.pulled} their manifest counts promised (a shard "
                    "shorter than its manifest says): the earlier reader had gone on into the "
                    "next shard, so up to that many samples of this epoch may be read twice or "
                    "not at all; check the data with `clipforge-data verify SHARDS`",
                    stacklevel=1,
                )
        rng = random.Random(repr(seed))
        raw = self._read_shards(iter(plan.shards), skips, worker, parent_pid)
        yield from shuffle_buffer(raw, self.config.shuffle_buffer, rng)

    def batches(
        self,
        raw: Iterator[_RawSample],
        skips: SkipCounter,
        worker: int,
        consumed: int,
        seed: tuple[int, ...],
    ) -> Iterator[dict[str, Any]]:
        """Stages 4-6 over raw samples: skip the first ``consumed`` (resume), decode, count bad
        samples in ``skips``, transform (seeded per ``seed`` + sample position) and batch.

        Public for streams that choose their own samples (embed reads whole parts per worker)
        but must decode, skip and batch exactly as training and eval do."""
        images: list[torch.Tensor] = []
        rows: list[tuple[str, str, str, Any]] = []
        n_raw = 0
        for sample in raw:
            n_raw += 1
            if n_raw <= consumed:
                continue  # stage 4: already delivered before the resume
            decoded = self._decode(sample, skips, seed, n_raw)
            if decoded is None:
                continue
            images.append(decoded[0])
            rows.append(decoded[1:])
            if len(images) == self.config.batch_size:
                yield self._collate(images, rows, skips, worker, n_raw)
                images, rows = [], []
        if images and not self.config.drop_last:
            yield self._collate(images, rows, skips, worker, n_raw)
        elif skips.pending:  # hand the last counts over in an empty batch
            yield self._collate([], [], skips, worker, n_raw)

    def _decode(
        self, sample: _RawSample, skips: SkipCounter, seed: tuple[int, ...], n_raw: int
    ) -> tuple[torch.Tensor, str, str, str, Any] | None:
        where = f"{sample.url}:{sample.key}"
        ext = next((e for e in IMAGE_MEMBER_EXTENSIONS if e in sample.members), None)
        if ext is None:
            skips.add("missing_image", where, f"no image member among {sorted(sample.members)}")
            return None
        caption_bytes = sample.members.get(self.config.caption_key)
        if caption_bytes is None:
            skips.add("missing_caption", where, f"no .{self.config.caption_key} member")
            return None
        try:
            caption = caption_bytes.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            skips.add("bad_caption", where, f"caption is not UTF-8 ({e})")
            return None
        if not caption:
            skips.add("bad_caption", where, "caption is empty")
            return None
        try:
            img = to_rgb(decode_image(sample.members[ext], extension=ext))
        except ImageDecodeError as e:
            skips.add("corrupt_image", where, str(e))
            return None
        # Seeding per sample position makes random augmentation independent of what came before,
        # so skipping samples on resume reproduces the uninterrupted run exactly.
        # (The CPU generator only: torch.manual_seed also queues a CUDA seeding, ~1 ms a call.)
        torch.default_generator.manual_seed(_stable_seed(*seed, n_raw))
        image = self.image_transform(img)
        meta = None
        if "json" in sample.members:
            try:
                meta = json.loads(sample.members["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = None
        if self.caption_transform is not None:  # same per-sample seed: exact on resume too
            caption = self.caption_transform(caption, meta)
        return image, caption, sample.key, sample.url, meta

    def _collate(
        self,
        images: list[torch.Tensor],
        rows: list[tuple[str, str, str, Any]],
        skips: SkipCounter,
        worker: int,
        n_raw: int,
    ) -> dict[str, Any]:
        captions = [r[0] for r in rows]
        batch_images = torch.stack(images) if images else torch.empty(0)
        if images and self.batch_transform is not None:
            batch_images = self.batch_transform(batch_images)
        text: Any = captions
        if self.tokenizer is not None and captions:
            text = self.tokenizer(captions)
        keys = [r[1] for r in rows]
        batch = {
            "image": batch_images,
            "text": text,
            "caption": captions,
            "key": keys,
            "url": [r[2] for r in rows],
            "meta": [r[3] for r in rows],
            "skipped": skips.take(),
            "worker": worker,
            "consumed": n_raw,
        }
        if self.hard_negatives is not None and self.tokenizer is not None and captions:
            # in the worker processes, like the captions' own tokenization
            batch.update(self.hard_negatives(keys, self.tokenizer))
        return batch


# ----------------------------------------------------------------------------- the loader

_PARENT: int | None = None
"""In a data-loader worker: the pid of the process that started it (set by the init function)."""

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _set_parent_death_signal() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (even by SIGKILL).

    The parent is strictly the *thread* that forked us: DataLoader forks its workers from the
    thread that iterates it, which outlives them (the iterator shuts them down first)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no prctl (e.g. another libc): the parent-pid watchdog still stops the worker


def worker_dies_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn`` (bind the loader's pid with ``functools.partial``): the
    worker dies with the process that started it, so a killed training or eval job leaves no
    orphan reading shards (a worker blocked on bad data never reaches torch's own between-batch
    parent check)."""
    global _PARENT
    # The direct parent: the loader's process under fork/spawn, a forkserver under forkserver
    # (which exits with the loader's process, orphaning us just the same).
    _PARENT = os.getppid()
    _set_parent_death_signal()
    if parent_pid != _PARENT and not _alive(parent_pid):
        os._exit(1)  # the loader died before the death signal was armed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardLoader:
    """A DataLoader over a :class:`ShardStream` that sums skip counts and tracks the position.

    Iterating yields the non-empty batches; ``skipped`` holds counts by reason so far,
    ``samples`` the samples delivered, ``without_hard_negatives`` how many of them had no mined
    negatives (when the stream attaches them), and ``position`` what to save for an exact
    resume.
    """

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int = 1,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not stream.config.resampled:
            check_exact_pass(stream.num_shards, stream.world_size, num_workers)
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.skipped: Counter[str] = Counter()
        self.samples = 0
        self.without_hard_negatives = 0
        n = max(num_workers, 1)
        start = stream.position
        self._consumed = list(start.consumed) if start.consumed else [0] * n
        if len(self._consumed) != n:
            raise ValueError(
                f"the saved data position is for {len(self._consumed)} workers, this loader has "
                f"{n}: resume with the same number of data workers"
            )
        self._next_worker = start.next_worker
        self._epoch = start.epoch
        self._plans = start.plans
        if any(len(plans) != n for _, plans in self._plans):
            raise ValueError(
                f"the saved data position holds re-split plans for another number of data "
                f"workers than this loader's {n}"
            )

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self._epoch, tuple(self._consumed), self._next_worker, self._plans)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stream.set_position(self.position)
        loader = DataLoader(
            self.stream,
            batch_size=None,
            # the stream yields finished batches: torch's default here (default_convert) would
            # only walk every sample's metadata dict looking for numpy arrays
            collate_fn=_batch_as_is,  # type: ignore[arg-type]  # batch_size=None: one item
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
            worker_init_fn=(
                functools.partial(worker_dies_with_parent, os.getpid())
                if self.num_workers > 0
                else None
            ),
        )
        n = max(self.num_workers, 1)
        for batch in loader:
            self.skipped.update(batch["skipped"])
            if "error" in batch:
                raise ShardsUnreadableError(batch["error"])
            self._consumed[batch["worker"]] = batch["consumed"]
            self._next_worker = (batch["worker"] + 1) % n
            if batch["caption"]:
                self.samples += len(batch["caption"])
                self.without_hard_negatives += batch.get("hard_negatives_missing", 0)
                yield batch
        if not self.stream.config.resampled:  # the pass is complete: the next one starts fresh
            self._epoch += 1
            self._consumed = [0] * n
            self._next_worker = 0
            self._plans = tuple((e, p) for e, p in self._plans if e >= self._epoch)

    def planned(self, epoch: int) -> bool:
        """``epoch`` is read by a re-split plan (in which a rank may have nothing to read)."""
        return any(e == epoch for e, _ in self._plans)


def _batch_as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate step for a stream of finished batches: none."""
    return batch


def make_loader(
    shards: ShardSpec,
    image_transform: Callable[[Image.Image], torch.Tensor],
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    config: ReaderConfig = ReaderConfig(),
    num_workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
    position: StreamPosition = StreamPosition(),
    pin_memory: bool = False,
    caption_transform: Callable[[str, Any], str] | None = None,
    hard_negatives: HardNegativeBatcher | None = None,
) -> ShardLoader:
    """Build the standard loader for a SHARDS specification (see :func:`parse_shard_spec`)."""
    stream = ShardStream(
        parse_shard_spec(shards),
        image_transform,
        batch_transform,
        tokenizer,
        config,
        rank,
        world_size,
        position,
        caption_transform,
        hard_negatives,
    )
    return ShardLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


def count_samples(shards: ShardSpec) -> int | None:
    """Total samples per the manifests, or None when some shard is not in a manifest."""
    totals = [s.samples for s in parse_shard_spec(shards)]
    return None if any(t is None for t in totals) else sum(t for t in totals if t is not None)


__all__ = [
    "SKIP_REASONS",
    "DataError",
    "ReaderConfig",
    "ReaderPlan",
    "Replay",
    "ShardLoader",
    "ShardSource",
    "ShardSpecError",
    "ShardStream",
    "ShardsUnreadableError",
    "StreamPosition",
    "check_exact_pass",
    "count_samples",
    "exact_pass_shards",
    "iter_tar_samples",
    "make_loader",
    "parse_shard_spec",
    "plan_from_dict",
    "plan_to_dict",
    "worker_dies_with_parent",
]
