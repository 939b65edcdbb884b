"""Peer side of ``clipforge-index bench``: build autofaiss's index and measure it the same way.

Runs under autofaiss's own virtual environment (numpy<2, faiss-cpu 1.13.2, autofaiss 2.18.0;
see PEERS.md), NOT under clipforge's; it imports only autofaiss, faiss, numpy and the
dependency-free ``bench_metrics.py`` next to it, so both tools are scored by the same code::

    /work/peers/autofaiss/bin/python index/peer_autofaiss.py --embeddings DIR_OF_NPY \\
        --queries q.npy --truth gt.npy --work WORK --memory 1G --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_metrics  # the file next to this script, importable without clipforge


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", required=True, help="folder of .npy database parts")
    p.add_argument("--queries", required=True, help="(nq, D) float32 evaluation queries .npy")
    p.add_argument("--truth", required=True, help="(nq, 10) exact inner-product top-10 ids .npy")
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
    truth = np.load(args.truth)
    # build_index returns the index with its tuned search hyper-parameters already set
    metrics = bench_metrics.evaluate_index(index, queries, truth)
    result = {
        "tool": "autofaiss 2.18.0",
        "faiss": faiss.__version__,
        "build_seconds": build_s,
        "size_bytes": os.path.getsize(index_path),
        "factory": (infos or {}).get("index_key"),
        "search_params": (infos or {}).get("index_param"),
        "infos": infos,
        **metrics,
    }
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "infos"}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
