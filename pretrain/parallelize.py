"""The one place where a model is wrapped for distributed execution or compiled.

Model code never imports torch.distributed; the trainer calls :func:`parallelize` once.
"""

from __future__ import annotations

import torch
from torch import nn

from clipforge.pretrain.config import ModelConfig
from clipforge.pretrain.distributed import DistInfo


def parallelize(model: nn.Module, cfg: ModelConfig, info: DistInfo) -> nn.Module:
    """Move to the device, then FSDP2 or DDP when distributed, then ``torch.compile`` if asked.

    FSDP shards each transformer block of both towers, then the root, so only one block's full
    parameters are materialised at a time.
    """
    model = model.to(info.device)
    if info.distributed and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if type(module).__name__ == "ResidualAttentionBlock":
                fully_shard(module)
        fully_shard(model)
    elif info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        # Locked towers have requires_grad=False parameters, which DDP ignores by itself.
        model = DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain open_clip model inside DDP / torch.compile wrappers."""
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "module", inner)
