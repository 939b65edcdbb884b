"""Index directory: loading applies search params; checksums catch bad or missing files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from clipforge.index import store
from clipforge.index.build import run_build
from clipforge.index.emb_dir import open_vectors
from clipforge.index.plan import BuildConfig
from clipforge.index.store import IndexIntegrityError, open_index, read_index_manifest

from .synthetic import write_synthetic_embeddings


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-modality IVF-SQfp16 index over 4,000 synthetic vectors (do not modify: copy)."""
    root = tmp_path_factory.mktemp("store")
    emb = write_synthetic_embeddings(root / "emb", part_counts=(2500, 1500), dim=16, seed=3)
    run_build(emb, root / "idx", kind="ivf_sqfp16", config=BuildConfig(), log=lambda _: None)
    return root / "idx"


@pytest.fixture
def idx(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "idx"))


def test_open_index_applies_params_and_loads_metadata(built: Path) -> None:
    for modality in ("image", "text"):
        opened = open_index(built, modality)
        assert opened.info is opened.manifest["modalities"][modality]
        ivf = faiss.extract_index_ivf(opened.index)
        assert ivf.nprobe == opened.info["search_params"]["nprobe"]
        assert opened.index.ntotal == opened.manifest["count"] == opened.metadata.num_rows == 4000
        assert opened.metadata.column_names[:2] == ["key", "caption"]


def test_mmap_gives_same_results(built: Path) -> None:
    q = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    d1, i1 = open_index(built, "image").index.search(q, 10)
    d2, i2 = open_index(built, "image", mmap=True).index.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_truncated_index_file(idx: Path) -> None:
    f = idx / "image.index"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(IndexIntegrityError, match=r"image\.index.*truncated"):
        open_index(idx, "image")
    open_index(idx, "text")  # the other modality is unaffected


@pytest.mark.parametrize("name", ["text.index", "metadata.parquet"])
def test_flipped_byte(idx: Path, name: str) -> None:
    f = idx / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match=rf"{name.replace('.', '[.]')} is altered"):
        open_index(idx, "text")


def test_missing_file(idx: Path) -> None:
    (idx / "image.index").unlink()
    with pytest.raises(IndexIntegrityError, match=r"missing: .*image\.index"):
        open_index(idx, "image")


def test_manifest_problems(idx: Path) -> None:
    manifest = read_index_manifest(idx)
    assert manifest["format"] == store.INDEX_FORMAT
    (idx / "index.json").write_text(json.dumps(manifest)[:50])
    with pytest.raises(IndexIntegrityError, match="not valid JSON"):
        read_index_manifest(idx)
    (idx / "index.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(IndexIntegrityError, match="format 'other/9'"):
        open_index(idx)
    (idx / "index.json").unlink()
    with pytest.raises(IndexIntegrityError, match="not a clipforge index directory"):
        open_index(idx)


def test_unknown_modality_and_bad_param(built: Path) -> None:
    manifest = read_index_manifest(built)
    with pytest.raises(ValueError, match="no 'audio' modality"):
        store.modality_info(manifest, "audio")
    index = open_index(built).index
    with pytest.raises(ValueError, match="efSearch"):
        store.apply_search_params(index, {"efSearch": 10})


def test_verify_index_dir(idx: Path) -> None:
    store.verify_index_dir(idx)
    f = idx / "text.index"
    f.write_bytes(f.read_bytes() + b"\0")
    store.verify_index_dir(idx, ("image",))
    with pytest.raises(IndexIntegrityError, match=r"text\.index.*altered"):
        store.verify_index_dir(idx)


def test_flat_index_roundtrip(tmp_path: Path) -> None:
    emb = write_synthetic_embeddings(tmp_path / "emb", part_counts=(500,), dim=8)
    info = run_build(emb, tmp_path / "idx", log=lambda _: None)["modalities"]["image"]
    assert info["kind"] == "flat" and info["search_params"] == {}
    assert info["measured_recall_at_10"] == 1.0
    q = open_vectors(emb, "text").sample(5, seed=0)
    _, found = open_index(tmp_path / "idx", mmap=True).index.search(q, 3)
    assert found.shape == (5, 3) and (found >= 0).all()
