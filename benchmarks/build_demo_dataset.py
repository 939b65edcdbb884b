"""Rebuild the embedded emoji demo dataset from the two npm tarballs.

    npm pack emoji-datasource-google@16.0.0 emojibase-data@17.0.0
    python -m benchmarks.build_demo_dataset \\
        emoji-datasource-google-16.0.0.tgz emojibase-data-17.0.0.tgz data_tools/demo_data

Every base emoji (no skin-tone variants) with a Google image becomes one sample: the 64x64 Noto
PNG (alpha composited onto white, stored as WebP q90), a caption from its English label and a few
emojibase tags ("grinning face, cheerful, cheery, grin"), and category, subcategory, names, all
tags and the Chinese label in the sample's .json. Shards are stored gzip-compressed (the tar
headers of 1,900 small samples would otherwise double the size); ``clipforge-data demo`` writes
them out as plain tars and checks them against the manifest.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipforge.data_tools.writer import WriteConfig, write_shards

SHARD_SIZE = 240
DEMO_DATA = Path(__file__).resolve().parents[1] / "data_tools" / "demo_data"
"""Where the package's demo data lives in the checkout (``clipforge.data_tools``'s package data)."""
MAX_TAGS = 3


def _extract(tgz: Path, into: Path) -> Path:
    with tarfile.open(tgz) as tar:
        tar.extractall(into, filter="data")
    return into / "package"


def _norm(hexcode: str) -> str:
    return hexcode.upper().replace("-FE0F", "")


def caption_for(label: str, tags: Sequence[str]) -> str:
    """``label, tag, tag, tag``: up to MAX_TAGS tags whose words are not already in the label."""
    label_words = label.lower().replace(":", " ").split()
    # "eye" adds nothing to "... eyes": skip tags that share a stem with a word of the label.
    extra = [
        t
        for t in tags
        if not any(w.startswith(t.lower()) or t.lower().startswith(w) for w in label_words)
    ]
    extra = extra[:MAX_TAGS]
    return ", ".join([label, *extra])


def build_rows(datasource: Path, emojibase: Path) -> list[dict[str, Any]]:
    """One table row per base emoji with a Google image, in the datasource's sort order."""
    emoji = json.loads((datasource / "emoji.json").read_text(encoding="utf-8"))
    english = {
        _norm(e["hexcode"]): e
        for e in json.loads((emojibase / "en" / "data.json").read_text(encoding="utf-8"))
    }
    chinese = {
        _norm(e["hexcode"]): e
        for e in json.loads((emojibase / "zh" / "data.json").read_text(encoding="utf-8"))
    }
    rows = []
    for e in sorted(emoji, key=lambda e: e["sort_order"]):
        image = f"img/google/64/{e['image']}"  # relative: shards do not depend on the temp dir
        if not e.get("has_img_google") or not (datasource / image).exists():
            continue
        en = english.get(_norm(e["unified"]), {})
        label = en.get("label") or e["name"].lower()
        tags = en.get("tags", [])
        rows.append(
            {
                "image": image,
                "caption": caption_for(label, tags),
                "name": label,
                "unified": e["unified"],
                "short_name": e["short_name"],
                "category": e["category"],
                "subcategory": e["subcategory"],
                "tags": tags,
                "label_zh": chinese.get(_norm(e["unified"]), {}).get("label"),
            }
        )
    return rows


NOTICE = """The emoji demo dataset

Images: Noto Emoji by Google, from the npm package emoji-datasource-google@16.0.0, licensed under
the Apache License 2.0 (https://github.com/googlefonts/noto-emoji/blob/main/LICENSE). The images
were alpha-composited onto white and re-encoded as WebP.

Emoji data (names, categories): emoji-datasource-google@16.0.0, MIT License, below.
English tags and Chinese labels: emojibase-data@17.0.0, MIT License, below.

Rebuilt with benchmarks/build_demo_dataset.py.

----- emoji-datasource-google LICENSE -----
{datasource}
----- emojibase-data LICENSE -----
{emojibase}"""


def build(datasource_tgz: Path, emojibase_tgz: Path, out_dir: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        datasource = _extract(datasource_tgz, tmp / "datasource")
        emojibase = _extract(emojibase_tgz, tmp / "emojibase")
        rows = build_rows(datasource, emojibase)
        table = datasource / "emoji.jsonl"
        table.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
        config = WriteConfig(
            image_size=64,
            resize_mode="center_crop",
            image_format="webp",
            quality=90,
            shard_size=SHARD_SIZE,
            prefix="emoji",
            workers=2,
        )
        result = write_shards(table, tmp / "shards", config, progress=False)
        if result.stats["failed"]:
            raise RuntimeError(f"demo build skipped inputs: {result.stats['failures']}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("emoji-*.tar.gz"):
            old.unlink()
        for shard in result.manifest.shards:
            data = (tmp / "shards" / shard.name).read_bytes()
            # mtime=0 and no file name: the same shards always give the same .gz bytes.
            with (
                open(out_dir / f"{shard.name}.gz", "wb") as raw,
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
            ):
                gz.write(data)
        for name in ("manifest.json", "stats.json"):
            shutil.copy(tmp / "shards" / name, out_dir / name)
        (out_dir / "NOTICE").write_text(
            NOTICE.format(
                datasource=(datasource / "LICENSE").read_text(encoding="utf-8"),
                emojibase=(emojibase / "LICENSE").read_text(encoding="utf-8"),
            ),
            encoding="utf-8",
        )
    return result.manifest.samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasource_tgz", type=Path, help="emoji-datasource-google-16.0.0.tgz")
    parser.add_argument("emojibase_tgz", type=Path, help="emojibase-data-17.0.0.tgz")
    parser.add_argument(
        "out_dir",
        type=Path,
        nargs="?",
        default=DEMO_DATA,
        help="the folder clipforge ships the demo from (default: data_tools/demo_data)",
    )
    args = parser.parse_args(argv)
    n = build(args.datasource_tgz, args.emojibase_tgz, args.out_dir)
    total = sum(p.stat().st_size for p in args.out_dir.iterdir())
    print(f"{n} samples -> {args.out_dir} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
