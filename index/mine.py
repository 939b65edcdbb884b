"""``clipforge-index mine``: hard negatives for training, mined from an ``EMB_DIR``.

For each training sample (each distinct key of ``EMB_DIR``'s metadata), the ``k`` captions whose
embeddings score highest against the sample's image embedding, excluding its own caption(s) and
every caption whose text equals one of its own; each caption text is a candidate once (its first
row), so a sample's negatives are distinct texts. Written as a hard-negatives file
(:mod:`clipforge.data_tools.hard_negatives`) that training reads as ``data.hard_negatives``.

The search is exact and brute force: image chunks x caption chunks, one matrix product and a
running top-k per pair, so memory is bounded by the chunk sizes (never N x N) but time is
O(N^2 D). That is what it is for: the training sets one fine-tunes on, up to a few million
samples on a GPU (10^6 samples at D=512: ~10^15 multiply-adds, minutes on one GPU, hours on CPU).
Beyond that, an approximate index (``clipforge-index build``) would be the tool; it is not used
here because an exact answer is cheap at these sizes and testable against brute force.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from clipforge.data_tools.hard_negatives import HardNegativesHeader, write_hard_negatives

from .emb_dir import (
    EMBEDDINGS_MANIFEST,
    EmbedError,
    metadata_file,
    open_vectors,
    read_embeddings_manifest,
)
from .embed import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MineConfig:
    """What ``clipforge-index mine`` reads, writes and how."""

    emb_dir: str
    """The ``EMB_DIR`` of the training shards (``clipforge-index embed`` with image and text)."""
    out: str
    """The hard-negatives file to write (atomically)."""
    k: int = 4
    """Negatives per sample."""
    query_chunk: int = 1024
    """Image rows scored at a time."""
    caption_chunk: int = 8192
    """Caption rows scored at a time (scores held: query_chunk x caption_chunk floats)."""
    device: str = "auto"
    """``auto``: CUDA when available, else CPU; or ``cpu`` / ``cuda``."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"mine: --k must be >= 1, got {self.k}")
        if self.query_chunk < 1 or self.caption_chunk < 1:
            raise ValueError(
                f"mine: chunk sizes must be >= 1, got {self.query_chunk}, {self.caption_chunk}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"mine: --device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class MineResult:
    """What :func:`mine` wrote."""

    samples: int
    """Entries written (distinct keys)."""
    without: int
    """Entries with fewer than k negatives (the collection had too few other captions)."""
    seconds: float
    """Wall time of the whole command."""


def _metadata(emb_dir: Path, manifest: dict) -> tuple[list[str], list[str]]:
    """Every row's ``key`` and ``caption``, in global row order (part order)."""
    keys: list[str] = []
    captions: list[str] = []
    for part in manifest["parts"]:
        path = emb_dir / metadata_file(part["part"])
        if not path.is_file():
            raise FileNotFoundError(f"metadata part file missing: {path}")
        table = pq.read_table(path, columns=["key", "caption"])
        if table.num_rows != int(part["count"]):
            raise EmbedError(
                f"{path}: {table.num_rows} rows but {EMBEDDINGS_MANIFEST} lists {part['count']}"
            )
        keys.extend(table.column("key").to_pylist())
        captions.extend(table.column("caption").to_pylist())
    return keys, captions


def nearest_other_captions(
    emb_dir: str | os.PathLike[str],
    k: int,
    query_chunk: int = 1024,
    caption_chunk: int = 8192,
    device: torch.device | None = None,
) -> tuple[list[str], list[list[str]]]:
    """``(keys, negatives)``: each distinct key of ``emb_dir`` (first-seen order) and its up
    to ``k`` mined negative captions, most similar to its image first.

    Rows sharing a key are one sample with several captions: its image is its first row's, and
    all of its captions are its own."""
    device = device or torch.device("cpu")
    d = Path(emb_dir)
    manifest = read_embeddings_manifest(d)
    missing = [m for m in ("image", "text") if m not in manifest["modalities"]]
    if missing:
        raise EmbedError(
            f"{d / EMBEDDINGS_MANIFEST} has no {' or '.join(missing)} embeddings: mining needs "
            "both (embed with --modalities image,text)"
        )
    images, texts = open_vectors(d, "image", manifest), open_vectors(d, "text", manifest)
    keys, captions = _metadata(d, manifest)

    text_of: dict[str, int] = {}
    text_id = np.array([text_of.setdefault(c, len(text_of)) for c in captions], np.int64)  # (N,)
    # a caption text is a candidate once, at its first row: negatives come out distinct
    candidate = np.zeros(len(captions), dtype=bool)  # (N,)
    candidate[np.unique(text_id, return_index=True)[1]] = True
    rows_of: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        rows_of.setdefault(key, []).append(row)
    sample_keys = list(rows_of)
    first_row = np.array([rows_of[key][0] for key in sample_keys], np.int64)  # (Q,)
    widest = max(len(r) for r in rows_of.values())
    own = np.full((len(sample_keys), widest), -1, np.int64)  # (Q, G) own caption text ids
    for q, key in enumerate(sample_keys):
        ids = text_id[rows_of[key]]
        own[q, : len(ids)] = ids

    text_id_t = torch.from_numpy(text_id).to(device)
    candidate_t = torch.from_numpy(candidate).to(device)
    negatives: list[list[str]] = []
    for start in range(0, len(sample_keys), query_chunk):
        stop = min(start + query_chunk, len(sample_keys))
        query = torch.from_numpy(images.take(first_row[start:stop])).to(device)  # (b, D)
        own_t = torch.from_numpy(own[start:stop]).to(device)  # (b, G)
        best = torch.full((stop - start, k), float("-inf"), device=device)  # (b, k)
        best_ids = torch.full((stop - start, k), -1, dtype=torch.long, device=device)
        for first, chunk in texts.iter_chunks(caption_chunk):
            cols = torch.arange(first, first + len(chunk), device=device)  # (t,)
            scores = query @ torch.from_numpy(chunk).to(device).T  # (b, t)
            excluded = (text_id_t[cols][None, :, None] == own_t[:, None, :]).any(-1)  # (b, t)
            excluded |= ~candidate_t[cols][None, :]
            scores = scores.masked_fill(excluded, float("-inf"))
            merged = torch.cat([best, scores], dim=1)  # (b, k + t)
            merged_ids = torch.cat([best_ids, cols.expand(stop - start, -1)], dim=1)
            top = torch.topk(merged, min(k, merged.shape[1]), dim=1, sorted=True)
            best, best_ids = top.values, merged_ids.gather(1, top.indices)
        for vals, ids in zip(best.cpu().numpy(), best_ids.cpu().numpy(), strict=True):
            negatives.append([captions[i] for v, i in zip(vals, ids, strict=True) if v > -np.inf])
    return sample_keys, negatives


def mine(config: MineConfig) -> MineResult:
    """Mine ``config.k`` negatives per sample of ``config.emb_dir`` into ``config.out``."""
    t0 = time.perf_counter()
    d = Path(config.emb_dir)
    manifest = read_embeddings_manifest(d)
    device = torch.device(resolve_device(config.device))
    keys, negatives = nearest_other_captions(
        d, config.k, config.query_chunk, config.caption_chunk, device
    )
    header = HardNegativesHeader(
        emb_dir=str(d.resolve()),
        model=str(manifest.get("model_source", "")),
        model_hash=str(manifest.get("model_hash", "")),
        k=config.k,
        count=len(keys),
    )
    write_hard_negatives(config.out, header, zip(keys, negatives, strict=True))
    without = sum(len(n) < config.k for n in negatives)
    return MineResult(len(keys), without, time.perf_counter() - t0)
