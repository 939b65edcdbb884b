"""Tests marked ``gpu`` need a CUDA device: without one they are skipped, with the reason (never
faked); ``benchmarks/gpu_check.sh`` runs them on a GPU machine (``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
