"""The hard-negatives file contract: round trip, atomic writes, errors that name file + line +
field, and the batcher's fixed-shape tokens and mask."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from clipforge.data_tools.hard_negatives import (
    HardNegativeBatcher,
    HardNegativesError,
    HardNegativesHeader,
    read_hard_negatives,
    write_hard_negatives,
)

HEADER = HardNegativesHeader(emb_dir="/e", model="/m", model_hash="abc", k=2, count=2)
H = HEADER.to_json()


def test_round_trip_and_the_header_line(tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    write_hard_negatives(path, HEADER, [("k1", ["a dog", "a cat"]), ("k2", [])])
    header, table = read_hard_negatives(path)
    assert header == HEADER
    assert table == {"k1": ("a dog", "a cat"), "k2": ()}
    first = json.loads(path.read_text().splitlines()[0])
    assert first["format"] == "clipforge-hard-negatives/1" and first["count"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["n.jsonl"]  # no temp file left


def test_a_failed_write_leaves_nothing_under_the_name(tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    with pytest.raises(HardNegativesError, match="1 entries written but the header says count=2"):
        write_hard_negatives(path, HEADER, [("k1", ["a"])])
    with pytest.raises(HardNegativesError, match="'k1' is empty or repeated"):
        write_hard_negatives(path, HEADER, [("k1", ["a"]), ("k1", ["b"])])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "the file is empty (no header line)"),
        (['{"format": "other/1"}'], ":1: field 'format' is 'other/1'"),
        (["not json"], ":1: not valid JSON"),
        ([{**HEADER.to_json(), "k": 0}], ":1: hard-negatives header: k must be >= 1"),
        ([HEADER.to_json(), '{"key": "a"}'], ":2: required field 'negatives' is missing"),
        ([HEADER.to_json(), {"key": 3, "negatives": []}], ":2: field 'key' must be a str"),
        ([H, {"key": "a", "negatives": ["x", "y", "z"]}], ":2: field 'negatives' has 3"),
        ([H, {"key": "a", "negatives": [""]}], ":2: field 'negatives' must be a list of non-"),
        ([H, {"key": "a", "negatives": []}, {"key": "a", "negatives": []}], ":3: key 'a' appears"),
        ([H, {"key": "a", "negatives": []}], "1 entries but the header's field 'count' is 2"),
    ],
)  # fmt: skip
def test_malformed_files_name_the_file_line_and_field(
    tmp_path: Path, lines: list, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(HardNegativesError, match=re.escape(f"{path}") + ".*" + re.escape(message)):
        read_hard_negatives(path)


def test_batcher_pads_to_k_and_counts_samples_without() -> None:
    def tokenizer(texts: list[str]) -> torch.Tensor:  # (n, 4): length, then char codes
        return torch.tensor([[len(t), *(ord(c) for c in t[:3].ljust(3))] for t in texts])

    table = {"a": ("x1", "x2", "x3"), "b": ("y1",), "c": ()}
    out = HardNegativeBatcher(table, per_sample=2)(["a", "b", "c", "zzz"], tokenizer)
    assert out["hard_negatives"].shape == (4, 2, 4)
    assert out["hard_negatives_mask"].tolist() == [[1, 1], [1, 0], [0, 0], [0, 0]]
    assert out["hard_negatives_missing"] == 2  # "c" (empty) and "zzz" (not in the file)
    assert out["hard_negatives"][0, 1, 0].item() == 2 and out["hard_negatives"][1, 1, 0] == 0
    with pytest.raises(HardNegativesError, match="per sample must be >= 1"):
        HardNegativeBatcher(table, per_sample=0)
