"""Samples/s of ``clipforge-index embed`` against a plain open_clip loop, same settings.

Both pipelines embed the same local shards with the same model, batch size, data-loader workers
and torch threads: clipforge's ``embed`` end to end (reader, model, part files, markers,
embeddings.json), and what a user would write with open_clip alone (a map-style Dataset over tar
offsets, PIL decode, ``open_clip.image_transform``, a DataLoader). Best of ``--repeats`` each,
the order alternating, after an untimed read of the shards and an untimed forward pass;
wall-clock and CPU-time throughput are both reported, and the largest difference between the
two pipelines' embeddings (same pixels, same model: it should be ~0). Run from the repository
root::

    python -m benchmarks.embed_throughput --model RUN --data SHARDS [--batch-size 256]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from clipforge.data_tools.atomic import write_json_atomic
from clipforge.data_tools.images import to_rgb
from clipforge.data_tools.reader import parse_shard_spec
from clipforge.data_tools.shardformat import IMAGE_MEMBER_EXTENSIONS, is_remote, split_member_name
from clipforge.index.emb_dir import MODALITIES, EmbedError, iter_parts
from clipforge.index.embed import EmbedConfig, autocast_for, embed, resolve_device
from clipforge.pretrain.distributed import DistInfo
from clipforge.pretrain.models import LoadedModel, load_model


@dataclass(frozen=True)
class EmbedBenchResult:
    """The benchmark's figures: clipforge embed vs a plain open_clip loop."""

    samples: int
    """Samples embedded per run (both pipelines embed the same samples)."""
    clipforge_samples_per_s: float
    """clipforge ``embed`` end to end (reader, model, part files, markers, embeddings.json)."""
    plain_samples_per_s: float
    """Plain loop: map-style Dataset, PIL decode, ``open_clip.image_transform``, DataLoader."""
    clipforge_samples_per_cpu_s: float
    """clipforge samples per CPU-second (main process + its data workers): robust to other
    load on a shared machine, where wall-clock figures are not."""
    plain_samples_per_cpu_s: float
    """The plain loop's samples per CPU-second."""
    max_abs_diff: float
    """Largest |clipforge - plain| over all embedding values (float32): same inputs, same math."""
    batch_size: int
    """Batch size of both."""
    workers: int
    """Data-loader workers of both."""
    threads: int
    """torch intra-op threads of both."""
    device: str
    """Device of both."""

    @property
    def ratio(self) -> float:
        """clipforge / plain throughput."""
        return self.clipforge_samples_per_s / max(self.plain_samples_per_s, 1e-12)


class _PlainTarDataset(torch.utils.data.Dataset):
    """What a user would write with open_clip alone: samples indexed by tar offsets, decoded
    with PIL and transformed by ``open_clip.image_transform``, captions tokenized per batch."""

    def __init__(self, shards: Sequence[str], transform: Callable[[Any], torch.Tensor]) -> None:
        self.items: list[tuple[str, str, int, int, int, int]] = []
        for url in shards:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(url, mode="r:") as tar:
                for info in tar:
                    key, ext = split_member_name(info.name)
                    groups.setdefault(key, {})[ext.lower()] = info
            for key, members in groups.items():
                ext = next((e for e in IMAGE_MEMBER_EXTENSIONS if e in members), None)
                if ext is None or "txt" not in members:
                    continue
                img, txt = members[ext], members["txt"]
                self.items.append((url, key, img.offset_data, img.size, txt.offset_data, txt.size))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        url, key, io_, isz, to_, tsz = self.items[i]
        with open(url, "rb") as f:
            f.seek(io_)
            image_bytes = f.read(isz)
            f.seek(to_)
            caption = f.read(tsz).decode("utf-8").strip()
        # to_rgb (alpha composited on white) as the reader does, so both see the same pixels.
        image = to_rgb(Image.open(io.BytesIO(image_bytes)))
        return self.transform(image), caption, key


