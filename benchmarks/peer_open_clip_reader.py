"""Throughput benchmark of open_clip_train's own webdataset input pipeline (a PEER tool).

Builds the training loader exactly as ``python -m open_clip_train.main`` does
(``open_clip_train.data.get_wds_dataset`` with ``is_train=True``, no resampling), with
open_clip's image transform and the default ``ViT-B-32`` tokenizer (context 77), iterates it,
and prints one line of JSON with the measured samples/s, so that clipforge's reader can be
compared with it on the same shards and machine.

This script does NOT import clipforge. It runs only in the peer virtual environment
(torch 2.14.1, open_clip_torch 3.3.0, webdataset==0.2.86, pandas; benchmarks/README.md), and
``python -m benchmarks.data_throughput`` runs it, e.g.::

    "$CLIPFORGE_PEER_OPENCLIP" -P benchmarks/peer_open_clip_reader.py \\
        --shards '/data/shard-{000000..000003}.tar' --num-samples 2000 --workers 2
"""

import argparse
import gc
import json
import random
import resource
import sys
import time

import numpy as np
import open_clip
import torch
from open_clip_train.data import get_wds_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="brace pattern of webdataset tars")
    p.add_argument("--num-samples", type=int, required=True, help="train_num_samples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup-batches", type=int, default=3, help="read first, not timed")
    p.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="total batches to read, warm-up included (default: one epoch)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-transform",
        action="store_true",
        help="use open_clip's training image transform (random resized crop) instead of "
        "the eval one (resize + centre crop)",
    )
    return p.parse_args(argv)


def open_clip_args(args: argparse.Namespace) -> argparse.Namespace:
    """The subset of open_clip_train.main's arguments that get_wds_dataset reads."""
    return argparse.Namespace(
        train_data=args.shards,
        val_data=None,
        train_num_samples=args.num_samples,
        val_num_samples=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        batch_size=args.batch_size,
        workers=args.workers,
        world_size=1,
        seed=args.seed,
    )


def peak_rss_mb() -> float:
    """Peak resident set size of this process plus its largest reaped child, in MB."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (self_kb + children_kb) / 1024.0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    preprocess = open_clip.image_transform(args.image_size, is_train=args.train_transform)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    data = get_wds_dataset(open_clip_args(args), preprocess, is_train=True, tokenizer=tokenizer)
    data.set_epoch(0)
    loader = data.dataloader
    max_batches = args.max_batches if args.max_batches is not None else loader.num_batches

    samples = 0
    batches = 0
    start = time.perf_counter()  # restarted once the warm-up batches are read
    for images, texts in loader:
        assert images.shape[-1] == args.image_size and texts.shape[-1] == 77
        batches += 1
        if batches > args.warmup_batches:
            samples += images.shape[0]
        if batches == args.warmup_batches:
            start = time.perf_counter()
        if batches >= max_batches:
            break
    seconds = time.perf_counter() - start
    if batches <= args.warmup_batches:
        sys.exit(f"only {batches} batches read: not more than --warmup-batches")

    # Shut the persistent workers down so that RUSAGE_CHILDREN includes them.
    del loader, data
    gc.collect()

    rate = samples / seconds
    print(
        json.dumps(
            {
                "tool": "open_clip_train",
                "samples": samples,
                "seconds": round(seconds, 3),
                "samples_per_s": round(rate, 2),
                "samples_per_s_per_worker": round(rate / max(1, args.workers), 2),
                "batch_size": args.batch_size,
                "workers": args.workers,
                "image_size": args.image_size,
                "peak_rss_mb": round(peak_rss_mb(), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
