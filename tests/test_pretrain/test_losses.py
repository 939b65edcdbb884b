"""Loss functions: hand-computed values, and the distributed oracle (2-process gloo == one
process on the concatenated batch: same loss, same gradient for every parameter)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipforge.pretrain.losses import contrastive_loss, make_loss, siglip_loss
from clipforge.pretrain.step import forward_backward
from tests.test_pretrain.launch import run_two_gloo_workers
from tests.test_pretrain.oracle_data import batch, tiny_model, varied_text_batch


def test_infonce_by_hand() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    s = torch.tensor(2.0)
    # logits_per_image = 2 * img @ txt.T = [[1.2, 0], [1.6, 2]]; per text = its transpose
    ce = lambda row, target: -row[target] + math.log(sum(math.exp(v) for v in row))  # noqa: E731
    li = (ce([1.2, 0.0], 0) + ce([1.6, 2.0], 1)) / 2
    lt = (ce([1.2, 1.6], 0) + ce([0.0, 2.0], 1)) / 2
    assert contrastive_loss(img, txt, s).item() == pytest.approx((li + lt) / 2, rel=1e-6)
    # symmetric in the two modalities
    assert contrastive_loss(txt, img, s).item() == pytest.approx((li + lt) / 2, rel=1e-6)


def test_infonce_perfect_alignment_goes_to_zero() -> None:
    feats = F.normalize(torch.eye(4), dim=-1)
    assert contrastive_loss(feats, feats, torch.tensor(100.0)).item() < 1e-10
    assert contrastive_loss(feats, feats, torch.tensor(1.0)).item() > 0.5


def test_siglip_by_hand() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    s, b = torch.tensor(2.0), torch.tensor(-1.0)
    logits = [[0.2, -1.0], [0.6, 1.0]]  # 2 * img @ txt.T - 1
    labels = [[1, -1], [-1, 1]]
    expected = (
        -sum(
            math.log(1 / (1 + math.exp(-labels[i][j] * logits[i][j])))
            for i in range(2)
            for j in range(2)
        )
        / 2
    )
    assert siglip_loss(img, txt, s, b).item() == pytest.approx(expected, rel=1e-6)


def test_make_loss_errors() -> None:
    with pytest.raises(ValueError, match="'triplet' is not one of infonce, siglip"):
        make_loss("triplet")
    out = {
        "image_features": torch.eye(2),
        "text_features": torch.eye(2),
        "logit_scale": torch.tensor(1.0),
    }
    with pytest.raises(ValueError, match="needs a model with a logit_bias"):
        make_loss("siglip")(out)


def _single_process(
    kind: str, accum: int = 1, varied: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = tiny_model(kind)
    images, texts = varied_text_batch() if varied else batch()
    out = forward_backward(model, images, texts, make_loss(kind), accum_steps=accum)
    return out["loss"], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-9, msg=name)


@pytest.mark.parametrize(
    ("kind", "accum", "wrap"),
    [("infonce", 1, "ddp"), ("siglip", 1, "ddp"), ("infonce", 2, "ddp"), ("infonce", 1, "fsdp")],
)
def test_two_rank_gloo_equals_one_process(kind: str, accum: int, wrap: str, tmp_path: Path) -> None:
    """DDP on the fixed batch; FSDP on a batch whose halves split into different numbers of
    text length groups (rank 0: one, rank 1: two), which must not unbalance FSDP's per-block
    collectives."""
    ranks = run_two_gloo_workers(
        "tests.test_pretrain.oracle_worker", tmp_path, kind, str(tmp_path), str(accum), wrap
    )
    loss, grads = _single_process(kind, varied=wrap == "fsdp")
    # DDP and FSDP average gradients, so every rank holds the same, already averaged, gradient
    _assert_same_grads(ranks[0]["grads"], ranks[1]["grads"])
    _assert_same_grads(ranks[0]["grads"], grads)
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(
        loss.item(), rel=1e-10
    )
