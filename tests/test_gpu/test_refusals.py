"""No silent CPU fallback: asking for CUDA (or FAISS GPU) where there is none is an error that
says so, in the trainer, embed, eval and index build. Checked here directly when this machine
has no GPU, and on a GPU machine in a child process with the GPU hidden (CUDA_VISIBLE_DEVICES
empty), so the check runs on both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def check_refusals() -> list[str]:
    """Each "cuda without CUDA" request fails with its message; returns the messages."""
    import faiss

    from clipforge.eval.retrieval import RetrievalConfig, distributed_ranks
    from clipforge.index.build import resolve_use_gpu
    from clipforge.index.embed import EmbedError, resolve_device
    from clipforge.pretrain.distributed import DistInfo, init_distributed

    assert not torch.cuda.is_available()
    messages = []
    with pytest.raises(RuntimeError, match=r"train\.device=cuda but no CUDA device") as e:
        init_distributed("cuda")
    messages.append(str(e.value))
    with pytest.raises(EmbedError, match="--device cuda was asked but no CUDA device") as e:
        resolve_device("cuda")
    messages.append(str(e.value))
    with pytest.raises(ValueError, match="device cuda requested but no GPU is visible") as e:
        x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        info = DistInfo(0, 1, 0, torch.device("cpu"), None)
        ids = torch.arange(4)
        distributed_ranks(x, x, ids, ids, info, RetrievalConfig(device="cuda"))
    messages.append(str(e.value))
    if faiss.get_num_gpus() == 0:
        with pytest.raises(RuntimeError, match="refusing to fall back to CPU silently") as e:
            resolve_use_gpu(True)
        messages.append(str(e.value))
    assert resolve_device("auto") == "cpu" and resolve_use_gpu(None) is False
    return messages


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: see the gpu test")
def test_cuda_requests_without_a_gpu_are_refused() -> None:
    assert len(check_refusals()) >= 3


@pytest.mark.gpu
def test_cuda_requests_with_the_gpu_hidden_are_refused() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    code = "from tests.test_gpu.test_refusals import check_refusals; print(len(check_refusals()))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip().splitlines()[-1]) >= 3
