"""Run under ``torchrun --nproc-per-node 2``: the distributed paths of eval, results saved by
rank 0 for tests/test_eval/test_distributed.py to compare with one process.

    dist_worker.py OUT.pt MODEL_DIR SHARDS
"""

from __future__ import annotations

import sys

import torch

from clipforge.eval.data import EvalDataConfig, embed_eval_set
from clipforge.eval.retrieval import RetrievalConfig, distributed_ranks, evaluate_retrieval
from clipforge.eval.tasks import setup
from clipforge.pretrain.distributed import shutdown
from clipforge.pretrain.models import load_model


def random_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded queries/candidates with duplicated candidates (exact ties), 2 positives each."""
    g = torch.Generator().manual_seed(7)
    c = torch.nn.functional.normalize(torch.randn(301, 12, generator=g), dim=1)
    c[200] = c[5]
    q = torch.nn.functional.normalize(torch.randn(257, 12, generator=g), dim=1)
    qg = torch.randint(0, 150, (257,), generator=g)
    cg = torch.arange(301) // 2  # candidates 2j and 2j+1 form group j
    return q, c, qg, cg


def main() -> None:
    out, model_dir, shards = sys.argv[1:4]
    info = setup("cpu")
    q, c, qg, cg = random_case()
    cfg = RetrievalConfig(query_block=16, cand_block=50, device="cpu")
    ranks = distributed_ranks(q, c, qg, cg, info, cfg)
    loaded = load_model(model_dir)
    emb = embed_eval_set(
        loaded.model,
        loaded.tokenizer,
        loaded.image_transforms(),
        shards,
        EvalDataConfig(batch_size=64, workers=0),
        info,
    )
    metrics = evaluate_retrieval(emb, info, RetrievalConfig(device="cpu"))
    if info.is_main:
        torch.save(
            {
                "ranks": (ranks.index, ranks.optimistic, ranks.pessimistic),
                "image_emb": emb.image_emb,
                "text_emb": emb.text_emb,
                "image_keys": emb.image_keys,
                "metrics": metrics,
                "world_size": info.world_size,
            },
            out,
        )
    shutdown(info)


if __name__ == "__main__":
    main()
