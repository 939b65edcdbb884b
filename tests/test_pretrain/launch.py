"""Launching in tests: the tiny preset's command line, a 2-rank gloo run of it under torchrun,
2 gloo worker processes of an oracle test, and a run directory cut back as a crash leaves it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from clipforge.pretrain.checkpoint import list_checkpoints, remove_checkpoint
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


def run_two_gloo_workers(module: str, out: Path, *args: str) -> list[dict]:
    """``python -m MODULE RANK 2 PORT *ARGS`` for ranks 0 and 1 (one thread each); asserts both
    succeeded and returns what each saved as ``OUT/rank{R}.pt``."""
    import torch

    root = Path(__file__).resolve().parents[2]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, str(rank), "2", str(port), *args],
            cwd=root,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def cut_back(run: Path, copy: Path, step: int) -> Path:
    """A copy of ``run`` as a crash after its checkpoint of ``step`` leaves it: the later
    checkpoints (either form) and the export gone."""
    shutil.copytree(run, copy)
    for s, path in list_checkpoints(copy / "checkpoints"):
        if s > step:
            remove_checkpoint(path)
    shutil.rmtree(copy / "model")
    return copy
