"""Finding and checking the interpreter of a peer tool's virtual environment.

A side-by-side benchmark runs the peer (open_clip_train, CLIP_benchmark) in a venv of its own,
whose pins clash with clipforge's; the benchmark is told that venv's ``python`` by a flag or an
environment variable, never by a default path (README.md in this folder says how to make each
venv). :func:`peer_python` resolves and checks it before any measuring starts, so that a
missing peer fails in seconds instead of after clipforge's half.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPEN_CLIP_ENV = "CLIPFORGE_PEER_OPENCLIP"
"""Environment variable naming the open_clip_train venv's python."""
CLIP_BENCHMARK_ENV = "CLIPFORGE_PEER_CLIPBENCH"
"""Environment variable naming the CLIP_benchmark venv's python."""


class PeerError(RuntimeError):
    """The peer's interpreter is missing, does not run, or lacks the peer (the message says
    which and how to fix it)."""


@dataclass(frozen=True)
class Peer:
    """One peer tool as a benchmark needs it."""

    name: str
    """The tool's name in messages ("open_clip_train")."""
    env_var: str
    """The environment variable that may name its python."""
    probe: str
    """A module the venv must import (checked with ``python -P -c 'import MODULE'``)."""


OPEN_CLIP_TRAIN = Peer("open_clip_train", OPEN_CLIP_ENV, "open_clip_train.main")
CLIP_BENCHMARK = Peer("CLIP_benchmark", CLIP_BENCHMARK_ENV, "clip_benchmark.cli")


def peer_env() -> dict[str, str]:
    """This process's environment without the variables that would make the peer's python see
    clipforge's packages (PYTHONPATH, PYTHONHOME, the venv marker)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}


def peer_python(
    peer: Peer, flag_value: str | None, flag: str = "--peer-python", alone: str | None = None
) -> str:
    """The python of ``peer``'s venv: ``flag_value`` if given, else ``$ENV_VAR``; checked to
    exist, run, and import the peer. Raises :class:`PeerError` otherwise, saying how to make
    the venv and, where the benchmark has one, the flag (``alone``) that measures clipforge
    alone."""
    how = (
        f"make its venv as benchmarks/README.md says, then pass {flag} VENV/bin/python "
        f"or set {peer.env_var}"
    ) + (f"; or measure clipforge alone with {alone}" if alone else "")
    path = flag_value or os.environ.get(peer.env_var, "")
    if not path:
        raise PeerError(f"no {peer.name} interpreter given: {how}")
    source = flag if flag_value else f"${peer.env_var}"
    if not Path(path).is_file():
        raise PeerError(f"no {peer.name} interpreter at {path} ({source}): {how}")
    try:
        proc = subprocess.run(
            [path, "-P", "-c", f"import {peer.probe}"],
            capture_output=True,
            text=True,
            env=peer_env(),
            timeout=300,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PeerError(f"{path} ({source}) does not run ({e}): {how}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerError(f"{path} ({source}) cannot import {peer.probe} ({last}): {how}")
    return path


__all__ = [
    "CLIP_BENCHMARK",
    "CLIP_BENCHMARK_ENV",
    "OPEN_CLIP_ENV",
    "OPEN_CLIP_TRAIN",
    "Peer",
    "PeerError",
    "peer_env",
    "peer_python",
]
