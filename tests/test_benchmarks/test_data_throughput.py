"""``python -m benchmarks.data_throughput``: it refuses, before writing anything, when the
open_clip_train interpreter is missing, and ``--no-peer`` measures clipforge's writer and reader
alone on real upscaled demo images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import data_throughput
from benchmarks.data_throughput import main
from benchmarks.peer_python import OPEN_CLIP_ENV


def test_fails_fast_without_its_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def not_reached(*_: object) -> None:
        raise AssertionError("clipforge's half ran before the peer was checked")

    monkeypatch.setattr(data_throughput, "run_benchmark", not_reached)
    monkeypatch.delenv(OPEN_CLIP_ENV, raising=False)
    work = tmp_path / "work"
    assert main(["--work-dir", str(work)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no open_clip_train interpreter given" in err
    assert OPEN_CLIP_ENV in err and "--no-peer" in err
    monkeypatch.setenv(OPEN_CLIP_ENV, str(tmp_path / "missing" / "python"))
    assert main(["--work-dir", str(work)]) == 2
    assert f"({'$' + OPEN_CLIP_ENV})" in capsys.readouterr().err
    assert not work.exists()


def test_no_peer_measures_clipforge_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures.json"
    argv = [
        "--work-dir", str(tmp_path / "work"), "--images", "48", "--source-size", "64",
        "--image-size", "64", "--read-size", "32", "--write-workers", "1", "--read-workers", "0",
        "--batch-size", "8", "--no-peer", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "write: 48 images 64px jpg -> 64px jpg shards" in printed
    assert "peer not run (--no-peer)" in printed
    figures = json.loads(out.read_text())
    assert figures["write"]["images"] == 48 and figures["write"]["images_per_s"] > 0
    (row,) = figures["read"]
    ours = row["clipforge"]
    # 6 batches of 8, the first 3 not timed
    assert ours["samples"] == 24 and ours["skipped"] == 0 and ours["samples_per_s"] > 0
    assert row["open_clip_train"] == "peer not run (--no-peer)"
