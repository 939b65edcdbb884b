"""Fixtures shared by every subsystem's tests: the demo shards and one trained demo model."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipforge.data_tools.demo import write_demo_shards


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded emoji demo dataset written as shards (1,911 samples, 8 shards)."""
    out = tmp_path_factory.mktemp("demo")
    write_demo_shards(out)
    return out


# The recipe of tests/test_pretrain/test_learns.py: ~50 s on 2 CPU cores, text->image R@10 ~0.96
# on the demo set (chance 0.005). Every subsystem that needs "a model that has learned" uses it.
TRAINED_DEMO_ARGS = (
    "--config", "tiny", "--set", "train.steps=400", "--set", "data.batch_size=128",
    "--set", "optim.lr=2e-3", "--set", "train.log_every=20",
    "--set", "train.checkpoint_every=400", "--set", "train.progress=lines",
)  # fmt: skip


@pytest.fixture(scope="session")
def trained_demo_run(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of the tiny model trained on the demo shards (model/ exported)."""
    from clipforge.pretrain.cli import main

    run = tmp_path_factory.mktemp("trained") / "run"
    argv = [*TRAINED_DEMO_ARGS, "--set", f"data.train={demo}", "--set", f"train.run_dir={run}"]
    assert main(argv) == 0
    return run


@pytest.fixture(scope="session")
def onnx_export_dir(
    trained_demo_run: Path, demo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``clipforge-export onnx --int8-text`` of the trained demo model (parity on 64 demo rows)."""
    pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")
    from clipforge.pretrain.export_cli import main

    out = tmp_path_factory.mktemp("onnx") / "export"
    argv = ["onnx", "--model", str(trained_demo_run), "--out", str(out), "--int8-text"]
    assert main([*argv, "--parity-data", str(demo), "--parity-rows", "64"]) == 0
    return out


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs for real disk-full tests (needs root and mount; skipped elsewhere)."""
    mnt = tmp_path / f"tiny-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a 1 MB tmpfs needs root and mount")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        gc.collect()  # a failed writer's file object may still hold the mount busy
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mnt)], check=False)
