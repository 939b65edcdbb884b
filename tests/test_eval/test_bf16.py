"""Evaluation at bf16 autocast against fp32 on the CPU, on the session's demo-trained model and the
1,911 demo samples: the embeddings and the Recall@K figures.

Tolerances (measured values in brackets): every image and caption embedding has cosine >= 0.99
with its fp32 counterpart and the mean cosine is >= 0.999 [image min 0.99984 / mean 0.99997,
text min 0.99998 / mean 0.99999]; every R@K of both directions moves by at most 2 points
[largest move 0.16 point, text->image R@5]. ``clipforge-eval retrieval --precision bf16`` reports
the same figures as the Python call. (``clipforge-index embed`` runs bf16 only on CUDA, so its
bf16 path is checked by tests/test_gpu, not here.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipforge.eval.cli import main
from clipforge.eval.data import EvalDataConfig, embed_eval_set
from clipforge.eval.report import read_report
from clipforge.eval.retrieval import DIRECTIONS, RetrievalConfig, evaluate_retrieval
from clipforge.pretrain.distributed import DistInfo
from clipforge.pretrain.models import load_model

KS = (1, 5, 10)


def _row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # (N,)


def test_bf16_eval_matches_fp32(trained_demo_run: Path, demo: Path, tmp_path: Path) -> None:
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    loaded = load_model(trained_demo_run)
    sets, figures = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = EvalDataConfig(batch_size=256, workers=1, precision=precision)
        emb = embed_eval_set(
            loaded.model, loaded.tokenizer, loaded.image_transforms(), str(demo), cfg, info
        )
        sets[precision] = emb
        figures[precision] = evaluate_retrieval(emb, info, RetrievalConfig(ks=KS, device="cpu"))
    fp32, bf16 = sets["fp32"], sets["bf16"]
    assert bf16.image_keys == fp32.image_keys and bf16.captions == fp32.captions
    assert bf16.image_emb.dtype == torch.float32  # normalised and stored in float32 after autocast
    for name in ("image_emb", "text_emb"):
        cos = _row_cosines(getattr(bf16, name), getattr(fp32, name))
        print(f"\n{name}: cosine min {cos.min():.5f} mean {cos.mean():.5f}")
        assert not torch.equal(getattr(bf16, name), getattr(fp32, name))  # bf16 really ran
        assert cos.min() >= 0.99 and cos.mean() >= 0.999
    moves = {
        (d, k): abs(figures["bf16"][d][f"R@{k}"] - figures["fp32"][d][f"R@{k}"])
        for d in DIRECTIONS
        for k in KS
    }
    worst = max(moves, key=moves.get)
    print(f"largest R@K move {moves[worst] * 100:.2f} points at {worst}")
    assert moves[worst] <= 0.02
    assert figures["fp32"]["text_to_image"]["R@10"] > 0.6  # a model that has learned

    # the command line's --precision bf16 is the same computation
    out = tmp_path / "bf16.json"
    argv = ["retrieval", "--model", str(trained_demo_run), "--data", str(demo), "--device", "cpu"]
    assert main([*argv, "--precision", "bf16", "--k", "1,5,10", "--json", str(out)]) == 0
    report = read_report(out)
    for d in DIRECTIONS:
        for k in KS:
            got = report["metrics"]["exact"][d][f"R@{k}"]
            assert abs(got - figures["bf16"][d][f"R@{k}"]) <= 1 / 1911, (d, k)
