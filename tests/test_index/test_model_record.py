"""An index keeps the exact query-model weights it was built from (``INDEX_DIR/model/``).

Continuing a training run re-exports ``RUN/model/`` and keep-last-K prunes the checkpoint an
index was embedded with; the index must still search by text and image with no model argument,
and still refuse any other model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clipforge.index.cli import main as index_main
from clipforge.index.emb_dir import read_member_bytes
from clipforge.index.searcher import ModelMismatchError, Searcher
from clipforge.pretrain.cli import main as pretrain_main
from clipforge.pretrain.models import load_model

QUERIES = ["red heart", "grinning face", "cat", "flag"]


def _train(run: Path, shard: str, steps: int, *more: str) -> None:
    argv = [*more, "--config", "tiny", "--set", f"data.train={shard}",
            "--set", f"train.run_dir={run}", "--set", f"train.steps={steps}",
            "--set", "data.batch_size=16",
            "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=1",
            "--set", "train.progress=lines"]  # fmt: skip
    assert pretrain_main(argv) == 0


def _hits(s: Searcher, image: Path) -> list[list[tuple[int, float]]]:
    text = s.search_text(QUERIES, k=5)
    by_image = s.search_image([image], k=5, target="text")
    return [[(h.id, round(h.score, 5)) for h in hs] for hs in [*text, *by_image]]


def test_index_stays_usable_after_its_run_trains_on(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shard = str(demo / "emoji-000000.tar")
    run = tmp_path / "run"
    _train(run, shard, steps=2)
    ckpt = run / "checkpoints" / "step-2.pt"
    old_hash = load_model(run).model_hash
    # an exported model/ (hard-linked: same file system) and a step checkpoint (exported)
    indexes = {
        "run": _embed_and_build(run, shard, tmp_path / "a"),
        "checkpoint": _embed_and_build(ckpt, shard, tmp_path / "b"),
    }
    row = pq.read_table(indexes["run"] / "metadata.parquet").slice(5, 1).to_pylist()[0]
    image = tmp_path / row["member"]
    image.write_bytes(read_member_bytes(row["shard"], row["offset"], row["size"]))
    before = {}
    for name, idx in indexes.items():
        manifest = json.loads((idx / "index.json").read_text())
        rec = manifest["model"]
        assert rec["model_hash"] == manifest["model_hash"] == old_hash
        # embed links the run's exported file, exports a checkpoint's weights from memory;
        # build links EMB_DIR's copy (the same file system here)
        emb = json.loads((idx.parent / "emb" / "embeddings.json").read_text())
        assert emb["model"]["linked"] is (name == "run") and rec["linked"] is True
        weights = idx / "model" / "open_clip_pytorch_model.bin"
        if name == "run":  # one file for the run, the embeddings and the index: no space used
            assert os.stat(weights).st_ino == os.stat(run / "model" / weights.name).st_ino
        before[name] = _hits(Searcher.open(idx), image)

    # resumes: model/ re-exported, step-2.pt pruned (keep 1)
    _train(run, shard, 4, "--set", "train.extend_schedule=continue_lr")
    assert not ckpt.exists()
    assert load_model(run).model_hash != old_hash
    for name, idx in indexes.items():
        s = Searcher.open(idx)  # no model: the index's own copy
        assert _hits(s, image) == before[name], name
        assert s.model.model_hash == old_hash
        capsys.readouterr()
        assert index_main(["search", "--index", str(idx), "--text", "red heart", "-k", "3"]) == 0
        assert "text query 'red heart'" in capsys.readouterr().out
        # an explicit model is still checked: the run's new weights are another model
        with pytest.raises(ModelMismatchError, match="leave the model out"):
            Searcher.open(idx, model=run)
        argv = ["search", "--index", str(idx), "--text", "x", "--model", str(run)]
        assert index_main(argv) == 2
        err = capsys.readouterr().err
        assert "is not the model the index" in err and "Traceback" not in err


def _embed_and_build(model: Path, shard: str, out: Path) -> Path:
    emb, idx = out / "emb", out / "index"
    argv = ["embed", "--model", str(model), "--data", shard, "--out", str(emb),
            "--workers", "0", "--batch-size", "64", "--progress", "none"]  # fmt: skip
    assert index_main(argv) == 0
    assert index_main(["build", "--embeddings", str(emb), "--out", str(idx), "--kind", "flat"]) == 0
    return idx
