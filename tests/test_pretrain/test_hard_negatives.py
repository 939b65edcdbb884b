"""Hard negatives in the loss and the step: hand-computed values, "all masked" equals the plain
loss exactly, accumulation equals one batch, and 2-process gloo equals one process on the
concatenated batch (loss and every parameter's gradient)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipforge.pretrain.config import ConfigError, load_config
from clipforge.pretrain.hard_negatives import load_hard_negatives
from clipforge.pretrain.losses import contrastive_loss, make_loss, siglip_loss
from clipforge.pretrain.step import forward_backward
from tests.test_pretrain.launch import run_two_gloo_workers
from tests.test_pretrain.oracle_data import batch, tiny_model

IMG = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TXT = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
# sample 0: one real negative and a masked slot (whose value must not matter); sample 1: two
NEG = torch.tensor([[[0.8, 0.6], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]]])  # (B=2, k=2, D=2)
MASK = torch.tensor([[True, False], [True, True]])


def _ce(row: list[float], target: int) -> float:
    return -row[target] + math.log(sum(math.exp(v) for v in row))


def test_infonce_with_negatives_by_hand() -> None:
    s = torch.tensor(2.0)
    # image rows: [2 <i, t_0>, 2 <i, t_1>] then the image's OWN real negatives:
    # image 0 -> n00 = 1.6 (n01 is masked), image 1 -> n10 = 0.0, n11 = 1.6
    li = (_ce([1.2, 0.0, 1.6], 0) + _ce([1.6, 2.0, 0.0, 1.6], 1)) / 2
    lt = (_ce([1.2, 1.6], 0) + _ce([0.0, 2.0], 1)) / 2  # text->image: unchanged
    loss = contrastive_loss(IMG, TXT, s, negative_features=NEG, negative_mask=MASK)
    assert loss.item() == pytest.approx((li + lt) / 2, rel=1e-6)
    # the masked slot's value is irrelevant
    other = NEG.clone()
    other[0, 1] = torch.tensor([1.0, 0.0])
    again = contrastive_loss(IMG, TXT, s, negative_features=other, negative_mask=MASK)
    assert torch.equal(loss, again)
    # and a hard negative makes the loss larger than without it
    assert loss.item() > contrastive_loss(IMG, TXT, s).item()


def test_siglip_with_negatives_by_hand() -> None:
    s, b = torch.tensor(2.0), torch.tensor(-1.0)
    logits = [[0.2, -1.0], [0.6, 1.0]]  # 2 * img @ txt.T - 1
    labels = [[1, -1], [-1, 1]]
    base = -sum(
        math.log(1 / (1 + math.exp(-labels[i][j] * logits[i][j])))
        for i in range(2)
        for j in range(2)
    )
    # each image's own real negatives, labelled -1: 2 <i, n> - 1 (n00; n10, n11)
    extra = [[0.6], [-1.0, 0.6]]
    pairs = -sum(math.log(1 / (1 + math.exp(z))) for row in extra for z in row)
    loss = siglip_loss(IMG, TXT, s, b, negative_features=NEG, negative_mask=MASK)
    assert loss.item() == pytest.approx((base + pairs) / 2, rel=1e-6)


def test_another_samples_negative_is_never_scored_against_this_image() -> None:
    """Sample 1's mined negative may be sample 0's own caption: it must not become a negative
    column of image 0 (it would be a false negative, as high as the positive)."""
    s = torch.tensor(2.0)
    neg = torch.stack([torch.tensor([[0.0, 1.0]]), TXT[:1]])  # (2, 1, 2): n10 == t_0
    mask = torch.ones(2, 1, dtype=torch.bool)
    loss = contrastive_loss(IMG, TXT, s, negative_features=neg, negative_mask=mask)
    # image 0: [t_0, t_1, n00] only; image 1: [t_0, t_1, n10 (= t_0)]
    li = (_ce([1.2, 0.0, 0.0], 0) + _ce([1.6, 2.0, 1.6], 1)) / 2
    lt = (_ce([1.2, 1.6], 0) + _ce([0.0, 2.0], 1)) / 2
    assert loss.item() == pytest.approx((li + lt) / 2, rel=1e-6)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_all_masked_is_exactly_the_plain_loss_with_the_same_gradients(kind: str) -> None:
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1).requires_grad_()
    neg = F.normalize(torch.randn(4, 3, 8, dtype=torch.float64), dim=-1).requires_grad_()
    mask = torch.zeros(4, 3, dtype=torch.bool)
    s, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    loss_fn = make_loss(kind)
    out = {"image_features": img, "text_features": txt, "logit_scale": s, "logit_bias": b}
    plain = loss_fn(out)
    with_neg = loss_fn({**out, "negative_features": neg, "negative_mask": mask})
    assert torch.equal(plain, with_neg)
    g_plain = torch.autograd.grad(plain, (img, txt))
    g_neg = torch.autograd.grad(with_neg, (img, txt, neg))
    assert all(torch.equal(a, c) for a, c in zip(g_plain, g_neg[:2], strict=False))
    assert torch.count_nonzero(g_neg[2]) == 0  # masked negatives get no gradient


def negatives_for(texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (B, 2, L) negative captions for the oracle batch and a mask with gaps: slot 1 is
    masked for every third sample, sample 5 has none (shared with hardneg_worker.py)."""
    g = torch.Generator().manual_seed(3)
    rows, length = texts.shape
    negatives = torch.randint(1, 49000, (rows, 2, length), generator=g)
    mask = torch.ones(rows, 2, dtype=torch.bool)
    mask[::3, 1] = False
    mask[5] = False
    return negatives, mask


