"""Every source type read and written through the real writer: folders (recursive, same-stem
.txt), .csv, .tsv, .jsonl and .parquet tables with configurable columns."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipforge.data_tools.sources import SourceError, iter_source
from clipforge.data_tools.writer import WriteConfig, write_shards

from .shard_helpers import all_samples, pattern_image

# Three rows: a path relative to the table's folder, a nested relative path, an absolute path.
_CAPTIONS = ["a, comma-separated caption", 'with "quotes" inside', "plain"]
_LICENSES = ["cc-by", "cc0", "mit"]


def _images(tmp_path: Path) -> list[str]:
    """Image paths as they go into the tables (two relative to ``tmp_path/data``, one absolute)."""
    (tmp_path / "data" / "pics" / "deeper").mkdir(parents=True)
    pattern_image((12, 10), 0).save(tmp_path / "data" / "pics" / "a.png")
    pattern_image((12, 10), 1).save(tmp_path / "data" / "pics" / "deeper" / "b.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pattern_image((12, 10), 2).save(elsewhere / "c.png")
    return ["pics/a.png", "pics/deeper/b.png", str(elsewhere / "c.png")]


def _write_table(kind: str, tmp_path: Path, paths: list[str]) -> Path:
    # columns named unlike any guessed default, so --image-column/--caption-column are needed
    rows = [
        {"picture": p, "alt_text": c, "license": lic, "rank": i}
        for i, (p, c, lic) in enumerate(zip(paths, _CAPTIONS, _LICENSES, strict=True))
    ]
    path = tmp_path / "data" / f"table.{kind}"
    if kind in ("csv", "tsv"):
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, list(rows[0]), delimiter="," if kind == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_table_source_with_named_columns_resolves_paths_and_keeps_extra_columns(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _images(tmp_path)
    table = _write_table(kind, tmp_path, paths)
    # run from another folder: relative paths must resolve against the table's folder, not cwd
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = tmp_path / "out"
    config = WriteConfig(
        image_size=8, image_format="png", image_column="picture", caption_column="alt_text"
    )
    result = write_shards(table, out, config, progress=False)

    assert result.stats["failures"] == {}
    samples = list(all_samples(out).values())
    assert [s["txt"].decode() for s in samples] == _CAPTIONS
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["source"] for m in metas] == paths
    assert [m["license"] for m in metas] == _LICENSES
    # text tables give strings; jsonl and parquet keep the column's type
    ranks = [m["rank"] for m in metas]
    assert ranks == (["0", "1", "2"] if kind in ("csv", "tsv") else [0, 1, 2])
    assert all("picture" not in m and "alt_text" not in m for m in metas)


def test_folder_source_is_recursive_sorted_and_counts_images_without_usable_caption(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    for rel, caption in [
        ("b.png", "top level b"),
        ("a/z.png", "nested z"),
        ("a/deep/er/y.jpg", "deeply nested y"),
        ("a.png", "top level a"),
        ("c.webp", None),  # no caption file
    ]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[rel.rsplit(".", 1)[1]]
        pattern_image((10, 10), len(rel)).save(src / rel, fmt)
        if caption is not None:
            (src / rel).with_suffix(".txt").write_text(caption, encoding="utf-8")
    pattern_image((10, 10), 9).save(src / "latin1.png")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (src / "notes.md").write_text("not an image")
    (src / "orphan.txt").write_text("a caption without an image")

    rows = list(iter_source(src))
    # the walk order is fixed (sorted names, sub-folders in name order) so keys are stable
    assert [r.source for r in rows] == [
        "a.png",
        "b.png",
        "c.webp",
        "latin1.png",
        "a/z.png",
        "a/deep/er/y.jpg",
    ]
    errors = [None, None, "missing_caption", "unreadable_caption", None, None]
    assert [r.error for r in rows] == errors

    out = tmp_path / "out"
    result = write_shards(src, out, WriteConfig(image_size=8), progress=False)
    assert result.stats["failures"] == {"missing_caption": 1, "unreadable_caption": 1}
    samples = all_samples(out)
    assert {json.loads(s["json"])["source"]: s["txt"].decode() for s in samples.values()} == {
        "a.png": "top level a",
        "b.png": "top level b",
        "a/z.png": "nested z",
        "a/deep/er/y.jpg": "deeply nested y",
    }
    # the uncaptioned rows keep their positions (2, 3), unused: later keys do not shift
    assert list(samples) == ["0000000000", "0000000001", "0000000004", "0000000005"]


def test_columns_are_guessed_from_common_names(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("filepath,title,extra\nx.png,hello,1\n", encoding="utf-8")
    (row,) = iter_source(table)
    assert (row.image_path, row.caption, row.extra) == (
        str(tmp_path / "x.png"),
        "hello",
        {"extra": "1"},
    )


def test_unknown_or_unguessable_column_is_an_error_naming_file_and_columns(tmp_path: Path) -> None:
    table = tmp_path / "t.tsv"
    table.write_text("img\tdescription\nx.png\thello\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"t\.tsv: cannot tell which column holds the image"):
        list(iter_source(table))
    with pytest.raises(SourceError, match=r"t\.tsv: no caption column 'caption'.*'description'"):
        list(iter_source(table, image_column="img", caption_column="caption"))
    rows = list(iter_source(table, image_column="img", caption_column="description"))
    assert [(r.caption, r.error) for r in rows] == [("hello", None)]


def test_malformed_table_lines_become_bad_rows_and_blank_lines_are_skipped(
    tmp_path: Path,
) -> None:
    csv_table = tmp_path / "t.csv"
    # a trailing blank line is common in hand-made tables and is not a row
    csv_table.write_text("image,caption\na.png,ok\nb.png,x,y\n\nc.png,ok too\n\n", encoding="utf-8")
    rows = list(iter_source(csv_table))
    assert [(r.source, r.error) for r in rows] == [
        ("a.png", None),
        ("t.csv:3", "bad_row"),
        ("c.png", None),
    ]
    assert rows[1].detail == "3 fields, header has 2"

    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(
        '{"image": "a.png", "caption": "ok"}\n'
        "{not json\n"
        "\n"
        '["a", "list"]\n'
        '{"image": "", "caption": "no path"}\n'
        '{"image": "b.png"}\n',
        encoding="utf-8",
    )
    rows = list(iter_source(jsonl))
    assert [(r.source, r.error) for r in rows] == [
        ("a.png", None),
        ("t.jsonl:2", "bad_row"),
        ("t.jsonl:4", "bad_row"),
        ("t.jsonl:5", "bad_row"),
        ("b.png", None),  # no caption: the writer counts it as empty_caption
    ]
    assert rows[1].detail.startswith("invalid JSON")
    assert rows[2].detail == "expected a JSON object, got list"
    assert rows[4].caption is None


def test_source_that_does_not_exist_or_has_an_unknown_suffix_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nope\.csv does not exist"):
        list(iter_source(tmp_path / "nope.csv"))
    (tmp_path / "t.xlsx").write_bytes(b"")
    with pytest.raises(SourceError, match=r"t\.xlsx: expected a folder or a .*got '\.xlsx'"):
        list(iter_source(tmp_path / "t.xlsx"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(SourceError, match=r"bad\.parquet: not a readable parquet file"):
        list(iter_source(tmp_path / "bad.parquet"))
