"""Resuming on another world size (2 gloo ranks through torchrun, and 1 process): the global
batch is kept, samples seen and the schedule continue, the checkpoint's weights and optimizer
state are what the new world trains on (FSDP's too), and an exact pass still reads every key of
its epoch once across the change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from clipforge.data_tools.reader import (
    ReaderConfig,
    StreamPosition,
    make_loader,
    parse_shard_spec,
)
from clipforge.data_tools.resplit import resplit_exact_pass
from clipforge.data_tools.transforms import clip_image_transforms
from clipforge.pretrain.checkpoint import load_checkpoint
from clipforge.pretrain.cli import main
from clipforge.pretrain.config import load_config
from clipforge.pretrain.distributed import DistInfo
from clipforge.pretrain.parallelize import full_state_dicts
from clipforge.pretrain.train import Trainer
from tests.ports import free_port
from tests.test_pretrain.launch import cut_back, tiny_run_args, torchrun_two_ranks

STEPS, HALF = 16, 8


def _args(demo: Path, run: Path, batch: int, steps: int = STEPS, *extra: str) -> list[str]:
    return tiny_run_args(demo, run, batch, steps, HALF, *extra)


_torchrun = torchrun_two_ranks


def _metrics(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def _restarts(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "restarts.jsonl").read_text().splitlines()]


def _assert_continues(resumed: dict[int, dict], reference: dict[int, dict]) -> None:
    """Same schedule and samples seen as the uninterrupted run; the loss goes on from where it
    was (another world size draws other samples, so equal only in level: the first resumed
    step is nearer the uninterrupted run's than the untrained model's first loss)."""
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-12), step
        assert resumed[step]["samples_seen"] == step * 64, step  # global batch 64 kept
    untrained = reference[1]["loss"]
    after = [resumed[s]["loss"] for s in range(HALF + 1, STEPS + 1)]
    before = [reference[s]["loss"] for s in range(HALF + 1, STEPS + 1)]
    mean_after, mean_before = sum(after) / len(after), sum(before) / len(before)
    assert abs(mean_after - mean_before) < 0.25, (after, before)
    assert untrained - mean_after > 0.3, (untrained, after)
    assert abs(after[0] - reference[HALF + 1]["loss"]) < abs(untrained - after[0]), after


def _resume_state_equals_checkpoint(demo: Path, run: Path, batch: int) -> None:
    """On 1 process, a resume of ``run`` loads exactly the checkpoint's weights and optimizer
    state (name-keyed, whatever wrapping wrote them), at its step and samples seen."""
    config = load_config("tiny", _args(demo, run, batch)[3::2])
    state = load_checkpoint(run / "checkpoints" / f"step-{HALF}.pt")
    trainer = Trainer(config, DistInfo(0, 1, 0, torch.device("cpu"), None))
    try:
        assert (trainer.step, trainer.samples_seen, trainer.batch_size) == (HALF, HALF * 64, 64)
        model_sd, optim_sd = full_state_dicts(trainer.model, trainer.optimizer)
        assert model_sd.keys() == state["model"].keys()
        for name, tensor in state["model"].items():
            assert torch.equal(model_sd[name], tensor), name
        assert optim_sd["state"].keys() == state["optimizer"]["state"].keys()
        for name, moments in state["optimizer"]["state"].items():
            for key, value in moments.items():
                assert torch.equal(optim_sd["state"][name][key], value), (name, key)
    finally:
        trainer.close()
    (run / "restarts.jsonl").unlink()  # that check recorded a start of its own


def test_two_ranks_to_one_and_fsdp_checkpoint_resume_on_one(demo: Path, tmp_path: Path) -> None:
    straight = tmp_path / "ddp-2"
    _torchrun(_args(demo, straight, 32))
    reference = _metrics(straight)
    assert reference[STEPS]["samples_seen"] == STEPS * 64

    moved = cut_back(straight, tmp_path / "ddp-2-then-1", HALF)
    _resume_state_equals_checkpoint(demo, moved, 32)
    assert main(_args(demo, moved, 32)) == 0  # the same command, now on 1 process
    resumed = _metrics(moved)
    _assert_continues(resumed, reference)
    (record,) = _restarts(moved)
    assert record["world_size"] == 1 and record["global_batch"] == 64
    assert record["world_change"]["world_size"] == [2, 1]
    assert record["world_change"]["batch_size"] == [32, 64]
    assert "re-seeded from (seed, step 8" in record["world_change"]["data"]
    assert load_checkpoint(moved / "checkpoints" / f"step-{STEPS}.pt")["batch_size"] == 64

    # FSDP (whole, name-keyed checkpoints) 2 -> 1: loads the same, trains the same as DDP's
    fsdp_straight = tmp_path / "fsdp-2"
    _torchrun(_args(demo, fsdp_straight, 32, STEPS, "--set", "model.fsdp=true"))
    fsdp = cut_back(fsdp_straight, tmp_path / "fsdp-2-then-1", HALF)
    _resume_state_equals_checkpoint(demo, fsdp, 32)
    assert main(_args(demo, fsdp, 32, STEPS, "--set", "model.fsdp=true")) == 0
    fsdp_resumed = _metrics(fsdp)
    for step in range(1, STEPS + 1):
        assert fsdp_resumed[step]["loss"] == pytest.approx(resumed[step]["loss"], abs=1e-4), step


def test_one_rank_to_two_keeps_the_global_batch(demo: Path, tmp_path: Path) -> None:
    straight = tmp_path / "one"
    assert main(_args(demo, straight, 64)) == 0
    moved = cut_back(straight, tmp_path / "one-then-two", HALF)
    _torchrun(_args(demo, moved, 64))  # the same command, now on 2 ranks
    _assert_continues(_metrics(moved), _metrics(straight))
    start, record = _restarts(moved)
    assert (start["event"], start["world_size"], record["world_size"]) == ("start", 1, 2)
    assert record["world_change"]["batch_size"] == [64, 32]
    assert record["world_change"]["global_batch"] == [64, 64]


def test_global_batch_is_refused_or_changed_only_when_asked(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    constant = ("--set", "optim.schedule=constant")  # stopping at HALF keeps the schedule
    assert main(_args(demo, run, 63, HALF, *constant)) == 0
    # 63 does not split over 2 ranks: refused before anything is written
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), "-m", "clipforge.pretrain",
        *_args(demo, run, 63, STEPS, *constant),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "global batch of 63 (1 rank(s) x 63), which 2 ranks cannot share" in proc.stderr
    # a different per-rank batch on the same world size: refused without the key ...
    assert main(_args(demo, run, 32, STEPS, *constant)) == 2
    assert "data.batch_size: 63 -> 32" in capsys.readouterr().err
    # ... and taken literally with it (the global batch changes; nothing else is scaled)
    allow = ("--set", "data.allow_global_batch_change=true")
    assert main(_args(demo, run, 32, STEPS, *constant, *allow)) == 0
    metrics = _metrics(run)
    assert metrics[HALF]["samples_seen"] == HALF * 63
    assert metrics[STEPS]["samples_seen"] == HALF * 63 + HALF * 32
    assert {metrics[s]["lr"] for s in range(3, STEPS + 1)} == {2e-3}  # the rate is not scaled
    record = _restarts(run)[-1]
    assert record["world_change"]["global_batch"] == [63, 32]


def test_exact_pass_two_ranks_to_one_reads_every_key_once(demo: Path, tmp_path: Path) -> None:
    run = tmp_path / "exact"
    exact = ("--set", "data.resampled=false", "--set", "data.shuffle_buffer=64")
    exact += ("--set", "optim.schedule=constant")  # stopping at step 4 keeps the schedule
    _torchrun(_args(demo, run, 32, 4, *exact, "--set", "train.checkpoint_every=4"))
    assert main(_args(demo, run, 32, 8, *exact, "--set", "train.checkpoint_every=4")) == 0
    before = load_checkpoint(run / "checkpoints" / "step-4.pt")["data_positions"]
    after = load_checkpoint(run / "checkpoints" / "step-8.pt")["data_positions"]
    assert len(before) == 2 and len(after) == 1

    # Replay what the trainer read, by the positions it saved: the first 4 steps on 2 ranks ...
    transform, _ = clip_image_transforms(8)

    def loader(batch: int, rank: int, world: int, position: StreamPosition, drop: bool = True):
        config = ReaderConfig(batch_size=batch, shuffle_buffer=64, seed=0, drop_last=drop)
        return make_loader(
            demo, transform, config=config, num_workers=1, rank=rank, world_size=world,
            position=position,
        )  # fmt: skip

    def take(source, n: int) -> list[str]:
        keys: list[str] = []
        for i, batch in enumerate(source, 1):
            keys += batch["key"]
            if i == n:
                break
        return keys

    seen: Counter[str] = Counter()
    old = []
    for rank in range(2):
        first = loader(32, rank, 2, StreamPosition())
        seen.update(take(first, 4))
        assert first.position == StreamPosition.from_dict(before[rank])
        old.append(first.position)
    # ... then 4 steps of 64 on 1 rank from the re-split positions the trainer derived ...
    (resplit,) = resplit_exact_pass(
        parse_shard_spec(str(demo)), old, seed=0, shuffle_buffer=64, world_size=1, workers=1
    )
    single = loader(64, 0, 1, resplit)
    seen.update(take(single, 4))
    assert single.position == StreamPosition.from_dict(after[0])
    # ... and the rest of the epoch from where the 1-rank run stopped
    seen.update(k for b in loader(64, 0, 1, single.position, drop=False) for k in b["key"])
    everything = Counter(k for b in loader(64, 0, 1, StreamPosition(), False) for k in b["key"])
    assert len(everything) == 1911 and set(everything.values()) == {1}
    assert seen == everything  # every key of the epoch exactly once across the change
    assert "exact pass" in _restarts(run)[-1]["world_change"]["data"]


def test_resume_from_a_checkpoint_at_the_end_of_an_exact_pass(tmp_path: Path) -> None:
    """A checkpoint taken at a pass's last batch holds "all consumed" of that pass: the resume
    goes on with the next pass (it once aborted with "yielded no samples")."""
    import tarfile

    from tests.test_data_tools.shard_helpers import add_member, image_bytes, pattern_image

    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"train-{s:06d}.tar", "w") as tar:
            for pos in range(16):
                key = f"{s:06d}{pos:04d}"
                add_member(tar, f"{key}.png", image_bytes(pattern_image((16, 16), s * 16 + pos)))
                add_member(tar, f"{key}.txt", f"item {s * 16 + pos}".encode())
    exact = ("--set", "data.resampled=false", "--set", "data.workers=1")
    # 32 samples in batches of 8: step 4 ends the first pass, and a checkpoint is taken there
    straight = tmp_path / "straight"
    assert main(tiny_run_args(shards, straight, 8, 6, 4, *exact)) == 0
    run = cut_back(straight, tmp_path / "run", 4)  # as if the job had died before step 6
    assert main(tiny_run_args(shards, run, 8, 6, 4, *exact)) == 0
    assert _restarts(run)[-1]["step"] == 4
    losses, expected = _metrics(run), _metrics(straight)
    # the resumed run's new pass is the unbroken run's second pass, step for step
    assert [losses[s]["loss"] for s in (5, 6)] == [expected[s]["loss"] for s in (5, 6)]
