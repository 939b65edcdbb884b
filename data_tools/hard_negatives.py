"""The hard-negatives file: for each training sample, captions that are close to its image but
are not its own (``clipforge-index mine`` writes it, training reads it: ``data.hard_negatives``).

It is JSON lines, so that it is written and read one sample at a time::

    {"format": "clipforge-hard-negatives/1", "emb_dir": ..., "model": ..., "model_hash": ...,
     "k": 4, "count": 1911}                                         <- line 1: the header
    {"key": "0000000003", "negatives": ["caption", "caption", ...]} <- one line per sample

``key`` is the sample's webdataset ``__key__`` (the tar member name without its extension, as the
reader groups members and as ``EMB_DIR``'s metadata records it): the writer's keys are
``<shard:06d><position>``, unique within a dataset. ``negatives`` are distinct caption texts,
most similar first, at most ``k`` of them (fewer where the collection had fewer candidates).
The file is written to a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge.data_tools.atomic import atomic_output

HARD_NEGATIVES_FORMAT = "clipforge-hard-negatives/1"


class HardNegativesError(ValueError):
    """A malformed hard-negatives file or entry (the message names the file, line and field)."""


@dataclass(frozen=True)
class HardNegativesHeader:
    """Line 1 of a hard-negatives file: where its negatives came from."""

    emb_dir: str
    """The ``EMB_DIR`` they were mined from (absolute path)."""
    model: str
    """The model that embedded ``EMB_DIR`` (its source path, as ``embeddings.json`` records it)."""
    model_hash: str
    """That model's weights hash (``embeddings.json``'s ``model_hash``)."""
    k: int
    """Negatives mined per sample (an entry may hold fewer)."""
    count: int
    """Sample lines that follow the header."""
    format: str = HARD_NEGATIVES_FORMAT
    """The file format and its version."""

    def __post_init__(self) -> None:
        if self.format != HARD_NEGATIVES_FORMAT:
            raise HardNegativesError(
                f"hard-negatives header: format {self.format!r} is not {HARD_NEGATIVES_FORMAT!r}"
            )
        if self.k < 1:
            raise HardNegativesError(f"hard-negatives header: k must be >= 1, got {self.k}")
        if self.count < 0:
            raise HardNegativesError(f"hard-negatives header: count must be >= 0, got {self.count}")

    def to_json(self) -> dict[str, Any]:
        """The header line's object (format first)."""
        return {
            "format": self.format,
            "emb_dir": self.emb_dir,
            "model": self.model,
            "model_hash": self.model_hash,
            "k": self.k,
            "count": self.count,
        }


def _field(obj: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    if name not in obj:
        raise HardNegativesError(f"{where}: required field {name!r} is missing")
    value = obj[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HardNegativesError(
            f"{where}: field {name!r} must be a {kind.__name__}, got {value!r:.80}"
        )
    return value


def _parse_line(path: Path, number: int, line: str) -> dict[str, Any]:
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise HardNegativesError(
            f"{where}: not valid JSON ({e.msg}; truncated or altered?)"
        ) from None
    if not isinstance(obj, dict):
        raise HardNegativesError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_hard_negatives(
    path: str | os.PathLike[str],
    header: HardNegativesHeader,
    entries: Iterable[tuple[str, Sequence[str]]],
) -> None:
    """Write ``header`` then one line per ``(key, negatives)`` to ``path`` atomically.

    Streams ``entries``; raises (and leaves nothing under ``path``) when their number is not
    ``header.count``, a key repeats or is empty, or an entry has more than ``header.k``."""
    seen: set[str] = set()
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header.to_json()) + "\n")
        for key, negatives in entries:
            if not key or key in seen:
                raise HardNegativesError(f"{path}: key {key!r} is empty or repeated")
            if len(negatives) > header.k:
                raise HardNegativesError(
                    f"{path}: key {key!r} has {len(negatives)} negatives, more than k={header.k}"
                )
            seen.add(key)
            f.write(json.dumps({"key": key, "negatives": list(negatives)}) + "\n")
        if len(seen) != header.count:
            raise HardNegativesError(
                f"{path}: {len(seen)} entries written but the header says count={header.count}"
            )


