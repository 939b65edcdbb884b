"""The learning-rate schedule as a list of segments, stored in every checkpoint.

A run starts with one segment: linear warmup from 0 to ``optim.lr`` over ``optim.warmup_steps``,
then cosine (or constant) to ``train.steps``. A resume that changes ``train.steps`` or the
schedule settings appends a segment from the resume step to the new end, by the rule the user
names in ``train.extend_schedule``:

- ``rewarm``: linear warmup from the current rate to ``optim.lr`` over ``optim.warmup_steps``
  (at most the segment's length), then cosine (``optim.schedule``) down to
  ``optim.min_lr_ratio x optim.lr`` at the new end;
- ``continue_lr``: cosine from the current rate down to ``optim.min_lr_ratio x optim.lr`` (never
  above the current rate) at the new end; no warmup.

"The current rate" is the rate the old schedule gives the next step, so the first steps after the
change continue from it without a jump. Because the segments travel with the checkpoints, a later
resume inside the extension follows the same rates as an uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from clipforge.pretrain.config import Config

EXTEND_RULES = ("rewarm", "continue_lr")

# Settings whose change on resume changes the schedule: they need a train.extend_schedule rule.
SCHEDULE_KEYS = (
    "train.steps",
    "optim.lr",
    "optim.warmup_steps",
    "optim.schedule",
    "optim.min_lr_ratio",
)


@dataclass(frozen=True)
class Segment:
    """Rates for steps ``start`` .. ``end - 1`` (0-based: the rate step ``k + 1`` trains with)."""

    start: int
    end: int
    peak_lr: float
    """The rate after warmup (the cosine's top)."""
    warmup_steps: int
    start_lr: float = 0.0
    """Where the linear warmup starts."""
    kind: Literal["cosine", "constant"] = "cosine"
    min_ratio: float = 0.0
    """The cosine's floor as a fraction of ``peak_lr``."""

    def lr(self, step: int) -> float:
        k = step - self.start
        if k < self.warmup_steps:
            # written so that a first segment (start_lr 0) gives exactly lr * (k + 1) / warmup
            return self.start_lr + (self.peak_lr - self.start_lr) * ((k + 1) / self.warmup_steps)
        if self.kind == "constant":
            return self.peak_lr
        progress = (k - self.warmup_steps) / max(1, self.end - self.start - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.peak_lr * (self.min_ratio + (1 - self.min_ratio) * cosine)

    def describe(self) -> str:
        shape = (
            f"warmup {self.start_lr:.3g} -> {self.peak_lr:.3g} over {self.warmup_steps} steps, "
            if self.warmup_steps
            else f"from {self.peak_lr:.3g}, "
        )
        tail = (
            "constant"
            if self.kind == "constant"
            else f"cosine to {self.peak_lr * self.min_ratio:.3g}"
        )
        return f"steps {self.start}..{self.end}: {shape}{tail}"


Schedule = list[Segment]


def initial_schedule(config: Config) -> Schedule:
    """The schedule of a run started from step 0."""
    oc = config.optim
    return [
        Segment(
            start=0,
            end=config.train.steps,
            peak_lr=oc.lr,
            warmup_steps=oc.warmup_steps,
            kind=oc.schedule,
            min_ratio=oc.min_lr_ratio,
        )
    ]


def lr_at(schedule: Sequence[Segment], step: int) -> float:
    """The rate of 0-based step ``step`` (the last segment starting at or before it decides)."""
    segment = next((s for s in reversed(schedule) if s.start <= step), schedule[0])
    return segment.lr(step)


def extend(schedule: Sequence[Segment], step: int, config: Config, rule: str) -> Schedule:
    """``schedule`` followed by a segment from ``step`` to ``config.train.steps`` by ``rule``."""
    if rule not in EXTEND_RULES:
        raise ValueError(f"unknown schedule rule {rule!r} (one of {EXTEND_RULES})")
    oc, end = config.optim, config.train.steps
    current = lr_at(schedule, step)
    if rule == "rewarm":
        new = Segment(
            start=step,
            end=end,
            peak_lr=oc.lr,
            warmup_steps=min(oc.warmup_steps, end - step),
            start_lr=current,
            kind=oc.schedule,
            min_ratio=oc.min_lr_ratio,
        )
    else:
        floor = oc.lr * oc.min_lr_ratio
        new = Segment(
            start=step,
            end=end,
            peak_lr=current,
            warmup_steps=0,
            start_lr=current,
            kind=oc.schedule,
            min_ratio=min(1.0, floor / current) if current > 0 else 0.0,
        )
    # segments that start at or after the change point are replaced (never reached)
    return [s for s in schedule if s.start < step] + [new]


def schedule_state(schedule: Sequence[Segment]) -> list[dict[str, Any]]:
    """Plain dicts for the checkpoint (``torch.load(weights_only=True)`` reads them)."""
    return [asdict(s) for s in schedule]


def schedule_from_state(state: list[dict[str, Any]]) -> Schedule:
    return [Segment(**s) for s in state]


__all__ = [
    "EXTEND_RULES",
    "SCHEDULE_KEYS",
    "Schedule",
    "Segment",
    "extend",
    "initial_schedule",
    "lr_at",
    "schedule_from_state",
    "schedule_state",
]
