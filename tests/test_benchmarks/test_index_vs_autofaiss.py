"""``python -m benchmarks.index_vs_autofaiss``: the peer's python is asked for, never assumed;
clipforge's half runs on its own; the peer is run from the repository root and scored here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import index_vs_autofaiss as bench
from clipforge.index.tune import recall_at_k

from .helptext import check_every_option_has_help_with_its_default

QUICK = ["--n", "3000", "--memory-budget", "64M"]


def test_without_a_peer_python_it_says_how_to_give_one_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(bench.PEER_ENV, raising=False)
    work = tmp_path / "work"
    assert bench.main([*QUICK, "--work-dir", str(work)]) == 2
    err = capsys.readouterr().err
    assert "--peer-python" in err and bench.PEER_ENV in err and "--skip-peer" in err, err
    assert not work.exists()  # checked before clipforge's half generated or built anything
    monkeypatch.setenv(bench.PEER_ENV, str(tmp_path / "no-such-python"))
    assert bench.main([*QUICK, "--work-dir", str(work)]) == 2
    assert "no-such-python" in capsys.readouterr().err and not work.exists()


def test_skip_peer_runs_clipforge_alone_and_scores_it_with_the_one_recall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(bench.PEER_ENV, raising=False)
    figures = tmp_path / "figures.json"
    argv = [*QUICK, "--work-dir", str(tmp_path / "work"), "--skip-peer", "--json", str(figures)]
    assert bench.main(argv) == 0
    report = json.loads(figures.read_text())
    assert list(report["results"]) == ["clipforge"]
    r = report["results"]["clipforge"]
    assert r["factory"] == "Flat"  # 3,000 vectors: auto picks exact search
    assert r["recall_at_10"] == pytest.approx(1.0, abs=1e-3)
    assert r["batched_qps"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert "recall@10" in report["table"]


def test_score_is_clipforge_recall() -> None:
    truth = np.arange(20).reshape(2, 10)
    found = truth.copy()
    found[0, 5:] = -1  # half of query 0's neighbours missing
    got = bench.score(found, truth)
    assert got["recall_at_10"] == recall_at_k(found, truth, 10) == 0.75
    assert got["recall_1_at_10"] == 1.0


def test_the_peer_runs_from_the_repository_root_in_its_own_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """clipforge's python as a stand-in peer: it lacks autofaiss, so the peer fails there,
    after ``-m benchmarks.peer_autofaiss`` was found (from the repository root) and started."""
    monkeypatch.setenv(bench.PEER_ENV, sys.executable)
    figures = tmp_path / "figures.json"
    argv = [*QUICK, "--work-dir", str(tmp_path / "work"), "--json", str(figures)]
    assert bench.main(argv) == 1  # the peer failed; clipforge's half still ran and is reported
    results = json.loads(figures.read_text())["results"]
    assert "error" not in results["clipforge"]
    assert "No module named 'autofaiss'" in results["autofaiss"]["error"]


def test_every_option_has_help_that_shows_its_default() -> None:
    check_every_option_has_help_with_its_default(bench.build_parser())


def test_a_reused_peer_run_must_match_the_budget_and_is_scored_here(tmp_path: Path) -> None:
    cfg = bench.IndexBenchConfig(
        n=3000, n_queries=40, n_tune_queries=40, work_dir=str(tmp_path), memory_budget="170M",
        peer_result=str(tmp_path / "peer"),
    )  # fmt: skip
    paths = bench.prepare_data(cfg, log=lambda _: None)
    peer = tmp_path / "peer"
    peer.mkdir()
    truth = np.load(paths["truth"])
    np.save(peer / "found.npy", truth)
    (peer / "result.json").write_text(json.dumps({"factory": "X", "memory": "1G"}))
    with pytest.raises(ValueError, match="budget 1G, not 170M"):
        bench.load_peer_result(cfg, paths, log=lambda _: None)
    (peer / "result.json").write_text(json.dumps({"factory": "X", "memory": "170M"}))
    got = bench.load_peer_result(cfg, paths, log=lambda _: None)
    assert got["recall_at_10"] == 1.0 and got["reused_from"] == str(peer)


def test_a_reused_clipforge_run_must_have_the_same_settings(tmp_path: Path) -> None:
    cfg = bench.IndexBenchConfig(n=3000, memory_budget="170M",
                                 clipforge_result=str(tmp_path / "c.json"))  # fmt: skip
    ran = {"config": {**bench.asdict(cfg), "memory_budget": "1G"},
           "results": {"clipforge": {"factory": "Flat"}}}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(ran))
    with pytest.raises(ValueError, match="memory_budget='1G'"):
        bench.load_clipforge_result(cfg, log=lambda _: None)
    ran["config"]["memory_budget"] = "170M"
    (tmp_path / "c.json").write_text(json.dumps(ran))
    assert bench.load_clipforge_result(cfg, log=lambda _: None)["factory"] == "Flat"
