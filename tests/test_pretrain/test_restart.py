"""A lost rank and a hung peer on 2 gloo processes: under ``torchrun --max-restarts 1`` a rank
that dies mid-run restarts the group, which resumes from the newest checkpoint and finishes with
the uninterrupted run's losses; a collective whose peer never comes fails after
``train.collective_timeout_s`` instead of hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clipforge.pretrain.config import load_config
from clipforge.pretrain.train import CRASH_ENV
from tests.ports import free_port


def _torchrun(demo: Path, run: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        # the static rendezvous (--master-port): its restarted group meets in the store of
        # the dead one, which failed in gloo's connect before each attempt had its own prefix
        "--max-restarts", "1", "--master-port", str(free_port()),
        "-m", "clipforge.pretrain", "--config", "tiny",
        "--set", f"data.train={demo}", "--set", f"train.run_dir={run}",
        "--set", "train.steps=12", "--set", "train.log_every=1",
        "--set", "train.checkpoint_every=4", "--set", "train.progress=lines",
        "--set", "optim.warmup_steps=2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_a_killed_rank_restarts_the_group_which_resumes_with_the_same_losses(
    demo: Path, tmp_path: Path
) -> None:
    straight = tmp_path / "straight"
    assert _torchrun(demo, straight, {}).returncode == 0
    expected = _losses(straight)

    run, marker = tmp_path / "killed", tmp_path / "crashed-once"
    # rank 1 exits (as a lost node) after step 6: past checkpoint 4, before checkpoint 8
    proc = _torchrun(demo, run, {CRASH_ENV: f"1:6:{marker}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists(), "rank 1 never exited: the test proved nothing"
    assert "exits after step 6" in proc.stderr
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 13))  # steps 5-6 were cut back, then redone
    for step in range(1, 13):
        assert losses[step] == pytest.approx(expected[step], abs=1e-5), step
    records = [json.loads(line) for line in (run / "restarts.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"], r["world_size"]) for r in records] == [
        ("start", 0, 2),
        ("resume", 4, 2),
    ]
    assert [r["torchrun_restarts"] for r in records] == [0, 1]


_HUNG_PEER = textwrap.dedent(
    """
    import os, sys, time
    from clipforge.pretrain.distributed import all_reduce_mean, init_distributed
    info = init_distributed("cpu", timeout_s=int(sys.argv[1]))
    if info.rank == 1:
        time.sleep(120)  # alive, but never joins the collective (a hung peer)
        sys.exit(0)
    t0 = time.monotonic()
    try:
        all_reduce_mean(1.0, info)
    except RuntimeError as e:
        print(f"TIMED OUT after {time.monotonic() - t0:.1f} s: {e}"[:300], flush=True)
        # os._exit: tearing down a process group whose peer hung can abort inside gloo's
        # destructors ("terminate called without an active exception"); the timeout was seen
        os._exit(0)
    os._exit(1)
    """
)


def test_a_collective_with_a_hung_peer_fails_after_the_timeout(tmp_path: Path) -> None:
    script = tmp_path / "hung_peer.py"
    script.write_text(_HUNG_PEER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "3"],
            env={**env, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        t0 = time.monotonic()
        out, _ = procs[0].communicate(timeout=90)
        assert procs[0].returncode == 0, out
        assert "TIMED OUT after" in out
        assert time.monotonic() - t0 < 60  # 3 s of timeout, plus start-up on a loaded machine
    finally:
        procs[1].kill()
        procs[1].wait()


def test_the_timeout_is_a_validated_resume_mutable_setting() -> None:
    assert load_config("tiny").train.collective_timeout_s == 600
    assert load_config("tiny", ["train.collective_timeout_s=30"]).train.collective_timeout_s == 30
    with pytest.raises(ValueError, match=r"train\.collective_timeout_s must be > 0, got 0"):
        load_config("tiny", ["train.collective_timeout_s=0"])
