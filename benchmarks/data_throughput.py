"""``clipforge-data bench``: shard-writing and reader throughput, side by side with open_clip.

1. Source: the demo emoji upscaled to ``--source-size`` JPEGs (bicubic), cycled to ``--images``
   files with same-stem captions -- realistic decode cost, real captions. Not timed.
2. Write: ``write_shards`` on that folder (decode, resize to ``--image-size``, JPEG encode) with
   ``--write-workers`` processes -> images/s.
3. Read: one exact pass of clipforge's reader (decode, open_clip's training transform to
   ``--read-size`` tensors, normalise, tokenize) per worker count, and the same shards through
   open_clip_train's own webdataset pipeline (``peer_open_clip_reader.py`` run by the peer
   venv's Python, see shared/PEERS.md) with the same transform, batch size and workers.
   The first ``--warmup-batches`` batches are not timed, for both tools.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.data_tools.demo import write_demo_shards
from clipforge.data_tools.images import decode_image, to_rgb
from clipforge.data_tools.reader import ReaderConfig, make_loader
from clipforge.data_tools.shardformat import iter_tar_members, read_manifest, split_member_name
from clipforge.data_tools.transforms import clip_image_transforms
from clipforge.data_tools.writer import WriteConfig, write_shards

PEER_SCRIPT = Path(__file__).with_name("peer_open_clip_reader.py")
DEFAULT_PEER_PYTHON = "/work/peers/openclip/bin/python"


@dataclass(frozen=True)
class BenchConfig:
    """Settings of ``clipforge-data bench``."""

    work_dir: Path
    """Scratch folder for the generated source images and shards (reused when present)."""
    images: int = 10000
    """Number of source images (demo emoji cycled)."""
    source_size: int = 256
    """Side of the upscaled source JPEGs."""
    image_size: int = 256
    """Side the writer stores (center_crop)."""
    read_size: int = 224
    """Side of the tensors the reader produces."""
    shard_size: int = 1000
    """Samples per shard."""
    write_workers: int = 2
    """Writer processes."""
    read_workers: tuple[int, ...] = (1, 2)
    """Data-loader worker counts to measure."""
    batch_size: int = 64
    """Reader batch size."""
    warmup_batches: int = 3
    """Batches read before the clock starts."""
    peer_python: str | None = DEFAULT_PEER_PYTHON
    """Python of the open_clip_train venv (None or missing: the peer is skipped, with a note)."""


def make_source(cfg: BenchConfig) -> Path:
    """The upscaled-emoji source folder (created once, then reused)."""
    src = cfg.work_dir / f"source-{cfg.images}-{cfg.source_size}"
    if (src / "done").exists():
        return src
    shutil.rmtree(src, ignore_errors=True)
    demo = cfg.work_dir / "demo"
    manifest = write_demo_shards(demo)
    originals: list[tuple[Image.Image, str]] = []
    for shard in manifest.shards:
        members: dict[str, dict[str, bytes]] = {}
        for name, data in iter_tar_members(str(demo / shard.name)):
            key, ext = split_member_name(name)
            members.setdefault(key, {})[ext] = data
        for m in members.values():
            originals.append((to_rgb(decode_image(m["webp"])), m["txt"].decode()))
    for i in range(cfg.images):
        img, caption = originals[i % len(originals)]
        folder = src / f"{i // 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        big = img.resize((cfg.source_size, cfg.source_size), Image.Resampling.BICUBIC)
        big.save(folder / f"{i:07d}.jpg", "JPEG", quality=90)
        (folder / f"{i:07d}.txt").write_text(caption, encoding="utf-8")
    (src / "done").write_text("")
    return src


def bench_write(cfg: BenchConfig, src: Path) -> tuple[Path, dict[str, Any]]:
    out = cfg.work_dir / "shards"
    shutil.rmtree(out, ignore_errors=True)
    config = WriteConfig(
        image_size=cfg.image_size,
        image_format="jpg",
        quality=90,
        shard_size=cfg.shard_size,
        workers=cfg.write_workers,
        prefix="bench",
    )
    start = time.perf_counter()
    result = write_shards(src, out, config, progress=False)
    seconds = time.perf_counter() - start
    n = result.manifest.samples
    return out, {
        "images": n,
        "seconds": round(seconds, 2),
        "images_per_s": round(n / seconds, 1),
        "workers": cfg.write_workers,
    }


def bench_read_clipforge(cfg: BenchConfig, shards: Path, workers: int) -> dict[str, Any]:
    import open_clip

    per_sample, per_batch = clip_image_transforms(cfg.read_size, train=True)
    loader = make_loader(
        shards,
        per_sample,
        per_batch,
        open_clip.get_tokenizer("ViT-B-32"),
        ReaderConfig(batch_size=cfg.batch_size),
        num_workers=workers,
    )
    samples = 0
    start = time.perf_counter()
    for batches, batch in enumerate(loader, start=1):
        assert batch["image"].shape[-1] == cfg.read_size and batch["text"].shape[-1] == 77
        if batches == cfg.warmup_batches:
            start = time.perf_counter()
        elif batches > cfg.warmup_batches:
            samples += batch["image"].shape[0]
    seconds = time.perf_counter() - start
    rate = samples / seconds
    return {
        "tool": "clipforge",
        "workers": workers,
        "samples": samples,
        "seconds": round(seconds, 2),
        "samples_per_s": round(rate, 1),
        "samples_per_s_per_worker": round(rate / max(workers, 1), 1),
        "skipped": sum(loader.skipped.values()),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def bench_read_peer(cfg: BenchConfig, shards: Path, workers: int) -> dict[str, Any] | str:
    """open_clip_train's pipeline on the same shards, or why it could not run."""
    if not cfg.peer_python or not Path(cfg.peer_python).exists():
        return (
            f"peer skipped: no open_clip_train venv at {cfg.peer_python} "
            "(create it as shared/PEERS.md says and pass --peer-python)"
        )
    manifest = read_manifest(shards)
    assert manifest is not None
    names = [s.name for s in manifest.shards]
    pattern = str(shards / f"bench-{{{names[0][6:12]}..{names[-1][6:12]}}}.tar")
    cmd = [
        cfg.peer_python,
        "-P",  # keep data_tools/ off sys.path: its inspect.py would shadow the stdlib's
        str(PEER_SCRIPT),
        "--shards",
        pattern,
        "--num-samples",
        str(manifest.samples),
        "--batch-size",
        str(cfg.batch_size),
        "--workers",
        str(workers),
        "--image-size",
        str(cfg.read_size),
        "--warmup-batches",
        str(cfg.warmup_batches),
        "--train-transform",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return f"peer failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (self_kb + children_kb) / 1024


def run_benchmark(cfg: BenchConfig, out: Any = sys.stdout) -> dict[str, Any]:
    """Run everything, print a table as it goes, and return all figures."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    src = make_source(cfg)
    shards, write = bench_write(cfg, src)
    print(
        f"write: {write['images']} images {cfg.source_size}px jpg -> {cfg.image_size}px jpg "
        f"shards, {write['workers']} workers: {write['images_per_s']} images/s "
        f"({write['seconds']} s)",
        file=out,
        flush=True,
    )
    rows = []
    print(
        f"read: {cfg.image_size}px jpg shards -> {cfg.read_size}x{cfg.read_size} normalised "
        f"tensors (open_clip train transform) + tokens, batch {cfg.batch_size}",
        file=out,
    )
    print(
        f"{'workers':>7} {'clipforge/s':>12} {'open_clip/s':>12} {'ratio':>6} {'per worker':>11}",
        file=out,
        flush=True,
    )
    for workers in cfg.read_workers:
        ours = bench_read_clipforge(cfg, shards, workers)
        peer = bench_read_peer(cfg, shards, workers)
        peer_rate = peer["samples_per_s"] if isinstance(peer, dict) else None
        ratio = f"{ours['samples_per_s'] / peer_rate:.2f}" if peer_rate else "-"
        print(
            f"{workers:>7} {ours['samples_per_s']:>12} {peer_rate or '-':>12} {ratio:>6} "
            f"{ours['samples_per_s_per_worker']:>11}",
            file=out,
            flush=True,
        )
        if isinstance(peer, str):
            print(f"        {peer}", file=out)
        rows.append({"workers": workers, "clipforge": ours, "open_clip_train": peer})
    return {"write": write, "read": rows, "config": {k: str(v) for k, v in vars(cfg).items()}}
