"""Distributed == single process, on 2 gloo processes launched by torchrun: the query-split rank
computation is exact, and the data split + gather puts every sample back in canonical order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from clipforge.eval.data import EvalDataConfig, embed_eval_set
from clipforge.eval.metrics import blocked_ranks
from clipforge.eval.retrieval import RetrievalConfig, evaluate_retrieval
from clipforge.pretrain.config import ModelConfig
from clipforge.pretrain.distributed import DistInfo
from clipforge.pretrain.models import build_model, export_open_clip, load_model
from tests.ports import free_port

from .dist_worker import random_case

WORKER = Path(__file__).with_name("dist_worker.py")


def test_two_ranks_equal_one_process(demo: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, cfg = build_model(ModelConfig(name="clipforge-tiny"))
    model_dir = export_open_clip(model, cfg, tmp_path / "model")
    shards = str(demo / "emoji-{000000..000001}.tar")  # 2 shards: one per rank
    out = tmp_path / "dist.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), str(WORKER), str(out), str(model_dir), shards,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    assert got["world_size"] == 2

    # 1. Ranks split by query slices across ranks == one process, bit for bit.
    q, c, qg, cg = random_case()
    single = blocked_ranks(q, c, qg, cg, query_block=16, cand_block=50)
    expected = (single.index, single.optimistic, single.pessimistic)
    for a, b in zip(got["ranks"], expected, strict=True):
        assert torch.equal(a, b)
    assert single.tied_queries > 0  # the duplicated candidate makes ties

    # 2. Each rank embedded one shard; gathered, the set is in the one-process order.
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    loaded = load_model(model_dir)
    emb = embed_eval_set(
        loaded.model, loaded.tokenizer, loaded.image_transforms(), shards,
        EvalDataConfig(batch_size=64, workers=0), info,
    )  # fmt: skip
    assert got["image_keys"] == emb.image_keys and len(emb.image_keys) > 400
    # Batches hold other samples on each rank, so embeddings match to float rounding only.
    assert torch.allclose(got["image_emb"], emb.image_emb, atol=1e-5)
    assert torch.allclose(got["text_emb"], emb.text_emb, atol=1e-5)
    single_m = evaluate_retrieval(emb, info, RetrievalConfig(device="cpu"))
    n = len(emb.image_keys)
    for d, m in single_m.items():
        for k in ("R@1", "R@5", "R@10"):
            assert abs(got["metrics"][d][k] - m[k]) <= 1 / n + 1e-12, (d, k)
