"""The CLIP_benchmark comparison: the data conversion and the refusal without a peer (always), and
the whole comparison against CLIP_benchmark's own venv when $CLIPFORGE_PEER_CLIPBENCH names its
python (it takes ~30 s; benchmarks/README.md says how to make that venv)."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import compare_clip_benchmark
from benchmarks.compare_clip_benchmark import main, write_clip_benchmark_wds
from benchmarks.peer_python import CLIP_BENCHMARK_ENV
from clipforge.eval.data import EmbeddedSet

PEER_PYTHON = os.environ.get(CLIP_BENCHMARK_ENV, "")


def test_conversion_writes_clip_benchmarks_wds_layout(demo: Path, tmp_path: Path) -> None:
    # 3 samples of the first demo shard; samples 0 and 2 are one image with two captions.
    with tarfile.open(demo / "emoji-000000.tar") as t:
        keys = sorted({m.name.split(".")[0] for m in t.getmembers()})[:3]
    emb = EmbeddedSet(
        image_emb=torch.zeros(2, 4),
        text_emb=torch.zeros(3, 4),
        text_image=torch.tensor([0, 1, 0]),
        image_keys=[keys[0], keys[1]],
        sample_keys=[("emoji-000000.tar", k) for k in keys],
        sample_image=torch.tensor([0, 1, 0]),
        image_ids=["a", "b"],
        labels=["x", "y"],
        captions=["first", "second", "third"],
        samples=3,
    )
    root = write_clip_benchmark_wds(emb, str(demo), tmp_path / "ret", "retrieval")
    assert (root / "test" / "nshards.txt").read_text().strip() == "1"
    assert (root / "dataset_type.txt").read_text().strip() == "retrieval"
    with tarfile.open(root / "test" / "0.tar") as t:
        names = t.getnames()
        assert [n.split(".")[1] for n in names] == ["webp", "txt", "webp", "txt"]  # as stored
        assert [n.split(".")[0] for n in names] == ["00000000"] * 2 + ["00000001"] * 2
        assert t.extractfile("00000000.txt").read().decode().splitlines() == ["first", "third"]
    cls = write_clip_benchmark_wds(
        emb, str(demo), tmp_path / "cls", "classification", ["x", "y"], ["a {c}."],
        torch.tensor([0, 1]),
    )  # fmt: skip
    assert (cls / "classnames.txt").read_text().split("\n")[:2] == ["x", "y"]
    assert (cls / "zeroshot_classification_templates.txt").read_text().strip() == "a {c}."
    with tarfile.open(cls / "test" / "0.tar") as t:
        assert t.extractfile("00000001.cls").read() == b"1"


def test_without_a_peer_it_fails_before_clipforge_evaluates(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def not_reached(*_: object, **__: object) -> None:
        raise AssertionError("clipforge's half ran before the peer was checked")

    monkeypatch.setattr(compare_clip_benchmark, "run_comparison", not_reached)
    monkeypatch.delenv(CLIP_BENCHMARK_ENV, raising=False)
    out = tmp_path / "result.json"
    argv = ["--model", str(tmp_path / "no-model"), "--data", str(demo), "--json", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CLIP_benchmark interpreter given" in err
    assert f"--peer-python VENV/bin/python or set {CLIP_BENCHMARK_ENV}" in err
    missing = tmp_path / "no-venv" / "bin" / "python"
    assert main([*argv, "--peer-python", str(missing)]) == 2
    assert f"no CLIP_benchmark interpreter at {missing} (--peer-python)" in capsys.readouterr().err
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho \"No module named 'clip_benchmark'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv(CLIP_BENCHMARK_ENV, str(broken))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"${CLIP_BENCHMARK_ENV}) cannot import clip_benchmark.cli (No module named" in err
    assert not out.exists()


@pytest.mark.skipif(
    not PEER_PYTHON,
    reason=f"needs CLIP_benchmark's venv: set {CLIP_BENCHMARK_ENV} to its python "
    "(benchmarks/README.md)",
)
def test_figures_agree_with_clip_benchmark(
    trained_demo_run: Path, demo: Path, tmp_path: Path
) -> None:
    names = "Smileys & Emotion,People & Body,Component,Animals & Nature,Food & Drink,"
    names += "Travel & Places,Activities,Objects,Symbols,Flags"
    out = tmp_path / "result.json"
    argv = ["--model", str(trained_demo_run), "--data", str(demo), "--classnames", names]
    assert main([*argv, "--json", str(out)]) == 0  # the peer from $CLIPFORGE_PEER_CLIPBENCH
    result = json.loads(out.read_text())
    assert result["metrics"]["agree"], json.dumps(result["metrics"]["rows"])
    assert all(row[-1] == "agree" for row in result["metrics"]["rows"])
