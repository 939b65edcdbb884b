"""Training-time evaluation configured in the run config (``train.eval``): two named sets
evaluated through pretrain's own main, their figures logged as ``eval/<name>/...``, the sets
saved in config.yaml and changeable on resume, and ``clipforge-eval plot RUN`` drawing the loss
and both sets' Recall@K."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clipforge.eval.cli import main as eval_main
from clipforge.eval.report import read_metrics_jsonl, training_curves
from clipforge.pretrain.cli import main as pretrain_main


def _run_args(demo: Path, run: Path, steps: int) -> list[str]:
    return [
        "--config", "tiny", "--set", f"data.train={demo}", "--set", f"train.run_dir={run}",
        "--set", f"train.steps={steps}", "--set", "data.batch_size=16",
        "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
        "--set", "train.progress=lines",
        "--set", "train.eval_callback=retrieval", "--set", "train.eval_every=2",
    ]  # fmt: skip


def _two_sets(demo: Path) -> list[str]:
    return [
        "--set", f"train.eval.full.data={demo}", "--set", "train.eval.full.limit=48",
        "--set", "train.eval.full.batch_size=48",
        "--set", f"train.eval.pair.data={demo}/emoji-{{000006..000007}}.tar",
        "--set", "train.eval.pair.k=2,1", "--set", "train.eval.pair.limit=32",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_set_run(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of 4 steps evaluating two named sets every 2 steps."""
    run = tmp_path_factory.mktemp("two-sets") / "run"
    assert pretrain_main([*_run_args(demo, run, 4), *_two_sets(demo)]) == 0
    return run


def test_each_set_is_logged_under_its_name(two_set_run: Path, demo: Path) -> None:
    records = read_metrics_jsonl(two_set_run)
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        # each set with its own K values: full has the default 1,5,10; pair has 1,2
        for d in ("t2i", "i2t"):
            assert {k for k in r if k.startswith(f"eval/full/{d}_R@")} == {
                f"eval/full/{d}_R@{k}" for k in (1, 5, 10)
            }
            assert {k for k in r if k.startswith(f"eval/pair/{d}_R@")} == {
                f"eval/pair/{d}_R@{k}" for k in (1, 2)
            }
        # each set's limit is its own: a rank is at most the number of evaluated images
        assert 1.0 <= r["eval/full/t2i_median_rank"] <= 48
        assert 1.0 <= r["eval/pair/i2t_mean_rank"] <= 32
        assert 0.0 <= r["eval/pair/t2i_R@1"] <= r["eval/pair/t2i_R@2"] <= 1.0
        assert not any(k.startswith("eval/t2i") for k in r)  # no unnamed keys beside
    saved = yaml.safe_load((two_set_run / "config.yaml").read_text())
    assert saved["train"]["eval"] == [
        {"name": "full", "data": str(demo), "k": [1, 5, 10], "limit": 48, "batch_size": 48,
         "image_id_field": None},
        {"name": "pair", "data": f"{demo}/emoji-{{000006..000007}}.tar", "k": [1, 2],
         "limit": 32, "batch_size": 256, "image_id_field": None},
    ]  # fmt: skip


def test_the_plot_draws_the_loss_and_both_sets(two_set_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    assert eval_main(["plot", str(two_set_run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    from clipforge.eval.report import training_figure

    curves = training_curves(read_metrics_jsonl(two_set_run))
    fig = training_figure(curves)
    labels = {line.get_label() for line in fig.axes[1].lines}
    assert {"full t2i R@10", "full i2t R@1", "pair t2i R@2", "pair i2t R@1"} <= labels
    assert len(fig.axes[0].lines) == 1 and len(fig.axes[0].lines[0].get_xdata()) == 4
    # --k draws only those K values, and a K that was never logged is a clear error
    assert eval_main(["plot", str(two_set_run), "--out", str(png), "--k", "1"]) == 0
    assert eval_main(["plot", str(two_set_run), "--out", str(tmp_path / "x.png"), "--k", "7"]) == 2
    assert not (tmp_path / "x.png").exists()


def test_training_curves_is_a_pure_reading_of_the_records() -> None:
    records = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.5},
        {"step": 2, "eval/val/t2i_R@1": 0.1, "eval/val/t2i_R@10": 0.5, "eval/val/i2t_R@5": 0.3,
         "eval/val/t2i_mean_rank": 9.0, "eval/test/i2t_R@1": 0.2, "eval/t2i_R@1": 0.05},
        {"step": 4, "eval/val/t2i_R@10": 0.7, "eval/test/i2t_R@1": None},
        {"loss": 1.0},  # no step: skipped
    ]  # fmt: skip
    curves = training_curves(records)
    assert curves.loss == ((1, 3.0), (2, 2.5))
    assert curves.recall == {
        "val": {
            "t2i_R@1": ((2, 0.1),),
            "t2i_R@10": ((2, 0.5), (4, 0.7)),
            "i2t_R@5": ((2, 0.3),),
        },
        "test": {"i2t_R@1": ((2, 0.2),)},
        "": {"t2i_R@1": ((2, 0.05),)},  # the unnamed (environment-configured) set's keys
    }
    assert list(curves.recall["val"]) == ["t2i_R@1", "t2i_R@10", "i2t_R@5"]  # K numerically
    only = training_curves(records, ks=[10])
    assert only.recall == {"val": {"t2i_R@10": ((2, 0.5), (4, 0.7))}}


def test_resume_may_change_the_eval_sets(two_set_run: Path, demo: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_set_run, run)
    # 2 more steps with one set dropped and the other's K changed: allowed (evaluation does not
    # change training), recorded in config.yaml, logged from step 6 on
    argv = [
        *_run_args(demo, run, 6),
        "--set", f"train.eval.full.data={demo}", "--set", "train.eval.full.limit=48",
        "--set", "train.eval.full.k=3", "--set", "train.extend_schedule=continue_lr",
    ]  # fmt: skip
    assert pretrain_main(argv) == 0
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 6 and "eval/full/t2i_R@3" in last
    assert not any(k.startswith("eval/pair/") for k in last)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert [(s["name"], s["k"]) for s in saved["train"]["eval"]] == [("full", [3])]


def test_wrong_eval_data_fails_before_training(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    argv = [*_run_args(demo, run, 2), "--set", f"train.eval.val.data={tmp_path}/missing"]
    assert pretrain_main(argv) == 2
    err = capsys.readouterr().err
    assert "train.eval.val.data" in err and "missing" in err
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def test_environment_beside_config_sets_is_refused(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("CLIPFORGE_EVAL_DATA", str(demo))
    argv = [*_run_args(demo, tmp_path / "run", 2), "--set", f"train.eval.val.data={demo}"]
    assert pretrain_main(argv) == 2
    err = capsys.readouterr().err
    assert "CLIPFORGE_EVAL_DATA" in err and "train.eval" in err
