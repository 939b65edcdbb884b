"""Run directories in real use, through ``clipforge.pretrain.cli.main``: one trainer at a time,
resumes that are checked before anything is written, torn and corrupt files, a full disk,
re-running a finished run, extending the schedule."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clipforge.pretrain import checkpoint as checkpoint_module
from clipforge.pretrain import rundir
from clipforge.pretrain.checkpoint import list_checkpoints
from clipforge.pretrain.cli import main
from clipforge.pretrain.rundir import LOCK_NAME, RunDirBusy, acquire_run_lock

WARMUP, PEAK = 2, 1e-3  # tiny preset's optim.lr


def _args(demo: Path, run: Path, *sets: str) -> list[str]:
    base = [
        f"data.train={demo}",
        f"train.run_dir={run}",
        "train.progress=lines",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "data.batch_size=16",
        f"optim.warmup_steps={WARMUP}",
        "train.steps=6",
    ]
    out = ["--config", "tiny"]
    for item in (*base, *sets):  # later --set wins
        out += ["--set", item]
    return out


def _metrics(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def _snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime: what "changes nothing" compares."""
    return {
        str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 6-step run: checkpoints at steps 3 and 6, metrics every step, model/."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(_args(demo, run)) == 0
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [3, 6]
    return run


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def _back_to_step_3(run: Path) -> None:
    """The run directory as a kill after step 3's checkpoint (and 6 metrics lines) leaves it."""
    (run / "checkpoints" / "step-6.pt").unlink()
    shutil.rmtree(run / "model")


# ----------------------------------------------------------------------------- 1. the lock


def test_a_second_trainer_is_refused_naming_the_holder_then_a_dead_holder_is_taken_over(
    demo: Path, run_copy: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                from pathlib import Path
                from clipforge.pretrain.rundir import acquire_run_lock
                acquire_run_lock(Path({str(run_copy)!r}))
                print("locked", flush=True)
                time.sleep(600)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = _snapshot(run_copy)
        assert main(_args(demo, run_copy)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is in use by another trainer" in err
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err
        assert _snapshot(run_copy) == before  # the holder's lock file included
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock; its file (naming it) is still there
    assert json.loads((run_copy / LOCK_NAME).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        assert main(_args(demo, run_copy)) == 0  # the run is complete: nothing to train
    assert f"no longer running (pid {holder.pid}" in caplog.text
    assert not (run_copy / LOCK_NAME).exists()  # released on exit


def test_without_flock_a_live_holder_refuses_and_a_dead_one_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    me = socket.gethostname()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": me, "pid": os.getppid()}))
    with pytest.raises(RunDirBusy, match=f"pid {os.getppid()} on host {me}"):
        acquire_run_lock(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": me, "pid": gone.pid}))
    lock = acquire_run_lock(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirBusy):  # held now, by this process
        acquire_run_lock(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- 2. config checks


def test_resume_with_a_different_model_is_refused_before_anything_is_written(
    demo: Path, run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _back_to_step_3(run_copy)
    before = _snapshot(run_copy)
    argv = _args(demo, run_copy, "model.name=clipforge-demo", "data.batch_size=8")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume" in err and "step-3.pt" in err
    assert "model.name: 'clipforge-tiny' -> 'clipforge-demo'" in err
    assert "data.batch_size: 16 -> 8" in err
    assert _snapshot(run_copy) == before


# ----------------------------------------------------------------------------- 3, 4, 5


def test_torn_metrics_line_corrupt_newest_checkpoint_and_stale_temps(
    demo: Path,
    finished: Path,
    run_copy: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ckpts = run_copy / "checkpoints"
    # a kill mid-way through a metrics line, a garbled newest checkpoint under its final name
    # (same size: only the CRC-32 check sees it) and temp files of killed writes
    with open(run_copy / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 7, "loss": 3.1')
    newest = bytearray((ckpts / "step-6.pt").read_bytes())
    newest[len(newest) // 2 : len(newest) // 2 + 64] = b"\xa5" * 64
    (ckpts / "step-6.pt").write_bytes(bytes(newest))
    shutil.rmtree(run_copy / "model")
    temps = [ckpts / "step-9.pt.tmp-4242", run_copy / "config.yaml.tmp-4242"]
    for t in temps:
        t.write_bytes(b"half")
    with caplog.at_level(logging.INFO, logger="clipforge"):
        assert main(_args(demo, run_copy)) == 0
    log_text = caplog.text
    assert "dropped its torn last line 7" in log_text
    assert "step-6.pt is unreadable" in log_text and "resuming from step-3.pt" in log_text
    assert "removed 2 temp file(s)" in log_text
    assert not any(t.exists() for t in temps)
    assert (ckpts / "step-6.pt.corrupt").exists()
    # resumed from step 3 and redid 4..6 exactly
    ours, reference = _metrics(run_copy), _metrics(finished)
    assert sorted(ours) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert ours[step]["loss"] == pytest.approx(reference[step]["loss"], abs=1e-6), step
    assert [s for s, _ in list_checkpoints(ckpts)] == [3, 6]

    # none intact: one clear line
    for path in list_checkpoints(ckpts):
        path[1].write_bytes(path[1].read_bytes()[:1000])
    capsys.readouterr()
    assert main(_args(demo, run_copy)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no intact checkpoint in" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- 6. disk full


def _one_clear_line(err: str, path: Path) -> None:
    assert err.count("\n") == 1, err
    assert "Traceback" not in err and "no space left" in err and "MB free" in err
    assert str(path) in err


def test_disk_full_on_a_real_filesystem(
    demo: Path, tiny_filesystem: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tiny_filesystem / "run"
    assert main(_args(demo, run)) == 3
    _one_clear_line(capsys.readouterr().err, run / "checkpoints" / "step-3.pt")
    assert list((run / "checkpoints").iterdir()) == []  # no temp, nothing under a final name


def test_disk_full_while_saving_a_checkpoint(
    demo: Path, run_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _back_to_step_3(run_copy)

    def full_disk_save(obj: object, path: Path) -> None:
        Path(path).write_bytes(b"\0" * 4096)  # part of it got out
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk_save)
    assert main(_args(demo, run_copy)) == 3
    err = capsys.readouterr().err
    _one_clear_line(err, run_copy / "checkpoints" / "step-6.pt")
    assert "resumes from step-3.pt" in err
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step-3.pt"]


# ----------------------------------------------------------------------------- 7. finished


def test_rerunning_a_finished_run_says_so_and_changes_nothing(
    demo: Path, finished: Path, run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(run_copy)
    last_loss = _metrics(finished)[6]["loss"]
    restarts = (run_copy / "restarts.jsonl").read_text().splitlines()
    assert len(restarts) == 1
    first = json.loads(restarts[0])
    assert first["event"] == "start" and first["step"] == 0 and first["world_size"] == 1
    assert first["hosts"] == [socket.gethostname()]

    assert main(_args(demo, run_copy)) == 0
    out = capsys.readouterr().out
    assert "already complete: 6 steps" in out and f"last logged loss {last_loss:.4f}" in out
    assert main(_args(demo, run_copy, "train.steps=4")) == 0
    out = capsys.readouterr().out
    assert "already complete: 6 steps (train.steps=4 asks for fewer)" in out
    assert "nan" not in out
    assert _snapshot(run_copy) == before  # config.yaml, model/, metrics, restarts: untouched

    # killed between the last checkpoint and the export: the re-run only exports
    from clipforge.pretrain.models import read_state_dict

    shutil.rmtree(run_copy / "model")
    assert main(_args(demo, run_copy)) == 0
    assert "already complete" in capsys.readouterr().out
    exported, reference = read_state_dict(run_copy / "model"), read_state_dict(finished / "model")
    assert exported.keys() == reference.keys()
    assert all(exported[k].equal(reference[k]) for k in reference)
    assert (run_copy / "config.yaml").read_bytes() == before["config.yaml"][0]


# ----------------------------------------------------------------------------- 8. schedule


def test_changing_steps_needs_a_rule_and_rewarm_resumes_exactly(
    demo: Path, finished: Path, run_copy: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    before = _snapshot(run_copy)
    assert main(_args(demo, run_copy, "train.steps=12")) == 2
    err = capsys.readouterr().err
    assert "train.extend_schedule=rewarm" in err and "train.extend_schedule=continue_lr" in err
    assert _snapshot(run_copy) == before

    assert main(_args(demo, run_copy, "train.steps=12", "train.extend_schedule=rewarm")) == 0
    lr = {s: r["lr"] for s, r in _metrics(run_copy).items()}
    old = {s: r["lr"] for s, r in _metrics(finished).items()}
    assert [lr[s] for s in range(1, 7)] == [old[s] for s in range(1, 7)]
    # rewarm: from the rate step 7 would have had (the finished cosine's end, 0) up to optim.lr
    # over WARMUP steps, then cosine down to 0 at step 12: no jump at the change
    assert lr[7] == pytest.approx(PEAK / WARMUP) and lr[8] == lr[9] == pytest.approx(PEAK)
    assert all(lr[s] > lr[s + 1] > 0 for s in range(9, 12))
    assert lr[12] < lr[7]
    restarts = [json.loads(x) for x in (run_copy / "restarts.jsonl").read_text().splitlines()]
    assert restarts[-1]["event"] == "resume" and restarts[-1]["step"] == 6
    assert restarts[-1]["changed"]["train.steps"] == [6, 12]

    # a later resume inside the extension (from step 9) follows the extended run exactly
    again = tmp_path / "again"
    shutil.copytree(run_copy, again)
    (again / "checkpoints" / "step-12.pt").unlink()
    shutil.rmtree(again / "model")
    assert main(_args(demo, again, "train.steps=12")) == 0  # the rule is in the checkpoint
    resumed, straight = _metrics(again), _metrics(run_copy)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(10, 13):
        assert resumed[step]["lr"] == straight[step]["lr"], step
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], abs=1e-6), step


def test_continue_lr_keeps_the_rate_and_allowed_changes_are_logged(
    demo: Path,
    finished: Path,
    run_copy: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _back_to_step_3(run_copy)  # stopped mid-decay
    argv = _args(
        demo,
        run_copy,
        "train.steps=9",
        "train.extend_schedule=continue_lr",
        "train.checkpoint_every=9",
        "model.grad_checkpointing=true",
    )
    with caplog.at_level(logging.INFO, logger="clipforge"):
        assert main(argv) == 0
    assert "resume changes model.grad_checkpointing: False -> True" in caplog.text
    assert "resume changes train.checkpoint_every: 3 -> 9" in caplog.text
    assert "by train.extend_schedule=continue_lr" in caplog.text
    lr = {s: r["lr"] for s, r in _metrics(run_copy).items()}
    old = {s: r["lr"] for s, r in _metrics(finished).items()}
    # step 4 trains at exactly the rate the uninterrupted 6-step run used there, then decays
    assert lr[4] == old[4]
    assert all(lr[s] > lr[s + 1] for s in range(4, 9)) and lr[9] > 0
    assert lr[5] > old[5]  # a longer decay than the old one
    changed = json.loads((run_copy / "restarts.jsonl").read_text().splitlines()[-1])["changed"]
    assert changed["model.grad_checkpointing"] == [False, True]
