"""A fixed tiny model and batch shared by the single-process and the distributed oracle runs."""

from __future__ import annotations

import torch
from torch import nn

from clipforge.pretrain.config import ModelConfig
from clipforge.pretrain.models import build_model

GLOBAL_BATCH = 8


def tiny_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model, _ = build_model(
        ModelConfig(name="clipforge-tiny"), siglip=kind == "siglip", init_logit_bias=-10.0
    )
    return model.double()  # float64: compare gradients tightly, not float32 round-off


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
    texts = torch.randint(1, 49000, (GLOBAL_BATCH, 32), generator=g)
    return images, texts


def varied_text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """128 image-text pairs whose captions need different lengths: rows 0-63 (rank 0's half
    on 2 ranks) are all short, one length group; rows 64-127 mix short and long, two groups."""
    g = torch.Generator().manual_seed(2)
    images = torch.randn(128, 3, 32, 32, generator=g, dtype=torch.float64)
    needed = [3 + i % 4 for i in range(64)] + [3 + i % 4 for i in range(32)] + [30] * 32
    texts = torch.zeros(128, 32, dtype=torch.long)
    for row, n in enumerate(needed):
        texts[row, : n - 1] = torch.randint(1, 49000, (n - 1,), generator=g)
        texts[row, n - 1] = 49407  # EOT: the pooled position, n - 1
    return images, texts
