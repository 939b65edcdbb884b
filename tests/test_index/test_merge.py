"""Sharded build + on-disk merge gives the same results as one in-RAM index."""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from clipforge.index import faiss_ops, merge, store
from clipforge.index.build import run_build
from clipforge.index.emb_dir import open_vectors
from clipforge.index.plan import BuildConfig, plan_index

from .synthetic import write_synthetic_embeddings


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_embeddings(
        tmp_path_factory.mktemp("emb"), part_counts=(3000, 2000, 2500), dim=24, seed=11
    )


def test_shard_ranges_cover_exactly() -> None:
    assert merge.shard_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert merge.shard_ranges(2, 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]
    with pytest.raises(ValueError):
        merge.shard_ranges(10, 0)


@pytest.mark.parametrize("kind", ["ivf_sqfp16", "ivf_pq"])
def test_sharded_on_disk_equals_single_index(emb_dir: Path, tmp_path: Path, kind: str) -> None:
    # OPQ exercises the IndexPreTransform wrapper through sharding and merging
    cfg = BuildConfig(
        flat_max_count=1000, pq_m=4, pq_nbits=4, opq=True, opq_iterations=2, chunk_size=1000
    )
    single = run_build(
        emb_dir,
        tmp_path / "single",
        kind=kind,
        modalities=["image"],
        config=cfg,
        log=lambda _: None,
    )["modalities"]["image"]
    sharded = run_build(
        emb_dir,
        tmp_path / "sharded",
        kind=kind,
        modalities=["image"],
        num_shards=3,
        config=cfg,
        log=lambda _: None,
    )["modalities"]["image"]
    assert sharded["extra_files"] == ["image.ivfdata"] and sharded["num_shards"] == 3
    assert set(sharded["sha256"]) == {"image.index", "image.ivfdata"}
    assert single["search_params"] == sharded["search_params"]
    assert single["measured_recall_at_10"] == sharded["measured_recall_at_10"]
    assert not list((tmp_path / "sharded").glob(".*"))  # work folder cleaned up

    # move the index directory: the .index finds its .ivfdata next to itself
    moved = Path(shutil.move(tmp_path / "sharded", tmp_path / "elsewhere"))
    q = open_vectors(emb_dir, "text").sample(300, seed=2)
    a = store.open_index(tmp_path / "single", "image")
    b = store.open_index(moved, "image")
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(b.index).invlists)
    assert isinstance(invlists, faiss.OnDiskInvertedLists)
    for nprobe in (1, 4, 16):
        store.apply_search_params(a.index, {"nprobe": nprobe})
        store.apply_search_params(b.index, {"nprobe": nprobe})
        da, ia = a.index.search(q, 10)
        db, ib = b.index.search(q, 10)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(da, db)


def test_rank_style_shards_and_merge(emb_dir: Path, tmp_path: Path) -> None:
    # What ranks / SLURM tasks do: one trained index file, each rank writes its shard, one merge.
    source = open_vectors(emb_dir, "image")
    cfg = BuildConfig(kind="ivf_flat", nlist=32)
    plan = plan_index(source.count, source.dim, cfg)
    trained = faiss_ops.train_index(plan, source, cfg, log=lambda _: None)
    merge.save_trained(trained, tmp_path / "trained.index")
    shards = [
        merge.build_shard(tmp_path / "trained.index", source, r, 2, tmp_path / f"s{r}.index")
        for r in range(2)
    ]
    out = tmp_path / "out"
    out.mkdir()
    n = merge.merge_on_disk(tmp_path / "trained.index", shards, out / "m.index", out / "m.ivfdata")
    assert n == source.count
    merged = faiss.read_index(str(out / "m.index"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    full = faiss.clone_index(trained)
    faiss_ops.add_vectors(full, source, chunk_size=4096)
    q = source.sample(50, seed=1) + 0.01
    merged.nprobe = full.nprobe = 4
    np.testing.assert_array_equal(merged.search(q, 10)[1], full.search(q, 10)[1])


def test_truncated_ivfdata_detected(emb_dir: Path, tmp_path: Path) -> None:
    run_build(
        emb_dir,
        tmp_path / "idx",
        kind="ivf_flat",
        modalities=["image"],
        num_shards=2,
        config=BuildConfig(nlist=32),
        log=lambda _: None,
    )
    f = tmp_path / "idx" / "image.ivfdata"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(store.IndexIntegrityError, match=r"image\.ivfdata.*truncated"):
        store.open_index(tmp_path / "idx", "image")


def test_sharding_needs_ivf(emb_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need an IVF kind"):
        run_build(
            emb_dir,
            tmp_path / "idx",
            kind="hnsw",
            modalities=["image"],
            num_shards=2,
            log=lambda _: None,
        )
    with pytest.raises(ValueError, match="IVF index"):
        merge.save_trained(faiss.IndexFlatIP(8), tmp_path / "t.index")


def test_auto_with_shards_picks_ivf(emb_dir: Path, tmp_path: Path) -> None:
    # 7,500 vectors would be exact (flat) search, which cannot be sharded: auto picks IVF instead
    m = run_build(emb_dir, tmp_path / "idx", modalities=["image"], num_shards=2,
                  log=lambda _: None)  # fmt: skip
    assert m["modalities"]["image"]["kind"] == "ivf_sqfp16"
    assert m["modalities"]["image"]["extra_files"] == ["image.ivfdata"]
