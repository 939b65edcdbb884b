"""Metadata access: tables made contiguous (one chunk per column, so a lookup does not
concatenate every row group), and item columns read from Arrow on access."""

from __future__ import annotations

import pyarrow as pa
import pytest

from clipforge.index.item_store import ColumnView
from clipforge.index.store import contiguous


def _chunked() -> pa.Table:
    parts = [
        pa.table({"key": ["a", "b"], "offset": [1, None]}),
        pa.table({"key": ["c"], "offset": [7]}),
    ]
    return pa.concat_tables(parts)


def test_contiguous_keeps_the_rows_in_one_chunk() -> None:
    table = _chunked()
    assert table.column("key").num_chunks == 2
    one = contiguous(table)
    assert [c.num_chunks for c in one.columns] == [1, 1]
    assert one.to_pylist() == table.to_pylist()
    assert one.take([2, 0]).column("key").to_pylist() == ["c", "a"]


def test_column_view_reads_rows_with_defaults() -> None:
    table = _chunked()
    keys, offsets = ColumnView(table, "key", ""), ColumnView(table, "offset", -1)
    missing = ColumnView(table, "caption", "")
    assert [keys[i] for i in range(3)] == ["a", "b", "c"] and list(keys) == ["a", "b", "c"]
    assert [offsets[i] for i in range(3)] == [1, -1, 7]  # a null reads as the default
    assert len(missing) == 3 and missing[2] == "" and list(missing) == ["", "", ""]
    assert keys[-1] == "c"
    with pytest.raises(IndexError, match="row 3 of 3"):
        keys[3]