def read_hard_negatives(
    path: str | os.PathLike[str],
) -> tuple[HardNegativesHeader, dict[str, tuple[str, ...]]]:
    """The header and ``{key: negatives}`` of a hard-negatives file, checked line by line.

    Raises :class:`HardNegativesError` naming the file, the line and the field of the first
    problem (and ``FileNotFoundError`` naming a missing file)."""
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "not found"
        raise FileNotFoundError(f"hard-negatives file {p} {what} (make it with "
                                "`clipforge-index mine EMB_DIR --out FILE`)")  # fmt: skip
    table: dict[str, tuple[str, ...]] = {}
    header: HardNegativesHeader | None = None
    with open(p, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            obj = _parse_line(p, number, line)
            where = f"{p}:{number}"
            if header is None:
                fmt = obj.get("format")
                if fmt != HARD_NEGATIVES_FORMAT:
                    raise HardNegativesError(
                        f"{where}: field 'format' is {fmt!r}, not {HARD_NEGATIVES_FORMAT!r}: "
                        "not a hard-negatives file"
                    )
                fields = {
                    "emb_dir": _field(obj, "emb_dir", str, where),
                    "model": _field(obj, "model", str, where),
                    "model_hash": _field(obj, "model_hash", str, where),
                    "k": _field(obj, "k", int, where),
                    "count": _field(obj, "count", int, where),
                }
                try:
                    header = HardNegativesHeader(**fields)
                except HardNegativesError as e:  # a value out of range: name the line too
                    raise HardNegativesError(f"{where}: {e}") from None
                continue
            key = _field(obj, "key", str, where)
            negatives = _field(obj, "negatives", list, where)
            if not key:
                raise HardNegativesError(f"{where}: field 'key' is empty")
            if key in table:
                raise HardNegativesError(f"{where}: key {key!r} appears twice")
            if len(negatives) > header.k:
                raise HardNegativesError(
                    f"{where}: field 'negatives' has {len(negatives)} entries, more than the "
                    f"header's k={header.k}"
                )
            if not all(isinstance(n, str) and n for n in negatives):
                raise HardNegativesError(
                    f"{where}: field 'negatives' must be a list of non-empty strings"
                )
            table[key] = tuple(negatives)
    if header is None:
        raise HardNegativesError(f"{p}: the file is empty (no header line)")
    if len(table) != header.count:
        raise HardNegativesError(
            f"{p}: {len(table)} entries but the header's field 'count' is {header.count} "
            "(truncated?)"
        )
    return header, table


class HardNegativeBatcher:
    """Attaches each sample's first ``per_sample`` negatives, tokenized, to a reader batch.

    The reader calls it (in its worker processes) with the batch's keys; it returns fixed-shape
    tensors, so every rank's batch has the same shape for the gathered loss."""

    def __init__(self, table: Mapping[str, Sequence[str]], per_sample: int) -> None:
        if per_sample < 1:
            raise HardNegativesError(f"hard negatives per sample must be >= 1, got {per_sample}")
        self.table = table
        self.per_sample = per_sample

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], per_sample: int) -> HardNegativeBatcher:
        """Read ``path`` (see :func:`read_hard_negatives`); more negatives per sample than the
        file was mined with is refused (the extra slots would all be empty, forwarded and
        masked: compute for nothing)."""
        header, table = read_hard_negatives(path)
        if per_sample > header.k:
            raise HardNegativesError(
                f"{path}: {per_sample} negatives per sample asked, but the file was mined with "
                f"k={header.k} (mine again with --k {per_sample}, or ask for at most {header.k})"
            )
        return cls(table, per_sample)

    def __call__(
        self, keys: Sequence[str], tokenizer: Callable[[list[str]], torch.Tensor]
    ) -> dict[str, Any]:
        """``{"hard_negatives": (B, k, L) tokens, "hard_negatives_mask": (B, k) bool (True: a
        real negative), "hard_negatives_missing": samples with none}``. Empty slots hold the
        tokens of an empty caption (forwarded, then masked out of the loss)."""
        k = self.per_sample
        texts: list[str] = []
        mask = torch.zeros(len(keys), k, dtype=torch.bool)  # (B, k)
        missing = 0
        for row, key in enumerate(keys):
            negatives = list(self.table.get(key, ()))[:k]
            missing += not negatives
            mask[row, : len(negatives)] = True
            texts.extend(negatives + [""] * (k - len(negatives)))
        tokens = tokenizer(texts)  # (B * k, L)
        return {
            "hard_negatives": tokens.view(len(keys), k, -1),  # (B, k, L)
            "hard_negatives_mask": mask,
            "hard_negatives_missing": missing,
        }


__all__ = [
    "HARD_NEGATIVES_FORMAT",
    "HardNegativeBatcher",
    "HardNegativesError",
    "HardNegativesHeader",
    "read_hard_negatives",
    "write_hard_negatives",
]
