"""Step checkpoints: atomic save, keep-last-K, load for exact resume.

Two forms (``train.checkpoint_format``), listed, verified, pruned and resumed alike:

- whole-state, ``checkpoints/step-N.pt``: gathered on rank 0 and written by it alone; holds the
  model, optimizer, grad scaler and scheduler states, the step and samples seen, every RNG
  state, and the data stream position (and, with ``train.ema_decay``, the weights' EMA under
  ``ema`` with its update count ``ema_updates``), plus the open_clip model config so that a
  checkpoint alone can be loaded for inference;
- sharded, ``checkpoints/step-N/``: a ``torch.distributed.checkpoint`` directory, each rank
  writing its own shards, with the same non-tensor state in a sidecar
  (:mod:`~clipforge.pretrain.sharded_checkpoint`).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from clipforge.data_tools.atomic import TMP_MARKER, atomic_output
from clipforge.pretrain.sharded_checkpoint import missing_pieces, read_sidecar, read_whole

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d+)(\.pt)?$")
CORRUPT_SUFFIX = ".corrupt"
# what resume reads from a checkpoint: one without them is not a clipforge step checkpoint
REQUIRED_KEYS = ("model", "optimizer", "step", "samples_seen", "rng", "data_positions")


class NoIntactCheckpoint(ValueError):
    """Every checkpoint of a run directory is unreadable (the message lists them)."""


def checkpoint_path(folder: str | os.PathLike[str], step: int, sharded: bool = False) -> Path:
    """``step-N.pt`` (whole-state) or ``step-N`` (a sharded checkpoint's directory)."""
    return Path(folder) / (f"step-{step}" if sharded else f"step-{step}.pt")


def list_checkpoints(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints of both forms, oldest first: ``step-N.pt`` files and
    ``step-N`` directories (temp files and directories of unfinished writes are not listed;
    whether a listed one is intact is :func:`load_newest_intact`'s question)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_RE.match(p.name)
        # a file must be step-N.pt, a directory step-N
        if m and (p.is_dir() if m.group(2) is None else p.is_file()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint of either form."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune_checkpoints(folder: str | os.PathLike[str], keep: int) -> None:
    """Keep-last-K over both forms: delete all but the newest ``keep`` checkpoints."""
    for _, old in list_checkpoints(folder)[:-keep]:
        remove_checkpoint(old)


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    """Every RNG state, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = cast(
        tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True)
    )
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: str | os.PathLike[str], step: int, state: dict[str, Any], keep: int
) -> Path:
    """Write ``step-N.pt`` atomically (temp file + rename), then delete all but the newest
    ``keep`` checkpoints."""
    path = checkpoint_path(folder, step)
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    prune_checkpoints(folder, keep)
    return path


def load_checkpoint(
    path: str | os.PathLike[str], verify: bool = False, tensors: bool = True
) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (plain tensors and containers only, so it
    loads with ``weights_only=True``), or a sharded checkpoint directory. ``verify``: also check
    every stored CRC-32 first (``torch.load`` does not: garbled tensor bytes would load as wrong
    weights) or, for a directory, that its sidecar, metadata and every shard file it names are
    there in full; and that the keys resume needs are there.

    A directory gives its sidecar plus, with ``tensors``, the whole model and optimizer state
    read into this one process (the same dict a whole-state checkpoint holds); without
    ``tensors`` only the sidecar (what resume plans from: the ranks then load their shards
    themselves)."""
    if Path(path).is_dir():
        return _load_sharded(Path(path), verify, tensors)
    try:
        if verify:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise ValueError(f"record {bad} fails its CRC-32 check")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    if verify:
        _check_keys(path, state, REQUIRED_KEYS)
    return state


def _check_keys(path: str | os.PathLike[str], state: Any, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if not (isinstance(state, dict) and k in state)]
    if missing:
        raise ValueError(f"checkpoint {path} is not a step checkpoint (no {missing})")


def _load_sharded(path: Path, verify: bool, tensors: bool) -> dict[str, Any]:
    if verify:
        why = missing_pieces(path)
        if why is not None:
            raise ValueError(f"sharded checkpoint {path} is incomplete: {why}")
    try:
        state = read_sidecar(path)
        if tensors:
            state.update(read_whole(path, keys={"model", "optimizer", "ema"}))
    except Exception as e:
        raise ValueError(
            f"sharded checkpoint {path} is unreadable ({type(e).__name__}: {e})"
        ) from None
    if verify:
        sidecar_keys = tuple(k for k in REQUIRED_KEYS if k not in ("model", "optimizer"))
        _check_keys(path, state, REQUIRED_KEYS if tensors else sidecar_keys)
    return state


def is_sharded(path: str | os.PathLike[str]) -> bool:
    """``path`` is a sharded checkpoint (a directory), not a whole-state file."""
    return Path(path).is_dir()


def load_newest_intact(folder: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, and its state; None when there is none at all.
    Either form: a sharded one gives its sidecar only (see :func:`load_checkpoint`).

    Newer ones that do not verify (torn or garbled: a disk or copy fault, since writes are
    atomic; a sharded directory missing a piece) are renamed to ``step-N.pt.corrupt`` /
    ``step-N.corrupt`` with a warning naming why, so that keep-last-K never keeps them in place
    of intact ones. When none verifies, :class:`NoIntactCheckpoint` and nothing is renamed (a
    re-run must not quietly start over).
    """
    found = list_checkpoints(folder)
    if not found:
        return None
    corrupt: list[tuple[Path, str]] = []
    for _, path in reversed(found):
        try:
            state = load_checkpoint(path, verify=True, tensors=not is_sharded(path))
        except ValueError as e:
            corrupt.append((path, str(e)))
            continue
        for bad, why in corrupt:
            aside = bad.with_name(bad.name + CORRUPT_SUFFIX)
            os.replace(bad, aside)
            log.warning("%s: renamed it to %s and resuming from %s", why, aside.name, path.name)
        return path, state
    raise NoIntactCheckpoint(
        f"no intact checkpoint in {folder}: "
        + "; ".join(why for _, why in corrupt)
        + ": restore one from a copy, or move them away to start over"
    )


def remove_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files of atomic writes a killed run left in ``folder`` (such as
    ``step-N.pt.tmp-PID``), and the temp directories of sharded saves that never completed
    (``step-N.tmp-PID/``). Only for the process that holds the run directory's lock."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if TMP_MARKER in p.name)
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale
