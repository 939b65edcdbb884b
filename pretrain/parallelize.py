"""The one place where a model is wrapped for distributed execution or compiled, and where the
wrapping's consequences are handled: whole state dicts of sharded models, and the global
gradient norm over sharded gradients.

Model code never imports torch.distributed; the trainer calls :func:`parallelize` once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from clipforge.pretrain.config import ModelConfig
from clipforge.pretrain.distributed import DistInfo
from clipforge.pretrain.pooled_forward import set_max_length_groups


def parallelize(
    model: nn.Module,
    cfg: ModelConfig,
    info: DistInfo,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Move to the device, then FSDP2 or DDP when distributed, then ``torch.compile`` if asked.

    FSDP shards each transformer block of both towers, then the root, so only one block's full
    parameters are materialised at a time. FSDP2 cannot shard 0-d parameters (the logit
    scale/bias): they stay replicated, and their gradients are averaged over ranks by a hook.

    ``param_dtype`` (FSDP only; e.g. ``torch.bfloat16`` for ``train.precision=bf16``): FSDP2's
    ``MixedPrecisionPolicy`` all-gathers the parameters in that dtype (half the all-gather bytes
    of float32) and reduce-scatters gradients in float32; the sharded float32 parameters stay
    the optimizer's master copy. Autocast still decides which ops run in low precision. DDP
    ignores it (its all-reduce is of float32 gradients).
    """
    model = model.to(info.device)
    if info.distributed and cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        set_max_length_groups(model, 1)  # every rank calls each block once: matched collectives

        # reduce_dtype only with a low param_dtype: float64 test models must reduce in float64
        reduce_dtype = torch.float32 if param_dtype is not None else None
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        scalars = [p for p in model.parameters() if p.ndim == 0]
        for module in model.modules():
            if isinstance(module, ResidualAttentionBlock):
                fully_shard(module, mp_policy=policy)
        fully_shard(model, ignored_params=set(scalars), mp_policy=policy)
        for p in scalars:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(_average_grad_over_ranks)
    elif info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        # Locked towers have requires_grad=False parameters, which DDP ignores by itself.
        model = DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        # torch.compile returns the same module behind an OptimizedModule (typed as a callable).
        model = cast(nn.Module, torch.compile(model))
    return model


def _average_grad_over_ranks(param: torch.Tensor) -> None:
    import torch.distributed as dist

    assert param.grad is not None
    dist.all_reduce(param.grad)  # SUM: gloo has no AVG
    param.grad.div_(dist.get_world_size())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain open_clip model inside DDP / torch.compile wrappers (FSDP2 shards in place)."""
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "module", inner)


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Whole (unsharded) model and optimizer state on the CPU, keyed by parameter name, so a
    checkpoint does not depend on how the run was wrapped. A collective under FSDP: call it on
    every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    plain = unwrap(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=_is_sharded(plain))
    model_sd, optim_sd = get_state_dict(plain, optimizer, options=options)
    return _on_cpu(model_sd), optim_sd


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole model weights on the CPU (a collective under FSDP: call it on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    plain = unwrap(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=_is_sharded(plain))
    return _on_cpu(get_model_state_dict(plain, options=options))


def _on_cpu(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    # A model state dict holds only tensors; torch types its values as any checkpointable value.
    return {k: cast(torch.Tensor, v).detach().to("cpu") for k, v in state.items()}


def load_full_state_dicts(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_sd: dict[str, Any],
    optim_sd: dict[str, Any],
) -> None:
    """Load what :func:`full_state_dicts` returned, resharding under FSDP (every rank calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        unwrap(model),
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=True),
    )


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (inf: measure only); returns the norm.

    Sharded (DTensor) gradients and replicated ones are normed separately and combined, since
    torch's own clipping cannot mix the two.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    squares = torch.zeros((), dtype=torch.float64)
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded)
        squares += cast(DTensor, norm).full_tensor().double().cpu() ** 2
    if plain:
        squares += torch.nn.utils.get_total_norm(plain).double().cpu() ** 2
    total = float(squares.sqrt())
    coef = max_norm / (total + 1e-6)  # as torch.nn.utils.clip_grad_norm_
    if coef < 1.0:
        for grad in grads:
            grad.mul_(coef)
    return total
