"""Fixtures of the embed/search/CLI tests: the demo embeddings of the shared trained model, and
a flat index of them.

Built once per session (on top of tests/conftest.py's ``trained_demo_run``) and shared,
read-only, by test_embed, test_searcher and test_cli, so training and embedding are paid once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from clipforge.index.cli import main as index_main
from clipforge.pretrain.models import LoadedModel, export_open_clip, load_model

EMBED_BATCH = 64  # tests that compare with the shared embeddings embed with the same batch size


@pytest.fixture(scope="session")
def trained_run(trained_demo_run: Path) -> Path:
    """The tiny model trained on the demo shards (run directory with model/)."""
    return trained_demo_run


@pytest.fixture(scope="session")
def trained_model(trained_run: Path) -> LoadedModel:
    return load_model(trained_run)


@pytest.fixture(scope="session")
def other_model_dir(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture with one weight changed: another model (another weights hash)."""
    loaded = load_model(trained_run)
    with torch.no_grad():
        loaded.model.logit_scale.add_(0.5)
    cfg = json.loads((trained_run / "model" / "open_clip_config.json").read_text())
    out = tmp_path_factory.mktemp("other-model") / "model"
    export_open_clip(loaded.model, cfg["model_cfg"], out, cfg.get("preprocess_cfg"))
    return out


@pytest.fixture(scope="session")
def demo_emb(demo: Path, trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo shards embedded by the trained model through the CLI (float16, 8 parts)."""
    out = tmp_path_factory.mktemp("demo-emb") / "emb"
    t0 = time.perf_counter()
    argv = [
        "embed", "--model", str(trained_run), "--data", str(demo), "--out", str(out),
        "--batch-size", str(EMBED_BATCH), "--workers", "1", "--progress", "none",
    ]  # fmt: skip
    assert index_main(argv) == 0
    print(f"[index fixtures] embedded the demo shards in {time.perf_counter() - t0:.1f} s")
    return out


@pytest.fixture(scope="session")
def demo_index(demo_emb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat (exact) index of the demo embeddings, built through the CLI."""
    out = tmp_path_factory.mktemp("demo-index") / "index"
    argv = ["build", "--embeddings", str(demo_emb), "--out", str(out), "--kind", "flat"]
    assert index_main(argv) == 0
    return out
