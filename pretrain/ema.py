"""Weight averaging: an exponential moving average (EMA) of a model's trainable parameters.

:class:`ModelEma` keeps a float32 shadow copy of each trainable parameter (``requires_grad``;
frozen parameters and buffers never change in training, so they are taken from the model as they
are) and moves it towards the live weights after each optimizer step the trainer takes:
``ema <- d * ema + (1 - d) * weights``, with ``d`` from :func:`ema_decay_at`.

Under FSDP2 a parameter is a DTensor holding this rank's shard: its shadow is a DTensor of the
same mesh and placements, and every update touches the local shards only (no collective); only
:meth:`ModelEma.full_state_dict` gathers. A sharded checkpoint saves :meth:`ModelEma.state_dict`
as it is (each rank its shards) and loads into it in place.

This is training code, not model code: like parallelize it names DTensor, and FSDPModule to
reshard after an evaluation's swap; the model never imports torch.distributed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn


def ema_decay_at(decay: float, updates: int, warmup: bool) -> float:
    """The decay of the EMA update that follows ``updates`` earlier ones: ``decay``, or with
    ``warmup`` ``min(decay, (1 + updates) / (10 + updates))`` (TensorFlow's num_updates rule:
    0.1 for the first update, 0.5 by the 9th, so the random initial weights fade fast)."""
    if warmup:
        return min(decay, (1 + updates) / (10 + updates))
    return decay


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (same storage: writing it writes the DTensor), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _reshard(model: nn.Module) -> None:
    """Free FSDP2's unsharded parameters (FSDP2 keeps the root's after a forward, expecting a
    backward), so that the next forward all-gathers the weights now in the shards, not the EMA
    weights it gathered inside :meth:`ModelEma.swapped_in`. Nothing to do without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 at least: a bf16 shadow would round away most of each (1 - d) * step
    return torch.promote_types(dtype, torch.float32)


class ModelEma:
    """The EMA of ``model``'s trainable parameters (``model`` unwrapped: names as in its state
    dict; FSDP2's in-place sharding is fine). ``decay`` in (0, 1); see :func:`ema_decay_at`."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay, self.warmup = decay, warmup
        self._model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._params = [p for _, p in named]
        with torch.no_grad():
            self._shadow = {n: p.detach().to(_shadow_dtype(p.dtype), copy=True) for n, p in named}
        self.updates = 0
        """EMA updates made so far (the warm-up's n); checkpointed with the shadow."""

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the current weights (after an optimizer step that was taken)."""
        d = ema_decay_at(self.decay, self.updates, self.warmup)
        shadow = [_local(s) for s in self._shadow.values()]
        weights = [_local(p) for p in self._params]
        # lerp_(w, 1 - d) is ema + (1 - d) * (w - ema) = d * ema + (1 - d) * w, fused
        pairs = zip(weights, shadow, strict=True)
        weights = [w if w.dtype == s.dtype else w.to(s.dtype) for w, s in pairs]
        torch._foreach_lerp_(shadow, weights, 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def reset_to_model(self) -> None:
        """Start over from the model's current weights (a resume from a checkpoint without an
        EMA): the shadow becomes a copy of them, the warm-up starts again."""
        shadow = [_local(s) for s in self._shadow.values()]
        torch._foreach_copy_(shadow, [_local(p) for p in self._params])
        self.updates = 0

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model's trainable parameters hold the EMA weights inside the block (to evaluate
        them with the model as wrapped, FSDP included); the raw weights, copied aside, are put
        back bit for bit on the way out. Costs one copy of the parameters while inside."""
        with torch.no_grad():
            live = [_local(p) for p in self._params]
            raw = [t.clone() for t in live]
            torch._foreach_copy_(live, [_local(s) for s in self._shadow.values()])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, raw)
            _reshard(self._model)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow by parameter name, as held (DTensor shards under FSDP2): what a sharded
        checkpoint saves, and loads into in place."""
        return self._shadow

    def full_state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The whole shadow on the CPU by parameter name (a collective under FSDP2: every rank
        calls, in the same order as the other collectives of a save). ``keep=False`` (ranks
        that do not write): take part in the gathers, keep nothing (an empty dict), so only
        one tensor at a time is whole on such a rank."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, s in self._shadow.items():
            full = s.full_tensor() if isinstance(s, DTensor) else s
            if keep:
                out[name] = full.detach().to("cpu", copy=True)
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: Mapping[str, torch.Tensor], where: str) -> None:
        """Load what :meth:`full_state_dict` returned (on every rank; each keeps its shard).
        ``where`` names the source in errors (e.g. the checkpoint's path)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        missing = sorted(set(self._shadow) - set(state))
        extra = sorted(set(state) - set(self._shadow))
        if missing or extra:
            raise ValueError(
                f"{where}: its EMA does not match the model's trainable parameters "
                f"(missing {missing[:5]}, unexpected {extra[:5]})"
            )
        for name, s in self._shadow.items():
            full = state[name]
            if tuple(full.shape) != tuple(s.shape):
                raise ValueError(
                    f"{where}: EMA of {name} has shape {tuple(full.shape)}, the parameter "
                    f"{tuple(s.shape)}"
                )
            full = full.to(device=_local(s).device, dtype=s.dtype)
            if isinstance(s, DTensor):
                # src_data_rank=None: every rank holds the whole tensor, each keeps its chunk
                full = distribute_tensor(full, s.device_mesh, s.placements, src_data_rank=None)
            _local(s).copy_(_local(full))


def with_ema_weights(
    model_state: Mapping[str, torch.Tensor], ema_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A whole model state dict with each trainable parameter's entry replaced by its EMA (in
    the entry's dtype); frozen parameters and buffers as they are. What ``model/`` exports."""
    unknown = sorted(set(ema_state) - set(model_state))
    if unknown:
        raise ValueError(f"EMA entries that the model state dict lacks: {unknown[:5]}")
    out = dict(model_state)
    for name, value in ema_state.items():
        out[name] = value.to(dtype=model_state[name].dtype, device=model_state[name].device)
    return out


__all__ = ["ModelEma", "ema_decay_at", "with_ema_weights"]
