"""Atomic file output: write to a temporary name in the same folder, then rename.

An interrupted process therefore never leaves a half-written file under a final name; at worst a
``*.tmp-<pid>`` file remains, which readers ignore and which the next writer of the same final
name removes (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp-"


def temp_path_for(final: Path) -> Path:
    """The temporary name used while ``final`` is written (same folder: rename is atomic)."""
    return final.with_name(f"{final.name}{TMP_MARKER}{os.getpid()}")


def remove_stale_temps(final: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files an interrupted writer of ``final`` left behind; return them.

    Only call this from the one process that owns ``final`` (the temp name carries the pid of
    the process that made it, so a killed writer's temp is never reused by the next one).
    """
    final_path = Path(final)
    stale = sorted(final_path.parent.glob(glob.escape(final_path.name) + TMP_MARKER + "*"))
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


@contextlib.contextmanager
def atomic_output(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success fsync and rename it to ``final``, on error delete it."""
    final_path = Path(final)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final_path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(final: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``final`` atomically."""
    with atomic_output(final) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(final: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``final`` atomically."""
    write_bytes_atomic(final, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
