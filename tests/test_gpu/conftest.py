"""Tests marked ``gpu`` need a CUDA device: without one they are skipped, with the reason (never
faked); ``benchmarks/gpu_check.sh`` runs them on a GPU machine (``pytest -m gpu``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipforge.pretrain.config import ModelConfig
from clipforge.pretrain.models import build_model, export_open_clip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported, seeded, untrained clipforge-tiny model (CPU and GPU load the same weights)."""
    torch.manual_seed(0)
    model, cfg = build_model(ModelConfig(name="clipforge-tiny"))
    return export_open_clip(model, cfg, tmp_path_factory.mktemp("tiny") / "model")
