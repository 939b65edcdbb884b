"""``python -m benchmarks.train_throughput``: it refuses, before training anything, when the
open_clip_train interpreter is missing or broken, and ``--no-peer`` measures clipforge alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import train_throughput
from benchmarks.peer_python import OPEN_CLIP_ENV
from benchmarks.train_throughput import main


def test_fails_fast_without_its_peer(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def not_reached(*_: object) -> None:
        raise AssertionError("clipforge's half ran before the peer was checked")

    monkeypatch.setattr(train_throughput, "bench_clipforge", not_reached)
    monkeypatch.delenv(OPEN_CLIP_ENV, raising=False)
    bench = ["--config", "bench-tiny", "--set", f"data.train={demo}"]
    assert main(bench) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no open_clip_train interpreter given" in err
    assert OPEN_CLIP_ENV in err and "--no-peer" in err
    missing = tmp_path / "no-venv" / "bin" / "python"
    assert main([*bench, "--peer-python", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no open_clip_train interpreter at {missing}" in err
    assert "--no-peer" in err
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho \"No module named 'open_clip_train'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv(OPEN_CLIP_ENV, str(broken))
    assert main(bench) == 2
    assert "cannot import open_clip_train.main (No module named" in capsys.readouterr().err


def test_no_peer_measures_clipforge_alone(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures.json"
    argv = [
        "--config", "tiny", "--set", f"data.train={demo}", "--set", "train.steps=4",
        "--set", "data.batch_size=16", "--warmup", "1", "--no-peer", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "peer not run (--no-peer)" in printed and "clipforge" in printed
    figures = json.loads(out.read_text())
    ours = figures["clipforge"]
    assert ours["steps_timed"] == 3 and ours["median_samples_per_s"] > 0
    assert 0 <= ours["data_wait_frac"] <= 1 and ours["last_loss"] > 0
    assert figures["open_clip_train"] == "peer not run (--no-peer)"
