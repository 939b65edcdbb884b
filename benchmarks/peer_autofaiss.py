"""Peer side of ``python -m benchmarks.index_vs_autofaiss``: build autofaiss's index and time it.

Runs under autofaiss's own virtual environment (numpy<2, faiss-cpu 1.13.2, autofaiss 2.18.0; see
benchmarks/README.md), NOT under clipforge's, from the repository root so that ``benchmarks`` is
importable (``python -m`` puts the working directory first on the path); it imports only
autofaiss, faiss, numpy and the dependency-free :mod:`benchmarks.index_timing`, so both tools are
timed by the same code. It writes the ids it found; the benchmark scores them::

    cd REPO && "$CLIPFORGE_PEER_AUTOFAISS" -m benchmarks.peer_autofaiss --embeddings DIR_OF_NPY \\
        --queries q.npy --found found.npy --work WORK --memory 1G --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.index_timing import time_index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.peer_autofaiss", description=__doc__.splitlines()[0]
    )
    p.add_argument("--embeddings", required=True, help="folder of .npy database parts")
    p.add_argument("--queries", required=True, help="(nq, D) float32 evaluation queries .npy")
    p.add_argument("--found", required=True, help="where to write the (nq, 10) ids found .npy")
    p.add_argument("--work", required=True, help="folder for the index and its infos")
    p.add_argument("--memory", default="1G", help="max_index_memory_usage")
    p.add_argument("--available", default="12G", help="current_memory_available")
    p.add_argument("--out", required=True, help="JSON file for the figures")
    args = p.parse_args(argv)

    from autofaiss import build_index  # imported late: it is slow and noisy to import

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    index_path = work / "knn.index"
    t0 = time.perf_counter()
    index, infos = build_index(
        embeddings=args.embeddings,
        index_path=str(index_path),
        index_infos_path=str(work / "index_infos.json"),
        max_index_memory_usage=args.memory,
        current_memory_available=args.available,
        metric_type="ip",
    )
    build_s = time.perf_counter() - t0
    queries = np.load(args.queries).astype(np.float32)
    # build_index returns the index with its tuned search hyper-parameters already set
    found, speed = time_index(index, queries)
    np.save(args.found, found)
    result = {
        "tool": "autofaiss 2.18.0",
        "faiss": faiss.__version__,
        "build_seconds": build_s,
        "memory": args.memory,  # the budget asked for: --peer-result checks it
        "size_bytes": os.path.getsize(index_path),
        "factory": (infos or {}).get("index_key"),
        "search_params": (infos or {}).get("index_param"),
        "infos": infos,
        **speed,
    }
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "infos"}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
