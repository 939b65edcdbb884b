"""Cost growth of ``clipforge-index build`` and search with N: 1M, 3M, 10M clustered vectors.

For each size N (``--sizes 1M,3M,10M``) this:

1. generates the clustered data of :mod:`benchmarks.index_vs_autofaiss` (same seed and recipe,
   so its 1M is that benchmark's 1M) straight into an EMB_DIR on disk, one ``--part-rows`` part
   file at a time (never the collection in RAM; at 10M x 256 float32 that is 10 GB), then 1,000
   evaluation queries and 1,000 held-out tuning queries, and the exact inner-product top 10 of
   the evaluation queries, computed chunk by chunk over the memory-mapped parts;
2. runs ``clipforge-index build`` in a child process under ``--memory-budget`` (2 GB forces
   IVF-PQ at 10M) and records its wall time and peak RSS (``wait4``'s ``ru_maxrss``);
3. searches the built index in another child process opened memory-mapped
   (``Searcher.open(..., mmap=True)``: FAISS ``IO_FLAG_MMAP`` maps the inverted lists instead of
   reading them), and records recall@10 against the exact top 10, batched and single-query QPS
   and p50/p99 (:func:`benchmarks.index_timing.time_index`), the latency of ``Searcher``
   searches at concurrency 16 and 32 (threads), and the child's memory from
   ``/proc/self/status``: peak RSS (VmHWM), and at the end RSS split into anonymous memory
   (what the process allocated) and file pages (mapped index pages the searches touched, which
   the kernel can drop at will).

It prints one table and how each figure grows from the smallest to the largest size, and writes
the figures to ``WORK_DIR/scale.json``. The generated data is deleted at the end unless
``--keep-data``. Run from the repository root::

    python -m benchmarks.index_scale --sizes 1M,3M,10M --dim 256 --memory-budget 2GB
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.data_tools.atomic import atomic_output, write_json_atomic
from clipforge.index import emb_dir, tune

from .index_vs_autofaiss import iter_draw

SIZE_SUFFIX = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}


@dataclass(frozen=True)
class ScaleConfig:
    """Settings of one cost-growth run (the defaults are the published setting)."""

    sizes: tuple[int, ...] = (1_000_000, 3_000_000, 10_000_000)
    """Collection sizes, smallest first."""
    dim: int = 256
    """Vector dimension."""
    n_centres: int = 1000
    """Cluster centres of the generator."""
    noise: float = 0.75
    """Expected noise norm of the generator (per-dimension std = noise / sqrt(dim))."""
    seed: int = 1234
    """numpy default_rng seed (the same data as benchmarks.index_vs_autofaiss at 1M)."""
    n_queries: int = 1000
    """Evaluation queries (exact top 10 computed for each)."""
    n_tune_queries: int = 1000
    """Held-out queries the build tunes nprobe with."""
    part_rows: int = 1_000_000
    """Rows per EMB_DIR part file (each generated and written on its own)."""
    memory_budget: str = "2GB"
    """``clipforge-index build --memory-budget`` for every size."""
    target_recall: float = 0.95
    """``clipforge-index build --target-recall``."""
    concurrency: tuple[int, ...] = (16, 32)
    """Threads searching one ``Searcher`` at once (one query per call)."""
    concurrent_queries: int = 2000
    """Searches in all per concurrency level."""
    work_dir: str = "/tmp/clipforge_index_scale"
    """Generated data and built indexes."""
    keep_data: bool = False
    """Keep the generated EMB_DIRs and indexes (default: delete them at the end)."""


def parse_count(text: str) -> int:
    """``"10M"`` -> 10_000_000, ``"300k"`` -> 300_000, ``"2500"`` -> 2500."""
    t = text.strip().lower()
    mult = SIZE_SUFFIX.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in SIZE_SUFFIX else t
    try:
        value = float(num) * mult
    except ValueError:
        raise ValueError(f"cannot read the size {text!r}; use e.g. 1M, 300k, 2500") from None
    if value < 1 or value != int(value):
        raise ValueError(f"size {text!r} must be a positive whole number of vectors")
    return int(value)


def label(n: int) -> str:
    """10_000_000 -> "10M", 300_000 -> "300k"."""
    for suffix, mult in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= mult and n % (mult // 10) == 0:
            return f"{n / mult:g}{suffix}"
    return str(n)


# --------------------------------------------------------------------------------------------
# data


def generate(cfg: ScaleConfig, n: int, log: Any = print) -> dict[str, Path]:
    """The EMB_DIR of ``n`` clustered vectors, queries, tuning queries and exact truth.

    Written part by part (each part file is a memory map filled from the generator, then
    renamed); reused when ``done.json`` is there.
    """
    d = Path(cfg.work_dir) / f"data_{label(n)}_d{cfg.dim}_s{cfg.seed}"
    paths = {
        "emb_dir": d / "emb",
        "queries": d / "queries.npy",
        "tune_queries": d / "tune_queries.npy",
        "truth": d / "truth.npy",
    }
    if (d / "done.json").is_file():
        log(f"data {label(n)}: reusing {d}")
        return paths
    t0 = time.perf_counter()
    emb = paths["emb_dir"]
    for sub in ("img_emb", "metadata"):
        (emb / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    centres = rng.standard_normal((cfg.n_centres, cfg.dim))  # (C, D)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    parts = []
    chunks = iter_draw(rng, n, centres, cfg.noise, chunk=100_000)
    buffered: np.ndarray | None = None  # rows of the last chunk that belong to the next part
    for p, first in enumerate(range(0, n, cfg.part_rows)):
        count = min(cfg.part_rows, n - first)
        path = emb / "img_emb" / f"img_emb_{p}.npy"
        with atomic_output(path) as tmp:
            arr = np.lib.format.open_memmap(tmp, "w+", np.float32, (count, cfg.dim))
            filled = 0
            while filled < count:
                x = buffered if buffered is not None else next(chunks)  # (<= 100k, D)
                take = min(len(x), count - filled)
                arr[filled : filled + take] = x[:take]
                buffered = x[take:] if take < len(x) else None
                filled += take
            arr.flush()
            del arr
        keys = pa.array([f"{i:010d}" for i in range(first, first + count)], pa.string())
        table = pa.table({"key": keys, "caption": pa.nulls(count, pa.string())})
        with atomic_output(emb / "metadata" / f"metadata_{p}.parquet") as tmp:
            pq.write_table(table, tmp)
        parts.append({"part": p, "count": count})
    queries = np.concatenate(list(iter_draw(rng, cfg.n_queries, centres, cfg.noise)))
    tune_q = np.concatenate(list(iter_draw(rng, cfg.n_tune_queries, centres, cfg.noise)))
    for key, arr in (("queries", queries), ("tune_queries", tune_q)):
        with atomic_output(paths[key]) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    write_json_atomic(
        emb / emb_dir.EMBEDDINGS_MANIFEST,
        {
            "format": emb_dir.EMBEDDINGS_FORMAT,
            "model_hash": "synthetic-clustered",
            "model_source": "benchmarks.index_scale clustered data",
            "dim": cfg.dim,
            "dtype": "float32",
            "modalities": ["image"],
            "count": n,
            "parts": parts,
        },
    )
    gen_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    # exact top 10, one 65,536-row chunk of the memory-mapped parts at a time
    _, truth = tune.exact_knn(emb_dir.open_vectors(emb, "image"), queries, 10)
    with atomic_output(paths["truth"]) as tmp, open(tmp, "wb") as f:
        np.save(f, truth)
    write_json_atomic(
        d / "done.json", {"generate_seconds": gen_s, "exact_seconds": time.perf_counter() - t1}
    )
    log(f"data {label(n)}: generated in {gen_s:.0f} s, exact top-10 in "
        f"{time.perf_counter() - t1:.0f} s ({d})")  # fmt: skip
    return paths


# --------------------------------------------------------------------------------------------
# child processes


def run_measured(cmd: list[str], log: Any = print) -> dict[str, Any]:
    """Run ``cmd``; its wall seconds, peak RSS (``wait4`` ru_maxrss) and output tail."""
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        log("  | " + line.rstrip())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed (exit {proc.returncode}):\n" + "\n".join(lines[-30:]))
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "output": lines[-20:]}


def build(cfg: ScaleConfig, n: int, paths: dict[str, Path], log: Any = print) -> dict[str, Any]:
    """``clipforge-index build`` of the size-``n`` EMB_DIR in a child process, measured."""
    out = Path(cfg.work_dir) / f"index_{label(n)}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "clipforge.index", "build",
        "--embeddings", str(paths["emb_dir"]), "--out", str(out),
        "--memory-budget", cfg.memory_budget, "--target-recall", str(cfg.target_recall),
        "--tune-queries", f"image={paths['tune_queries']}", "--cpu",
    ]  # fmt: skip
    measured = run_measured(cmd, log)
    manifest = json.loads((out / "index.json").read_text())
    info = manifest["modalities"]["image"]
    return {
        "index_dir": str(out),
        "build_seconds": measured["seconds"],
        "build_peak_rss_bytes": measured["peak_rss_bytes"],
        "factory": info["factory"],
        "search_params": info["search_params"],
        "size_bytes": info["size_bytes"],
        "tuning_recall_at_10": info["measured_recall_at_10"],
    }


def _proc_status() -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process, bytes (Linux ``/proc``)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def concurrent_latency(
    search: Any, queries: np.ndarray, threads: int, total: int
) -> dict[str, float]:
    """p50/p99 ms and searches/s of ``total`` one-query ``search(q)`` calls on ``threads``."""
    lat = np.empty(total)
    counter = iter(range(total))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            search(queries[i % len(queries)])
            lat[i] = time.perf_counter() - t0

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "searches_per_s": total / wall,
    }


def search_child(index_dir: str, queries: str, truth: str, out: str, cfg_json: str) -> int:
    """The search process: open memory-mapped, measure, write the figures to ``out``."""
    import faiss

    from clipforge.index.searcher import Searcher

    from .index_timing import time_index

    cfg = json.loads(cfg_json)
    before = _proc_status()
    t0 = time.perf_counter()
    searcher = Searcher.open(index_dir, mmap=True)
    open_s = time.perf_counter() - t0
    q = np.load(queries)  # (nq, D)
    after_open = _proc_status()
    found, speed = time_index(searcher.faiss_index("image"), q)
    result: dict[str, Any] = {
        "open_seconds": open_s,
        "recall_at_10": tune.recall_at_k(found, np.load(truth), 10),
        **speed,
        "rss_before_open": before,
        "rss_after_open": after_open,
    }
    # One query per call from many threads, as a service's request handlers would call it;
    # FAISS threads inside each call would only fight the callers for the cores.
    faiss.omp_set_num_threads(1)
    for c in cfg["concurrency"]:
        result[f"concurrency_{c}"] = concurrent_latency(
            lambda v: searcher.search_embeddings(v, 10), q, c, cfg["concurrent_queries"]
        )
    result["rss_end"] = _proc_status()
    Path(out).write_text(json.dumps(result, indent=2))
    return 0


def search(cfg: ScaleConfig, n: int, paths: dict[str, Path], index_dir: str,
           log: Any = print) -> dict[str, Any]:  # fmt: skip
    """Measure the search of ``index_dir`` in a child process; its figures."""
    out = Path(cfg.work_dir) / f"search_{label(n)}.json"
    out.unlink(missing_ok=True)
    cfg_json = json.dumps({"concurrency": list(cfg.concurrency),
                           "concurrent_queries": cfg.concurrent_queries})  # fmt: skip
    cmd = [
        sys.executable, "-m", "benchmarks.index_scale", "--search-child", index_dir,
        str(paths["queries"]), str(paths["truth"]), str(out), cfg_json,
    ]  # fmt: skip
    measured = run_measured(cmd, log)
    figures = json.loads(out.read_text())
    return {"search_peak_rss_bytes": measured["peak_rss_bytes"], **figures}


def _status_of(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of process ``pid``, bytes (Linux ``/proc``)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def serve_latency(cfg: ScaleConfig, n: int, paths: dict[str, Path], index_dir: str,
                  log: Any = print) -> dict[str, Any]:  # fmt: skip
    """The search service over ``index_dir`` memory-mapped (``clipforge-index serve --mmap``,
    its own process) under ``clipforge-index loadtest --vectors`` (the evaluation queries as
    vector queries: the index has no model) at each concurrency; its memory after opening and
    at the end."""
    from clipforge.index.loadtest import LoadTestConfig, run_loadtest, started_service

    pids: list[int] = []
    figures: dict[str, Any] = {}
    with started_service(index_dir, log=log, extra_args=["--mmap"], on_start=pids.append) as url:
        figures["service_rss_after_open"] = _status_of(pids[0])
        for c in cfg.concurrency:
            result = run_loadtest(
                LoadTestConfig(
                    url=url,
                    requests=cfg.concurrent_queries,
                    concurrency=c,
                    k=10,
                    vectors=str(paths["queries"]),
                ),
                log=log,
            )
            if result.errors or result.not_run:
                raise RuntimeError(f"service load test at {label(n)}:\n{result.summary()}")
            log("  | " + result.summary().replace("\n", "\n  | "))
            figures[f"service_{c}"] = {
                "p50_ms": result.percentile(50),
                "p99_ms": result.percentile(99),
                "requests_per_s": result.requests_per_s,
            }
        figures["service_rss_end"] = _status_of(pids[0])
    return figures


# --------------------------------------------------------------------------------------------
# report


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


ROWS = [
    ("index", lambda r: str(r["factory"])),
    ("search params", lambda r: str(r["search_params"])),
    ("index size", lambda r: _gb(r["size_bytes"])),
    ("build time", lambda r: f"{r['build_seconds']:.0f} s"),
    ("build peak RSS", lambda r: _gb(r["build_peak_rss_bytes"])),
    ("search peak RSS", lambda r: _gb(r["search_peak_rss_bytes"])),
    ("search RSS before open", lambda r: _gb(r["rss_before_open"]["VmRSS"])),
    ("search RSS + index, anon", lambda r: _added(r, "RssAnon")),
    ("search RSS + index, file", lambda r: _added(r, "RssFile")),
    ("recall@10 (exact truth)", lambda r: f"{r['recall_at_10']:.3f}"),
    ("QPS batched", lambda r: f"{r['batched_qps']:.0f} ({r['batch_threads']} thr)"),
    ("QPS single, 1 thread", lambda r: f"{r['single_qps']:.0f}"),
    ("p50 / p99 single", lambda r: f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms"),
    ("Searcher c=16 p50/p99", lambda r: _conc(r, 16)),
    ("Searcher c=32 p50/p99", lambda r: _conc(r, 32)),
    ("service c=16 p50/p99", lambda r: _served(r, 16)),
    ("service c=32 p50/p99", lambda r: _served(r, 32)),
    ("service RSS open / end", lambda r: _served_rss(r)),
]


def _served(r: dict[str, Any], c: int) -> str:
    x = r.get(f"service_{c}")
    if x is None:
        return "-"
    return f"{x['p50_ms']:.1f} / {x['p99_ms']:.1f} ms, {x['requests_per_s']:.0f}/s"


def _served_rss(r: dict[str, Any]) -> str:
    if "service_rss_end" not in r:
        return "-"
    return f"{_gb(r['service_rss_after_open']['VmRSS'])} / {_gb(r['service_rss_end']['VmRSS'])}"


def _added(r: dict[str, Any], key: str) -> str:
    """RSS the index and the searches added to the process (end minus before the open)."""
    return _gb(max(r["rss_end"][key] - r["rss_before_open"][key], 0))


def _conc(r: dict[str, Any], c: int) -> str:
    x = r.get(f"concurrency_{c}")
    if x is None:
        return "-"
    return f"{x['p50_ms']:.1f} / {x['p99_ms']:.1f} ms, {x['searches_per_s']:.0f}/s"


GROWTH = [
    ("build time", "build_seconds"),
    ("build peak RSS", "build_peak_rss_bytes"),
    ("index size", "size_bytes"),
    ("search peak RSS", "search_peak_rss_bytes"),
    ("single-query p50", "p50_ms"),
]


def growth_exponent(ns: list[int], values: list[float]) -> float:
    """The b of a least-squares fit value ~ a * N**b over the sizes (log-log slope)."""
    x, y = np.log(np.asarray(ns, float)), np.log(np.asarray(values, float))
    return float(np.polyfit(x, y, 1)[0])


PROJECTED_SIZES = (100_000_000, 1_000_000_000)
"""Collection sizes :func:`projection` extrapolates to."""


def projection(
    results: dict[int, dict[str, Any]], sizes: tuple[int, ...] = PROJECTED_SIZES
) -> list[str]:
    """What larger indexes would need, extrapolated from the largest size measured: its bytes a
    vector (same index kind), its build time grown as the measured build time grows (at least
    linearly), and a split build (``build --part i/P``) into parts the size of the largest
    build measured, each needing that build's peak RSS and at most its time (the quantizer is
    trained once for all parts, not per part)."""
    ns = sorted(results)
    top = ns[-1]
    r = results[top]
    per_vector = r["size_bytes"] / top
    growth = (
        growth_exponent(ns, [float(results[n]["build_seconds"]) for n in ns])
        if len(ns) > 1
        else 1.0
    )
    growth = max(growth, 1.0)
    lines = [
        f"projection from {label(top)} ({r['factory']}, {per_vector:.0f} B a vector, build "
        f"~N^{growth:.2f}):"
    ]
    for n in sizes:
        scale = n / top
        one_machine = r["build_seconds"] * scale**growth
        parts = math.ceil(scale)
        part_min = r["build_seconds"] / 60
        lines.append(
            f"  {label(n)}: index {_gb(per_vector * n)}; one machine ~{one_machine / 3600:.1f} h; "
            f"or {parts} parts of {label(top)} on {parts} machines: <= {part_min:.0f} min and "
            f"{_gb(r['build_peak_rss_bytes'])} RSS each, then the merge"
        )
    return lines


def format_table(results: dict[int, dict[str, Any]], cfg: ScaleConfig) -> str:
    """The cost-growth table (one column per size), growth exponents and the machine."""
    ns = sorted(results)
    cols = {n: [fn(results[n]) for _, fn in ROWS] for n in ns}
    colw = {n: max(len(label(n)), *(len(c) for c in cols[n])) for n in ns}
    lw = max(len(r[0]) for r in ROWS)
    lines = [
        f"cost growth: clustered {cfg.dim}-d vectors, budget {cfg.memory_budget}, target "
        f"recall@10 {cfg.target_recall}, {cfg.n_queries} queries (exact truth)",
        "".ljust(lw) + "  " + "  ".join(label(n).ljust(colw[n]) for n in ns),
    ]
    for i, (name, _) in enumerate(ROWS):
        lines.append(name.ljust(lw) + "  " + "  ".join(cols[n][i].ljust(colw[n]) for n in ns))
    if len(ns) >= 2:
        parts = []
        for name, key in GROWTH:
            vals = [float(results[n][key]) for n in ns]
            parts.append(f"{name} ~N^{growth_exponent(ns, vals):.2f}")
        lines.append(f"growth {label(ns[0])}->{label(ns[-1])} (log-log fit): " + ", ".join(parts))
    if ns:
        lines.extend(projection(results))
    lines.append(
        f"machine: {os.cpu_count()} CPU cores on {platform.node()}, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end (shared with other jobs)"
    )
    return "\n".join(lines)


def run_scale(cfg: ScaleConfig, log: Any = print) -> dict[str, Any]:
    """Generate, build and search every size; print the table; return the figures."""
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, Any]] = {}
    loads: dict[int, list[float]] = {}
    report_path = Path(cfg.work_dir) / "scale.json"
    try:
        for n in cfg.sizes:
            log(f"== {label(n)} x {cfg.dim} ==")
            paths = generate(cfg, n, log)
            built = build(cfg, n, paths, log)
            searched = search(cfg, n, paths, built["index_dir"], log)
            served = serve_latency(cfg, n, paths, built["index_dir"], log)
            results[n] = {**built, **searched, **served}
            loads[n] = list(os.getloadavg())
            log(f"  load average after {label(n)}: {loads[n]}")
            partial = {str(k): v for k, v in results.items()}
            write_json_atomic(report_path, {"config": asdict(cfg), "loadavg": loads,
                                            "results": partial})  # fmt: skip
    finally:
        if not cfg.keep_data:
            for n in cfg.sizes:
                for p in Path(cfg.work_dir).glob(f"*_{label(n)}*"):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
    table = format_table(results, cfg)
    log(table)
    report = {"config": asdict(cfg), "loadavg": loads, "table": table,
              "results": {str(k): v for k, v in results.items()}}  # fmt: skip
    write_json_atomic(report_path, report)
    log(f"figures written to {report_path}")
    return report


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.index_scale",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--sizes", default="1M,3M,10M", help="collection sizes (default: %(default)s)")
    p.add_argument("--dim", type=int, default=256, help="dimension (default: %(default)s)")
    p.add_argument("--memory-budget", default="2GB",
                   help="clipforge-index build --memory-budget (default: %(default)s)")  # fmt: skip
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="clipforge-index build --target-recall (default: %(default)s)")  # fmt: skip
    p.add_argument("--queries", type=int, default=1000,
                   help="evaluation and tuning queries each (default: %(default)s)")  # fmt: skip
    p.add_argument("--part-rows", default="1M", help="rows per part file (default: %(default)s)")
    p.add_argument("--concurrency", default="16,32",
                   help="Searcher threads at once (default: %(default)s)")  # fmt: skip
    p.add_argument("--concurrent-queries", type=int, default=2000,
                   help="searches per concurrency level (default: %(default)s)")  # fmt: skip
    p.add_argument("--work-dir", default="/tmp/clipforge_index_scale",
                   help="data and indexes (default: %(default)s)")  # fmt: skip
    p.add_argument("--keep-data", action="store_true",
                   help="keep the generated data and indexes (default: delete them)")  # fmt: skip
    p.add_argument("--search-child", nargs=5, metavar=("INDEX", "Q", "TRUTH", "OUT", "CFG"),
                   help="internal: be the search child process (default: off)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with the hidden ``--search-child``, one search process)."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.search_child:
        return search_child(*a.search_child)
    try:
        sizes = tuple(sorted(parse_count(s) for s in a.sizes.split(",") if s.strip()))
        cfg = ScaleConfig(
            sizes=sizes, dim=a.dim, memory_budget=a.memory_budget, target_recall=a.target_recall,
            n_queries=a.queries, n_tune_queries=a.queries, part_rows=parse_count(a.part_rows),
            concurrency=tuple(int(c) for c in a.concurrency.split(",") if c.strip()),
            concurrent_queries=a.concurrent_queries, work_dir=a.work_dir, keep_data=a.keep_data,
        )  # fmt: skip
    except ValueError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    if not cfg.sizes or min(cfg.sizes) < 1000:
        print(f"{p.prog}: error: --sizes needs sizes of at least 1000 vectors", file=sys.stderr)
        return 2
    free = shutil.disk_usage(Path(cfg.work_dir).parent if not Path(cfg.work_dir).exists()
                             else cfg.work_dir).free  # fmt: skip
    need = max(cfg.sizes) * cfg.dim * 4 * 1.3  # the largest EMB_DIR + its index, roughly
    if free < need:
        print(f"{p.prog}: error: {label(max(cfg.sizes))} x {cfg.dim} needs ~{need / 1e9:.0f} GB "
              f"in {cfg.work_dir}, {free / 1e9:.0f} GB free", file=sys.stderr)  # fmt: skip
        return 2
    run_scale(cfg, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