def _single_process(kind: str, accum: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = tiny_model(kind)
    images, texts = batch()
    negatives, mask = negatives_for(texts)
    out = forward_backward(
        model,
        images,
        texts,
        make_loss(kind),
        accum_steps=accum,
        negatives=negatives,
        negative_mask=mask,
    )
    return out["loss"], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-9, msg=name)


def test_step_with_negatives_accumulates_exactly_and_changes_the_loss() -> None:
    loss1, grads1 = _single_process("infonce", 1)
    loss2, grads2 = _single_process("infonce", 2)
    assert loss2.item() == pytest.approx(loss1.item(), rel=1e-10)
    _assert_same_grads(grads1, grads2)
    # the negatives are really in the loss: without them it is another (smaller) value
    model = tiny_model("infonce")
    images, texts = batch()
    plain = forward_backward(model, images, texts, make_loss("infonce"))["loss"]
    assert plain.item() < loss1.item()
    # and the text tower gets gradient from them: compare with the plain step's
    plain_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert not torch.allclose(
        plain_grads["token_embedding.weight"], grads1["token_embedding.weight"]
    )


def test_step_refuses_mismatched_negatives() -> None:
    model = tiny_model("infonce")
    images, texts = batch()
    negatives, mask = negatives_for(texts)
    with pytest.raises(ValueError, match=r"\(B, k\) mask for the batch of 8"):
        forward_backward(
            model, images, texts, make_loss("infonce"), negatives=negatives, negative_mask=mask[:4]
        )


@pytest.mark.parametrize(("kind", "accum"), [("infonce", 2), ("siglip", 1)])
def test_two_rank_gloo_with_negatives_equals_one_process(
    kind: str, accum: int, tmp_path: Path
) -> None:
    ranks = run_two_gloo_workers(
        "tests.test_pretrain.hardneg_worker", tmp_path, kind, str(tmp_path), str(accum)
    )
    loss, grads = _single_process(kind, 1)
    _assert_same_grads(ranks[0]["grads"], ranks[1]["grads"])
    _assert_same_grads(ranks[0]["grads"], grads)
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(
        loss.item(), rel=1e-10
    )


def test_config_validates_and_a_bad_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.hard_negatives_per_sample must be >= 1"):
        load_config("tiny", ["data.hard_negatives_per_sample=0"])
    bad = tmp_path / "negs.jsonl"
    header = '{"format": "clipforge-hard-negatives/1", "emb_dir": "e", "model": "m", '
    header += '"model_hash": "h", "k": 2, "count": 1}\n'
    bad.write_text(header + '{"key": "a", "negatives": "x"}\n')
    config = load_config("tiny", [f"data.hard_negatives={bad}"])
    with pytest.raises(
        ConfigError, match=re.escape(f"data.hard_negatives: {bad}:2: field 'negatives'")
    ):
        load_hard_negatives(config.data)
    missing = load_config("tiny", [f"data.hard_negatives={tmp_path / 'none.jsonl'}"])
    with pytest.raises(ConfigError, match=r"none.jsonl not found"):
        load_hard_negatives(missing.data)
    folder = load_config("tiny", [f"data.hard_negatives={tmp_path}"])
    with pytest.raises(ConfigError, match=r"is a folder, not a file"):
        load_hard_negatives(folder.data)
    good = tmp_path / "good.jsonl"
    good.write_text(header + '{"key": "a", "negatives": ["x", "y"]}\n')
    assert load_hard_negatives(load_config("tiny", [f"data.hard_negatives={good}"]).data)
    more = load_config("tiny", [f"data.hard_negatives={good}", "data.hard_negatives_per_sample=3"])
    with pytest.raises(ConfigError, match=r"3 negatives per sample asked, but .* k=2"):
        load_hard_negatives(more.data)
