"""Shard-writing and reader throughput, side by side with open_clip_train's input pipeline.

    python -m benchmarks.data_throughput --work-dir bench-work [--peer-python VENV/bin/python]
    python -m benchmarks.data_throughput --work-dir bench-work --no-peer   # clipforge alone

The open_clip_train venv's python comes from ``--peer-python`` or ``$CLIPFORGE_PEER_OPENCLIP``
(README.md in this folder says how to make it); it is checked before anything is measured.

1. Source: the demo emoji upscaled to ``--source-size`` JPEGs (bicubic), cycled to ``--images``
   files with same-stem captions -- realistic decode cost, real captions. Not timed.
2. Write: ``write_shards`` on that folder (decode, resize to ``--image-size``, JPEG encode) with
   ``--write-workers`` processes -> images/s.
3. Read: one exact pass of clipforge's reader (decode, open_clip's training transform to
   ``--read-size`` tensors, normalise, tokenize) per worker count, and the same shards through
   open_clip_train's own webdataset pipeline (``peer_open_clip_reader.py`` run by the peer
   venv's python) with the same transform, batch size and workers.
   The first ``--warmup-batches`` batches are not timed, for both tools.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

from benchmarks.peer_python import OPEN_CLIP_TRAIN, PeerError, peer_env, peer_python
from clipforge.data_tools.atomic import write_json_atomic
from clipforge.data_tools.demo import write_demo_shards
from clipforge.data_tools.images import decode_image, to_rgb
from clipforge.data_tools.reader import ReaderConfig, make_loader
from clipforge.data_tools.shardformat import iter_tar_members, read_manifest, split_member_name
from clipforge.data_tools.transforms import clip_image_transforms
from clipforge.data_tools.writer import WriteConfig, write_shards

PEER_SCRIPT = Path(__file__).with_name("peer_open_clip_reader.py")


@dataclass(frozen=True)
class BenchConfig:
    """Settings of the data benchmark (its command-line flags map onto these)."""

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
    peer_python: str | None = None
    """Python of the open_clip_train venv, already checked (None: clipforge alone)."""


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
    """Write ``src`` as shards with ``cfg.write_workers`` processes; (the shards, figures)."""
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
    """One exact pass of clipforge's reader over ``shards`` with ``workers`` processes."""
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
    if not cfg.peer_python:
        return "peer not run (--no-peer)"
    manifest = read_manifest(shards)
    assert manifest is not None
    names = [s.name for s in manifest.shards]
    pattern = str(shards / f"bench-{{{names[0][6:12]}..{names[-1][6:12]}}}.tar")
    cmd = [
        cfg.peer_python,
        "-P",  # keep this folder off the peer's sys.path: nothing of the checkout may shadow
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
    proc = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), check=False)
    if proc.returncode != 0:
        return f"peer failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (self_kb + children_kb) / 1024


def run_benchmark(cfg: BenchConfig, out: TextIO | None = None) -> dict[str, Any]:
    """Run everything, print a table as it goes (to ``out``, default stdout), and return all
    figures."""
    out = out or sys.stdout  # looked up now, not at import: the caller may have replaced it
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.data_throughput",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--work-dir", default="bench-work", help="scratch folder (reused)")
    parser.add_argument("--images", type=int, default=10000, help="synthetic images to write")
    parser.add_argument(
        "--source-size", type=int, default=256, help="side of the synthetic source images"
    )
    parser.add_argument("--image-size", type=int, default=256, help="side stored in the shards")
    parser.add_argument("--read-size", type=int, default=224, help="side of the reader's tensors")
    parser.add_argument("--write-workers", type=int, default=2, help="writer processes")
    parser.add_argument("--read-workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=64, help="reader batch size")
    parser.add_argument(
        "--peer-python",
        default=None,
        help=f"python of the open_clip_train venv (default ${OPEN_CLIP_TRAIN.env_var})",
    )
    parser.add_argument(
        "--no-peer", action="store_true", help="measure clipforge alone (no peer venv needed)"
    )
    parser.add_argument("--json", help="also write all figures to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 2 with a one-line error for bad flags or a missing peer."""
    args = build_parser().parse_args(argv)
    prog = "benchmarks.data_throughput"
    try:
        read_workers = tuple(int(w) for w in args.read_workers.split(","))
    except ValueError:
        print(f"{prog}: error: --read-workers {args.read_workers!r}: not integers", file=sys.stderr)
        return 2
    try:
        python = (
            None
            if args.no_peer
            else peer_python(OPEN_CLIP_TRAIN, args.peer_python, alone="--no-peer")
        )
    except PeerError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    cfg = BenchConfig(
        work_dir=Path(args.work_dir),
        images=args.images,
        source_size=args.source_size,
        image_size=args.image_size,
        read_size=args.read_size,
        write_workers=args.write_workers,
        read_workers=read_workers,
        batch_size=args.batch_size,
        peer_python=python,
    )
    figures = run_benchmark(cfg)
    if args.json:
        write_json_atomic(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
