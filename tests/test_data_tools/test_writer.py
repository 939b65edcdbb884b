"""The shard writer on real images: round trip, determinism, shard roll-over, manifest/stats,
bad inputs counted by reason."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from clipforge.data_tools.images import encode_image
from clipforge.data_tools.writer import WriteConfig, write_shards

from .shard_helpers import (
    all_samples,
    image_bytes,
    make_folder_source,
    pattern_image,
    shard_samples,
    tar_members,
)


def test_round_trip_stores_exact_pixels_captions_and_metadata(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sizes = [(24, 18), (9, 31), (17, 17)]
    for i, size in enumerate(sizes):
        pattern_image(size, i).save(src / f"p{i}.png")
    captions = ["a red fox", "  café ☕ «unicode» caption\n", "line one\nline two\n"]
    for i, caption in enumerate(captions):
        (src / f"p{i}.txt").write_text(caption, encoding="utf-8")
    out = tmp_path / "out"

    # png + no resize is lossless, so the stored image must be the input, pixel for pixel.
    result = write_shards(
        src, out, WriteConfig(resize_mode="none", image_format="png"), progress=False
    )

    members = tar_members(out / "shard-000000.tar")
    keys = ["0000000000", "0000000001", "0000000002"]
    # webdataset needs a sample's members adjacent: image, caption, metadata, in input order
    assert [name for name, _ in members] == [
        f"{k}.{e}" for k in keys for e in ("png", "txt", "json")
    ]
    samples = shard_samples(out / "shard-000000.tar")
    for i, key in enumerate(keys):
        original = pattern_image(sizes[i], i)
        stored = Image.open(io.BytesIO(samples[key]["png"]))
        assert stored.size == sizes[i]
        assert stored.convert("RGB").tobytes() == original.tobytes()
        # and the member bytes are exactly the encoder's output for that image
        assert samples[key]["png"] == encode_image(original, "png")
        # the caption is stored as UTF-8, only surrounding whitespace removed
        assert samples[key]["txt"].decode("utf-8") == captions[i].strip()
        assert json.loads(samples[key]["json"]) == {
            "key": key,
            "source": f"p{i}.png",
            "original_width": sizes[i][0],
            "original_height": sizes[i][1],
            "width": sizes[i][0],
            "height": sizes[i][1],
        }
    assert (result.written, result.reused, result.manifest.samples) == (1, 0, 3)


def test_same_input_gives_byte_identical_shards_with_one_or_two_workers(tmp_path: Path) -> None:
    make_folder_source(tmp_path / "src", 7)
    one = write_shards(
        tmp_path / "src", tmp_path / "a", WriteConfig(image_size=16, shard_size=3), progress=False
    )
    # a second run, with 2 worker processes finishing shards in any order
    two = write_shards(
        tmp_path / "src",
        tmp_path / "b",
        WriteConfig(image_size=16, shard_size=3, workers=2),
        progress=False,
    )
    names = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in (tmp_path / "b").glob("*.tar")) == names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert one.manifest.shards == two.manifest.shards
    assert list(all_samples(tmp_path / "a")) == list(all_samples(tmp_path / "b"))


def test_shards_roll_over_at_shard_size_and_manifest_and_stats_describe_them(
    tmp_path: Path,
) -> None:
    captions = make_folder_source(tmp_path / "src", 7, size=(20, 12))
    out = tmp_path / "out"
    write_shards(tmp_path / "src", out, WriteConfig(image_size=8, shard_size=3), progress=False)

    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    # keys: 6-digit shard index + position of the input row within the shard
    assert [list(shard_samples(p)) for p in shards] == [
        ["0000000000", "0000000001", "0000000002"],
        ["0000010000", "0000010001", "0000010002"],
        ["0000020000"],
    ]
    stored_captions = [s["txt"].decode() for s in all_samples(out).values()]
    assert stored_captions == captions

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "clipforge.shards/v1"
    assert manifest["samples"] == 7
    assert manifest["shards"] == [
        {
            "name": p.name,
            "samples": n,
            "bytes": p.stat().st_size,
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
        }
        for p, n in zip(shards, [3, 3, 1], strict=True)
    ]
    assert manifest["writer"]["image_size"] == 8
    assert manifest["writer"]["shard_size"] == 3

    stats = json.loads((out / "stats.json").read_text())
    assert (stats["inputs"], stats["samples"], stats["shards"], stats["failed"]) == (7, 7, 3, 0)
    assert stats["failures"] == {}
    assert stats["bytes"] == sum(p.stat().st_size for p in shards)
    assert [s["samples"] for s in stats["per_shard"]] == [3, 3, 1]
    # sizes are those of the input images; formats those they were read in
    assert stats["image_width"]["min"] == stats["image_width"]["max"] == 20
    assert stats["image_height"]["max"] == 12
    assert stats["image_formats"] == {"png": 7}
    lengths = [len(c) for c in captions]
    assert (stats["caption_chars"]["min"], stats["caption_chars"]["max"]) == (
        min(lengths),
        max(lengths),
    )
    stored_jpgs = [m["jpg"] for m in all_samples(out).values()]
    assert stats["image_bytes"] == sum(len(b) for b in stored_jpgs)


def test_bad_inputs_are_skipped_counted_by_reason_and_named_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    pattern_image((30, 30), 1).save(img_dir / "good1.png")
    pattern_image((30, 30), 2).save(img_dir / "good2.png")
    pattern_image((30, 6), 3).save(img_dir / "thin.png")
    (img_dir / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    full_jpeg = image_bytes(pattern_image((64, 64), 4), "JPEG")
    (img_dir / "cut.jpg").write_bytes(full_jpeg[: len(full_jpeg) // 2])  # header fine, data cut
    (img_dir / "folder.png").mkdir()  # exists, but cannot be read as a file
    table = tmp_path / "table.csv"
    table.write_text(
        "image,caption\n"
        "img/good1.png,first good\n"  # row 0
        "img/nowhere.png,missing file\n"  # row 1
        "img/garbage.jpg,corrupt bytes\n"  # row 2
        "img/cut.jpg,truncated jpeg\n"  # row 3
        "img/good1.png,   \n"  # row 4: blank caption
        "img/good1.png,too,many,fields\n"  # row 5: malformed
        ",no image path\n"  # row 6: empty image value
        "img/thin.png,below min size\n"  # row 7
        "img/folder.png,a directory\n"  # row 8
        "img/good2.png,second good\n",  # row 9
        encoding="utf-8",
    )
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        result = write_shards(table, out, WriteConfig(image_size=16, min_size=10), progress=False)

    stats = json.loads((out / "stats.json").read_text())
    assert stats["failures"] == {
        "bad_row": 2,
        "corrupt_image": 2,
        "empty_caption": 1,
        "missing_image": 1,
        "too_small": 1,
        "unreadable_image": 1,
    }
    assert (stats["inputs"], stats["samples"], stats["failed"]) == (10, 2, 8)
    assert result.manifest.samples == 2
    # the good rows keep the keys of their input positions (0 and 9), whatever failed between
    samples = all_samples(out)
    assert {k: v["txt"].decode() for k, v in samples.items()} == {
        "0000000000": "first good",
        "0000000009": "second good",
    }
    where = {ex["where"]: ex["reason"] for ex in stats["failure_examples"]}
    assert where["img/nowhere.png"] == "missing_image"
    assert where["img/garbage.jpg"] == "corrupt_image"
    assert where["img/cut.jpg"] == "corrupt_image"
    assert where["table.csv:7"] == "bad_row"  # file:line of the malformed row
    assert where["img/thin.png"] == "too_small"
    assert where["img/folder.png"] == "unreadable_image"
    log = caplog.text
    assert "img/nowhere.png (missing_image)" in log
    assert "table.csv:7 (bad_row)" in log
