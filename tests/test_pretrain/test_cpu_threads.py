"""How many compute threads a CPU-training rank takes: its share of the cores less its loader
workers; OMP_NUM_THREADS or train.cpu_threads override."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from clipforge.pretrain.config import ConfigError, load_config
from clipforge.pretrain.cpu_threads import compute_threads, local_world_size, set_compute_threads
from clipforge.pretrain.train import train


def test_the_share_of_cores_less_the_loader_workers() -> None:
    assert compute_threads(0, workers=1, cores=2, local_world=1, env={}).threads == 1
    assert compute_threads(0, workers=2, cores=16, local_world=1, env={}).threads == 14
    # 4 ranks on 16 cores, 2 workers each: 4 cores a rank, 2 of them for compute
    choice = compute_threads(0, workers=2, cores=16, local_world=4, env={})
    assert choice.threads == 2 and "4 ranks" in choice.reason
    # never below one thread, whatever is left
    assert compute_threads(0, workers=8, cores=2, local_world=2, env={}).threads == 1
    assert compute_threads(0, workers=0, cores=8, local_world=1, env={}).threads == 8


def test_explicit_settings_win() -> None:
    omp = compute_threads(0, workers=1, cores=16, local_world=1, env={"OMP_NUM_THREADS": "3"})
    assert (omp.threads, omp.reason) == (3, "OMP_NUM_THREADS=3")
    asked = compute_threads(5, workers=1, cores=2, local_world=1, env={"OMP_NUM_THREADS": "1"})
    assert (asked.threads, asked.reason) == (5, "train.cpu_threads=5")
    # an empty or junk OMP_NUM_THREADS is not a choice
    assert compute_threads(0, 1, 4, 1, {"OMP_NUM_THREADS": ""}).threads == 3
    assert compute_threads(0, 1, 4, 1, {"OMP_NUM_THREADS": "x"}).threads == 3


def test_local_world_size_from_torchrun_or_slurm() -> None:
    assert local_world_size({}) == 1
    assert local_world_size({"LOCAL_WORLD_SIZE": "8"}) == 8
    assert local_world_size({"SLURM_NTASKS_PER_NODE": "4(x2)"}) == 4
    assert local_world_size({"LOCAL_WORLD_SIZE": "0", "SLURM_NTASKS_PER_NODE": "2"}) == 2


def test_set_compute_threads_sets_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert set_compute_threads(1, workers=0).threads == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_negative_cpu_threads_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train\.cpu_threads"):
        load_config("tiny", ["train.cpu_threads=-1"])


def test_training_computes_with_the_chosen_threads_and_puts_them_back(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    during: list[int] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        during.append(torch.get_num_threads())
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    overrides = [f"data.train={demo}", f"train.run_dir={tmp_path / 'run'}", "train.steps=2",
                 "train.device=cpu", "train.cpu_threads=3", "data.batch_size=8"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="clipforge.pretrain.cpu_threads"):
        train(load_config("tiny", overrides))
    assert during == [3, 3]
    assert "computing with 3 CPU thread(s): train.cpu_threads=3" in caplog.text
    assert torch.get_num_threads() == before
