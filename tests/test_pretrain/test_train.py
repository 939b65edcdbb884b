"""The training loop end to end on the emoji demo shards (CPU, tiny model)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipforge.pretrain.checkpoint import list_checkpoints
from clipforge.pretrain.cli import main
from clipforge.pretrain.config import load_config
from clipforge.pretrain.train import TrainingAborted, train


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _args(demo: Path, run: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "tiny",
        "--set",
        f"data.train={demo}",
        "--set",
        f"train.run_dir={run}",
        "--set",
        "train.progress=lines",
        *extra,
    ]


def test_cli_trains_logs_checkpoints_and_exports(demo: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    rc = main(
        _args(
            demo,
            run,
            "--set",
            "train.steps=12",
            "--set",
            "train.log_every=4",
            "--set",
            "train.checkpoint_every=5",
            "--set",
            "train.keep_checkpoints=2",
        )
    )
    assert rc == 0
    records = _metrics(run)
    assert [r["step"] for r in records] == [4, 8, 12]
    last = records[-1]
    assert last["samples_seen"] == 12 * 32
    for key in (
        "loss",
        "lr",
        "temperature",
        "samples_per_s",
        "samples_per_s_per_device",
        "data_wait_frac",
        "skipped_samples",
        "nonfinite_steps",
        "tflops_per_device",
    ):
        assert key in last, key
    assert 0 <= last["data_wait_frac"] <= 1
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [10, 12]  # keep-last-2
    assert (run / "config.yaml").exists()
    assert load_config(str(run / "config.yaml")).train.steps == 12


def test_exported_model_loads_in_open_clip_with_identical_embeddings(
    demo: Path, tmp_path: Path
) -> None:
    import open_clip
    from open_clip.transformer import VisionTransformer

    from clipforge.pretrain.models import load_model

    run = tmp_path / "run"
    assert main(_args(demo, run, "--set", "train.steps=3")) == 0
    ours = load_model(run)
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run / 'model'}")
    theirs.eval()
    images = torch.rand(4, 3, 32, 32)
    tokens = ours.tokenizer(["a red heart", "grinning face", "cat", "flag: Japan"])
    with torch.no_grad():
        # ours computes only what the pooled features depend on (pooled_forward): equal up to
        # float summation order; open_clip's own forward on our weights is bitwise identical
        for mine, reference in (
            (ours.model.encode_image(images), theirs.encode_image(images)),
            (ours.model.encode_text(tokens), theirs.encode_text(tokens)),
        ):
            torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
        assert torch.equal(
            open_clip.CLIP.encode_text(ours.model, tokens), theirs.encode_text(tokens)
        )
        assert torch.equal(
            VisionTransformer.forward(ours.model.visual, images), theirs.encode_image(images)
        )
    # and by config name + weights file, as CLIP_benchmark / clip-retrieval call it
    from clipforge.pretrain.models import register_model_configs

    register_model_configs()
    by_name, _, _ = open_clip.create_model_and_transforms(
        "clipforge-tiny", pretrained=str(run / "model" / "open_clip_pytorch_model.bin")
    )
    by_name.eval()
    with torch.no_grad():
        assert torch.equal(by_name.encode_image(images), theirs.encode_image(images))


def test_nonfinite_steps_are_skipped_then_abort(demo: Path, tmp_path: Path) -> None:
    # lr this large blows the weights up within a few steps; every later step is non-finite
    cfg = load_config(
        "tiny",
        [
            f"data.train={demo}",
            f"train.run_dir={tmp_path / 'run'}",
            "optim.lr=1e30",
            "optim.warmup_steps=0",
            "optim.grad_clip=0",
            "train.max_nonfinite=3",
            "train.steps=40",
            "train.log_every=1",
            "train.progress=lines",
        ],
    )
    with pytest.raises(TrainingAborted, match="3 consecutive steps with a non-finite"):
        train(cfg)
    records = _metrics(tmp_path / "run")
    assert records and records[-1]["nonfinite_steps"] >= 2


def test_preflight_errors_are_clear(demo: Path, tmp_path: Path, capsys) -> None:
    assert main(["--config", "tiny", "--set", f"train.run_dir={tmp_path}/r"]) == 2
    assert "data.train is empty" in capsys.readouterr().err
    assert main(_args(tmp_path / "nothing-here", tmp_path / "r")) == 2
    assert "nothing-here" in capsys.readouterr().err
    assert (
        main(
            _args(demo, tmp_path / "r", "--set", "data.resampled=false", "--set", "data.workers=9")
        )
        == 2
    )
    assert "9 worker(s)" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(_args(demo, blocker / "run")) == 2
    assert "not writable" in capsys.readouterr().err


def _train_cmd(demo: Path, run: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clipforge.pretrain",
        *_args(
            demo,
            run,
            "--set",
            "train.steps=24",
            "--set",
            "train.log_every=1",
            "--set",
            "train.checkpoint_every=6",
            "--set",
            "data.resampled=false",
            "--set",
            "data.workers=2",
            "--set",
            "data.shuffle_buffer=64",
        ),
    ]


def test_sigkill_and_resume_reproduce_the_uninterrupted_losses(demo: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(demo, straight), env=env, check=True, capture_output=True)
    expected = {r["step"]: r["loss"] for r in _metrics(straight)}

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(demo, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # kill somewhere after the second checkpoint
        if (killed / "metrics.jsonl").exists() and len(_metrics(killed)) >= 14:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = len(_metrics(killed))
    assert 14 <= steps_done < 24, "the run was not killed mid-way"
    subprocess.run(_train_cmd(demo, killed), env=env, check=True, capture_output=True)
    resumed = {r["step"]: r["loss"] for r in _metrics(killed)}
    assert sorted(resumed) == list(range(1, 25))
    for step in range(1, 25):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compiled_model_trains_like_eager(demo: Path, tmp_path: Path) -> None:
    runs = {}
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        run = tmp_path / name
        args = _args(
            demo,
            run,
            "--set",
            "train.steps=3",
            "--set",
            "train.log_every=1",
            "--set",
            f"model.compile={compiled}",
        )
        assert main(args) == 0
        runs[name] = [r["loss"] for r in _metrics(run)]
    assert len(runs["compiled"]) == 3
    # the same steps on the same data; compiled kernels round differently
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)
