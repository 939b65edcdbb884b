"""``clipforge-index mine``: the nearest other captions of each image, checked against brute
force on synthetic and on really embedded shards, and the whole path embed -> mine -> train."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipforge.data_tools.hard_negatives import read_hard_negatives
from clipforge.data_tools.shardformat import add_member
from clipforge.index.cli import main as index_main
from clipforge.index.mine import nearest_other_captions
from clipforge.pretrain.cli import main as pretrain_main
from clipforge.pretrain.config import ModelConfig
from clipforge.pretrain.models import build_model, export_open_clip
from tests.test_data_tools.shard_helpers import image_bytes, pattern_image
from tests.test_index.synthetic import load_all, write_synthetic_embeddings

SAMPLES_PER_SHARD = 24


def _metadata(emb: Path) -> tuple[list[str], list[str]]:
    manifest = json.loads((emb / "embeddings.json").read_text())
    tables = [pq.read_table(emb / "metadata" / f"metadata_{p['part']}.parquet")
              for p in manifest["parts"]]  # fmt: skip
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    return keys, [c for t in tables for c in t.column("caption").to_pylist()]


def brute_force(emb: Path, k: int) -> dict[str, list[tuple[str, float]]]:
    """For each key (rows sharing one are one sample), every caption text not its own scored by
    its first row against the key's first image, best k: a plain loop over the whole matrix."""
    img, txt = load_all(emb, "image"), load_all(emb, "text")
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    keys, captions = _metadata(emb)
    rows: dict[str, list[int]] = {}
    for r, key in enumerate(keys):
        rows.setdefault(key, []).append(r)
    out = {}
    for key, own_rows in rows.items():
        own = {captions[r] for r in own_rows}
        scores = txt @ img[own_rows[0]]
        best: dict[str, float] = {}
        for j, caption in enumerate(captions):
            if caption not in own and caption not in best:
                best[caption] = float(scores[j])
        out[key] = sorted(best.items(), key=lambda item: -item[1])[:k]
    return out


def _check_against_brute_force(emb: Path, keys: list[str], negatives: list[list[str]], k: int):
    expected = brute_force(emb, k)
    assert keys == list(expected)
    for key, got in zip(keys, negatives, strict=True):
        assert got == [caption for caption, _ in expected[key]], key
    return expected


def test_chunked_search_equals_brute_force_across_parts_and_chunks(tmp_path: Path) -> None:
    emb = write_synthetic_embeddings(tmp_path / "emb", part_counts=(150, 0, 110), dim=16)
    # duplicate texts (row j's caption is that of row j % 97) and a sample with two captions
    # (rows 0 and 1 share a key): neither its captions nor any equal text may come back
    table = pq.read_table(emb / "metadata" / "metadata_0.parquet").to_pydict()
    table["caption"] = [f"caption {j % 97}" for j in range(150)]
    table["key"][1] = table["key"][0]
    pq.write_table(pa.table(table), emb / "metadata" / "metadata_0.parquet")
    keys, negatives = nearest_other_captions(emb, 5, query_chunk=37, caption_chunk=53)
    expected = _check_against_brute_force(emb, keys, negatives, 5)
    assert len(keys) == 259  # 260 rows, one key twice
    captions = dict(zip(*_metadata(emb), strict=True))
    first = keys[0]
    assert {"caption 0", "caption 1"}.isdisjoint(negatives[0])
    assert all(len(set(n)) == len(n) == 5 for n in negatives)  # distinct texts
    assert all(captions[key] not in n for key, n in zip(keys, negatives, strict=True))
    assert first in expected


