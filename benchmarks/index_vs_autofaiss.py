"""clipforge's auto index vs autofaiss on clustered data: build time, size, recall, QPS.

Data (generated exactly and cached as .npy in the work folder): numpy
``default_rng(1234)``; 1,000 centres = standard-normal 256-d vectors, L2-normalised; each point =
a uniformly drawn centre + isotropic Gaussian noise (std 0.75/16 per dimension), L2-normalised;
N = 1,000,000 database points, then 1,000 evaluation queries drawn the same way, then (from the
same generator, after the evaluation queries) 1,000 held-out *tuning* queries that clipforge's
build uses to pick nprobe — never the evaluation queries, never the indexed vectors. Per draw:
all centre labels first, then the noise (row chunks of one stream). Ground truth = exact
inner-product top 10.

clipforge builds with ``run_build`` (auto kind, 1 GiB budget, target recall@10 0.95); autofaiss
runs in its own virtual environment via :mod:`benchmarks.peer_autofaiss`
(``max_index_memory_usage="1G"``). Both are timed by :func:`benchmarks.index_timing.time_index`
on the same queries, and the ids each found are scored here by clipforge's one Recall@k
(:func:`clipforge.index.tune.recall_at_k`).

The peer's interpreter is ``--peer-python`` or ``$CLIPFORGE_PEER_AUTOFAISS`` (there is no
default: it is a virtual environment of the machine's own); without either, ``--skip-peer``
runs clipforge's half alone. Run from the repository root::

    python -m benchmarks.index_vs_autofaiss [--n 1000000] [--peer-python PY | --skip-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.data_tools.atomic import atomic_output, write_json_atomic
from clipforge.index import emb_dir, store, tune
from clipforge.index.build import run_build
from clipforge.index.faiss_ops import Log
from clipforge.index.plan import parse_memory_size

from . import index_candidates
from .index_timing import time_index

PEER_ENV = "CLIPFORGE_PEER_AUTOFAISS"
"""The environment variable naming autofaiss's python (when ``--peer-python`` is not given)."""
REPO = Path(__file__).resolve().parents[1]
"""The repository root: the peer runs from here, so that ``benchmarks`` is importable."""


@dataclass(frozen=True)
class IndexBenchConfig:
    """Settings of one benchmark run (the defaults are the published setting)."""

    n: int = 1_000_000
    """Database size (1,000,000 published; smaller for a quick run)."""
    dim: int = 256
    """Vector dimension."""
    n_centres: int = 1000
    """Cluster centres."""
    noise: float = 0.75
    """Expected noise norm (per-dimension std = noise / sqrt(dim))."""
    n_queries: int = 1000
    """Evaluation queries."""
    n_tune_queries: int = 1000
    """Held-out tuning queries for clipforge's build (drawn after the evaluation queries)."""
    seed: int = 1234
    """numpy default_rng seed."""
    memory_budget: str = "1G"
    """Index memory budget for both tools (binary units, as autofaiss parses them)."""
    target_recall: float = 0.95
    """clipforge's tuning target (recall@10)."""
    kind: str = "auto"
    """clipforge's index kind."""
    work_dir: str = "/tmp/clipforge_index_bench"
    """Cache of the generated data, and the built indexes."""
    skip_peer: bool = False
    """Do not run autofaiss."""
    peer_python: str | None = None
    """Python of autofaiss's virtual environment (None: only with ``skip_peer``)."""
    peer_timeout_s: float = 4 * 3600
    """Give up on the peer after this long."""
    peer_result: str | None = None
    """Folder of a finished peer run on the same data and budget (its result.json and
    found.npy, from ``benchmarks.peer_autofaiss``) to report instead of running it again."""
    candidates: tuple[str, ...] | None = None
    """None: no candidate sweep; () the default candidates; else these FAISS factories."""
    clipforge_result: str | None = None
    """Figures JSON of a finished clipforge half on the same data and budget to report instead
    of building again (so a candidate sweep can join a build that already ran)."""


# --------------------------------------------------------------------------------------------
# data


