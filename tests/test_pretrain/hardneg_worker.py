"""Run by test_hard_negatives.py in 2 gloo processes: DDP forward/backward of this rank's half
batch with its half of the hard negatives (the oracle is one process on the whole batch)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(rank: int, world: int, port: int, kind: str, out_dir: str, accum: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from clipforge.pretrain.losses import make_loss
    from clipforge.pretrain.step import forward_backward
    from tests.test_pretrain.oracle_data import batch, tiny_model
    from tests.test_pretrain.test_hard_negatives import negatives_for

    model = DistributedDataParallel(tiny_model(kind))
    images, texts = batch()
    negatives, mask = negatives_for(texts)
    local = images.shape[0] // world
    rows = slice(rank * local, (rank + 1) * local)
    out = forward_backward(
        model,
        images[rows],
        texts[rows],
        make_loss(kind),
        accum_steps=accum,
        no_sync=model.no_sync,
        negatives=negatives[rows],
        negative_mask=mask[rows],
    )
    grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
    torch.save({"loss": out["loss"], "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    r, w, port, kind, out, accum = sys.argv[1:7]
    main(int(r), int(w), int(port), kind, out, int(accum))
