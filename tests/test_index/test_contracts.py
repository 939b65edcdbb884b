"""The typed contracts: index.json's modality entry, the part marker, the embedding run.

Each round-trips through its JSON (same keys as the files on disk) and refuses a bad field with
an error naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipforge.index.emb_dir import EmbedError, EmbedRun, PartMarker, read_part_marker
from clipforge.index.store import IndexIntegrityError, ModalityIndexEntry

OLD_ENTRY = {"file": "image.index", "sha256": {"image.index": "ab"}, "search_params": {}}


def test_index_entry_round_trips_and_old_minimal_entries_load() -> None:
    entry = ModalityIndexEntry.from_json(OLD_ENTRY, "idx/index.json: modalities.image")
    assert entry.kind is None and entry.extra_files == () and entry.search_params == {}
    full = {**entry.to_json(), "kind": "ivf_sq8", "search_params": {"nprobe": 12},
            "extra_files": [], "tuning": [{"nprobe": 12, "recall": 0.97}]}  # fmt: skip
    again = ModalityIndexEntry.from_json(full, "x")
    assert again.to_json() == full and list(again.to_json())[:3] == ["file", "extra_files", "kind"]


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"sha256": None}, "sha256"),
        ({"search_params": "nprobe=3"}, "search_params"),
        ({"num_recall_queries": True}, "num_recall_queries"),
        ({"extra_files": ["image.ivfdata"]}, "sha256"),  # a file with no checksum
    ],
)
def test_index_entry_names_the_file_and_the_bad_field(patch: dict, field: str) -> None:
    where = "idx/index.json: modalities.image"
    with pytest.raises(IndexIntegrityError, match=rf"{where}: .*'{field}'"):
        ModalityIndexEntry.from_json({**OLD_ENTRY, **patch}, where)


def test_part_marker_round_trips_and_a_bad_one_is_redone(tmp_path: Path) -> None:
    run = EmbedRun(dim=8, dtype="float16", modalities=("image", "text"), model_hash="h")
    (tmp_path / "img_emb").mkdir()
    (tmp_path / "img_emb" / "img_emb_0.npy").write_bytes(b"12345")
    marker = PartMarker(0, ("/s/a.tar",), 3, run, {"img_emb/img_emb_0.npy": {"size_bytes": 5}})
    data = marker.to_json()
    assert set(data) == {"format", "part", "shards", "count", "dim", "dtype", "modalities",
                         "model_hash", "skipped", "files"}  # fmt: skip
    assert PartMarker.from_json(data, "m.json") == marker
    (tmp_path / "parts").mkdir()
    path = tmp_path / "parts" / "part_0.json"
    path.write_text(json.dumps(data))
    assert read_part_marker(tmp_path, 0) == marker
    path.write_text(json.dumps({**data, "count": "3"}))
    assert read_part_marker(tmp_path, 0) is None  # malformed: the part is redone, not trusted
    with pytest.raises(EmbedError, match=r"m.json: field 'count'"):
        PartMarker.from_json({**data, "count": "3"}, "m.json")
    with pytest.raises(EmbedError, match="dtype"):
        EmbedRun.from_json({**run.to_json(), "dtype": "int8"}, "m.json")
