"""Gradient accumulation keeps the whole batch as negatives: k micro-batches == one batch."""

from __future__ import annotations

import pytest
import torch

from clipforge.pretrain.losses import make_loss
from clipforge.pretrain.step import forward_backward
from tests.test_pretrain.oracle_data import batch, tiny_model
from tests.test_pretrain.test_losses import _assert_same_grads, _single_process


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("accum", [2, 4])
def test_accumulated_micro_batches_equal_one_batch(kind: str, accum: int) -> None:
    loss_1, grads_1 = _single_process(kind, accum=1)
    loss_k, grads_k = _single_process(kind, accum=accum)
    assert loss_k.item() == pytest.approx(loss_1.item(), rel=1e-12)
    _assert_same_grads(grads_k, grads_1)


def test_indivisible_batch_is_refused() -> None:
    images, texts = batch()
    with pytest.raises(ValueError, match="batch of 8 cannot be split into 3"):
        forward_backward(tiny_model("infonce"), images, texts, make_loss("infonce"), accum_steps=3)


def test_nan_input_gives_a_nonfinite_loss_not_an_exception() -> None:
    images, texts = batch()
    images[0] = float("nan")
    out = forward_backward(tiny_model("infonce"), images, texts, make_loss("infonce"))
    assert not torch.isfinite(out["loss"])
