"""What a run directory holds besides checkpoints: its lock, ``metrics.jsonl``, ``restarts.jsonl``.

One trainer at a time: rank 0 of a job holds ``train.lock`` (an exclusive ``flock`` on it, the
holder's host and pid written inside) for as long as it trains; the other ranks of that job never
take it, so they are never refused. The kernel drops the lock when its holder dies, however it
dies, so a lock file left by a killed run is simply taken over (with a message naming the dead
holder). Where the file system has no ``flock`` (some NFS and Lustre mounts), the file is created
with ``O_EXCL`` instead and a file naming a dead pid on this host is taken over.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.pretrain.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"
METRICS_NAME = "metrics.jsonl"
RESTARTS_NAME = "restarts.jsonl"

# flock failures that mean "this file system cannot flock", not "somebody holds it"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirBusy(ConfigError):
    """Another trainer holds the run directory (the message names it)."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _dead_here(holder: dict[str, Any] | None) -> bool:
    """``holder`` names a process of this host that no longer runs."""
    pid = holder.get("pid") if holder else None
    return (
        holder is not None
        and holder.get("host") == socket.gethostname()
        and isinstance(pid, int)
        and not _pid_alive(pid)
    )


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that has not written its name into the lock yet"
    host = holder.get("host", "?")
    here = " (this host)" if host == socket.gethostname() else ""
    return f"pid {holder.get('pid', '?')} on host {host}{here}, since {holder.get('since', '?')}"


def _parse_holder(raw: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


@dataclass
class RunLock:
    """The held lock of one run directory; :meth:`release` (or process exit) gives it up."""

    path: Path
    fd: int
    flocked: bool

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            # unlink while still holding it, and only our own file: a trainer that opened the
            # old inode re-checks the path after locking (see acquire) and retries
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    self.path.unlink()
        finally:
            os.close(self.fd)
            self.fd = -1


def acquire_run_lock(run_dir: Path) -> RunLock:
    """Take ``run_dir``'s lock or raise :class:`RunDirBusy` naming its holder. OSError when the
    folder cannot be written at all."""
    path = run_dir / LOCK_NAME
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": _now()})
    patience = time.monotonic() + 10
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse_holder(os.pread(fd, 4096, 0))
            os.close(fd)
            if _dead_here(holder) and time.monotonic() < patience:
                # killed, but its forked data workers share the lock until they follow it
                time.sleep(0.2)
                continue
            raise RunDirBusy(
                f"train.run_dir {run_dir} is in use by another trainer ({_describe(holder)}; "
                f"lock file {path}): wait for it to finish or stop it, or use another "
                "train.run_dir"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_FLOCK:
                return _acquire_exclusive(path, me, run_dir)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder unlinked it while releasing: lock the path's current file
            os.close(fd)
            continue
        previous = _parse_holder(os.pread(fd, 4096, 0))
        if previous:
            _took_over(path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        return RunLock(path, fd, flocked=True)
    raise RunDirBusy(f"train.run_dir {run_dir}: could not take {path} (it keeps changing)")


def _took_over(path: Path, previous: dict[str, Any]) -> None:
    other_host = previous.get("host") != socket.gethostname()
    log.warning(
        "%s was left by a trainer that is no longer running (%s): taking it over%s",
        path,
        _describe(previous),
        " (it ran on another host: if it still runs there, this file system does not share "
        "locks between hosts, stop one of the two)"
        if other_host
        else "",
    )


def _acquire_exclusive(path: Path, me: str, run_dir: Path) -> RunLock:
    """The lock without flock: create the file exclusively; a dead local holder's is replaced."""
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = _parse_holder(path.read_bytes())
            except FileNotFoundError:
                continue
            if _dead_here(holder):
                assert holder is not None
                _took_over(path, holder)
                path.unlink(missing_ok=True)
                continue
            raise RunDirBusy(
                f"train.run_dir {run_dir} is in use by another trainer ({_describe(holder)}; "
                f"lock file {path}): wait for it or stop it, or use another train.run_dir; "
                "if that trainer is no longer running, delete the lock file"
            ) from None
        os.write(fd, me.encode())
        return RunLock(path, fd, flocked=False)
    raise RunDirBusy(f"train.run_dir {run_dir}: could not take {path} (it keeps changing)")


# ----------------------------------------------------------------------------- jsonl files


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a ``.jsonl`` file this package appends to; a line that does not parse (the
    last one torn by a kill mid-write) is dropped with a warning, never an exception."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            torn = number == len(lines) or (number == len(lines) - 1 and not lines[-1])
            log.warning(
                "%s: dropped %s line %d (%d bytes, not valid JSON%s)",
                path,
                "its torn last" if torn else "a damaged",
                number,
                len(line),
                ": the run writing it was killed mid-line" if torn else "",
            )
            continue
        records.append(record)
    return records


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line with one ``write`` (O_APPEND: concurrent appends never interleave)."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # a short write on a full disk: leave no torn line behind
            raise OSError(errno.ENOSPC, f"{path}: short write ({written} of {len(data)} bytes)")
    finally:
        os.close(fd)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines up to ``step`` (those past it were written by a run killed after
    its last checkpoint, and will be written again); rewritten atomically."""
    if not path.exists():
        return
    from clipforge.data_tools.atomic import write_bytes_atomic

    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def last_logged_loss(path: Path, step: int) -> float | None:
    """The loss of the last metrics line at or before ``step``."""
    losses = [r["loss"] for r in read_jsonl(path) if "loss" in r and r.get("step", 0) <= step]
    return float(losses[-1]) if losses else None


__all__ = [
    "LOCK_NAME",
    "METRICS_NAME",
    "RESTARTS_NAME",
    "RunDirBusy",
    "RunLock",
    "acquire_run_lock",
    "append_jsonl",
    "last_logged_loss",
    "read_jsonl",
    "truncate_metrics",
]
