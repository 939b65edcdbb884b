"""The retrieval callback through pretrain's own main: registered as an entry point, configured by
environment (the older way, still working for a run whose ``train.eval`` is empty), logging
``eval/`` figures into metrics.jsonl every ``train.eval_every`` steps. The config-driven sets:
test_train_eval.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipforge.eval.callbacks import callback_config
from clipforge.pretrain.cli import main as pretrain_main
from clipforge.pretrain.config import ConfigError
from clipforge.pretrain.train import resolve_eval_callback


def test_entry_point_is_registered() -> None:
    from clipforge.eval.callbacks import retrieval_callback

    assert resolve_eval_callback("retrieval") is retrieval_callback


def test_config_from_environment_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CLIPFORGE_EVAL_DATA"):
        callback_config({})
    cfg = callback_config({"CLIPFORGE_EVAL_DATA": "d", "CLIPFORGE_EVAL_K": "5,1"})
    assert cfg.data == "d" and cfg.k == (1, 5) and cfg.limit is None
    f = tmp_path / "eval.yaml"
    f.write_text("data: shards/\nk: [1, 10]\nlimit: 64\n")
    cfg = callback_config({"CLIPFORGE_EVAL_CONFIG": str(f), "CLIPFORGE_EVAL_LIMIT": "32"})
    assert (cfg.data, cfg.k, cfg.limit) == ("shards/", (1, 10), 32)  # variables win
    f.write_text("data: x\nbogus: 1\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        callback_config({"CLIPFORGE_EVAL_CONFIG": str(f)})
    with pytest.raises(ConfigError, match="K values"):
        callback_config({"CLIPFORGE_EVAL_DATA": "d", "CLIPFORGE_EVAL_K": "x"})


def test_training_logs_eval_metrics(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPFORGE_EVAL_DATA", str(demo))
    monkeypatch.setenv("CLIPFORGE_EVAL_LIMIT", "48")  # per rank: a quick figure
    monkeypatch.setenv("CLIPFORGE_EVAL_BATCH_SIZE", "48")
    run = tmp_path / "run"
    argv = [
        "--config", "tiny", "--set", f"data.train={demo}", "--set", f"train.run_dir={run}",
        "--set", "train.steps=4", "--set", "data.batch_size=16", "--set", "train.log_every=2",
        "--set", "train.eval_callback=retrieval", "--set", "train.eval_every=2",
        "--set", "train.progress=lines",
    ]  # fmt: skip
    assert pretrain_main(argv) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/t2i_R@1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        for key in ("eval/t2i_R@1", "eval/t2i_R@10", "eval/i2t_R@5", "eval/t2i_mean_rank"):
            assert key in r
        assert 0.0 <= r["eval/t2i_R@10"] <= 1.0
        assert 1.0 <= r["eval/i2t_median_rank"] <= 48


def test_missing_eval_data_is_a_clean_pretrain_error(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("CLIPFORGE_EVAL_DATA", raising=False)
    monkeypatch.delenv("CLIPFORGE_EVAL_CONFIG", raising=False)
    argv = [
        "--config", "tiny", "--set", f"data.train={demo}", "--set", f"train.run_dir={tmp_path}/r",
        "--set", "train.steps=1", "--set", "data.batch_size=8", "--set", "train.progress=lines",
        "--set", "train.eval_callback=retrieval", "--set", "train.eval_every=1",
    ]  # fmt: skip
    assert pretrain_main(argv) == 2
    err = capsys.readouterr().err
    assert "CLIPFORGE_EVAL_DATA" in err and "train.eval.NAME.data" in err
