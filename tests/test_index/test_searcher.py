"""``clipforge.index.searcher.Searcher``: queries, model check, k and dimension errors, e2e."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipforge.index.emb_dir import read_member_bytes
from clipforge.index.searcher import Hit, ModelMismatchError, Searcher, SearchError
from clipforge.pretrain.models import LoadedModel

# tests/conftest.py's trained_demo_run (clipforge-tiny, 400 x 128, lr 2e-3); measured: see the test.
MIN_TOP10_FRACTION = 0.8


@pytest.fixture(scope="module")
def searcher(demo_index: Path) -> Searcher:
    return Searcher.open(demo_index)  # model: index.json's model_source (the trained run)


def _captions(demo_index: Path) -> tuple[list[str], list[str]]:
    table = pq.read_table(demo_index / "metadata.parquet")
    return table.column("caption").to_pylist(), table.column("key").to_pylist()


def test_text_search_finds_the_captions_emoji(searcher: Searcher, demo_index: Path) -> None:
    """End to end (demo-trained tiny model -> embed -> flat index -> text search): the fraction
    of all 1,911 captions whose own emoji is among the top 10 of 1,911 (chance: 0.5%)."""
    captions, keys = _captions(demo_index)
    hits = searcher.search_text(captions, k=10)
    assert len(hits) == 1911 and all(len(h) == 10 for h in hits)
    found = [key in {h.key for h in hs} for key, hs in zip(keys, hits, strict=True)]
    fraction = sum(found) / len(found)
    print(f"\n[e2e] captions with their emoji in the top 10: {fraction:.3f}")
    assert fraction >= MIN_TOP10_FRACTION, fraction
    h = hits[0][0]
    assert isinstance(h, Hit) and h.shard.endswith(".tar") and h.source and h.caption
    assert -1.0 - 1e-3 <= h.score <= 1.0 + 1e-3
    scores = [x.score for x in hits[0]]
    assert scores == sorted(scores, reverse=True)


def test_single_and_batched_queries_agree(searcher: Searcher) -> None:
    one = searcher.search_text("red heart", k=5)
    both = searcher.search_text(["red heart", "grinning face"], k=5)
    assert [h.id for h in one] == [h.id for h in both[0]]
    assert len(both) == 2 and len(both[1]) == 5


def test_image_to_image_and_image_to_text(searcher: Searcher, tmp_path: Path) -> None:
    table = pq.read_table(searcher.index_dir / "metadata.parquet")
    row = table.slice(123, 1).to_pylist()[0]
    path = tmp_path / row["member"]
    path.write_bytes(read_member_bytes(row["shard"], row["offset"], row["size"]))
    hits = searcher.search_image(path, k=3)
    assert hits[0].id == 123 and hits[0].key == row["key"]  # itself, at cosine ~1
    assert hits[0].score == pytest.approx(1.0, abs=2e-3)
    captions = searcher.search_image([path, path], k=10, target="text")
    assert len(captions) == 2 and [h.id for h in captions[0]] == [h.id for h in captions[1]]
    assert all(h.caption for h in captions[0])


def test_an_item_scored_against_itself_is_at_most_1(
    searcher: Searcher, demo_emb: Path, tmp_path: Path
) -> None:
    """ "More like item N" gave 1.000036: float16 storage rounds each row's norm to ~1e-4, so an
    indexed row scored as if it were longer than a unit vector. Build renormalises the rows and
    the searcher clamps cosine scores: every item against itself now scores <= 1 and ~1."""
    from tests.test_index.synthetic import load_all

    stored = load_all(demo_emb, "image")  # (1911, 64) float16 rows, norms 1 +- ~1e-4
    assert np.abs(np.linalg.norm(stored, axis=1) - 1).max() > 1e-6  # what the bug fed on
    hits = searcher.search_embeddings(stored, k=1)
    scores = np.array([h[0].score for h in hits])
    assert scores.max() <= 1.0 and scores.min() > 0.999
    # the service's path: the item's stored image bytes, embedded afresh in float32
    table = pq.read_table(searcher.index_dir / "metadata.parquet")
    for i in (10, 70, 130):  # items that scored 1.00005..1.00008 against themselves before
        row = table.slice(i, 1).to_pylist()[0]
        path = tmp_path / row["member"]
        path.write_bytes(read_member_bytes(row["shard"], row["offset"], row["size"]))
        best = searcher.search_image(path, k=1)[0]
        assert best.score <= 1.0 and best.score == pytest.approx(1.0, abs=2e-3)


def test_k_errors_and_k_up_to_the_collection_size(searcher: Searcher) -> None:
    for k, msg in [(0, "k must be >= 1"), (-3, "k must be >= 1"), (1912, "exceeds"),
                   (2.5, "integer")]:  # fmt: skip
        with pytest.raises(SearchError, match=msg):
            searcher.search_text("heart", k=k)  # type: ignore[arg-type]
    everything = searcher.search_text("heart", k=1911)
    assert sorted(h.id for h in everything) == list(range(1911))


def test_raw_embedding_queries_check_the_dimension(searcher: Searcher) -> None:
    with pytest.raises(SearchError, match=r"query dimension 32 does not match .* 64"):
        searcher.search_embeddings(np.ones((2, 32), np.float32))
    q = searcher.embed_text(["heart"])  # (1, 64)
    assert q.shape == (1, 64)
    via_raw = searcher.search_embeddings(q[0] * 7.0, k=4)  # any scale: queries are normalised
    assert [h.id for h in via_raw[0]] == [h.id for h in searcher.search_text("heart", k=4)]


def test_another_model_is_refused(demo_index: Path, other_model_dir: Path) -> None:
    with pytest.raises(ModelMismatchError, match="is not the model the index") as e:
        Searcher.open(demo_index, model=other_model_dir)
    manifest = json.loads((demo_index / "index.json").read_text())
    assert manifest["model_hash"] in str(e.value)


def test_accepts_the_right_model_object(demo_index: Path, trained_model: LoadedModel) -> None:
    s = Searcher.open(demo_index, model=trained_model)
    assert s.model is trained_model and s.count == 1911 and s.dim == 64
    assert s.targets == ["image", "text"]


def test_missing_model_source_is_a_clear_error_but_raw_search_works(
    demo_index: Path, tmp_path: Path
) -> None:
    import shutil

    # an index built before indexes kept their own model copy: only model_source names it
    copy = tmp_path / "index"
    shutil.copytree(demo_index, copy)
    manifest = json.loads((copy / "index.json").read_text())
    manifest["model_source"] = str(tmp_path / "gone")
    del manifest["model"]
    shutil.rmtree(copy / "model")
    (copy / "index.json").write_text(json.dumps(manifest))
    s = Searcher.open(copy)
    hits = s.search_embeddings(np.eye(64, dtype=np.float32)[:2], k=3)
    assert [len(h) for h in hits] == [3, 3]
    with pytest.raises(SearchError, match="does not exist here"):
        s.search_text("heart")


def test_a_missing_model_copy_is_a_clear_error_naming_it(demo_index: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(demo_index, copy)
    (copy / "model" / "open_clip_pytorch_model.bin").unlink()
    s = Searcher.open(copy)  # raw search needs no model
    assert len(s.search_embeddings(np.eye(64, dtype=np.float32)[0], k=2)[0]) == 2
    with pytest.raises(
        ValueError, match=r"model/open_clip_pytorch_model\.bin \(the index's copy.*--model"
    ):
        s.search_text("heart")


def test_empty_collection_is_a_clear_error(tmp_path: Path) -> None:
    import faiss

    from clipforge.index import store

    d = tmp_path / "empty"
    d.mkdir()
    size, sha = store.write_faiss_index(faiss.IndexFlatIP(8), d / "image.index")
    pq.write_table(pa.table({"key": pa.array([], pa.string())}), d / "metadata.parquet")
    msize, msha = store.file_record(d / "metadata.parquet")
    store.write_index_manifest(d, {
        "format": store.INDEX_FORMAT, "model_hash": "x", "model_source": "", "dim": 8,
        "metric": "inner_product", "count": 0,
        "metadata": {"file": "metadata.parquet", "sha256": msha, "size_bytes": msize},
        "modalities": {"image": {"file": "image.index", "sha256": {"image.index": sha},
                                 "file_sizes": {"image.index": size}, "search_params": {}}},
    })  # fmt: skip
    s = Searcher.open(d)
    with pytest.raises(SearchError, match="empty"):
        s.search_embeddings(np.ones((1, 8), np.float32), k=1)
    with pytest.raises(SearchError, match="has no text index"):
        Searcher.open(d, model=None).search_embeddings(np.ones((1, 8), np.float32), target="text")
