"""Launch environments and distributed training through torchrun on 2 gloo processes: DDP and
FSDP give the same losses and weights, and an FSDP run resumes exactly from its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipforge.pretrain.distributed import detect_launch
from clipforge.pretrain.models import read_state_dict
from tests.ports import free_port


def test_launch_is_read_from_torchrun_then_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert detect_launch() == (0, 1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert detect_launch() == (9, 16, 1)
    # torchrun inside a SLURM allocation: torchrun's variables win
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert detect_launch() == (1, 2, 1)


def _torchrun(demo: Path, run: Path, fsdp: bool, steps: int) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()),
        "-m", "clipforge.pretrain", "--config", "tiny",
        "--set", f"data.train={demo}", "--set", f"train.run_dir={run}",
        "--set", f"train.steps={steps}", "--set", "train.log_every=1",
        "--set", "train.checkpoint_every=3", "--set", f"model.fsdp={str(fsdp).lower()}",
        "--set", "train.progress=lines", "--set", "data.resampled=false",
        "--set", "data.shuffle_buffer=0", "--set", "optim.warmup_steps=0",
        # a constant rate: stopping at step 3 and resuming to 6 follows the same schedule
        "--set", "optim.schedule=constant",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_fsdp_equals_ddp_and_resumes_exactly(demo: Path, tmp_path: Path) -> None:
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(demo, ddp, fsdp=False, steps=6)
    _torchrun(demo, fsdp, fsdp=True, steps=3)
    _torchrun(demo, fsdp, fsdp=True, steps=6)  # resumes from checkpoints/step-3.pt

    records = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes
    assert records[-1]["samples_seen"] == 6 * 32 * 2  # global batch = 32 per rank x 2 ranks
    ddp_losses, fsdp_losses = _losses(ddp), _losses(fsdp)
    assert sorted(fsdp_losses) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert fsdp_losses[step] == pytest.approx(ddp_losses[step], abs=2e-5), step
    assert ddp_losses[6] < ddp_losses[1]
    # the exported weights are whole (not shards) and agree
    w_ddp = read_state_dict(ddp / "model")
    w_fsdp = read_state_dict(fsdp / "model")
    assert w_ddp.keys() == w_fsdp.keys()
    for name in w_ddp:
        torch.testing.assert_close(w_fsdp[name], w_ddp[name], rtol=1e-4, atol=2e-5, msg=name)

    # (resuming a 2-rank checkpoint on 1 process, or 1 on 2: tests/test_pretrain/test_elastic.py)
