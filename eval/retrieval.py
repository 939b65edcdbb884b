"""Image<->text retrieval Recall@K (exact, blocked, split across ranks) and through an index.

Directions are named by what is searched, as in CLIP_benchmark: ``text_to_image`` (a caption
queries the images; CLIP_benchmark's ``image_retrieval_recall@K``) and ``image_to_text`` (an
image queries the captions; ``text_retrieval_recall@K``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipforge.eval.data import EmbeddedSet, EvalDataError, all_gather_rows, embed_texts, lookup
from clipforge.eval.metrics import (
    Ranks,
    blocked_ranks,
    ranks_from_topk,
    recall_at_k,
    retrieval_metrics,
)
from clipforge.pretrain.distributed import DistInfo

DIRECTIONS = ("text_to_image", "image_to_text")


@dataclass(frozen=True)
class RetrievalConfig:
    """How retrieval figures are computed."""

    ks: tuple[int, ...] = (1, 5, 10)
    """The K of Recall@K."""
    query_block: int = 1024
    """Queries per similarity block."""
    cand_block: int = 16384
    """Candidates per similarity block (a block holds query_block x cand_block scores)."""
    device: str = "auto"
    """Where similarities are computed: ``auto`` (this rank's GPU when present), ``cpu``,
    ``cuda``."""


def _compute_device(cfg: RetrievalConfig, info: DistInfo) -> torch.device:
    if cfg.device == "auto":
        return info.device
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise EvalDataError("device cuda requested but no GPU is visible")
    return torch.device(cfg.device)


def distributed_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_groups: torch.Tensor,
    cand_groups: torch.Tensor,
    info: DistInfo,
    cfg: RetrievalConfig = RetrievalConfig(),
) -> Ranks:
    """:func:`blocked_ranks` with the queries split into one contiguous slice per rank; every
    rank returns the ranks of all queries (equal to the single-process result)."""
    n = queries.shape[0]
    lo = n * info.rank // info.world_size
    hi = n * (info.rank + 1) // info.world_size
    local = blocked_ranks(
        queries[lo:hi],  # (n_r, D) this rank's queries
        candidates,
        query_groups[lo:hi],
        cand_groups,
        query_block=cfg.query_block,
        cand_block=cfg.cand_block,
        device=_compute_device(cfg, info),
    )
    stacked = torch.stack([local.index, local.optimistic, local.pessimistic], dim=1)  # (n_r, 3)
    allr = all_gather_rows(stacked, info)  # (n, 3) in rank order = query order
    return Ranks(allr[:, 0].contiguous(), allr[:, 1].contiguous(), allr[:, 2].contiguous())


def retrieval_ranks(
    emb: EmbeddedSet, info: DistInfo, cfg: RetrievalConfig = RetrievalConfig()
) -> dict[str, Ranks]:
    """Exact ranks of both directions for an embedded set."""
    if emb.text_emb is None:
        raise ValueError("the embedded set has no text embeddings")
    image_groups = torch.arange(emb.image_emb.shape[0])  # image row i is group i
    return {
        "text_to_image": distributed_ranks(
            emb.text_emb, emb.image_emb, emb.text_image, image_groups, info, cfg
        ),
        "image_to_text": distributed_ranks(
            emb.image_emb, emb.text_emb, image_groups, emb.text_image, info, cfg
        ),
    }


def evaluate_retrieval(
    emb: EmbeddedSet, info: DistInfo, cfg: RetrievalConfig = RetrievalConfig()
) -> dict[str, dict[str, float | int]]:
    """Recall@K, mean/median rank, tie counts and bounds for both directions."""
    ranks = retrieval_ranks(emb, info, cfg)
    return {d: retrieval_metrics(ranks[d], cfg.ks) for d in DIRECTIONS}


def field_query_direction(query_field: str) -> str:
    """The metrics key of text -> image retrieval queried by a .json field (``name_to_image``)."""
    return f"{query_field}_to_image"


def field_query_texts(emb: EmbeddedSet, query_field: str) -> list[str]:
    """Per image row: the text of ``query_field`` (a dotted path) in its sample's .json.

    Every image must have one (a non-empty string): a query set with holes would report
    figures over fewer queries than images without saying so."""
    texts = []
    metas = emb.image_metas or [None] * len(emb.image_keys)
    for key, meta in zip(emb.image_keys, metas, strict=True):
        value = lookup(meta, query_field)
        if not isinstance(value, str) or not value.strip():
            raise EvalDataError(
                f"sample {key}: its .json has no text field {query_field!r} to query by "
                f"(found {value!r})"
            )
        texts.append(value.strip())
    return texts


def evaluate_field_queries(
    emb: EmbeddedSet,
    model: nn.Module,
    tokenizer: Any,
    query_field: str,
    info: DistInfo,
    cfg: RetrievalConfig = RetrievalConfig(),
    batch_size: int = 256,
    precision: str = "fp32",
) -> dict[str, float | int]:
    """Text -> image figures with one field of each image's .json as its query (the emoji
    demo's ``name``: "cat face" against every image, without the caption's tags).

    One query per image row; its positives are the images whose field has the same text (an
    image with a unique name has one). Same metrics as :func:`evaluate_retrieval`."""
    texts = field_query_texts(emb, query_field)
    n = len(texts)
    # Each rank embeds a contiguous slice of the queries, gathered back in order.
    lo, hi = n * info.rank // info.world_size, n * (info.rank + 1) // info.world_size
    # the model sits on this rank's device (cfg.device only places the similarity blocks)
    local = embed_texts(model, tokenizer, texts[lo:hi], batch_size, info.device, precision)
    if local.numel() == 0:
        local = torch.zeros(0, emb.image_emb.shape[1])
    queries = all_gather_rows(local, info)  # (n, D) unit rows, query i = image row i's field
    first_row: dict[str, int] = {}
    groups = torch.tensor([first_row.setdefault(t, i) for i, t in enumerate(texts)])  # (n,)
    ranks = distributed_ranks(queries, emb.image_emb, groups, groups, info, cfg)
    return retrieval_metrics(ranks, cfg.ks)


def flat_metrics(metrics: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{"t2i_R@1": ..., "i2t_mean_rank": ...}``: the headline figures as one flat dict (for
    training-time logging)."""
    short = {"text_to_image": "t2i", "image_to_text": "i2t"}
    out: dict[str, float] = {}
    for d, m in metrics.items():
        for k, v in m.items():
            if (k.startswith("R@") and not k.endswith(("_optimistic", "_pessimistic"))) or k in (
                "mean_rank",
                "median_rank",
            ):
                out[f"{short.get(d, d)}_{k}"] = float(v)
    return out


