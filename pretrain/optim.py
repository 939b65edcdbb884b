"""The optimizer and the learning-rate schedule a run trains with.

:func:`make_optimizer` builds AdamW over two parameter groups (with and without weight decay);
:func:`resume_schedule` decides the schedule a resumed run follows from the checkpoint's
schedule and the settings that changed; :func:`set_lr` applies a step's rate. The rate curve
itself (segments, warmup, cosine) lives in :mod:`clipforge.pretrain.schedule`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from clipforge.pretrain.config import Config, ConfigError
from clipforge.pretrain.schedule import SCHEDULE_KEYS, Schedule, Segment, extend, lr_at

log = logging.getLogger(__name__)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Whether ``param`` is exempt from weight decay: biases, norm gains, scalars (the logit
    scale and bias) and other vectors. Decay pulls weights toward 0; for a gain or a scale that
    is a pull toward a degenerate model, not a regularizer (the CLIP and open_clip recipe)."""
    return param.ndim < 2 or "logit_" in name or ".ln" in name or "bn" in name or ("bias" in name)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters as [decayed, not decayed] optimizer groups (frozen ones left out,
    so a frozen tower costs no optimizer state)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW as ``config.optim`` says, over :func:`param_groups` of the unwrapped ``model``.

    The fused kernel (one pass over all parameters, ~3x faster on CPU) is used only without
    ``model.fsdp``: FSDP's sharded parameters take the per-tensor-list path.
    """
    oc = config.optim
    fused = oc.fused and not config.model.fsdp
    return torch.optim.AdamW(
        param_groups(model, oc.weight_decay),
        lr=oc.lr,
        betas=(oc.beta1, oc.beta2),
        eps=oc.eps,
        fused=fused or None,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group trains with ``lr`` (the schedule is set per step, not by a torch scheduler, so
    that it is a pure function of the step and resumes exactly)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def legacy_schedule(saved: Mapping[str, Any], config: Config) -> Schedule:
    """The schedule a checkpoint written before schedules were stored followed: the one its own
    saved config (``saved``, a ``Config.to_dict()``) described, falling back to ``config``."""
    optim, steps = saved.get("optim", {}), saved.get("train", {}).get("steps", config.train.steps)
    oc = config.optim
    return [
        Segment(
            start=0,
            end=int(steps),
            peak_lr=float(optim.get("lr", oc.lr)),
            warmup_steps=int(optim.get("warmup_steps", oc.warmup_steps)),
            kind=optim.get("schedule", oc.schedule),
            min_ratio=float(optim.get("min_lr_ratio", oc.min_lr_ratio)),
        )
    ]


def resume_schedule(
    schedule: Schedule,
    step: int,
    changes: Mapping[str, tuple[Any, Any]],
    config: Config,
    checkpoint: str,
) -> Schedule:
    """The schedule a run resumed at ``step`` follows, given the checkpoint's ``schedule`` and the
    settings that ``changes`` (key -> (old, new)).

    Unchanged schedule settings: the checkpoint's schedule, as is. A longer run on a constant
    rate past its warmup: the rate just goes on. Any other change needs the user's rule
    (``train.extend_schedule``): the old curve has no answer for the new steps, and guessing
    one silently would make the resumed run differ from what was asked. Raises
    :class:`ConfigError` (naming ``checkpoint`` and the changes) without a rule.
    """
    schedule_changes = {k: v for k, v in changes.items() if k in SCHEDULE_KEYS}
    if not schedule_changes:
        return schedule
    tc = config.train
    listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in schedule_changes.items())
    current = lr_at(schedule, step)
    last = schedule[-1]
    # a constant rate past its warmup has no decay to restart: it just goes on
    constant_goes_on = (
        set(schedule_changes) == {"train.steps"}
        and last.kind == "constant"
        and step - last.start >= last.warmup_steps
    )
    if constant_goes_on and not tc.extend_schedule:
        log.info("%s: the constant rate %.3g goes on to the new end", listed, current)
        return [*schedule[:-1], dataclasses.replace(last, end=tc.steps)]
    if not tc.extend_schedule:
        raise ConfigError(
            f"resuming {checkpoint} at step {step} with {listed} changes the learning-rate "
            f"schedule (the next step's rate is {current:.3g}): say how it continues, "
            "--set train.extend_schedule=rewarm (warm up from it to optim.lr over "
            "optim.warmup_steps steps, then decay to the new end) or "
            "--set train.extend_schedule=continue_lr (decay from it to the new end)"
        )
    extended = extend(schedule, step, config, tc.extend_schedule)
    log.info(
        "schedule changed at step %d (%s) by train.extend_schedule=%s: %s",
        step,
        listed,
        tc.extend_schedule,
        extended[-1].describe(),
    )
    return extended


__all__ = [
    "legacy_schedule",
    "make_optimizer",
    "no_weight_decay",
    "param_groups",
    "resume_schedule",
    "set_lr",
]
