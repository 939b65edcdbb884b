"""Dataset statistics: an accumulator shared by the shard writer and the shard scanner.

The writer keeps one accumulator per shard and stores its state beside the shard, so per-part
statistics merge exactly (lists are concatenated, counters added) into ``stats.json``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_FAILURE_EXAMPLES = 50


@dataclass
class StatsAccumulator:
    """Counts, caption lengths, image sizes/formats and failures over a set of samples."""

    caption_chars: list[int] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    formats: Counter[str] = field(default_factory=Counter)
    image_bytes: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    failure_examples: list[dict[str, str]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return len(self.caption_chars)

    def add_sample(self, caption: str, width: int, height: int, fmt: str, nbytes: int) -> None:
        """Record one good sample (``width``/``height`` of the image as read)."""
        self.caption_chars.append(len(caption))
        self.caption_words.append(len(caption.split()))
        self.widths.append(width)
        self.heights.append(height)
        self.formats[fmt] += 1
        self.image_bytes += nbytes

    def add_failure(self, reason: str, where: str, detail: str = "") -> None:
        """Record one skipped input: ``reason`` is a short code, ``where`` names the input."""
        self.failures[reason] += 1
        if len(self.failure_examples) < MAX_FAILURE_EXAMPLES:
            self.failure_examples.append({"reason": reason, "where": where, "detail": detail})

    def merge(self, other: StatsAccumulator) -> None:
        """Add ``other`` into this accumulator."""
        self.caption_chars += other.caption_chars
        self.caption_words += other.caption_words
        self.widths += other.widths
        self.heights += other.heights
        self.formats.update(other.formats)
        self.image_bytes += other.image_bytes
        self.failures.update(other.failures)
        room = MAX_FAILURE_EXAMPLES - len(self.failure_examples)
        self.failure_examples += other.failure_examples[: max(room, 0)]

    def to_state(self) -> dict[str, Any]:
        """A JSON-serialisable state that :meth:`from_state` restores exactly."""
        return {
            "caption_chars": self.caption_chars,
            "caption_words": self.caption_words,
            "widths": self.widths,
            "heights": self.heights,
            "formats": dict(self.formats),
            "image_bytes": self.image_bytes,
            "failures": dict(self.failures),
            "failure_examples": self.failure_examples,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StatsAccumulator:
        return cls(
            caption_chars=list(state["caption_chars"]),
            caption_words=list(state["caption_words"]),
            widths=list(state["widths"]),
            heights=list(state["heights"]),
            formats=Counter(state["formats"]),
            image_bytes=int(state["image_bytes"]),
            failures=Counter(state["failures"]),
            failure_examples=list(state["failure_examples"]),
        )

    def summary(self) -> dict[str, Any]:
        """The human-facing summary written to ``stats.json`` and printed by ``stats``."""
        return {
            "samples": self.samples,
            "failures": dict(sorted(self.failures.items())),
            "failed": sum(self.failures.values()),
            "caption_chars": describe(self.caption_chars),
            "caption_words": describe(self.caption_words),
            "image_width": describe(self.widths),
            "image_height": describe(self.heights),
            "image_formats": dict(sorted(self.formats.items())),
            "image_bytes": self.image_bytes,
            "failure_examples": self.failure_examples,
        }


def describe(values: list[int]) -> dict[str, float]:
    """min / mean / p5 / p50 / p95 / max of ``values`` (all zeros when empty)."""
    if not values:
        return {"min": 0, "mean": 0.0, "p5": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    arr = np.asarray(values, dtype=np.float64)
    p5, p50, p95 = np.percentile(arr, [5, 50, 95])
    return {
        "min": int(arr.min()),
        "mean": round(float(arr.mean()), 2),
        "p5": round(float(p5), 2),
        "p50": round(float(p50), 2),
        "p95": round(float(p95), 2),
        "max": int(arr.max()),
    }