# ----------------------------------------------------------------------------- through an index


def index_retrieval(
    emb: EmbeddedSet,
    index_dir: str | Path,
    ks: tuple[int, ...],
    model_hash: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Recall@K with the ANN index of ``index_dir`` instead of exact search.

    The index must hold the evaluated samples (matched by shard file name and key through its
    metadata) and come from the same model (``model_hash`` vs ``index.json``). The text -> image
    direction searches the image index, image -> text the text index (when built). A query's
    rank is the position of its first positive in the index's top ``max(ks)`` results.
    """
    from clipforge.index.store import open_index, read_index_manifest

    manifest = read_index_manifest(index_dir)
    if model_hash and manifest.get("model_hash") and manifest["model_hash"] != model_hash:
        raise EvalDataError(
            f"{index_dir} was built with model {manifest['model_hash']}, the evaluated model is "
            f"{model_hash}: embeddings of different models cannot be compared"
        )
    out: dict[str, dict[str, Any]] = {}
    row_of = {sk: i for i, sk in enumerate(emb.sample_keys)}
    kmax = max(ks)
    for direction, modality in (("text_to_image", "image"), ("image_to_text", "text")):
        if modality not in manifest.get("modalities", {}):
            continue
        opened = open_index(index_dir, modality)
        meta = opened.metadata.select(["shard", "key"]).to_pydict()
        cand_groups = torch.full((len(meta["key"]),), -1, dtype=torch.long)
        missing = 0
        for i, (shard, key) in enumerate(zip(meta["shard"], meta["key"], strict=True)):
            row = row_of.get((Path(shard).name, key))
            if row is None:
                missing += 1
            else:
                cand_groups[i] = emb.sample_image[row]
        if missing == len(meta["key"]):
            raise EvalDataError(
                f"{index_dir}: none of its {len(meta['key'])} items is in the evaluated data "
                f"(matched by shard name and key): was it built from the same shards?"
            )
        if modality == "image":
            queries, query_groups = emb.text_emb, emb.text_image
        else:
            queries, query_groups = emb.image_emb, torch.arange(emb.image_emb.shape[0])
        assert queries is not None
        k = min(kmax, opened.index.ntotal)
        q = np.ascontiguousarray(queries.numpy().astype(np.float32))  # (Nq, D) unit rows
        t0 = time.perf_counter()
        _, ids = opened.index.search(q, k)  # (Nq, k) index ids, -1 = none
        elapsed = time.perf_counter() - t0
        ranks = ranks_from_topk(torch.from_numpy(ids).long(), query_groups, cand_groups)
        figures: dict[str, Any] = {f"R@{kk}": v for kk, v in recall_at_k(ranks, ks).items()}
        figures.update(
            {
                "queries": int(q.shape[0]),
                "index_items": int(opened.index.ntotal),
                "items_not_in_data": missing,
                "factory": opened.info.get("factory", opened.info.get("kind", "?")),
                "search_params": opened.info.get("search_params", {}),
                "qps_batched": q.shape[0] / elapsed if elapsed > 0 else float("inf"),
            }
        )
        out[direction] = figures
    return out