def _plain_loop(
    loaded: LoadedModel,
    shards: Sequence[str],
    batch_size: int,
    workers: int,
    modalities: Sequence[str],
) -> tuple[float, int, dict[str, dict[str, np.ndarray]]]:
    transform = open_clip.image_transform(
        loaded.image_size, is_train=False, mean=loaded.mean, std=loaded.std
    )
    tokenizer = loaded.tokenizer

    def collate(rows: list[tuple[torch.Tensor, str, str]]) -> dict[str, Any]:
        return {
            "image": torch.stack([r[0] for r in rows]),  # (B, 3, H, W) float, normalised
            "text": tokenizer([r[1] for r in rows]),  # (B, context_length)
            "key": [r[2] for r in rows],
        }

    device = next(loaded.model.parameters()).device
    t0 = time.perf_counter()
    dataset = _PlainTarDataset(shards, transform)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, shuffle=False
    )
    out: dict[str, dict[str, np.ndarray]] = {m: {} for m in modalities}
    n = 0
    for batch in loader:
        with torch.inference_mode(), autocast_for(device):
            feats = {}
            if "image" in modalities:
                feats["image"] = loaded.model.encode_image(batch["image"].to(device))  # (B, D)
            if "text" in modalities:
                feats["text"] = loaded.model.encode_text(batch["text"].to(device))  # (B, D)
        for m, f in feats.items():
            arr = F.normalize(f.float(), dim=-1).cpu().numpy()  # (B, D) unit rows
            out[m].update(zip(batch["key"], arr, strict=True))
        n += len(batch["key"])
    return time.perf_counter() - t0, n, out


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the data-loader workers, which the
    loaders join when a pass ends)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _warm_up(loaded: LoadedModel, batch_size: int, modalities: Sequence[str]) -> None:
    """One untimed forward per tower at the benchmark's batch size (first-call allocations and
    kernel selection would otherwise be charged to whichever pipeline runs first)."""
    device = next(loaded.model.parameters()).device
    size = loaded.image_size
    with torch.inference_mode(), autocast_for(device):
        if "image" in modalities:
            loaded.model.encode_image(torch.zeros(batch_size, 3, size, size, device=device))
        if "text" in modalities:
            loaded.model.encode_text(loaded.tokenizer(["warm up"] * batch_size).to(device))


def bench_embed(
    model: str | LoadedModel,
    data: str,
    work_dir: str | os.PathLike[str],
    batch_size: int = 256,
    workers: int = 2,
    threads: int | None = None,
    modalities: tuple[str, ...] = MODALITIES,
    device: str = "auto",
    repeats: int = 2,
) -> EmbedBenchResult:
    """Samples/s of :func:`embed` and of a plain open_clip loop on the same shards, model,
    batch size, workers and threads: best of ``repeats`` each, the order alternating, after an
    untimed read of the shard files and an untimed forward pass. Wall-clock and CPU-time
    throughput are both reported. Local uncompressed shards only (the plain loop seeks in
    them)."""
    urls = [u for src in parse_shard_spec(data) for u in src.urls]
    if any(is_remote(u) for u in urls):
        raise EmbedError("embed_throughput reads local shards only (the plain loop seeks in them)")
    if threads is not None:
        torch.set_num_threads(threads)
    device_name = resolve_device(device)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device_name)
    for url in urls:  # warm the page cache so neither pipeline pays the first disk read
        with open(url, "rb") as f:
            while f.read(1 << 22):
                pass
    _warm_up(loaded, batch_size, modalities)
    work = Path(work_dir)
    single = DistInfo(0, 1, 0, next(loaded.model.parameters()).device, None)
    best = {"cf": (0.0, 0.0), "plain": (0.0, 0.0)}  # (samples/s, samples/cpu-s)
    n_cf = n_plain = 0
    plain_out: dict[str, dict[str, np.ndarray]] = {}
    for r in range(repeats):
        # Alternate which pipeline goes first, so neither always meets a colder machine.
        for which in ("cf", "plain") if r % 2 == 0 else ("plain", "cf"):
            t0, c0 = time.perf_counter(), _cpu_seconds()
            if which == "cf":
                cfg = EmbedConfig(
                    model=str(loaded.source), data=data, out=str(work / "bench-embed"),
                    dtype="float32", batch_size=batch_size, workers=workers,
                    modalities=modalities, device=device_name, progress="none", overwrite=True,
                )  # fmt: skip
                n_cf = n = embed(cfg, loaded=loaded, dist_info=single).samples
            else:
                _, n_plain, plain_out = _plain_loop(loaded, urls, batch_size, workers, modalities)
                n = n_plain
            wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            best[which] = (max(best[which][0], n / wall), max(best[which][1], n / cpu))
    diff = 0.0
    for _, arrays, meta in iter_parts(work / "bench-embed"):
        keys = meta.column("key").to_pylist()
        for m in modalities:
            ref = np.stack([plain_out[m][k] for k in keys]) if keys else arrays[m]
            diff = max(diff, float(np.abs(np.asarray(arrays[m], np.float32) - ref).max(initial=0)))
    if n_cf != n_plain:
        raise EmbedError(f"the pipelines embedded different sample counts: {n_cf} vs {n_plain}")
    return EmbedBenchResult(
        samples=n_cf,
        clipforge_samples_per_s=best["cf"][0],
        plain_samples_per_s=best["plain"][0],
        clipforge_samples_per_cpu_s=best["cf"][1],
        plain_samples_per_cpu_s=best["plain"][1],
        max_abs_diff=diff,
        batch_size=batch_size,
        workers=workers,
        threads=torch.get_num_threads(),
        device=device_name,
    )


