"""``python -m benchmarks.index_scale`` and the candidate sweep of ``index_vs_autofaiss``, tiny."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import index_candidates, index_scale
from benchmarks import index_vs_autofaiss as bench
from clipforge.index import emb_dir

from .helptext import check_every_option_has_help_with_its_default


def test_sizes_read_and_print_alike() -> None:
    assert index_scale.parse_count("10M") == 10_000_000
    assert index_scale.parse_count("300k") == 300_000
    assert index_scale.label(3_000_000) == "3M" and index_scale.label(2500) == "2.5k"
    with pytest.raises(ValueError, match=r"1\.5x"):
        index_scale.parse_count("1.5x")


def test_growth_exponent_is_the_log_log_slope() -> None:
    ns = [1_000_000, 3_000_000, 10_000_000]
    assert index_scale.growth_exponent(ns, [2.0 * n for n in ns]) == pytest.approx(1.0)
    assert index_scale.growth_exponent(ns, [5.0 * n**0.5 for n in ns]) == pytest.approx(0.5)


def test_generated_parts_are_the_one_stream_of_the_autofaiss_benchmark(tmp_path: Path) -> None:
    """Part files cut at 700 rows hold exactly the rows index_vs_autofaiss draws in one go."""
    cfg = index_scale.ScaleConfig(sizes=(2000,), part_rows=700, n_queries=20, n_tune_queries=20,
                                  work_dir=str(tmp_path))  # fmt: skip
    paths = index_scale.generate(cfg, 2000, log=lambda _: None)
    manifest = emb_dir.read_embeddings_manifest(paths["emb_dir"])
    assert [p["count"] for p in manifest["parts"]] == [700, 700, 600]
    got = np.concatenate([x for _, x in emb_dir.open_vectors(paths["emb_dir"], "image")
                          .iter_chunks(10_000)])  # fmt: skip
    ref = bench.IndexBenchConfig(n=2000, n_queries=20, n_tune_queries=20, work_dir=str(tmp_path))
    ref_paths = bench.prepare_data(ref, log=lambda _: None)
    np.testing.assert_allclose(got, np.load(ref_paths["db"]), atol=1e-6)
    np.testing.assert_array_equal(np.load(paths["truth"]), np.load(ref_paths["truth"]))


def test_one_size_end_to_end_builds_searches_and_reports(tmp_path: Path) -> None:
    argv = ["--sizes", "3000", "--part-rows", "1000", "--queries", "50", "--concurrency", "4",
            "--concurrent-queries", "40", "--work-dir", str(tmp_path)]  # fmt: skip
    assert index_scale.main(argv) == 0
    report = json.loads((tmp_path / "scale.json").read_text())
    r = report["results"]["3000"]
    assert r["factory"] == "Flat"  # 3,000 vectors: exact search
    assert r["recall_at_10"] == pytest.approx(1.0, abs=1e-3)
    assert r["build_peak_rss_bytes"] > 0 and r["search_peak_rss_bytes"] > 0
    assert r["rss_end"]["RssAnon"] > 0 and r["concurrency_4"]["p99_ms"] > 0
    assert "search RSS + index, file" in report["table"]
    # the service, memory-mapped, answered every vector query of its load test
    assert r["service_4"]["p99_ms"] >= r["service_4"]["p50_ms"] > 0
    assert r["service_rss_end"]["VmRSS"] > 0 and "service c=16" in report["table"]
    assert not list(tmp_path.glob("data_*"))  # the generated data is deleted without --keep-data


def test_candidate_sweep_sizes_tunes_and_scores_each(tmp_path: Path) -> None:
    cfg = bench.IndexBenchConfig(n=3000, n_queries=50, n_tune_queries=50, work_dir=str(tmp_path))
    paths = bench.prepare_data(cfg, log=lambda _: None)
    swept = index_candidates.run_candidates(
        paths, 1 << 20, tmp_path / "c",
        ["IVF64,SQ4", "IVF64,PQ16x4fs,Refine(SQ4)", "IVF64,RaBitQ4"],
        target_recall=0.5, log=lambda _: None,
    )  # fmt: skip
    rows = swept["rows"]
    assert [r["factory"] for r in rows] == [
        "IVF64,SQ4",
        *["IVF64,PQ16x4fs,Refine(SQ4)"] * 2,
        "IVF64,RaBitQ4",
    ]
    assert [r["search_params"].get("k_factor_rf") for r in rows] == [None, 4, 16, None]
    for r in rows:
        assert r["size_bytes"] > 0 and r["fits_budget"] == (r["size_bytes"] <= 1 << 20)
        assert 0.3 < r["recall_at_10"] <= 1.0 and r["single_qps"] > 0
    table = index_candidates.format_candidates(swept, 1 << 20)
    assert "IVF64,PQ16x4fs,Refine(SQ4)" in table and "k_factor_rf=16" in table


def test_every_option_has_help_that_shows_its_default() -> None:
    check_every_option_has_help_with_its_default(index_scale.build_parser())


def test_projection_extrapolates_from_the_largest_size() -> None:
    # build time x10 for x10 vectors: linear; 100 B a vector at 10M
    results = {
        1_000_000: {"size_bytes": 1e8, "build_seconds": 60.0, "factory": "A",
                    "build_peak_rss_bytes": 1e9},
        10_000_000: {"size_bytes": 1e9, "build_seconds": 600.0, "factory": "IVF,PQ",
                     "build_peak_rss_bytes": 4e9},
    }  # fmt: skip
    head, p100m, p1b = index_scale.projection(results)
    assert head == "projection from 10M (IVF,PQ, 100 B a vector, build ~N^1.00):"
    # 100M: 10 GB, 600 s x 10 = 1.7 h, or 10 parts of 10M each <= 10 min and 4 GB
    assert p100m == (
        "  100M: index 10.00 GB; one machine ~1.7 h; or 10 parts of 10M on 10 machines: "
        "<= 10 min and 4.00 GB RSS each, then the merge"
    )
    assert p1b.startswith("  1B: index 100.00 GB; one machine ~16.7 h; or 100 parts of 10M")
    # a build that grew slower than linearly is still projected as linear (adding is linear)
    results[10_000_000]["build_seconds"] = 300.0
    assert "build ~N^1.00" in index_scale.projection(results)[0]
