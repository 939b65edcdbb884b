"""``--part I/N``: disjoint slices with their own shards and manifests, joined by
``merge-manifests`` into what a single run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipforge.data_tools.cli import main

from .shard_helpers import all_samples, make_folder_source


def _table(tmp_path: Path, rows: int) -> Path:
    make_folder_source(tmp_path / "imgs", rows)
    table = tmp_path / "table.csv"
    lines = ["image,caption"] + [f"imgs/img{i:03d}.png,caption {i}" for i in range(rows)]
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return table


def _write(table: Path, out: Path, *extra: str) -> int:
    args = ["write", str(table), str(out), "--image-size", "8", "--shard-size", "2"]
    return main([*args, "--no-progress", *extra])


def test_parts_write_disjoint_shards_and_merge_into_the_single_run_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _table(tmp_path, 7)  # 4 shards of 2, 2, 2, 1 rows
    single = tmp_path / "single"
    assert _write(table, single) == 0
    out = tmp_path / "parts"
    for part in ("0/3", "1/3", "2/3"):
        assert _write(table, out, "--part", part, "--workers", "2") == 0

    def listed(name: str) -> list[str]:
        return [s["name"] for s in json.loads((out / name).read_text())["shards"]]

    # shard i belongs to part i % 3; each part names only its own shards
    assert listed("manifest.part-0-of-3.json") == ["shard-000000.tar", "shard-000003.tar"]
    assert listed("manifest.part-1-of-3.json") == ["shard-000001.tar"]
    assert listed("manifest.part-2-of-3.json") == ["shard-000002.tar"]
    assert not (out / "manifest.json").exists()  # only merge-manifests writes it
    assert json.loads((out / "stats.part-0-of-3.json").read_text())["samples"] == 3

    capsys.readouterr()
    assert main(["merge-manifests", str(out)]) == 0
    assert "7 samples in 4 shards" in capsys.readouterr().out
    merged = json.loads((out / "manifest.json").read_text())
    expected = json.loads((single / "manifest.json").read_text())
    # the same shards, byte for byte (sha256), as the single run
    assert merged["shards"] == expected["shards"]
    assert merged["samples"] == 7
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["inputs"], stats["samples"], stats["shards"]) == (7, 7, 4)
    samples = all_samples(out)  # fails if two parts wrote the same key
    assert sorted(s["txt"].decode() for s in samples.values()) == [f"caption {i}" for i in range(7)]
    assert main(["verify", str(out)]) == 0


def test_part_that_gets_no_shard_writes_an_empty_manifest_so_merge_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _table(tmp_path, 2)  # one shard only, but two parts (e.g. a SLURM array of 2)
    out = tmp_path / "out"
    assert _write(table, out, "--part", "0/2") == 0
    assert _write(table, out, "--part", "1/2") == 0
    part1 = json.loads((out / "manifest.part-1-of-2.json").read_text())
    assert (part1["samples"], part1["shards"]) == (0, [])
    assert main(["merge-manifests", str(out)]) == 0
    assert "2 samples in 1 shards" in capsys.readouterr().out


def test_merge_refuses_while_a_part_is_missing_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _table(tmp_path, 5)
    out = tmp_path / "out"
    assert _write(table, out, "--part", "0/2") == 0
    capsys.readouterr()
    assert main(["merge-manifests", str(out)]) == 2
    err = capsys.readouterr().err
    assert "parts [1] of 2 have no manifest yet" in err
    assert str(out) in err
    assert not (out / "manifest.json").exists()
