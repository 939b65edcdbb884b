"""Fixtures shared by every subsystem's tests: the demo shards and one trained demo model."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipforge.data_tools.demo import write_demo_shards


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded emoji demo dataset written as shards (1,911 samples, 8 shards)."""
    out = tmp_path_factory.mktemp("demo")
    write_demo_shards(out)
    return out
