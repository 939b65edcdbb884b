"""Atomic file output: write to a temporary name in the same folder, then rename.

An interrupted process therefore never leaves a half-written file under a final name; at worst a
``*.tmp-<pid>`` file remains, which readers ignore and which the next writer of the same final
name removes (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp-"

# A write that fails with less than this much left on the file system is taken to have failed for
# lack of space even when the writer reports no errno: torch.save, for one, raises a bare
# RuntimeError ("unexpected pos ...") when its stream hits ENOSPC.
NEARLY_FULL_BYTES = 16 * 2**20


class OutOfSpaceError(OSError):
    """Writing ``path`` failed because its file system is full; nothing was left under its name."""

    def __init__(self, path: Path, free_bytes: int, written_bytes: int) -> None:
        self.path = path
        self.free_bytes = free_bytes
        self.written_bytes = written_bytes
        super().__init__(
            errno.ENOSPC,
            f"{path}: no space left on the device while writing it "
            f"({_mb(free_bytes)} free on {_mount_point(path.parent)}, {_mb(written_bytes)} "
            "written before it failed); nothing was left under that name: free some space "
            "and re-run the same command",
        )

    def __str__(self) -> str:
        return str(self.args[1])


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _mount_point(path: Path) -> str:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


def _errnos(exc: BaseException) -> set[int]:
    """The errno of ``exc`` and of every exception it was raised from or during."""
    found: set[int] = set()
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            found.add(e.errno)
        todo += [e.__cause__, e.__context__]
    return found


def out_of_space(final: Path, tmp: Path, exc: BaseException) -> OutOfSpaceError | None:
    """An :class:`OutOfSpaceError` for ``final`` if ``exc`` (raised while ``tmp`` was being
    written) came from a full file system, else None. Call it before ``tmp`` is deleted: the
    free space it reports is what the failed write left."""
    if isinstance(exc, OutOfSpaceError):
        return exc
    try:
        free = shutil.disk_usage(final.parent).free
    except OSError:
        return None
    # An OSError with another errno says what went wrong; one without (numpy's "N requested
    # and M written") is judged by the space left, like any other errno-less failure.
    said_other = isinstance(exc, OSError) and exc.errno is not None
    if not _errnos(exc) & {errno.ENOSPC, errno.EDQUOT} and (
        said_other or isinstance(exc, KeyboardInterrupt | SystemExit) or free >= NEARLY_FULL_BYTES
    ):
        return None
    try:
        written = tmp.stat().st_size
    except OSError:
        written = 0
    return OutOfSpaceError(final, free, written)


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
    """Yield a temporary path; on success fsync and rename it to ``final``, on error delete it.

    A failure for lack of space (however the writer reported it) is raised as
    :class:`OutOfSpaceError`, whose message names ``final`` and the space left.
    """
    final_path = Path(final)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final_path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final_path)
    except BaseException as e:
        full = out_of_space(final_path, tmp, e)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if full is not None and full is not e:
            raise full from e
        raise


def write_bytes_atomic(final: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``final`` atomically."""
    with atomic_output(final) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(final: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``final`` atomically."""
    write_bytes_atomic(final, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
