"""``python -m benchmarks.embed_throughput``: clipforge embed vs a plain open_clip loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.embed_throughput import build_parser, main

from .helptext import check_every_option_has_help_with_its_default


def test_prints_both_figures_and_the_ratio(
    demo: Path, trained_demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = tmp_path / "bench.json"
    shards = str(demo / "emoji-{000000..000001}.tar")
    argv = ["--model", str(trained_demo_run), "--data", shards, "--batch-size", "64",
            "--workers", "1", "--repeats", "1", "--json", str(figures)]  # fmt: skip
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    print(out)
    assert "clipforge embed" in out and "plain open_clip" in out and "ratio" in out
    result = json.loads(figures.read_text())
    assert result["samples"] == 480
    for key in ("clipforge_samples_per_s", "plain_samples_per_s", "clipforge_samples_per_cpu_s",
                "plain_samples_per_cpu_s", "ratio"):  # fmt: skip
        assert result[key] > 0, key
    assert result["max_abs_diff"] < 1e-3  # same pixels, same model: the same embeddings


def test_every_option_has_help_that_shows_its_default() -> None:
    check_every_option_has_help_with_its_default(build_parser())
