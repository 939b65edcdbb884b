"""Input sources for the shard writer: a folder of images + captions, or a table.

Every source yields :class:`SourceRow` in a deterministic order. A row that cannot be used (no
caption file, a malformed line, a missing column value) is still yielded, with ``error`` set, so
the writer counts it by reason and the row's position (and so every sample key) stays stable.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge.data_tools.images import IMAGE_EXTENSIONS

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
IMAGE_COLUMN_CANDIDATES = ("image", "image_path", "filepath", "path", "file", "filename")
CAPTION_COLUMN_CANDIDATES = ("caption", "text", "title", "txt")


class SourceError(ValueError):
    """The source as a whole cannot be read (wrong path, unknown type, missing column)."""


@dataclass(frozen=True)
class SourceRow:
    """One input row: an image file and its caption, or the reason the row is unusable."""

    image_path: str | None
    """Absolute path of the image file (None when the row itself is bad)."""
    caption: str | None
    """The caption text as read (None when missing)."""
    source: str
    """How to name this input in logs and the sample's .json (relative path or ``file:line``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra table columns, kept in the sample's .json."""
    error: str | None = None
    """A failure reason code (``missing_caption``, ``bad_row``) when the row is unusable."""
    detail: str = ""
    """Human-readable detail for ``error``."""


LABEL_FIELD = "category"
"""The .json field ``label_from_folder`` writes: the one ``clipforge-eval zeroshot`` reads by
default, as it reads the class sub-folder of a raw image folder."""


def iter_source(
    src: str | os.PathLike[str],
    image_column: str | None = None,
    caption_column: str | None = None,
    label_from_folder: bool = False,
) -> Iterator[SourceRow]:
    """Yield the rows of a folder or table source (``.csv``, ``.tsv``, ``.jsonl``, ``.parquet``).

    ``label_from_folder`` (folders only): each image's first sub-folder under ``src`` (``cats``
    for ``src/cats/x.jpg``) becomes its class label, in the extra column :data:`LABEL_FIELD`;
    images directly in ``src`` get no label."""
    path = Path(src)
    if path.is_dir():
        yield from _iter_folder(path, label_from_folder)
        return
    if not path.exists():
        raise SourceError(f"source {path} does not exist")
    if label_from_folder:
        raise SourceError(
            f"source {path}: --label-from-folder needs a folder of class sub-folders, not a "
            f"table (a table's label is one of its columns: every extra column is kept)"
        )
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise SourceError(
            f"source {path}: expected a folder or a {'/'.join(TABLE_SUFFIXES)} file, got {suffix!r}"
        )
    if suffix == ".parquet":
        yield from _iter_parquet(path, image_column, caption_column)
    elif suffix == ".jsonl":
        yield from _iter_jsonl(path, image_column, caption_column)
    else:
        yield from _iter_delimited(
            path, "\t" if suffix == ".tsv" else ",", image_column, caption_column
        )


def _iter_folder(root: Path, label_from_folder: bool = False) -> Iterator[SourceRow]:
    extensions = {"." + e for e in IMAGE_EXTENSIONS}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # deterministic walk order
        for name in sorted(filenames):
            image = Path(dirpath) / name
            if image.suffix.lower() not in extensions:
                continue
            rel = image.relative_to(root).as_posix()
            folder, _, rest = rel.partition("/")
            extra = {LABEL_FIELD: folder} if label_from_folder and rest else {}
            caption_file = image.with_suffix(".txt")
            try:
                caption = caption_file.read_text(encoding="utf-8")
            except FileNotFoundError:
                yield SourceRow(
                    str(image),
                    None,
                    rel,
                    extra,
                    error="missing_caption",
                    detail=f"no {caption_file.name} beside the image",
                )
                continue
            except (OSError, UnicodeDecodeError) as e:
                yield SourceRow(
                    str(image), None, rel, extra, error="unreadable_caption", detail=str(e)
                )
                continue
            yield SourceRow(str(image), caption, rel, extra)


def _pick_column(
    columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path
) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise SourceError(f"{path}: no {what} column {wanted!r}; columns are {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise SourceError(
        f"{path}: cannot tell which column holds the {what} (tried {', '.join(candidates)}); "
        f"columns are {columns}; name it with --{what}-column"
    )


def _row_from_record(
    record: dict[str, Any], image_col: str, caption_col: str, base: Path, where: str
) -> SourceRow:
    image_value = record.get(image_col)
    caption_value = record.get(caption_col)
    extra = {k: v for k, v in record.items() if k not in (image_col, caption_col)}
    if image_value is None or str(image_value).strip() == "":
        return SourceRow(
            None, None, where, extra, error="bad_row", detail=f"empty {image_col!r} value"
        )
    image_path = Path(str(image_value))
    if not image_path.is_absolute():
        image_path = base / image_path  # relative paths resolve against the table's folder
    caption = None if caption_value is None else str(caption_value)
    return SourceRow(str(image_path), caption, str(image_value), extra)


def _iter_delimited(
    path: Path, delimiter: str, image_column: str | None, caption_column: str | None
) -> Iterator[SourceRow]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise SourceError(f"{path}: the file is empty (no header row)")
        image_col = _pick_column(header, image_column, IMAGE_COLUMN_CANDIDATES, "image", path)
        caption_col = _pick_column(
            header, caption_column, CAPTION_COLUMN_CANDIDATES, "caption", path
        )
        for values in reader:
            if not values:
                continue  # a blank line (e.g. a trailing one): no row, as in .jsonl
            where = f"{path.name}:{reader.line_num}"
            if len(values) != len(header):
                yield SourceRow(
                    None,
                    None,
                    where,
                    error="bad_row",
                    detail=f"{len(values)} fields, header has {len(header)}",
                )
                continue
            yield _row_from_record(
                dict(zip(header, values, strict=True)), image_col, caption_col, path.parent, where
            )


def _iter_jsonl(
    path: Path, image_column: str | None, caption_column: str | None
) -> Iterator[SourceRow]:
    image_col = caption_col = None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield SourceRow(None, None, where, error="bad_row", detail=f"invalid JSON: {e}")
                continue
            if not isinstance(record, dict):
                yield SourceRow(
                    None,
                    None,
                    where,
                    error="bad_row",
                    detail=f"expected a JSON object, got {type(record).__name__}",
                )
                continue
            if image_col is None:  # columns are decided by the first good record
                image_col = _pick_column(
                    list(record), image_column, IMAGE_COLUMN_CANDIDATES, "image", path
                )
                caption_col = _pick_column(
                    list(record), caption_column, CAPTION_COLUMN_CANDIDATES, "caption", path
                )
            assert caption_col is not None
            yield _row_from_record(record, image_col, caption_col, path.parent, where)


def _iter_parquet(
    path: Path, image_column: str | None, caption_column: str | None
) -> Iterator[SourceRow]:
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except Exception as e:
        raise SourceError(f"{path}: not a readable parquet file ({e})") from None
    columns = table_file.schema_arrow.names
    image_col = _pick_column(columns, image_column, IMAGE_COLUMN_CANDIDATES, "image", path)
    caption_col = _pick_column(columns, caption_column, CAPTION_COLUMN_CANDIDATES, "caption", path)
    row_no = 0
    for batch in table_file.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row_no += 1
            yield _row_from_record(
                record, image_col, caption_col, path.parent, f"{path.name}:row {row_no}"
            )