def _modalities(text: str) -> tuple[str, ...]:
    mods = tuple(m.strip() for m in text.split(",") if m.strip())
    if not mods or any(m not in MODALITIES for m in mods):
        raise argparse.ArgumentTypeError(f"expected image, text or image,text; got {text!r}")
    return mods


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (they were ``clipforge-index bench-embed``'s)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.embed_throughput", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", required=True, help="run directory, model/ folder or checkpoint")
    p.add_argument("--data", required=True, help="local uncompressed SHARDS")
    p.add_argument("--batch-size", type=int, default=256,
                   help="samples per forward pass (default: %(default)s)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2,
                   help="data-loader processes (default: %(default)s)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--modalities", type=_modalities, default=("image", "text"),
                   help="towers: image, text or image,text (default: image,text)")  # fmt: skip
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N (default: %(default)s)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=2,
                   help="best of N runs each (default: %(default)s)")  # fmt: skip
    p.add_argument("--work-dir", help="scratch folder (default: a temporary one)")
    p.add_argument("--json", help="also write the figures to this file (default: none)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; 2 on bad input (the message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="clipforge-bench-embed-") as tmp:
            r = bench_embed(
                args.model,
                args.data,
                args.work_dir or tmp,
                batch_size=args.batch_size,
                workers=args.workers,
                threads=args.threads,
                modalities=args.modalities,
                device=args.device,
                repeats=args.repeats,
            )
    except (EmbedError, FileNotFoundError, ValueError) as e:
        print(f"embed_throughput: error: {e}", file=sys.stderr)
        return 2
    print(
        f"embed_throughput: {r.samples} samples, batch {r.batch_size}, {r.workers} worker(s), "
        f"{r.threads} thread(s), {r.device}, modalities {','.join(args.modalities)}"
    )
    cpu_ratio = r.clipforge_samples_per_cpu_s / max(r.plain_samples_per_cpu_s, 1e-12)
    print(f"{'':20}{'samples/s':>12}{'samples/CPU-s':>16}")
    print(f"{'clipforge embed':20}{r.clipforge_samples_per_s:12.1f}"
          f"{r.clipforge_samples_per_cpu_s:16.1f}")  # fmt: skip
    print(f"{'plain open_clip':20}{r.plain_samples_per_s:12.1f}{r.plain_samples_per_cpu_s:16.1f}")
    print(f"{'ratio':20}{r.ratio:11.2f}x{cpu_ratio:15.2f}x")
    print(f"max |difference| of the embeddings: {r.max_abs_diff:.2e}")
    if args.json:
        write_json_atomic(args.json, {**asdict(r), "ratio": r.ratio})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
