"""Launching the tiny preset in tests: its command line, and a 2-rank gloo run under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.ports import free_port


def tiny_run_args(
    demo: Path, run: Path, batch: int, steps: int, checkpoint_every: int, *extra: str
) -> list[str]:
    """``clipforge-pretrain`` arguments of a short tiny-preset run on ``demo``'s shards; every
    other item from index 3 on is a ``--set`` override (``[3::2]``)."""
    return [
        "--config", "tiny", "--set", f"data.train={demo}", "--set", f"train.run_dir={run}",
        "--set", f"train.steps={steps}", "--set", "train.log_every=1",
        "--set", f"train.checkpoint_every={checkpoint_every}", "--set", "train.progress=lines",
        "--set", "optim.warmup_steps=2", "--set", "optim.lr=2e-3",
        "--set", f"data.batch_size={batch}", *extra,
    ]  # fmt: skip


def torchrun_two_ranks(args: list[str]) -> None:
    """``clipforge-pretrain ARGS`` on 2 gloo ranks (one thread each); asserts it succeeded."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), "-m", "clipforge.pretrain", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