def _write_shards(root: Path, shards: int = 2) -> list[Path]:
    """Tiny real shards, keys as clipforge-data writes them; caption i is that of i + 30."""
    root.mkdir(parents=True)
    paths = []
    for s in range(shards):
        path = root / f"train-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for pos in range(SAMPLES_PER_SHARD):
                i = s * SAMPLES_PER_SHARD + pos
                key = f"{s:06d}{pos:04d}"
                add_member(tar, f"{key}.png", image_bytes(pattern_image((32, 32), i)))
                add_member(tar, f"{key}.txt", f"a picture of item {i % 30}".encode())
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained clipforge-tiny (any model embeds; the nearest captions are still exact)."""
    model, cfg = build_model(ModelConfig())
    return export_open_clip(model, cfg, tmp_path_factory.mktemp("random") / "model")


def _embed(model: Path, data: str, out: Path) -> None:
    argv = ["embed", "--model", str(model), "--data", data, "--out", str(out),
            "--workers", "0", "--batch-size", "16", "--progress", "none"]  # fmt: skip
    assert index_main(argv) == 0


def _train_args(shards: Path, run: Path, steps: int) -> list[str]:
    """A tiny exact-pass run: 48 samples in batches of 8 (accumulated in 2), 6 steps a pass."""
    return [
        "--config", "tiny", "--set", f"data.train={shards}", "--set", f"train.run_dir={run}",
        "--set", f"train.steps={steps}", "--set", "train.log_every=3",
        "--set", "train.checkpoint_every=3", "--set", "train.progress=lines",
        "--set", "data.batch_size=8", "--set", "data.resampled=false", "--set", "data.workers=1",
        "--set", "train.accum_steps=2",
    ]  # fmt: skip


def _embed_and_mine(model: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two shards, shard 0 embedded and mined (shard 1's samples have no negatives)."""
    shards = _write_shards(tmp_path / "shards")
    emb, out = tmp_path / "emb", tmp_path / "negatives.jsonl"
    _embed(model, str(shards[0]), emb)
    assert index_main(["mine", str(emb), "--out", str(out), "--k", "3", "--device", "cpu"]) == 0
    return tmp_path / "shards", emb, out


def test_mine_cli_on_embedded_shards_then_training_uses_the_negatives(
    random_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards, emb, out = _embed_and_mine(random_model, tmp_path)
    printed = capsys.readouterr().out
    assert f"mined 3 hard negatives for {SAMPLES_PER_SHARD} samples in" in printed
    header, table = read_hard_negatives(out)
    assert (header.k, header.count, header.emb_dir) == (3, SAMPLES_PER_SHARD, str(emb.resolve()))
    assert header.model == str(random_model.resolve())
    keys, captions = _metadata(emb)
    assert list(table) == keys
    _check_against_brute_force(emb, list(table), [list(v) for v in table.values()], 3)
    own = dict(zip(keys, captions, strict=True))
    assert all(own[key] not in negs and len(negs) == 3 for key, negs in table.items())

    run = tmp_path / "run"
    negatives = ["--set", f"data.hard_negatives={out}", "--set", "data.hard_negatives_per_sample=2"]
    assert pretrain_main([*_train_args(shards, run, 6), *negatives]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in lines if "loss" in r][-1]
    assert last["step"] == 6 and np.isfinite(last["loss"])
    # one exact pass over both shards: exactly shard 1's samples came without negatives
    assert last["samples_without_hard_negatives"] == SAMPLES_PER_SHARD


def test_a_resume_may_add_negatives_mined_with_the_checkpoint(
    random_model: Path, tmp_path: Path
) -> None:
    shards, _emb, out = _embed_and_mine(random_model, tmp_path)
    run = tmp_path / "run"
    assert pretrain_main(_train_args(shards, run, 3)) == 0
    resumed = [*_train_args(shards, run, 6), "--set", f"data.hard_negatives={out}"]
    assert pretrain_main([*resumed, "--set", "train.extend_schedule=continue_lr"]) == 0
    restarts = (run / "restarts.jsonl").read_text().splitlines()
    assert json.loads(restarts[-1])["changed"]["data.hard_negatives"] == ["", str(out)]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [3, 6]
    assert "samples_without_hard_negatives" in lines[-1]


def test_mine_refuses_an_emb_dir_without_text_and_training_a_bad_file(
    random_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emb = write_synthetic_embeddings(tmp_path / "emb", part_counts=(20,), modalities=("image",))
    capsys.readouterr()
    assert index_main(["mine", str(emb), "--out", str(tmp_path / "n.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "has no text embeddings: mining needs both" in err
    assert not (tmp_path / "n.jsonl").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "clipforge-hard-negatives/1"}\n')
    _write_shards(tmp_path / "shards", shards=1)
    argv = ["--config", "tiny", "--set", f"data.train={tmp_path / 'shards'}", "--set",
            f"train.run_dir={tmp_path / 'run'}", "--set", f"data.hard_negatives={bad}"]  # fmt: skip
    assert pretrain_main(argv) == 2
    err = capsys.readouterr().err
    assert f"data.hard_negatives: {bad}:1: required field 'emb_dir' is missing" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
