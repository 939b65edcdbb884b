"""Run by test_losses.py in 2 gloo processes: DDP (or FSDP) forward/backward on this rank's half
batch."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(
    rank: int, world: int, port: int, kind: str, out_dir: str, accum: int, wrap: str = "ddp"
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from clipforge.pretrain.losses import make_loss
    from clipforge.pretrain.step import forward_backward
    from tests.test_pretrain.oracle_data import batch, tiny_model, varied_text_batch

    if wrap == "fsdp":  # through clipforge's own wrapping, on the batch of varied lengths
        from clipforge.pretrain.config import ModelConfig
        from clipforge.pretrain.distributed import DistInfo
        from clipforge.pretrain.parallelize import parallelize

        info = DistInfo(rank, world, rank, torch.device("cpu"), "gloo")
        model = parallelize(tiny_model(kind), ModelConfig(fsdp=True), info)
        images, texts = varied_text_batch()
        no_sync, inner = None, model
    else:
        model = DistributedDataParallel(tiny_model(kind))
        images, texts = batch()
        no_sync, inner = model.no_sync, model.module
    local = images.shape[0] // world
    rows = slice(rank * local, (rank + 1) * local)
    out = forward_backward(
        model, images[rows], texts[rows], make_loss(kind), accum_steps=accum, no_sync=no_sync
    )
    grads = {
        n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        for n, p in inner.named_parameters()
        if p.grad is not None
    }
    torch.save({"loss": out["loss"], "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    r, w, port, kind, out, accum = sys.argv[1:7]
    main(int(r), int(w), int(port), kind, out, int(accum), *sys.argv[7:8])
