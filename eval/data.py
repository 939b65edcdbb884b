"""Read an evaluation set (shards or an image folder), embed it, and gather it across ranks.

Every rank reads a disjoint part (whole shards, or every ``world_size``-th file of a folder) and
embeds it; the parts are then gathered on every rank and put in *canonical order* -- the order of
the SHARDS specification, then the order inside each shard (or the sorted file walk of a folder)
-- so the result, and every metric computed from it, is the same for any number of ranks and
data-loader workers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clipforge.data_tools.images import IMAGE_EXTENSIONS, to_rgb
from clipforge.data_tools.reader import ReaderConfig, make_loader, parse_shard_spec
from clipforge.data_tools.shardformat import read_manifest
from clipforge.pretrain.distributed import DistInfo
from clipforge.pretrain.models import dual_encoder


class EvalDataError(ValueError):
    """The evaluation data cannot be used as given (the message says why)."""


@dataclass(frozen=True)
class EvalDataConfig:
    """How an evaluation set is read and grouped."""

    batch_size: int = 256
    """Samples per embedding batch."""
    workers: int = 1
    """Data-loader worker processes per rank (capped so every reader gets a shard)."""
    image_id_field: str | None = None
    """Group captions by this field of the sample's .json (dotted path for nested fields): samples
    sharing a value are one image with several captions, the first sample's image standing for
    the group. None: every sample is its own image."""
    split_lines: bool = False
    """Treat each line of a caption as a separate caption of the image (CLIP_benchmark's layout
    for retrieval sets with several captions per image)."""
    label_field: str | None = None
    """Field of the sample's .json holding the class label (zero-shot). None: ``category`` for
    shards, the class sub-folder for an image folder."""
    precision: str = "fp32"
    """``fp32``, or ``bf16``/``fp16`` autocast (GPU speed; figures move by ~0.1-0.5 points)."""
    limit: int | None = None
    """Read at most this many samples per rank (quick checks; None: all)."""


@dataclass
class EmbeddedSet:
    """An embedded evaluation set in canonical order."""

    image_emb: torch.Tensor
    """(Ni, D) float32, L2-normalised: one row per image (group)."""
    text_emb: torch.Tensor | None
    """(Nt, D) float32, L2-normalised: one row per caption (None when texts were not embedded)."""
    text_image: torch.Tensor
    """(Nt,) int64: the image row of each caption (its positive)."""
    image_keys: list[str]
    """Sample key of each image row (the group's first sample)."""
    sample_keys: list[tuple[str, str]]
    """(shard file name, key) of every sample read, in canonical order."""
    sample_image: torch.Tensor
    """(Ns,) int64: the image row of every sample."""
    image_ids: list[str]
    """Group id of each image row (the ``image_id_field`` value, or the sample key)."""
    labels: list[Any]
    """Per image row: the label field's value (None where absent)."""
    captions: list[str]
    """Per caption row: the caption text."""
    samples: int
    """Samples read (over all ranks)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples skipped by the reader, by reason (over all ranks)."""
    image_metas: list[Any] = field(default_factory=list)
    """Per image row: the .json of its (first) sample, None where absent (query fields such as
    an emoji's ``name``; see :func:`clipforge.eval.retrieval.evaluate_field_queries`)."""


def lookup(meta: Any, path: str) -> Any:
    """``meta["a"]["b"]`` for ``path="a.b"``; None when any part is missing."""
    cur = meta
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def is_image_folder(data: str) -> bool:
    """A local folder with no ``*.tar`` in it: read as image files (not shards)."""
    p = Path(data)
    return "::" not in data and p.is_dir() and not any(p.glob("*.tar"))


def label_field_of(data: str, cfg: EvalDataConfig) -> str:
    """Where a sample's class label is read: ``cfg.label_field``, else ``category`` in a shard
    sample's .json (what ``clipforge-data write --label-from-folder`` stores), else an image
    folder's class sub-folder (``folder``)."""
    return cfg.label_field or ("folder" if is_image_folder(data) else "category")


def data_manifest(data: str) -> dict[str, Any]:
    """What was evaluated: the SHARDS spec with each source's manifest (shard names, sample
    counts, sha256), or an image folder's file count."""
    if is_image_folder(data):
        files = [
            p for p in Path(data).rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        ]
        return {"spec": data, "kind": "image-folder", "images": len(files)}
    sources = []
    for src in parse_shard_spec(data):
        folders = {str(Path(u).parent) for u in src.urls}
        manifests = {}
        for folder in sorted(folders):
            try:
                m = read_manifest(folder)
            except ValueError:
                m = None
            if m is not None:
                manifests[folder] = m.to_json()
        sources.append(
            {
                "shards": list(src.urls),
                "weight": src.weight,
                "samples": src.samples,
                "manifests": manifests,
            }
        )
    return {"spec": data, "kind": "shards", "sources": sources}


# ----------------------------------------------------------------------------- reading


@dataclass
class _Rows:
    """One rank's embedded samples (local order; sorted after gathering)."""

    order: list[tuple[int, int]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    metas: list[Any] = field(default_factory=list)
    image_emb: list[torch.Tensor] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def _iter_shard_batches(
    data: str,
    per_sample: Any,
    per_batch: Any,
    cfg: EvalDataConfig,
    info: DistInfo,
    skipped: Counter[str],
) -> Iterator[dict[str, Any]]:
    sources = parse_shard_spec(data)
    urls = [u for s in sources for u in s.urls]
    url_index = {u: i for i, u in enumerate(urls)}
    if len(urls) < info.world_size:
        raise EvalDataError(
            f"{data}: {len(urls)} shard(s) for {info.world_size} ranks: each rank needs a shard "
            f"(write smaller shards, or run on fewer ranks)"
        )
    workers = max(0, min(cfg.workers, len(urls) // info.world_size))
    loader = make_loader(
        urls,
        per_sample,
        per_batch,
        None,
        ReaderConfig(batch_size=cfg.batch_size, resampled=False),
        num_workers=workers,
        rank=info.rank,
        world_size=info.world_size,
    )
    seq: Counter[str] = Counter()
    for batch in loader:
        order = []
        for u in batch["url"]:
            order.append((url_index[u], seq[u]))  # samples of a shard arrive in tar order
            seq[u] += 1
        batch["order"] = order
        yield batch
    skipped.update(loader.skipped)


class _FolderDataset(torch.utils.data.Dataset):
    """Image files of a folder (sorted walk), this rank's share; caption = same-stem .txt."""

    def __init__(self, root: Path, files: list[Path], per_sample: Any) -> None:
        self.root, self.files, self.per_sample = root, files, per_sample

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str, str, dict[str, Any], str]:
        path = self.files[i]
        rel = path.relative_to(self.root).as_posix()
        parts = rel.split("/")
        # The class sub-folder; an image directly in the root has none (no label).
        meta: dict[str, Any] = {"source": rel, "folder": parts[0] if len(parts) > 1 else None}
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
        try:
            with Image.open(path) as img:
                image = self.per_sample(to_rgb(img))
        except (OSError, ValueError) as e:
            return None, caption, rel, meta, f"corrupt_image: {e}"
        return image, caption, rel, meta, ""


def _iter_folder_batches(
    data: str,
    per_sample: Any,
    per_batch: Any,
    cfg: EvalDataConfig,
    info: DistInfo,
    skipped: Counter[str],
) -> Iterator[dict[str, Any]]:
    root = Path(data)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )
    if not files:
        raise EvalDataError(f"{data}: no image files (and no *.tar shards) in this folder")
    mine = list(range(info.rank, len(files), info.world_size))
    ds = _FolderDataset(root, [files[i] for i in mine], per_sample)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=lambda rows: rows
    )
    pos = 0
    for rows in loader:
        good = [(i, r) for i, r in enumerate(rows) if r[0] is not None]
        skipped["corrupt_image"] += len(rows) - len(good)
        idx = [mine[pos + i] for i, _ in good]
        pos += len(rows)
        if not good:
            continue
        images = per_batch(torch.stack([r[0] for _, r in good]))
        yield {
            "image": images,
            "caption": [r[1] for _, r in good],
            "key": [r[2] for _, r in good],
            "meta": [r[3] for _, r in good],
            "order": [(0, i) for i in idx],
            "url": [data] * len(good),
        }


def precision_autocast(device: torch.device, precision: str) -> Any:
    """The autocast context for `precision` (fp32 | bf16 | fp16) on DEVICE; shared by the
    retrieval and zero-shot embedders so both evaluate under the same numerics."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision not in ("bf16", "fp16"):
        raise EvalDataError(f"precision must be fp32, bf16 or fp16; got {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def read_and_embed_images(
    model: nn.Module,
    data: str,
    image_transforms: tuple[Any, Any],
    cfg: EvalDataConfig,
    info: DistInfo,
) -> _Rows:
    """This rank's samples: image embeddings (B, D) per batch, captions, keys, metas, order."""
    per_sample, per_batch = image_transforms
    rows = _Rows()
    it = (
        _iter_folder_batches(data, per_sample, per_batch, cfg, info, rows.skipped)
        if is_image_folder(data)
        else _iter_shard_batches(data, per_sample, per_batch, cfg, info, rows.skipped)
    )
    was_training = model.training
    model.eval()
    try:
        for batch in it:
            n = len(batch["key"])
            if cfg.limit is not None:
                n = min(n, cfg.limit - len(rows.keys))
            if n <= 0:
                break
            images = batch["image"][:n].to(info.device)  # (B, 3, H, W)
            with torch.no_grad(), precision_autocast(info.device, cfg.precision):
                emb = dual_encoder(model).encode_image(images)
            rows.image_emb.append(F.normalize(emb.float(), dim=-1).cpu())  # (B, D) unit rows
            rows.keys += batch["key"][:n]
            rows.captions += batch["caption"][:n]
            rows.metas += batch["meta"][:n]
            rows.order += batch["order"][:n]
            rows.urls += batch["url"][:n]
    finally:
        model.train(was_training)
    return rows


def embed_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> torch.Tensor:
    """(N, D) float32 L2-normalised text embeddings, computed in batches on ``device``."""
    out = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[i : i + batch_size]).to(device)  # (B, context)
            with torch.no_grad(), precision_autocast(device, precision):
                emb = dual_encoder(model).encode_text(tokens)
            out.append(F.normalize(emb.float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


# ----------------------------------------------------------------------------- gathering


def all_gather_rows(local: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's ``(n_r, D)`` tensor in rank order (rows may differ per rank)."""
    if not info.distributed:
        return local
    dev = info.device if info.backend == "nccl" else torch.device("cpu")
    n = torch.tensor([local.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n)
    top = int(max(int(s) for s in sizes))
    padded = torch.zeros((top, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local.to(dev)
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)]).cpu()


def all_gather_list(local: list[Any], info: DistInfo) -> list[Any]:
    """Concatenate every rank's Python list in rank order."""
    if not info.distributed:
        return local
    boxes: list[Any] = [None] * info.world_size
    dist.all_gather_object(boxes, local)
    return [x for box in boxes for x in box]


def gather_rows(rows: _Rows, info: DistInfo) -> tuple[_Rows, torch.Tensor]:
    """Every rank's rows on every rank, in canonical order; returns (rows, image_emb (N, D))."""
    dim = rows.image_emb[0].shape[1] if rows.image_emb else 0
    dims = all_gather_list([dim], info)
    dim = max(dims) if dims else 0
    local_emb = torch.cat(rows.image_emb) if rows.image_emb else torch.zeros(0, dim)
    emb = all_gather_rows(local_emb, info)
    meta = all_gather_list(
        list(zip(rows.order, rows.keys, rows.captions, rows.metas, rows.urls, strict=True)), info
    )
    skipped = all_gather_list([dict(rows.skipped)], info)
    perm = sorted(range(len(meta)), key=lambda i: meta[i][0])
    out = _Rows(
        order=[meta[i][0] for i in perm],
        keys=[meta[i][1] for i in perm],
        captions=[meta[i][2] for i in perm],
        metas=[meta[i][3] for i in perm],
        urls=[meta[i][4] for i in perm],
    )
    for s in skipped:
        out.skipped.update(s)
    return out, emb[torch.tensor(perm, dtype=torch.long)] if perm else emb


# ----------------------------------------------------------------------------- the whole set


def embed_eval_set(
    model: nn.Module,
    tokenizer: Any,
    image_transforms: tuple[Any, Any],
    data: str,
    cfg: EvalDataConfig,
    info: DistInfo,
    texts: bool = True,
) -> EmbeddedSet:
    """Read ``data``, embed its images (and captions), group captions by image id, and return
    the whole set in canonical order on every rank. Captions are embedded split across ranks."""
    rows = read_and_embed_images(model, data, image_transforms, cfg, info)
    rows, sample_emb = gather_rows(rows, info)
    if not rows.keys:
        raise EvalDataError(f"{data}: no usable samples (skipped: {dict(rows.skipped) or 'none'})")
    # Group samples into images.
    group_of: dict[str, int] = {}
    image_rows: list[int] = []
    sample_image: list[int] = []
    for i, (key, meta) in enumerate(zip(rows.keys, rows.metas, strict=True)):
        gid = key
        if cfg.image_id_field:
            value = lookup(meta, cfg.image_id_field)
            if value is None:
                raise EvalDataError(
                    f"sample {key}: no field {cfg.image_id_field!r} in its .json to group by"
                )
            gid = str(value)
        if gid not in group_of:
            group_of[gid] = len(image_rows)
            image_rows.append(i)
        sample_image.append(group_of[gid])
    captions: list[str] = []
    text_image: list[int] = []
    for cap, img in zip(rows.captions, sample_image, strict=True):
        lines = [ln.strip() for ln in cap.splitlines()] if cfg.split_lines else [cap]
        for line in lines:
            if line:
                captions.append(line)
                text_image.append(img)
    label_field = label_field_of(data, cfg)
    text_emb = None
    if texts:
        # Each rank embeds a contiguous slice of the captions; gathered back in order.
        n = len(captions)
        lo = n * info.rank // info.world_size
        hi = n * (info.rank + 1) // info.world_size
        local = embed_texts(
            model, tokenizer, captions[lo:hi], cfg.batch_size, info.device, cfg.precision
        )
        if local.numel() == 0:
            local = torch.zeros(0, sample_emb.shape[1])
        text_emb = all_gather_rows(local, info)
    idx = torch.tensor(image_rows, dtype=torch.long)
    return EmbeddedSet(
        image_emb=sample_emb[idx],
        text_emb=text_emb,
        text_image=torch.tensor(text_image, dtype=torch.long),
        image_keys=[rows.keys[i] for i in image_rows],
        sample_keys=[(Path(u).name, k) for u, k in zip(rows.urls, rows.keys, strict=True)],
        sample_image=torch.tensor(sample_image, dtype=torch.long),
        image_ids=list(group_of),
        labels=[lookup(rows.metas[i], label_field) for i in image_rows],
        captions=captions,
        samples=len(rows.keys),
        skipped=dict(rows.skipped),
        image_metas=[rows.metas[i] for i in image_rows],
    )
