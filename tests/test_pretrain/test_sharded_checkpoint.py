"""Sharded checkpoints (``train.checkpoint_format=sharded``, torch.distributed.checkpoint) on 2
gloo ranks through torchrun and on 1 process: they hold exactly what the whole-state checkpoint
of the same step holds, load on another world size (FSDP2 2 -> 1, DDP 1 -> 2 -> 1) into exactly
the state the whole-state form loads, train on with its losses, an asynchronous save writes the
same content as a synchronous one, keep-last-K spans both forms, and an incomplete directory is
never resumed from."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from clipforge.pretrain.checkpoint import list_checkpoints, load_checkpoint
from clipforge.pretrain.cli import main
from clipforge.pretrain.config import ConfigError, load_config
from clipforge.pretrain.distributed import DistInfo
from clipforge.pretrain.models import load_model, read_state_dict
from clipforge.pretrain.parallelize import full_state_dicts
from clipforge.pretrain.sharded_checkpoint import METADATA_NAME, SIDECAR_NAME
from clipforge.pretrain.train import Trainer
from tests.test_pretrain.launch import cut_back, tiny_run_args, torchrun_two_ranks

STEPS, HALF = 6, 3
SHARDED = ("--set", "train.checkpoint_format=sharded")
ASYNC = (*SHARDED, "--set", "train.checkpoint_async=true")


def _args(demo: Path, run: Path, batch: int, steps: int, *extra: str) -> list[str]:
    return tiny_run_args(demo, run, batch, steps, HALF, *extra)


_torchrun = torchrun_two_ranks


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _ckpt(run: Path, step: int) -> Path:
    """The step's checkpoint of either form (exactly one must be there)."""
    (path,) = [p for s, p in list_checkpoints(run / "checkpoints") if s == step]
    return path


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts / lists / tensors equal: tensors bit for bit (torch.equal, same dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same model, optimizer (moments, step counts, param groups) and trainer state."""
    sa, sb = load_checkpoint(a, verify=True), load_checkpoint(b, verify=True)
    keys = ("model", "optimizer", "step", "samples_seen", "data_positions", "schedule")
    keys += ("batch_size", "global_batch", "last_loss", "model_cfg")
    for key in keys:
        _assert_same(sa[key], sb[key], f"{a.name}:{key}")
    # torch's generator is seeded by train.seed (Python's is not: it differs between runs)
    torch_rng = [[r["torch"] for r in s["rng_per_rank"]] for s in (sa, sb)]
    _assert_same(*torch_rng, f"{a.name}:rng_per_rank.torch")


def _loaded_on_one_process(demo: Path, run: Path, batch: int, *extra: str) -> dict[str, Any]:
    """What a 1-process resume of ``run`` holds after loading: whole model + optimizer state."""
    config = load_config("tiny", _args(demo, run, batch, STEPS, *extra)[3::2])
    trainer = Trainer(config, DistInfo(0, 1, 0, torch.device("cpu"), None))
    try:
        assert (trainer.step, trainer.batch_size) == (HALF, 2 * batch)
        model_sd, optim_sd = full_state_dicts(trainer.model, trainer.optimizer)
    finally:
        trainer.close()
    (run / "restarts.jsonl").unlink()  # that check recorded a start of its own
    return {"model": model_sd, "optimizer": optim_sd}


def test_fsdp_sharded_two_ranks_to_one_equals_whole_state_and_async_equals_sync(
    demo: Path, tmp_path: Path
) -> None:
    fsdp = ("--set", "model.fsdp=true")
    whole, sharded, asynchronous = tmp_path / "whole", tmp_path / "sharded", tmp_path / "async"
    _torchrun(_args(demo, whole, 16, STEPS, *fsdp))
    _torchrun(_args(demo, sharded, 16, STEPS, *fsdp, *SHARDED))
    _torchrun(_args(demo, asynchronous, 16, STEPS, *fsdp, *ASYNC))

    # the form of the checkpoint changes nothing in training ...
    assert _losses(sharded) == _losses(whole) == _losses(asynchronous)
    for step in (HALF, STEPS):
        shards = _ckpt(sharded, step)
        assert shards.is_dir() and {"__0_0.distcp", "__1_0.distcp"} <= {
            p.name for p in shards.iterdir()
        }  # each of the 2 ranks wrote its own file
        # ... and a sharded checkpoint holds exactly the whole-state one's content, written
        # synchronously or asynchronously (while training went on)
        _assert_same_checkpoint(_ckpt(whole, step), shards)
        _assert_same_checkpoint(shards, _ckpt(asynchronous, step))
    for run in (whole, sharded, asynchronous):  # model/ exported at the end, whatever the form
        assert (run / "model" / "open_clip_config.json").is_file()
    assert not [p for p in (asynchronous / "checkpoints").iterdir() if ".tmp-" in p.name]

    # FSDP 2 -> 1: the sharded checkpoint loads into the very state the whole-state one does
    # (tests/test_pretrain/test_elastic.py proves the whole-state one's load and resume) ...
    whole_1 = cut_back(whole, tmp_path / "whole-then-1", HALF)
    sharded_1 = cut_back(sharded, tmp_path / "sharded-then-1", HALF)
    expected = load_checkpoint(whole_1 / "checkpoints" / f"step-{HALF}.pt")
    loaded = _loaded_on_one_process(demo, sharded_1, 16, *fsdp, *SHARDED)
    _assert_same(loaded["model"], expected["model"], "model")
    _assert_same(loaded["optimizer"]["state"], expected["optimizer"]["state"], "optimizer")
    # ... and trains on from it with the whole-state resume's losses and state
    assert main(_args(demo, whole_1, 16, STEPS, *fsdp)) == 0
    assert main(_args(demo, sharded_1, 16, STEPS, *fsdp, *SHARDED)) == 0
    resumed = _losses(sharded_1)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == _losses(whole_1)
    _assert_same_checkpoint(_ckpt(whole_1, STEPS), _ckpt(sharded_1, STEPS))
    record = json.loads((sharded_1 / "restarts.jsonl").read_text().splitlines()[-1])
    assert record["world_change"]["world_size"] == [2, 1]
    assert record["checkpoint"] == f"step-{HALF}"


def test_ddp_sharded_one_to_two_to_one_rank_equals_whole_state(demo: Path, tmp_path: Path) -> None:
    # a constant rate: each leg stops at its train.steps on the same schedule
    constant = ("--set", "optim.schedule=constant")
    runs = {"whole": tmp_path / "whole", "sharded": tmp_path / "sharded"}
    for form, run in runs.items():
        extra = (*constant, *SHARDED) if form == "sharded" else constant
        assert main(_args(demo, run, 32, HALF, *extra)) == 0  # 1 process
        _torchrun(_args(demo, run, 32, 2 * HALF, *extra))  # 1 -> 2 DDP ranks
        assert main(_args(demo, run, 32, 3 * HALF, *extra)) == 0  # 2 -> 1
    whole, sharded = runs["whole"], runs["sharded"]
    assert sorted(_losses(sharded)) == list(range(1, 3 * HALF + 1))
    assert _losses(sharded) == _losses(whole)
    for step in (HALF, 2 * HALF, 3 * HALF):
        _assert_same_checkpoint(_ckpt(whole, step), _ckpt(sharded, step))
    two_ranks = _ckpt(sharded, 2 * HALF)  # written by 2 DDP ranks: each replica written once
    assert load_checkpoint(two_ranks)["global_batch"] == 32  # the run's global batch, kept
    assert len(load_checkpoint(two_ranks, tensors=False)["rng_per_rank"]) == 2
    records = [json.loads(x) for x in (sharded / "restarts.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records] == [1, 2, 1]
    assert [r.get("world_change", {}).get("batch_size") for r in records] == [
        None,
        [32, 16],
        [16, 32],
    ]


def test_incomplete_sharded_checkpoints_are_skipped_and_keep_last_k_spans_both_forms(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    every = ("--set", "train.checkpoint_every=2", "--set", "optim.schedule=constant")
    keep2 = ("--set", "train.keep_checkpoints=2")
    assert main(_args(demo, run, 16, 4, *every)) == 0  # whole-state: step-2.pt, step-4.pt
    assert main(_args(demo, run, 16, 8, *every, *keep2, *SHARDED)) == 0  # the form changes
    ckpts = run / "checkpoints"
    assert [p.name for _, p in list_checkpoints(ckpts)] == ["step-6", "step-8"]

    # a save killed mid-write leaves its temp directory (some shard files, no sidecar); a
    # partial copy leaves a final-named directory whose shard file is short
    killed = ckpts / "step-10.tmp-4242"
    shutil.copytree(ckpts / "step-8", killed)
    (killed / SIDECAR_NAME).unlink()
    (killed / METADATA_NAME).unlink()
    shard = ckpts / "step-8" / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    caplog.set_level(logging.INFO, logger="clipforge")
    assert main(_args(demo, run, 16, 10, *every, *keep2, *SHARDED)) == 0
    text = caplog.text
    assert "removed 1 temp file(s) left by an interrupted write: checkpoints/step-10.tmp-4242" in (
        text
    )
    assert (
        f"sharded checkpoint {ckpts / 'step-8'} is incomplete: shard file __0_0.distcp holds "
        f"{size // 2} bytes, its metadata needs {size}" in text
    )
    assert "renamed it to step-8.corrupt and resuming from step-6" in text
    assert sorted(_losses(run)) == list(range(1, 11))  # steps 7-8 redone from step 6
    assert [p.name for _, p in list_checkpoints(ckpts)] == ["step-8", "step-10"]
    assert (ckpts / "step-8.corrupt").is_dir() and not killed.exists()

    # inference reads a sharded checkpoint too: the exported model/ is its final weights
    exported = read_state_dict(run / "model")
    final = read_state_dict(ckpts / "step-10")
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    loaded = load_model(ckpts / "step-10")
    assert loaded.model_hash == load_model(run / "model").model_hash
    # a complete run missing its model/ exports it from the sharded checkpoint, trains nothing
    shutil.rmtree(run / "model")
    assert main(_args(demo, run, 16, 10, *every, *keep2, *SHARDED)) == 0
    assert read_state_dict(run / "model").keys() == final.keys()
    assert all(torch.equal(read_state_dict(run / "model")[k], final[k]) for k in final)


def test_async_needs_the_sharded_form() -> None:
    assert load_config("tiny").train.checkpoint_format == "whole"
    config = load_config("tiny", ["train.checkpoint_format=sharded", "train.checkpoint_async=true"])
    assert config.train.checkpoint_async
    with pytest.raises(ConfigError, match=r"train\.checkpoint_async must be false unless "):
        load_config("tiny", ["train.checkpoint_async=true"])
    with pytest.raises(ConfigError, match=r"train\.checkpoint_format"):
        load_config("tiny", ["train.checkpoint_format=shards"])