def iter_draw(
    rng: np.random.Generator,
    n: int,
    centres: np.ndarray,
    noise: float,
    chunk: int = 100_000,
) -> Iterator[np.ndarray]:
    """Yield n unit vectors (<= chunk, D) float32 at a time: centre[label] + N(0, noise^2/D).

    All n labels are drawn first, then the noise row chunk by row chunk: consecutive
    ``standard_normal`` calls continue one stream, so the chunk size changes no value and a
    caller can write each chunk to disk without holding all n rows.
    """
    dim = centres.shape[1]
    labels = rng.integers(0, len(centres), size=n)  # (n,) int64: 80 MB at 10M
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        x = centres[labels[a:b]] + rng.standard_normal((b - a, dim)) * (noise / np.sqrt(dim))
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _draw(
    rng: np.random.Generator,
    n: int,
    centres: np.ndarray,
    noise: float,
    out: np.ndarray,
    chunk: int = 100_000,
) -> None:
    """Fill ``out`` (n, D) float32 with the unit vectors of :func:`iter_draw`."""
    a = 0
    for x in iter_draw(rng, n, centres, noise, chunk):
        out[a : a + len(x)] = x
        a += len(x)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def prepare_data(cfg: IndexBenchConfig, log: Log = print) -> dict[str, Path]:
    """Generate (or reuse) database, queries, tuning queries and ground truth in the work dir.

    The database is written as an EMB_DIR (``img_emb/img_emb_0.npy`` float32 + metadata +
    embeddings.json) so clipforge builds it through its normal entry point; autofaiss reads the
    same ``img_emb`` folder.
    """
    key = f"n{cfg.n}_d{cfg.dim}_c{cfg.n_centres}_s{cfg.seed}_q{cfg.n_queries}_t{cfg.n_tune_queries}"
    d = Path(cfg.work_dir) / "data" / key
    paths = {
        "emb_dir": d / "emb",
        "db": d / "emb" / "img_emb" / "img_emb_0.npy",
        "queries": d / "queries.npy",
        "tune_queries": d / "tune_queries.npy",
        "truth": d / "truth.npy",
    }
    done = d / "done.json"
    if done.is_file():
        log(f"data: reusing {d}")
        return paths
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    centres = rng.standard_normal((cfg.n_centres, cfg.dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    paths["db"].parent.mkdir(parents=True, exist_ok=True)
    tmp_db = paths["db"].with_name(paths["db"].name + store_tmp())
    db = np.lib.format.open_memmap(tmp_db, mode="w+", dtype=np.float32, shape=(cfg.n, cfg.dim))
    _draw(rng, cfg.n, centres, cfg.noise, db)
    db.flush()
    del db
    os.replace(tmp_db, paths["db"])
    q = np.empty((cfg.n_queries, cfg.dim), np.float32)
    _draw(rng, cfg.n_queries, centres, cfg.noise, q)
    tq = np.empty((cfg.n_tune_queries, cfg.dim), np.float32)
    _draw(rng, cfg.n_tune_queries, centres, cfg.noise, tq)
    _save_npy(paths["queries"], q)
    _save_npy(paths["tune_queries"], tq)

    emb = paths["emb_dir"]
    (emb / "metadata").mkdir(parents=True, exist_ok=True)
    keys = pa.array([f"{i:09d}" for i in range(cfg.n)], pa.string())
    table = pa.table({"key": keys, "caption": pa.nulls(cfg.n, pa.string())})
    with atomic_output(emb / "metadata" / "metadata_0.parquet") as tmp:
        pq.write_table(table, tmp)
    write_json_atomic(
        emb / emb_dir.EMBEDDINGS_MANIFEST,
        {
            "format": emb_dir.EMBEDDINGS_FORMAT,
            "model_hash": "synthetic-peers-md",
            "model_source": "benchmarks.index_vs_autofaiss clustered data",
            "dim": cfg.dim,
            "dtype": "float32",
            "modalities": ["image"],
            "count": cfg.n,
            "parts": [{"part": 0, "count": cfg.n}],
        },
    )
    source = emb_dir.open_vectors(emb, "image")
    _, truth = tune.exact_knn(source, q, 10)
    _save_npy(paths["truth"], truth)
    write_json_atomic(done, {"config": asdict(cfg), "seconds": time.perf_counter() - t0})
    log(f"data: generated {d} in {time.perf_counter() - t0:.0f} s")
    return paths


def store_tmp() -> str:
    return f".tmp-{os.getpid()}"


# --------------------------------------------------------------------------------------------
# runs


def run_clipforge(cfg: IndexBenchConfig, paths: dict[str, Path], log: Log = print) -> dict:
    """Build clipforge's index with held-out tuning queries; evaluate on the evaluation queries."""
    out = Path(cfg.work_dir) / "clipforge_index"
    t0 = time.perf_counter()
    manifest = run_build(
        paths["emb_dir"],
        out,
        kind=cfg.kind,
        memory_budget=cfg.memory_budget,
        target_recall=cfg.target_recall,
        modalities=["image"],
        held_out_queries={"image": paths["tune_queries"]},
        created_by="benchmarks.index_vs_autofaiss",
        log=log,
    )
    build_s = time.perf_counter() - t0
    info = manifest["modalities"]["image"]
    opened = store.open_index(out, "image")
    found, speed = time_index(opened.index, np.load(paths["queries"]))
    return {
        "tool": "clipforge",
        "faiss": faiss.__version__,
        "build_seconds": build_s,
        "size_bytes": info["size_bytes"],
        "factory": info["factory"],
        "search_params": info["search_params"],
        "tuning_recall_at_10": info["measured_recall_at_10"],
        "reason": info["reason"],
        **score(found, np.load(paths["truth"])),
        **speed,
    }


def score(found: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Recall of the (nq, 10) ids a tool ``found`` against the exact (nq, 10) ``truth``."""
    return {
        "recall_at_10": tune.recall_at_k(found, truth, 10),
        "recall_1_at_10": tune.recall_1_at_k(found, truth, 10),
    }


def resolve_peer_python(peer_python: str | None) -> str:
    """autofaiss's python: ``peer_python``, else ``$CLIPFORGE_PEER_AUTOFAISS``; checked to exist.

    Called before anything is built, so a missing peer costs seconds, not clipforge's half.
    """
    chosen = peer_python or os.environ.get(PEER_ENV)
    if not chosen:
        raise FileNotFoundError(
            "no python for autofaiss: pass --peer-python PATH or set "
            f"{PEER_ENV}=PATH to the python of a virtual environment with autofaiss 2.18.0 "
            "(benchmarks/README.md says how to make one), or --skip-peer to run clipforge alone"
        )
    if not Path(chosen).is_file():
        raise FileNotFoundError(
            f"autofaiss's python {chosen} (from "
            f"{'--peer-python' if peer_python else PEER_ENV}) is not a file; "
            "use --skip-peer to run clipforge alone"
        )
    return chosen


def _wait_for(path: Path, timeout_s: float, flag: str, log: Log) -> None:
    """Wait until ``path`` exists: the reused run was started earlier and may still be
    building (autofaiss takes tens of minutes at 1M)."""
    deadline = time.monotonic() + timeout_s
    if not path.is_file():
        log(f"{flag}: waiting for {path} (that run is still going)")
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{flag}: {path} did not appear within {timeout_s:.0f} s")
        time.sleep(10)


def load_peer_result(cfg: IndexBenchConfig, paths: dict[str, Path], log: Log = print) -> dict:
    """The figures of a finished peer run in ``cfg.peer_result``, checked to be on the same
    data and budget, scored here like a fresh one."""
    work = Path(cfg.peer_result or "")
    out, found_path = work / "result.json", work / "found.npy"
    if not work.is_dir():
        raise FileNotFoundError(f"--peer-result {work} is not a folder")
    _wait_for(out, cfg.peer_timeout_s, "--peer-result", log)
    if not found_path.is_file():
        raise FileNotFoundError(f"--peer-result {work}: result.json but no found.npy")
    result = json.loads(out.read_text())
    memory = result.get("memory")  # recorded by peer_autofaiss (runs before it did not)
    if memory is not None and str(memory) != cfg.memory_budget:
        raise ValueError(f"--peer-result {work} ran with budget {memory}, not {cfg.memory_budget}")
    found = np.load(found_path)
    if found.shape[0] != np.load(paths["truth"]).shape[0]:
        raise ValueError(f"--peer-result {work}: {found.shape[0]} queries, not {cfg.n_queries}")
    log(f"peer: reusing the finished autofaiss run in {work} (same data, budget, machine)")
    return {**result, "reused_from": str(work), **score(found, np.load(paths["truth"]))}


def load_clipforge_result(cfg: IndexBenchConfig, log: Log = print) -> dict:
    """clipforge's figures from a finished run's JSON, checked to be on the same data/budget."""
    path = Path(cfg.clipforge_result or "")
    _wait_for(path, cfg.peer_timeout_s, "--clipforge-result", log)
    report = json.loads(path.read_text())
    ran = report.get("config", {})
    for key in ("n", "dim", "seed", "memory_budget", "target_recall", "kind"):
        if ran.get(key) != getattr(cfg, key):
            raise ValueError(f"--clipforge-result {path} ran with {key}={ran.get(key)!r}, "
                             f"not {getattr(cfg, key)!r}")  # fmt: skip
    result = report["results"]["clipforge"]
    if "error" in result:
        raise ValueError(f"--clipforge-result {path}: that run failed: {result['error']}")
    log(f"clipforge: reusing the finished build's figures in {path}")
    return {**result, "reused_from": str(path)}


def run_peer(cfg: IndexBenchConfig, paths: dict[str, Path], log: Log = print) -> dict:
    """Run autofaiss in its own venv through :mod:`benchmarks.peer_autofaiss`; score what it
    found here, with clipforge's Recall@k; return its figures."""
    peer_python = resolve_peer_python(cfg.peer_python)
    work = Path(cfg.work_dir) / "autofaiss_index"
    out = work / "result.json"
    found_path = work / "found.npy"
    out.unlink(missing_ok=True)
    found_path.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        peer_python, "-m", "benchmarks.peer_autofaiss",
        "--embeddings", str(paths["db"].parent),
        "--queries", str(paths["queries"]),
        "--found", str(found_path),
        "--work", str(work),
        "--memory", cfg.memory_budget,
        "--out", str(out),
    ]  # fmt: skip
    log("peer: " + " ".join(cmd))
    # the peer venv must not see clipforge's site-packages
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(cmd, env=env, cwd=REPO, timeout=cfg.peer_timeout_s,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0 or not out.is_file() or not found_path.is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"autofaiss peer failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    return {**result, **score(np.load(found_path), np.load(paths["truth"]))}


# --------------------------------------------------------------------------------------------
# report


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


ROWS = [
    ("index", lambda r: str(r["factory"])),
    ("search params", lambda r: str(r["search_params"])),
    ("build time", lambda r: f"{r['build_seconds']:.0f} s"),
    ("index size", lambda r: _mb(r["size_bytes"])),
    ("recall@10", lambda r: f"{r['recall_at_10']:.3f}"),
    ("recall 1@10", lambda r: f"{r['recall_1_at_10']:.3f}"),
    ("QPS batched", lambda r: f"{r['batched_qps']:.0f} ({r['batch_threads']} thr)"),
    ("QPS single query, 1 thread", lambda r: f"{r['single_qps']:.0f}"),
    ("latency p50 / p99 (single)", lambda r: f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms"),
]


def format_table(results: dict[str, dict], cfg: IndexBenchConfig) -> str:
    """Side-by-side table (one column per tool) plus caveats."""
    names = list(results)
    width = [max(28, *(len(n) for n in names))]
    cells = {n: [fn(results[n]) if "error" not in results[n] else "-" for _, fn in ROWS]
             for n in names}  # fmt: skip
    colw = {n: max(len(n), *(len(c) for c in cells[n])) for n in names}
    lines = [
        f"index benchmark: {cfg.n:,} x {cfg.dim} clustered vectors, "
        f"{cfg.n_queries} queries, budget {cfg.memory_budget}, clipforge target recall@10 "
        f"{cfg.target_recall}",
        "".ljust(width[0]) + "  " + "  ".join(n.ljust(colw[n]) for n in names),
    ]
    for i, (label, _) in enumerate(ROWS):
        lines.append(label.ljust(width[0]) + "  " + "  ".join(cells[n][i].ljust(colw[n])
                                                              for n in names))  # fmt: skip
    for n in names:
        if "error" in results[n]:
            lines.append(f"{n}: FAILED: {results[n]['error'][:500]}")
    if "autofaiss" in results and "clipforge" in results and "error" not in results["autofaiss"]:
        a, c = results["autofaiss"], results["clipforge"]
        if "error" not in c:
            lines.append(
                f"clipforge vs autofaiss: single-query QPS x{c['single_qps'] / a['single_qps']:.1f}"
                f", build time x{c['build_seconds'] / a['build_seconds']:.2f}, recall@10 "
                f"{c['recall_at_10']:.3f} vs {a['recall_at_10']:.3f}"
            )
    lines.append(
        f"caveats: {os.cpu_count()} CPU cores on {platform.node()}, SHARED with other engineers' "
        "jobs during the run (timings are noisy, both tools ran in the same session, one after "
        "the other); clipforge faiss "
        f"{faiss.__version__}, autofaiss with faiss-cpu 1.13.2 in its own venv; build time "
        "includes each tool's own tuning; sizes are the index files on disk."
    )
    return "\n".join(lines)


def run_index_benchmark(
    n: int = 1_000_000,
    work_dir: str | os.PathLike[str] = "/tmp/clipforge_index_bench",
    skip_peer: bool = False,
    memory_budget: str = "1G",
    target_recall: float = 0.95,
    kind: str = "auto",
    peer_python: str | None = None,
    json_out: str | os.PathLike[str] | None = None,
    peer_result: str | None = None,
    candidates: tuple[str, ...] | None = None,
    clipforge_result: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Run the benchmark, print the table, and return ``{"config", "results", "table"}``."""
    cfg = IndexBenchConfig(
        n=n, work_dir=str(work_dir), skip_peer=skip_peer, memory_budget=memory_budget,
        target_recall=target_recall, kind=kind, peer_python=peer_python, peer_result=peer_result,
        candidates=candidates, clipforge_result=clipforge_result,
    )  # fmt: skip
    if not skip_peer and peer_result is None:
        resolve_peer_python(peer_python)  # before clipforge's half: fail in seconds, not hours
    paths = prepare_data(cfg, log=log)
    results: dict[str, dict] = {}
    swept = None
    budget = parse_memory_size(cfg.memory_budget) or 0
    if candidates is not None:  # first: reused runs may still be finishing
        log("== candidates at the same budget ==")
        swept = index_candidates.run_candidates(
            paths, budget, Path(cfg.work_dir) / "candidates", list(candidates) or None, log=log
        )
    log("== clipforge ==")
    try:
        results["clipforge"] = (
            load_clipforge_result(cfg, log) if clipforge_result else run_clipforge(cfg, paths, log)
        )
    except Exception as e:  # report, and still run the peer
        results["clipforge"] = {"error": f"{type(e).__name__}: {e}"}
    if not skip_peer:
        log("== autofaiss (own venv) ==")
        try:
            results["autofaiss"] = (
                load_peer_result(cfg, paths, log) if peer_result else run_peer(cfg, paths, log=log)
            )
        except Exception as e:
            results["autofaiss"] = {"error": f"{type(e).__name__}: {e}"}
    table = format_table(results, cfg)
    if swept is not None:
        extra = [("clipforge build (auto)", results["clipforge"]),
                 ("autofaiss", results.get("autofaiss"))]  # fmt: skip
        table += "\n" + index_candidates.format_candidates(swept, budget, extra)
    log(table)
    report = {"config": asdict(cfg), "results": results, "table": table, "candidates": swept}
    out = Path(json_out) if json_out else Path(cfg.work_dir) / "results.json"
    write_json_atomic(out, report)
    log(f"figures written to {out}")
    return report


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.index_vs_autofaiss",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--n", type=int, default=1_000_000,
                   help="database size; quick: 100000 (default: %(default)s)")  # fmt: skip
    p.add_argument("--work-dir", default="/tmp/clipforge_index_bench",
                   help="data and index cache (default: %(default)s)")  # fmt: skip
    p.add_argument("--skip-peer", action="store_true",
                   help="do not run autofaiss (default: run it)")  # fmt: skip
    p.add_argument("--memory-budget", default="1G",
                   help="index size bound of both (default: %(default)s)")  # fmt: skip
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="recall@10 clipforge tunes for (default: %(default)s)")  # fmt: skip
    p.add_argument("--kind", default="auto",
                   help="clipforge's index kind, as build's (default: %(default)s)")  # fmt: skip
    p.add_argument("--peer-python",
                   help=f"python of the autofaiss venv (default: ${PEER_ENV})")  # fmt: skip
    p.add_argument("--json", default=None, help="figures JSON (default: WORK_DIR/results.json)")
    p.add_argument("--peer-result", metavar="DIR",
                   help="report the finished autofaiss run in DIR (result.json, found.npy; same "
                   "data and budget) instead of running it again (default: run it)")  # fmt: skip
    p.add_argument("--clipforge-result", metavar="JSON",
                   help="report clipforge's half from this finished run's figures JSON (same "
                   "data and budget) instead of building again (default: build)")  # fmt: skip
    p.add_argument("--candidates", action="store_true",
                   help="also sweep index candidates at the budget on one shared coarse "
                   "quantizer: size, recall, QPS, build time each (default: no sweep)")  # fmt: skip
    p.add_argument("--candidate", action="append", default=[], metavar="FACTORY",
                   help="with --candidates: a FAISS factory to try, repeatable "
                   "(default: benchmarks.index_candidates.default_candidates)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when both tools ran, 1 when one failed, 2 without a peer python."""
    p = build_parser()
    a = p.parse_args(argv)
    if not a.skip_peer and a.peer_result is None:
        try:
            resolve_peer_python(a.peer_python)
        except FileNotFoundError as e:
            print(f"{p.prog}: error: {e}", file=sys.stderr)
            return 2
    report = run_index_benchmark(
        n=a.n, work_dir=a.work_dir, skip_peer=a.skip_peer, memory_budget=a.memory_budget,
        target_recall=a.target_recall, kind=a.kind, peer_python=a.peer_python, json_out=a.json,
        peer_result=a.peer_result, candidates=tuple(a.candidate) if a.candidates else None,
        clipforge_result=a.clipforge_result,
        log=lambda s: print(s, flush=True),
    )  # fmt: skip
    return 0 if all("error" not in r for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
