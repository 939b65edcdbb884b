"""Text -> image retrieval queried by a .json field (the demo's name-only evaluation): each image's
field is its query, images sharing the text are each other's positives, and a missing field is an
error naming the sample."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipforge.eval.data import EmbeddedSet, EvalDataError
from clipforge.eval.retrieval import evaluate_field_queries, field_query_texts
from clipforge.pretrain.distributed import DistInfo


class _LookupTextModel(nn.Module):
    """encode_text(tokens) = a fixed row per token id: the planted query embeddings."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.rows = rows  # (V, D)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rows[tokens[:, 0]]  # (B, D)


def _embedded(names: list[object]) -> EmbeddedSet:
    n = len(names)
    return EmbeddedSet(
        image_emb=torch.eye(n),  # (n, n): image i is the unit vector e_i
        text_emb=None,
        text_image=torch.zeros(0, dtype=torch.long),
        image_keys=[f"k{i}" for i in range(n)],
        sample_keys=[("s.tar", f"k{i}") for i in range(n)],
        sample_image=torch.arange(n),
        image_ids=[f"k{i}" for i in range(n)],
        labels=[None] * n,
        captions=[],
        samples=n,
        image_metas=[{"name": v} if v is not None else None for v in names],
    )


def test_field_queries_rank_each_image_by_its_own_name() -> None:
    names = ["cat face", "rocket", "pizza", "cat face", "bento box"]
    vocab = sorted(set(names))
    emb = _embedded(names)
    # Planted query embeddings (D = 5): "cat face" -> image 0, "rocket" -> image 2 first and
    # image 1 second, "pizza" -> image 2, "bento box" -> image 4 third.
    rows = torch.zeros(len(vocab), 5)
    rows[vocab.index("cat face"), 0] = 1.0
    rows[vocab.index("rocket")] = torch.tensor([0.0, 0.6, 0.8, 0.0, 0.0])
    rows[vocab.index("pizza"), 2] = 1.0
    rows[vocab.index("bento box")] = torch.tensor([0.7, 0.0, 0.5, 0.0, 0.3])

    def tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[vocab.index(t)] for t in texts])  # (B, 1)

    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    metrics = evaluate_field_queries(emb, _LookupTextModel(rows), tokenizer, "name", info)
    # ranks: cat face (image 0) 1; rocket 2; pizza 1; the second cat face (image 3): image 0
    # holds the same name, so it is a positive at rank 1; bento box 3
    assert metrics["queries"] == 5
    assert metrics["R@1"] == pytest.approx(3 / 5)
    assert metrics["R@5"] == pytest.approx(1.0)
    assert metrics["mean_rank"] == pytest.approx((1 + 2 + 1 + 1 + 3) / 5)


@pytest.mark.parametrize("bad", [None, "", 3])
def test_a_missing_or_empty_field_names_the_sample(bad: object) -> None:
    emb = _embedded(["cat face", bad, "pizza"])
    with pytest.raises(EvalDataError, match=r"sample k1: its \.json has no text field 'name'"):
        field_query_texts(emb, "name")
    assert field_query_texts(_embedded(["a", " b "]), "name") == ["a", "b"]
