"""How many intra-op threads a CPU-training process computes with.

torch starts with one intra-op thread per core, as if the process had the machine to itself.
A training process does not: its data-loader workers decode and tokenize on the same cores, and
under torchrun or SLURM several ranks share the node. OpenMP threads that find their core taken
spin, then wait, and the whole step waits for the slowest thread, so oversubscribing costs far
more than the cores it takes: on 2 cores with the tiny preset's one loader worker, a bare
training loop of the demo's model and data ran at 620 samples/s with 2 compute threads and at
1,039 with 1 (the worker keeps the other core); the demo's training went from 770 to 1,450.
:func:`compute_threads` gives each rank the cores it may run on (its CPU affinity), divided
among the node's ranks, less its loader workers; an explicit ``OMP_NUM_THREADS`` (torchrun sets
1 for several ranks per node) or ``train.cpu_threads`` wins.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count chosen for this process, and why."""

    threads: int
    """Intra-op threads to compute with (``torch.set_num_threads``)."""
    reason: str
    """Where the number came from, for the log."""


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS has one, else the count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def local_world_size(env: Mapping[str, str]) -> int:
    """Ranks on this node: torchrun's ``LOCAL_WORLD_SIZE``, SLURM's tasks per node, else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(name, "")
        # SLURM writes "4(x2)" for uneven layouts: the first count is this node's kind
        digits = value.split("(", 1)[0]
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return 1


def compute_threads(
    requested: int, workers: int, cores: int, local_world: int, env: Mapping[str, str]
) -> ThreadChoice:
    """The intra-op threads of one CPU-training rank.

    ``requested`` > 0 (``train.cpu_threads``) is taken as it is; otherwise an ``OMP_NUM_THREADS``
    in ``env`` decides (set by the user, or by torchrun); otherwise the rank's share of ``cores``
    (``cores // local_world``) less its ``workers`` loader processes, at least 1.
    """
    if requested > 0:
        return ThreadChoice(requested, f"train.cpu_threads={requested}")
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), f"OMP_NUM_THREADS={omp}")
    share = max(1, cores // max(1, local_world))
    threads = max(1, share - workers)
    ranks = f" / {local_world} ranks on this node" if local_world > 1 else ""
    return ThreadChoice(
        threads,
        f"{cores} cores{ranks}, less {workers} data-loader worker{'s' if workers != 1 else ''}",
    )


def set_compute_threads(requested: int, workers: int) -> ThreadChoice:
    """Choose (:func:`compute_threads`) and set this process's intra-op threads; logged."""
    choice = compute_threads(
        requested, workers, available_cores(), local_world_size(os.environ), os.environ
    )
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    log.info("computing with %d CPU thread(s): %s", choice.threads, choice.reason)
    return choice
