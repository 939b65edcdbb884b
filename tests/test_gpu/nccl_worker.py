"""Run by test_cuda.py under torchrun with NCCL: clipforge's DDP and FSDP2 (bf16 policy) wrapping,
the gathered loss and the collective helpers on CUDA ranks; each rank saves what it computed."""

from __future__ import annotations

import os
import sys

import torch


def main(out_dir: str) -> None:
    from clipforge.pretrain.config import ModelConfig
    from clipforge.pretrain.distributed import all_reduce_max, all_reduce_mean, init_distributed
    from clipforge.pretrain.losses import make_loss
    from clipforge.pretrain.parallelize import clip_grad_norm, full_state_dicts, parallelize
    from clipforge.pretrain.step import forward_backward
    from tests.test_pretrain.oracle_data import batch, tiny_model

    info = init_distributed("cuda")
    if info.world_size == 1:  # clipforge runs one process without a group: make an NCCL one
        import torch.distributed as dist

        from clipforge.pretrain.distributed import DistInfo

        dist.init_process_group("nccl", rank=0, world_size=1, device_id=info.device)
        info = DistInfo(0, 1, 0, info.device, "nccl")
    assert info.backend == "nccl" and info.device.type == "cuda", info
    images, texts = batch()
    rows = slice(info.rank * 8 // info.world_size, (info.rank + 1) * 8 // info.world_size)
    images, texts = images[rows].float().to(info.device), texts[rows].to(info.device)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    results = {
        "world": info.world_size,
        "max": all_reduce_max(float(info.rank), info),
        "mean": all_reduce_mean(float(info.rank), info),
    }
    for wrap in ("ddp", "fsdp"):
        cfg = ModelConfig(fsdp=wrap == "fsdp")
        plain = tiny_model("infonce").float()
        param_dtype = torch.bfloat16 if wrap == "fsdp" else None  # FSDP2's bf16 policy
        model = parallelize(plain, cfg, info, param_dtype=param_dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = forward_backward(model, images, texts, make_loss("infonce"), autocast=autocast)
        norm = clip_grad_norm(model, 1.0)
        inner = getattr(model, "module", model)
        grads = {}
        for n, p in inner.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[n] = g.float().cpu()
        optimizer.step()
        model_sd, _ = full_state_dicts(model, optimizer)  # whole weights, on the CPU
        results[wrap] = {
            "loss": float(out["loss"]),
            "grad_norm": norm,
            "grads": grads,
            "weights_on_cpu": all(v.device.type == "cpu" for v in model_sd.values()),
        }
    torch.save(results, os.path.join(out_dir, f"rank{info.rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
