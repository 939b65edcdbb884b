"""``python -m benchmarks.checkpoint_cost`` at tiny size: 2 gloo ranks save the whole-state and
the sharded forms (sync and async) through the trainer's functions, 1 process loads both, and
the table has every figure; the checkpoints it timed are real ones with equal content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import checkpoint_cost
from benchmarks.checkpoint_cost import _parser, main
from clipforge.pretrain.checkpoint import load_checkpoint
from tests.test_benchmarks.helptext import check_every_option_has_help_with_its_default


def test_tiny_run_prints_every_form_and_writes_real_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work, out = tmp_path / "work", tmp_path / "figures.json"
    argv = ["--model", "clipforge-tiny", "--work-dir", str(work), "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "clipforge-tiny, 3,386,113 parameters" in printed
    assert "uptime before:" in printed and "load average" in printed
    figures = json.loads(out.read_text())
    rows = {(r["phase"], str(r["rank"])): r for r in figures["rows"]}
    saves = ("whole", "sharded", "sharded async")
    assert set(rows) == {(p, r) for p in saves for r in ("0", "1")} | {
        ("load sharded", "0 of 1"),
        ("load whole", "0 of 1"),
    }
    for (phase, _), r in rows.items():
        assert r["seconds"] > 0 and r["peak_rss_mb"] >= r["rss_before_mb"] > 0, phase
        assert f"| {phase} | " in printed
    for rank in ("0", "1"):  # async: training blocked no longer than the whole write took
        r = rows[("sharded async", rank)]
        assert 0 < r["blocked_seconds"] <= r["seconds"]
    assert rows[("whole", "0")]["on_disk"].endswith(" GB")

    whole = load_checkpoint(work / "whole" / "step-1.pt", verify=True)
    for folder in ("sharded", "sharded-async"):
        shards = work / folder / "step-1"
        assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in shards.iterdir()}
        sharded = load_checkpoint(shards)
        assert sharded["model"].keys() == whole["model"].keys()
        for name, tensor in whole["model"].items():
            assert torch.equal(sharded["model"][name], tensor), name
        for name, moments in whole["optimizer"]["state"].items():
            for key, value in moments.items():
                assert torch.equal(sharded["optimizer"]["state"][name][key], value), name


def test_refusals_name_the_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--ranks", "1"]) == 2
    assert "--ranks must be >= 2 (a sharded save needs shards), got 1" in capsys.readouterr().err
    assert main(["--model", "no-such-model"]) == 2
    assert "--model no-such-model:" in capsys.readouterr().err
    monkeypatch.setattr(checkpoint_cost, "_mem_available_bytes", lambda: 2**30)
    assert main(["--model", "ViT-L-14"]) == 2
    err = capsys.readouterr().err
    assert "ViT-L-14 (427,616,513 parameters, 5.13 GB of weights + AdamW state) needs about" in err
    assert "1.07 GB is available: pick a smaller --model" in err


def test_every_option_has_help_with_its_default() -> None:
    check_every_option_has_help_with_its_default(_parser())
