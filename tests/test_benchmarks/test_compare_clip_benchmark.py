"""The CLIP_benchmark comparison: the data conversion (always), and the whole comparison against
CLIP_benchmark's own venv when it exists and CLIPFORGE_TEST_PEERS=1 (it takes ~30 s)."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from clipforge.eval.compare_clip_benchmark import CompareConfig, write_clip_benchmark_wds
from clipforge.eval.data import EmbeddedSet

PEER_PYTHON = Path("/work/peers/clipbench/bin/python")


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


@pytest.mark.skipif(
    not (PEER_PYTHON.is_file() and os.environ.get("CLIPFORGE_TEST_PEERS") == "1"),
    reason="needs CLIP_benchmark's venv (shared/PEERS.md) and CLIPFORGE_TEST_PEERS=1",
)
def test_figures_agree_with_clip_benchmark(trained_demo_run: Path, demo: Path) -> None:
    from clipforge.eval.compare_clip_benchmark import run_comparison

    names = "Smileys & Emotion,People & Body,Component,Animals & Nature,Food & Drink,"
    names += "Travel & Places,Activities,Objects,Symbols,Flags"
    result = run_comparison(
        str(trained_demo_run),
        str(demo),
        CompareConfig(classnames=names, peer_python=str(PEER_PYTHON)),
    )
    assert result["metrics"]["agree"], json.dumps(result["metrics"]["rows"])
    assert all(row[-1] == "agree" for row in result["metrics"]["rows"])
