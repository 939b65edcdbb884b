"""The fused AdamW path makes the same updates as the reference per-tensor AdamW."""

from __future__ import annotations

from dataclasses import replace

import torch

from clipforge.pretrain.config import load_config
from clipforge.pretrain.losses import make_loss
from clipforge.pretrain.optim import make_optimizer
from clipforge.pretrain.step import forward_backward
from tests.test_pretrain.oracle_data import batch, tiny_model


def _train_3_steps(fused: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    cfg = load_config("tiny", ["optim.lr=1e-3", "optim.weight_decay=0.2"])
    cfg = replace(cfg, optim=replace(cfg.optim, fused=fused))
    # float64: the key bias's gradient is zero up to round-off, which Adam scales up to ~lr in
    # float32, differently per implementation
    model = tiny_model("infonce")
    optimizer = make_optimizer(model, cfg)
    images, texts = batch()
    for _ in range(3):
        forward_backward(model, images, texts, make_loss("infonce"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def test_fused_adamw_matches_reference() -> None:
    fused_model, fused_opt = _train_3_steps(fused=True)
    ref_model, ref_opt = _train_3_steps(fused=False)
    initial = tiny_model("infonce").state_dict()
    assert fused_opt.defaults["fused"] is True and not ref_opt.defaults["fused"]
    moved = 0
    for (name, p), (_, q) in zip(
        fused_model.named_parameters(), ref_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
        moved += int(not torch.equal(p, initial[name]))
    assert moved > 10  # the steps did update the weights
