"""benchmarks/gpu_check.py --dry-run on the CPU (tiny sizes, CUDA parts reported as skipped), so
the one-call GPU check is exercised by the suite and cannot rot before a GPU comes. Not marked
``gpu``. The shell wrapper's install step is not run here (CLIPFORGE_GPU_CHECK_SKIP_INSTALL=1 is
how benchmarks/gpu_check.sh itself is told to skip it)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.gpu_check import STAGE_NAMES, main


def test_dry_run_writes_every_stage(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpu_check.json"
    argv = ["--dry-run", "--out", str(out), "--work-dir", str(tmp_path / "work")]
    assert main([*argv, "--skip", "pytest_cpu_subset"]) == 0
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and r["format"] == "clipforge.gpu_check/v1"
    st = r["stages"]
    assert set(STAGE_NAMES) <= set(st)
    failed = {k: v.get("error") for k, v in st.items() if v["status"] not in ("ok", "skipped")}
    assert not failed, failed
    assert st["environment"]["device"] == "cpu"
    # pytest -m gpu ran and, without CUDA, skipped every gpu test with the reason
    gpu = st["pytest_gpu"]
    assert gpu["returncode"] == 0 and gpu["skipped"] >= 8 and gpu["failures"] == 0
    assert all("needs" in why for why in gpu["skipped_tests"].values())
    rows = st["train_synthetic"]["rows"]
    assert {row["tool"] for row in rows} == {"clipforge", "open_clip"}
    for row in rows:
        assert row["samples_per_s"] > 0 and row["flops_per_sample"] > 0, row
    by_tool = {row["tool"]: row for row in rows}
    # the pooled-only forward does less work than open_clip's forward on the same batch
    assert by_tool["clipforge"]["flops_per_sample"] < by_tool["open_clip"]["flops_per_sample"]
    (e2e,) = st["train_e2e"]["rows"]
    assert e2e["samples_per_s_per_gpu"] > 0 and 0 <= e2e["data_wait_frac"] <= 1
    assert e2e["tflops"] is not None and e2e["mfu"] is None  # no peak for a CPU
    emb = st["embed_eval"]
    assert emb["embed"]["samples"] == 192 and emb["similarity"]["queries"] == 192
    assert 0 <= emb["similarity"]["R@1"] <= emb["similarity"]["R@10"] <= 1
    assert st["faiss"]["cpu"]["returncode"] == 0
    assert st["train_compile"]["status"] == "skipped" and "dry run" in st["train_compile"]["reason"]
    assert st["pytest_cpu_subset"]["reason"] == "--skip"
    assert "DRY RUN" in r["summary"] and "clipforge-tiny" in r["summary"]
    assert r["summary"] in capsys.readouterr().out
