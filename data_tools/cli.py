"""``clipforge-data``: write, describe, verify and merge webdataset shards; the demo dataset."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from clipforge.data_tools.cliutil import DefaultsHelpFormatter, part_arg, subparser_class
from clipforge.data_tools.images import IMAGE_FORMATS, RESIZE_MODES
from clipforge.data_tools.reader import ShardSpecError
from clipforge.data_tools.shardformat import ManifestError
from clipforge.data_tools.sources import SourceError


def _rgb(value: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
        raise argparse.ArgumentTypeError(f"--background wants R,G,B in 0..255, got {value!r}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipforge-data", description=__doc__, formatter_class=DefaultsHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=subparser_class())
    _add_write_parser(
        sub.add_parser("write", help="write a folder or table of images + captions as shards")
    )

    m = sub.add_parser("merge-manifests", help="join the per-part manifests of --part runs")
    m.add_argument("out_dir", help="the folder every --part run wrote into")

    s = sub.add_parser("stats", help="counts, caption lengths, image sizes, per-shard table")
    s.add_argument("shards", help="folder, brace pattern, glob; several joined with ::")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--workers", type=int, default=2, help="processes reading shards")

    v = sub.add_parser("verify", help="read every member; non-zero exit on any damage")
    v.add_argument("shards", help="folder, brace pattern, glob; several joined with ::")
    v.add_argument("--workers", type=int, default=2, help="processes reading shards")

    d = sub.add_parser("demo", help="write the embedded emoji demo dataset as shards")
    d.add_argument("out_dir", help="folder the demo shards go to (created)")
    return parser


def _add_write_parser(w: argparse.ArgumentParser) -> None:
    """``clipforge-data write``'s arguments (WriteConfig's fields, one flag each)."""
    w.add_argument(
        "src",
        help="folder of images with same-stem .txt captions, or a .csv/.tsv/.jsonl/.parquet table",
    )
    w.add_argument(
        "out_dir", help="folder the shards, manifest.json and stats.json go to (created)"
    )
    w.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="stored size in pixels: the square side (center_crop, pad) or the longest side "
        "(keep_ratio); ignored by --resize-mode none",
    )
    w.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default="center_crop",
        help="center_crop: square crop; keep_ratio: longest side = --image-size; pad: square "
        "with --background bars; none: original size",
    )
    w.add_argument(
        "--image-format",
        choices=IMAGE_FORMATS,
        default="jpg",
        help="encoding of the stored images",
    )
    w.add_argument("--quality", type=int, default=95, help="jpg/webp quality (1-100)")
    w.add_argument(
        "--min-size", type=int, default=0, help="skip images whose shorter side is below this"
    )
    w.add_argument(
        "--shard-size",
        type=int,
        default=10000,
        help="input rows per shard (skipped rows make a shard smaller)",
    )
    w.add_argument("--workers", type=int, default=1, help="processes encoding shards in parallel")
    w.add_argument("--prefix", default="shard", help="shard names: PREFIX-000000.tar")
    w.add_argument(
        "--part",
        type=part_arg,
        default=(0, 1),
        metavar="I/N",
        help="write only the I-th of N disjoint slices (SLURM arrays, ranks); default 0/1: all",
    )
    w.add_argument("--image-column", help="table column with image paths (default: guess)")
    w.add_argument("--caption-column", help="table column with captions (default: guess)")
    w.add_argument(
        "--label-from-folder",
        action="store_true",
        help="folder source with class sub-folders (SRC/cats/x.jpg): store each image's "
        'sub-folder as its label, "category": "cats" in its .json, the field '
        "clipforge-eval zeroshot reads",
    )
    w.add_argument(
        "--background",
        type=_rgb,
        default=(255, 255, 255),
        metavar="R,G,B",
        help="colour transparency is composited onto (and pad fills with); default 255,255,255",
    )
    w.add_argument("--no-resume", action="store_true", help="rewrite shards already complete")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("clipforge").setLevel(logging.INFO)
    try:
        return _COMMANDS[args.command](args)
    except (SourceError, ShardSpecError, ManifestError, ValueError, FileNotFoundError) as e:
        print(f"clipforge-data {args.command}: error: {e}", file=sys.stderr)
        return 2


def _write(args: argparse.Namespace) -> int:
    from clipforge.data_tools.writer import WriteConfig, write_shards

    config = WriteConfig(
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        image_format=args.image_format,
        quality=args.quality,
        min_size=args.min_size,
        shard_size=args.shard_size,
        workers=args.workers,
        prefix=args.prefix,
        part_index=args.part[0],
        part_count=args.part[1],
        background=args.background,
        image_column=args.image_column,
        caption_column=args.caption_column,
        label_from_folder=args.label_from_folder,
        resume=not args.no_resume,
    )
    result = write_shards(args.src, args.out_dir, config, progress=not args.no_progress)
    st = result.stats
    print(
        f"{result.manifest.samples} samples in {len(result.manifest.shards)} shards "
        f"({result.written} written, {result.reused} already complete) -> {result.manifest_path}"
    )
    print(
        f"{st['failed']} of {st['inputs']} inputs skipped"
        + (f": {json.dumps(st['failures'])}" if st["failed"] else "")
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    from clipforge.data_tools.writer import merge_part_manifests

    result = merge_part_manifests(args.out_dir)
    print(
        f"{result.manifest.samples} samples in {len(result.manifest.shards)} shards "
        f"-> {result.manifest_path}"
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from clipforge.data_tools.inspect import shard_stats

    st = shard_stats(args.shards, workers=args.workers)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"{'shard':<48} {'samples':>8} {'MB':>8} {'caption':>8}  formats")
    for row in st["per_shard"]:
        name = row["shard"] if len(row["shard"]) <= 48 else "..." + row["shard"][-45:]
        print(
            f"{name:<48} {row['samples']:>8} {row['bytes'] / 1e6:>8.2f} "
            f"{row['caption_chars_mean']:>8}  {row['image_formats']}"
        )
    cc, w, h = st["caption_chars"], st["image_width"], st["image_height"]
    print(
        f"\n{st['samples']} samples in {st['shards']} shards, {st['image_bytes'] / 1e6:.1f} MB "
        f"of images {st['image_formats']}"
    )
    print(
        f"caption chars: mean {cc['mean']}, p5 {cc['p5']}, p50 {cc['p50']}, p95 {cc['p95']}, "
        f"max {cc['max']}; words mean {st['caption_words']['mean']}"
    )
    print(
        f"image size: width {w['min']}..{w['max']} (p50 {w['p50']}), "
        f"height {h['min']}..{h['max']} (p50 {h['p50']})"
    )
    if st["problems"]:
        print(f"{st['problems']} problems found: run `clipforge-data verify` for the list")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from clipforge.data_tools.inspect import verify_shards

    problems = verify_shards(args.shards, workers=args.workers)
    for p in problems:
        print(p)
    if problems:
        print(f"verify: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print("verify: all shards clean")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from clipforge.data_tools.demo import write_demo_shards

    manifest = write_demo_shards(args.out_dir)
    print(
        f"wrote the emoji demo dataset: {manifest.samples} samples in "
        f"{len(manifest.shards)} shards -> {args.out_dir}"
    )
    return 0


_COMMANDS = {
    "write": _write,
    "merge-manifests": _merge,
    "stats": _stats,
    "verify": _verify,
    "demo": _demo,
}
