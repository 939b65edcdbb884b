"""Pure retrieval and classification metrics: similarity -> ranks -> Recall@K, mean/median rank.

Definitions (the same as CLIP_benchmark's ``zeroshot_retrieval`` and ``zeroshot_classification``,
so figures are comparable with published tables):

* a *query* has one or more *positive* candidates (a caption's positive is its image; an image's
  positives are all of its captions). Positives are given by group ids: query ``q`` and candidate
  ``c`` are a positive pair iff ``query_groups[q] == cand_groups[c]``;
* the *rank* of a query is the 1-based position of its best-placed positive in the candidates
  sorted by decreasing similarity;
* Recall@K is the fraction of queries whose rank is <= K (for an image with several captions: at
  least one caption in the top K, CLIP_benchmark's ``recall_at_k > 0``). K larger than the number
  of candidates is allowed and gives 1.0 (every positive is within the first K).

Tie policy (exact score ties happen: pixel-identical images get identical embeddings). clipforge
orders equal scores by candidate index, lower index first -- a stable sort of the scores, which is
deterministic and independent of block sizes, devices and the number of ranks. For K = 1 this is
what CLIP_benchmark's ``torch.topk`` (and ``argmax``) do: the first maximum wins. For K > 1,
``torch.topk`` on CPU picks among equal scores at the K-th place by quickselect, which depends on
the whole row (measured: it disagrees with any fixed index order), so no deterministic rule can
reproduce it. Every result therefore also reports how many queries have a negative tied with
their best positive (``tied_queries``) and the Recall@K bounds under the *optimistic* (positives
first) and *pessimistic* (negatives first) orders: another tool's figure that differs from
clipforge's by tie-breaking alone lies within those bounds.

The blocked functions never hold the full ``Nq x Nc`` similarity matrix: queries and candidates
are processed in blocks, and every score comes from :func:`similarity` (float64 accumulation
rounded to float32), so a score does not depend on the block it was computed in: blocked results
equal dense ones and identical vectors tie exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TIE_ORDERS = ("index", "optimistic", "pessimistic")


@dataclass(frozen=True)
class Ranks:
    """Per-query ranks of the best-placed positive under the three tie orders (1-based)."""

    index: torch.Tensor
    """(Nq,) int64: equal scores ordered by candidate index, lower first (clipforge's rule)."""
    optimistic: torch.Tensor
    """(Nq,) int64: positives before negatives of equal score (the best case)."""
    pessimistic: torch.Tensor
    """(Nq,) int64: negatives before positives of equal score (the worst case)."""

    @property
    def tied_queries(self) -> int:
        """Queries with at least one negative scored exactly as their best positive."""
        return int((self.pessimistic != self.optimistic).sum())

    def __len__(self) -> int:
        return int(self.index.numel())


def concat_ranks(parts: list[Ranks]) -> Ranks:
    """Ranks of consecutive query slices joined in order."""
    return Ranks(
        torch.cat([p.index for p in parts]),
        torch.cat([p.optimistic for p in parts]),
        torch.cat([p.pessimistic for p in parts]),
    )


def parse_ks(text: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """``"1,5,10"`` -> ``(1, 5, 10)``: sorted, unique, each >= 1 (ValueError otherwise)."""
    if isinstance(text, str):
        try:
            values = [int(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"K values must be integers like 1,5,10; got {text!r}") from None
    else:
        values = [int(v) for v in text]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"K values must be >= 1 (at least one), got {text!r}")
    return tuple(sorted(set(values)))


# ----------------------------------------------------------------------------- similarity


def similarity(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(q, c) inner products, accumulated in float64 and rounded to the inputs' dtype.

    Why: a float32 matrix product rounds the same dot product differently depending on where
    it sits (SIMD lane or remainder loop, GEMV for one query row vs GEMM, CPU vs GPU), so two
    identical candidate vectors -- an exact tie -- can come out one ulp apart in one block shape
    and equal in another. In float64 the products are exact and the sums' rounding errors
    (~1e-16) vanish when rounded to float32, so identical vectors tie for every block shape and
    device, and blocked results equal dense ones.
    """
    out_dtype = queries.dtype if queries.dtype.is_floating_point else torch.float32
    return (queries.double() @ candidates.double().T).to(out_dtype)


# ----------------------------------------------------------------------------- dense reference


def ranks_from_scores(
    scores: torch.Tensor, query_groups: torch.Tensor, cand_groups: torch.Tensor
) -> Ranks:
    """Ranks from a full similarity matrix (the reference the blocked version must equal).

    ``scores`` (Nq, Nc); ``query_groups`` (Nq,) and ``cand_groups`` (Nc,) integer group ids.
    Every query must have at least one positive (ValueError otherwise).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (Nq, Nc), got shape {tuple(scores.shape)}")
    pos = query_groups.view(-1, 1) == cand_groups.view(1, -1)  # (Nq, Nc) bool
    best, best_idx = _best_positive(scores, pos, offset=0)
    stats = _count_block(scores, pos, best, best_idx, offset=0)
    return _ranks_from_counts(*stats, best)


def _best_positive(
    scores: torch.Tensor, pos: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(best positive score, lowest candidate index among positives with that score) per row.

    Rows without a positive give (-inf, a huge index)."""
    neg_inf = torch.tensor(-math.inf, dtype=scores.dtype, device=scores.device)
    masked = torch.where(pos, scores, neg_inf)  # (q, c)
    best = masked.max(dim=1).values  # (q,)
    cols = torch.arange(scores.shape[1], device=scores.device) + offset
    big = torch.iinfo(torch.int64).max
    at_best = pos & (masked == best.view(-1, 1))
    idx = torch.where(at_best, cols.view(1, -1), torch.full_like(cols, big).view(1, -1))
    return best, idx.min(dim=1).values


def _count_block(
    scores: torch.Tensor,
    pos: torch.Tensor,
    best: torch.Tensor,
    best_idx: torch.Tensor,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: negatives scored above the best positive, equal to it, and equal with a lower
    candidate index than the best positive (the ones the index rule puts first)."""
    neg = ~pos
    b = best.view(-1, 1)
    greater = ((scores > b) & neg).sum(dim=1)
    equal_mask = (scores == b) & neg
    equal = equal_mask.sum(dim=1)
    cols = torch.arange(scores.shape[1], device=scores.device) + offset
    before = (equal_mask & (cols.view(1, -1) < best_idx.view(-1, 1))).sum(dim=1)
    return greater, equal, before


def _ranks_from_counts(
    greater: torch.Tensor, equal: torch.Tensor, before: torch.Tensor, best: torch.Tensor
) -> Ranks:
    if bool(torch.isneginf(best).any()):
        raise ValueError("a query has no positive candidate (check the group ids)")
    greater, equal, before = greater.long().cpu(), equal.long().cpu(), before.long().cpu()
    return Ranks(1 + greater + before, 1 + greater, 1 + greater + equal)


# ----------------------------------------------------------------------------- blocked ranks


def blocked_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_groups: torch.Tensor,
    cand_groups: torch.Tensor,
    query_block: int = 1024,
    cand_block: int = 16384,
    device: str | torch.device | None = None,
) -> Ranks:
    """Exact ranks without the full similarity matrix: equal to
    ``ranks_from_scores(similarity(queries, candidates), ...)``.

    ``queries`` (Nq, D) and ``candidates`` (Nc, D), L2-normalised (any dtype; computed in it);
    group ids as in :func:`ranks_from_scores`. Memory: one ``query_block x cand_block`` score
    block at a time (plus the candidates). ``device``: where to compute (default: the queries').
    For each query block, pass 1 computes only the candidate blocks holding its positives to find
    the best positive's score; pass 2 counts the negatives above / equal to it in every block.
    """
    if queries.dim() != 2 or candidates.dim() != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"queries (Nq, D) and candidates (Nc, D) must share D: got {tuple(queries.shape)} "
            f"and {tuple(candidates.shape)}"
        )
    if query_block < 1 or cand_block < 1:
        raise ValueError("block sizes must be >= 1")
    dev = torch.device(device) if device is not None else queries.device
    cands = candidates.to(dev)  # (Nc, D)
    cgroups = cand_groups.to(dev).long()  # (Nc,)
    qgroups_all = query_groups.long()
    nc = cands.shape[0]
    # Candidates sorted by group: the positions of a query block's positives by binary search.
    order = torch.argsort(cgroups, stable=True)
    sorted_groups = cgroups[order]
    parts: list[Ranks] = []
    for q0 in range(0, queries.shape[0], query_block):
        q = queries[q0 : q0 + query_block].to(dev)  # (q, D)
        qg = qgroups_all[q0 : q0 + query_block].to(dev)  # (q,)
        groups = torch.unique(qg)
        lo = torch.searchsorted(sorted_groups, groups, right=False)
        hi = torch.searchsorted(sorted_groups, groups, right=True)
        counts = hi - lo
        starts = torch.repeat_interleave(lo, counts)
        within = torch.arange(int(counts.sum()), device=dev) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        pos_cands = order[starts + within]
        pos_blocks = sorted(set((pos_cands // cand_block).tolist()))
        best = torch.full((q.shape[0],), -math.inf, dtype=q.dtype, device=dev)
        big = torch.iinfo(torch.int64).max
        best_idx = torch.full((q.shape[0],), big, dtype=torch.int64, device=dev)
        cache: dict[int, torch.Tensor] = {}
        for b in pos_blocks:
            c0 = b * cand_block
            s = similarity(q, cands[c0 : c0 + cand_block])  # (q, c) cosine similarities
            if len(pos_blocks) <= 2:  # positives local to few blocks (the usual data order)
                cache[b] = s
            pos = qg.view(-1, 1) == cgroups[c0 : c0 + cand_block].view(1, -1)
            b_best, b_idx = _best_positive(s, pos, c0)
            better = b_best > best
            same = b_best == best
            tie_idx = torch.where(same, torch.minimum(best_idx, b_idx), best_idx)
            best_idx = torch.where(better, b_idx, tie_idx)
            best = torch.maximum(best, b_best)
        greater = torch.zeros(q.shape[0], dtype=torch.int64, device=dev)
        equal = torch.zeros_like(greater)
        before = torch.zeros_like(greater)
        for c0 in range(0, nc, cand_block):
            cached = cache.pop(c0 // cand_block, None)
            # (q, c), as in pass 1
            s = cached if cached is not None else similarity(q, cands[c0 : c0 + cand_block])
            pos = qg.view(-1, 1) == cgroups[c0 : c0 + cand_block].view(1, -1)
            g, e, bf = _count_block(s, pos, best, best_idx, c0)
            greater += g
            equal += e
            before += bf
        parts.append(_ranks_from_counts(greater, equal, before, best))
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64)
        return Ranks(empty, empty, empty)
    return concat_ranks(parts)


# ----------------------------------------------------------------------------- blocked top-k


def blocked_topk(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    query_block: int = 1024,
    cand_block: int = 16384,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k neighbours by inner product with a running top-k over candidate blocks.

    Returns (scores (Nq, k'), indices (Nq, k')) with ``k' = min(k, Nc)``, best first; equal scores
    ordered by candidate index, lower first (clipforge's tie rule), so the result does not depend
    on the block sizes. Memory: ``query_block x (k + cand_block)`` at a time.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dev = torch.device(device) if device is not None else queries.device
    cands = candidates.to(dev)  # (Nc, D)
    nc = cands.shape[0]
    k = min(k, nc)
    out_s, out_i = [], []
    for q0 in range(0, queries.shape[0], query_block):
        q = queries[q0 : q0 + query_block].to(dev)  # (q, D)
        run_s = torch.empty(q.shape[0], 0, dtype=q.dtype, device=dev)
        run_i = torch.empty(q.shape[0], 0, dtype=torch.int64, device=dev)
        for c0 in range(0, nc, cand_block):
            s = similarity(q, cands[c0 : c0 + cand_block])  # (q, c)
            idx = torch.arange(c0, c0 + s.shape[1], device=dev).expand(q.shape[0], -1)
            # The running list holds lower indices than this block, and a stable descending sort
            # keeps equal scores in that order: ties resolve to the lower index.
            all_s = torch.cat([run_s, s], dim=1)
            all_i = torch.cat([run_i, idx], dim=1)
            top = torch.sort(all_s, dim=1, descending=True, stable=True).indices[:, :k]
            run_s, run_i = all_s.gather(1, top), all_i.gather(1, top)
        out_s.append(run_s.cpu())
        out_i.append(run_i.cpu())
    if not out_s:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
    return torch.cat(out_s), torch.cat(out_i)


def ranks_from_topk(
    topk_indices: torch.Tensor, query_groups: torch.Tensor, cand_groups: torch.Tensor
) -> torch.Tensor:
    """(Nq,) rank of the first positive in each query's result list (1-based), or
    ``k + 1`` when none of the ``k`` results is a positive. ``topk_indices`` (Nq, k), -1 = no
    result (FAISS pads with -1)."""
    nq, k = topk_indices.shape
    valid = topk_indices >= 0
    hit = valid & (
        cand_groups.long()[topk_indices.clamp(min=0)] == query_groups.long().view(-1, 1)
    )  # (Nq, k)
    positions = torch.arange(1, k + 1).expand(nq, -1)
    first = torch.where(hit, positions, torch.full_like(topk_indices, k + 1))
    return first.min(dim=1).values if k else torch.full((nq,), 1, dtype=torch.int64)


# ----------------------------------------------------------------------------- summaries


def recall_at_k(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """{K: fraction of queries with rank <= K} (1.0 for K >= the number of candidates)."""
    r = ranks.view(-1)
    if r.numel() == 0:
        return {k: float("nan") for k in ks}
    return {k: float((r <= k).double().mean()) for k in ks}


def rank_summary(ranks: torch.Tensor) -> dict[str, float]:
    """Mean and median rank (1-based; the median of an even count is the mean of the middle two,
    as numpy's)."""
    r = ranks.view(-1).double()
    if r.numel() == 0:
        return {"mean_rank": float("nan"), "median_rank": float("nan")}
    return {"mean_rank": float(r.mean()), "median_rank": float(r.quantile(0.5))}


def retrieval_metrics(ranks: Ranks, ks: tuple[int, ...]) -> dict[str, float | int]:
    """One direction's figures: ``R@K`` (clipforge's tie rule), mean/median rank, the number of
    tied queries, and ``R@K_optimistic`` / ``R@K_pessimistic`` bounds."""
    out: dict[str, float | int] = {}
    for k, v in recall_at_k(ranks.index, ks).items():
        out[f"R@{k}"] = v
    out.update(rank_summary(ranks.index))
    out["queries"] = len(ranks)
    out["tied_queries"] = ranks.tied_queries
    for name, r in (("optimistic", ranks.optimistic), ("pessimistic", ranks.pessimistic)):
        for k, v in recall_at_k(r, ks).items():
            out[f"R@{k}_{name}"] = v
    return out


# ----------------------------------------------------------------------------- classification


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Top-K accuracy and mean per-class recall (CLIP_benchmark's ``acc1``/``acc5``/
    ``mean_per_class_recall``).

    ``logits`` (N, C) scores; ``targets`` (N,) class indices. The prediction rank uses the same
    tie rule as retrieval (equal scores: lower class index first; ``argmax`` returns the first
    maximum). Top-K with K >= C is NaN when C < 5 (as CLIP_benchmark reports acc5 for fewer than 5
    classes). Mean per-class recall averages over the classes that occur in ``targets``
    (scikit-learn's ``balanced_accuracy_score``).
    """
    n, c = logits.shape
    targets = targets.long().view(-1)
    classes = torch.arange(c)
    groups = classes  # class j is candidate j; sample i's positive is class targets[i]
    ranks = ranks_from_scores(logits, targets, groups).index  # (N,)
    out: dict[str, float] = {}
    for k in ks:
        out[f"acc{k}"] = float("nan") if (k >= 5 and c < 5) else float((ranks <= k).double().mean())
    pred = logits.argmax(dim=1)  # (N,) first maximum
    recalls = []
    for cls in torch.unique(targets).tolist():
        mask = targets == cls
        recalls.append(float((pred[mask] == cls).double().mean()))
    out["mean_per_class_recall"] = sum(recalls) / len(recalls) if recalls else float("nan")
    out["samples"] = float(n)
    return out
