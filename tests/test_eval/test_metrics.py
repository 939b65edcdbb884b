"""Pure metric functions on small hand-computed similarity matrices, and blocked == dense."""

from __future__ import annotations

import math

import pytest
import torch

from clipforge.eval.metrics import (
    blocked_ranks,
    blocked_topk,
    classification_metrics,
    parse_ks,
    rank_summary,
    ranks_from_scores,
    ranks_from_topk,
    recall_at_k,
    retrieval_metrics,
    similarity,
)


def test_ranks_single_positive_hand_computed() -> None:
    # 3 text queries x 3 images; text i's image is image i.
    s = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # positive first -> rank 1
            [0.8, 0.3, 0.5],  # positive 0.3 below 0.8 and 0.5 -> rank 3
            [0.1, 0.7, 0.6],  # positive 0.6 below 0.7 -> rank 2
        ]
    )
    g = torch.arange(3)
    r = ranks_from_scores(s, g, g)
    assert r.index.tolist() == [1, 3, 2]
    assert r.tied_queries == 0
    assert recall_at_k(r.index, (1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}
    assert rank_summary(r.index) == {"mean_rank": 2.0, "median_rank": 2.0}


def test_ties_index_rule_and_bounds() -> None:
    # Query 0: positive (col 2) tied with negatives at cols 0 and 3 -> index rule: col 0 first.
    # Query 1: positive (col 0) tied with negative col 1 -> the positive has the lower index.
    s = torch.tensor([[0.5, 0.1, 0.5, 0.5], [0.4, 0.4, 0.9, 0.0]])
    qg = torch.tensor([2, 0])
    cg = torch.arange(4)
    r = ranks_from_scores(s, qg, cg)
    assert r.index.tolist() == [2, 2]  # q0: col0 (tie, lower) then col2; q1: col2 (0.9) then col0
    assert r.optimistic.tolist() == [1, 2]
    assert r.pessimistic.tolist() == [3, 3]
    assert r.tied_queries == 2
    m = retrieval_metrics(r, (1, 2))
    assert m["R@1"] == 0.0 and m["R@2"] == 1.0
    assert m["R@1_optimistic"] == 0.5 and m["R@1_pessimistic"] == 0.0
    assert m["tied_queries"] == 2


def test_several_captions_per_image() -> None:
    # Image -> text: 2 images, 5 captions; captions 0,1,2 belong to image 0, 3,4 to image 1.
    cap_groups = torch.tensor([0, 0, 0, 1, 1])
    s = torch.tensor(
        [
            [0.2, 0.6, 0.3, 0.7, 0.1],  # best own caption 0.6 (col 1) below 0.7 -> rank 2
            [0.9, 0.1, 0.2, 0.3, 0.8],  # own captions 0.3 / 0.8: best 0.8 below 0.9 -> rank 2
        ]
    )
    r = ranks_from_scores(s, torch.tensor([0, 1]), cap_groups)
    assert r.index.tolist() == [2, 2]
    # The reverse direction (text -> image): each caption's only positive is its image.
    r_t = ranks_from_scores(s.T.contiguous(), cap_groups, torch.tensor([0, 1]))
    assert r_t.index.tolist() == [2, 1, 1, 2, 1]
    # Positives tied with each other are not ties: image 0 with two own captions at 0.5.
    s2 = torch.tensor([[0.5, 0.5, 0.1, 0.2, 0.3]])
    r2 = ranks_from_scores(s2, torch.tensor([0]), cap_groups)
    assert r2.index.tolist() == [1] and r2.tied_queries == 0


def test_k_larger_than_candidates() -> None:
    s = torch.tensor([[0.9, 0.1], [0.3, 0.2]])  # ranks 1 and 2
    g = torch.arange(2)
    r = ranks_from_scores(s, g, g)
    assert recall_at_k(r.index, (1, 5, 100)) == {1: 0.5, 5: 1.0, 100: 1.0}
    _top_s, top_i = blocked_topk(torch.eye(2), torch.eye(2), k=10)
    assert top_i.shape == (2, 2)


def test_query_without_positive_is_an_error() -> None:
    with pytest.raises(ValueError, match="no positive"):
        ranks_from_scores(torch.zeros(1, 2), torch.tensor([5]), torch.arange(2))


def test_parse_ks() -> None:
    assert parse_ks("10,1,5,5") == (1, 5, 10)
    for bad in ("", "0", "a,b", "1,-2"):
        with pytest.raises(ValueError):
            parse_ks(bad)


def _random_unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("qb,cb", [(1, 13), (1, 1000), (16, 5), (64, 50), (1000, 1000)])
def test_blocked_equals_dense_with_duplicates(qb: int, cb: int) -> None:
    imgs = _random_unit(120, 16, 0)
    imgs[7] = imgs[3]  # pixel-identical images: exact ties for their captions
    imgs[90] = imgs[3]
    # 3 captions per image for the first 40 images, 1 for the rest (uneven groups).
    cap_groups = torch.cat([torch.arange(40).repeat_interleave(3), torch.arange(40, 120)])
    caps = _random_unit(len(cap_groups), 16, 1) * 0.5 + imgs[cap_groups]
    caps = caps / caps.norm(dim=1, keepdim=True)
    img_groups = torch.arange(120)
    for q, c, qg, cg in (
        (caps, imgs, cap_groups, img_groups),
        (imgs, caps, img_groups, cap_groups),
    ):
        dense = ranks_from_scores(similarity(q, c), qg, cg)  # the full matrix
        blocked = blocked_ranks(q, c, qg, cg, query_block=qb, cand_block=cb)
        assert torch.equal(dense.index, blocked.index)
        assert torch.equal(dense.optimistic, blocked.optimistic)
        assert torch.equal(dense.pessimistic, blocked.pessimistic)
    # The duplicated images make the captions of images 3, 7 and 90 tied queries.
    r = blocked_ranks(caps, imgs, cap_groups, img_groups, query_block=qb, cand_block=cb)
    tied = (r.pessimistic != r.optimistic).nonzero().view(-1)
    assert set(cap_groups[tied].tolist()) <= {3, 7, 90} and r.tied_queries > 0


def test_identical_vectors_tie_for_every_block_shape() -> None:
    # One query row (GEMV) vs many (GEMM), duplicates in SIMD lanes and remainders: still ties.
    c = _random_unit(37, 24, 5)
    c[36] = c[0]
    c[17] = c[0]
    q = _random_unit(9, 24, 6)
    for rows in (q[:1], q[:2], q):
        s = similarity(rows, c)
        assert torch.equal(s[:, 0], s[:, 36]) and torch.equal(s[:, 0], s[:, 17])


def test_blocked_topk_matches_stable_sort_and_ranks() -> None:
    q = _random_unit(50, 8, 2)
    c = _random_unit(200, 8, 3)
    c[150] = c[20]  # a tie: index 20 must come first
    ref = torch.sort(similarity(q, c), dim=1, descending=True, stable=True)
    for cb in (1, 17, 500):
        s, i = blocked_topk(q, c, k=12, query_block=9, cand_block=cb)
        assert torch.equal(i, ref.indices[:, :12])
        assert torch.allclose(s, ref.values[:, :12])
    # R@K from a top-k list equals R@K from exact ranks (K <= k).
    groups = torch.arange(50) * 3  # query j's positive: candidate 3j
    cg = torch.arange(200)
    ranks = ranks_from_scores(similarity(q, c), groups, cg).index
    found = ranks_from_topk(blocked_topk(q, c, k=12)[1], groups, cg)
    assert torch.equal(torch.where(ranks <= 12, ranks, torch.full_like(ranks, 13)), found)


def test_classification_known_answer() -> None:
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # class 0, correct
            [0.2, 0.8, 0.0, 0.0, 0.0, 0.0],  # class 0, predicted 1 (target at rank 2)
            [0.0, 0.0, 0.1, 0.2, 0.3, 0.9],  # class 2, rank 5
            [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],  # class 1, tie with class 0 -> class 0 first
        ]
    )
    targets = torch.tensor([0, 0, 2, 1])
    m = classification_metrics(logits, targets)
    assert m["acc1"] == 0.25
    assert m["acc5"] == 1.0
    # per class: class 0 -> 1/2, class 1 -> 0/1, class 2 -> 0/1
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 0 + 0) / 3)
    m3 = classification_metrics(logits[:, :3], targets)
    assert math.isnan(m3["acc5"])
