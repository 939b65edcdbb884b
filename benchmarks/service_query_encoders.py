"""The search service's load test with each query encoder: PyTorch, ONNX fp32, ONNX int8.

python -m benchmarks.service_query_encoders [--index DIR --export DIR] [--work DIR]

Without ``--index`` it builds a demo index first (the demo shards, the tiny model trained for
``--steps`` steps, embed, a flat build) under ``--work``; without ``--export`` it exports the
index's model with ``clipforge-export onnx --int8-text`` there. Then, for each encoder in turn,
it starts ``clipforge-index serve --query-encoder ENCODER`` in its own process, asks it each
load-test query once (k=10) for the hits, and runs the README's load test
(``clipforge-index loadtest``: ``--requests`` searches, ``--concurrency`` at a time) against it.
The query-encode latency is the service's own text path (``Searcher.embed_text``, one query,
tokenizer included) timed in this process. Prints one table; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

ENCODERS = ("torch", "onnx", "onnx-int8")


def build_demo_index(work: Path, steps: int) -> Path:
    """Demo shards -> tiny model (``steps`` steps) -> embeddings -> flat index, under ``work``
    (each stage skipped when its output is already there)."""
    from clipforge.data_tools.demo import write_demo_shards
    from clipforge.index.cli import main as index_main
    from clipforge.pretrain.cli import main as pretrain_main

    data, run, emb, index = work / "demo-data", work / "run", work / "emb", work / "index"
    if not (data / "manifest.json").is_file():
        write_demo_shards(data)
    if not (run / "model").is_dir():
        argv = ["--config", "tiny", "--set", f"data.train={data}", "--set", f"train.run_dir={run}",
                "--set", f"train.steps={steps}", "--set", "data.batch_size=128",
                "--set", "optim.lr=2e-3", "--set", "train.progress=lines",
                "--set", f"train.checkpoint_every={steps}"]  # fmt: skip
        if pretrain_main(argv) != 0:
            raise SystemExit("training the demo model failed")
    embed = ["embed", "--model", str(run), "--data", str(data), "--out", str(emb)]
    if not (emb / "embeddings.json").is_file() and index_main(embed) != 0:
        raise SystemExit("embedding the demo shards failed")
    build = ["build", "--embeddings", str(emb), "--out", str(index), "--kind", "flat"]
    if not (index / "index.json").is_file() and index_main(build) != 0:
        raise SystemExit("building the demo index failed")
    return index


def export_index_model(index: Path, out: Path) -> Path:
    """``clipforge-export onnx --int8-text`` of the index's own model copy (``INDEX/model``)."""
    from clipforge.pretrain.export_cli import main as export_main

    argv = ["onnx", "--model", str(index / "model"), "--out", str(out), "--int8-text"]
    if not (out / "export.json").is_file() and export_main(argv) != 0:
        raise SystemExit("the ONNX export failed")
    return out


def encode_latency_ms(index: Path, export: Path, encoder: str, repeats: int) -> float:
    """Median ms of one text query through the service's own text path with ``encoder``."""
    import torch

    from clipforge.index.loadtest import DEFAULT_QUERIES
    from clipforge.index.searcher import Searcher

    torch.set_num_threads(1)  # the service encodes on one thread
    searcher = Searcher.open(index)
    if encoder != "torch":
        searcher.use_onnx_text_encoder(export, int8=encoder == "onnx-int8", threads=1)
    for q in DEFAULT_QUERIES:  # warm-up: first-call allocations, onnxruntime's arena
        searcher.embed_text([q])
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        searcher.embed_text([DEFAULT_QUERIES[i % len(DEFAULT_QUERIES)]])
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def service(index: Path, export: Path, encoder: str, timeout_s: float = 300) -> Iterator[str]:
    """``clipforge-index serve --query-encoder ENCODER`` on a free loopback port; its URL."""
    from clipforge.index.loadtest import started_service

    extra = ["--query-encoder", encoder]
    if encoder != "torch":
        extra += ["--onnx-export", str(export)]
    with started_service(str(index), timeout_s=timeout_s, extra_args=extra) as url:
        yield url


def hits_of(url: str, queries: Sequence[str], k: int = 10) -> list[list[int]]:
    """The service's top-``k`` image ids for each query, asked one at a time."""
    out = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for q in queries:
            r = client.post("/search", json={"text": q, "k": k, "target": "image"})
            r.raise_for_status()
            out.append([int(h["id"]) for h in r.json()["hits"]])
    return out


def overlap_at_k(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each query's top-k ids that two answers share."""
    return statistics.mean(len(set(x) & set(y)) / max(len(x), 1) for x, y in zip(a, b, strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", help="an index with its model/ (default: build the demo's)")
    p.add_argument("--export", help="clipforge-export onnx of that model (default: export it)")
    p.add_argument("--work", default="runs/service-bench", help="where built things go")
    p.add_argument("--steps", type=int, default=200, help="training steps of a built index")
    p.add_argument("--requests", type=int, default=500, help="load-test searches per encoder")
    p.add_argument("--concurrency", type=int, default=16, help="searches in flight at once")
    p.add_argument("--encode-repeats", type=int, default=200, help="timed single-query encodes")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)

    from clipforge.index.loadtest import DEFAULT_QUERIES, LoadTestConfig, run_loadtest

    work = Path(args.work)
    index = Path(args.index) if args.index else build_demo_index(work, args.steps)
    export = Path(args.export) if args.export else export_index_model(index, work / "onnx")
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    reference: list[list[int]] | None = None
    for encoder in ENCODERS:
        encode_ms = encode_latency_ms(index, export, encoder, args.encode_repeats)
        with service(index, export, encoder) as url:
            hits = hits_of(url, DEFAULT_QUERIES)
            result = run_loadtest(
                LoadTestConfig(url=url, requests=args.requests, concurrency=args.concurrency)
            )
        print(result.summary(), flush=True)
        reference = hits if reference is None else reference
        rows.append(
            {
                "encoder": encoder,
                "encode_p50_ms": encode_ms,
                "p50_ms": result.percentile(50),
                "p99_ms": result.percentile(99),
                "requests_per_s": result.requests_per_s,
                "errors": result.errors,
                "mean_batch": result.batching.get("mean_batch"),
                "overlap_at_10": overlap_at_k(hits, reference),
            }
        )
    load_after = os.getloadavg()[0]

    print(
        f"\n{args.requests} searches at concurrency {args.concurrency} per encoder, "
        f"{os.cpu_count()} CPU(s), load average {load_before:.1f} before / {load_after:.1f} after"
    )
    print(
        "| query encoder | encode p50 ms | service p50 ms | service p99 ms | requests/s "
        "| errors | overlap@10 vs torch |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(
            f"| `{r['encoder']}` | {r['encode_p50_ms']:.2f} | {r['p50_ms']:,.0f} | "
            f"{r['p99_ms']:,.0f} | {r['requests_per_s']:.1f} | {r['errors']} | "
            f"{r['overlap_at_10']:.3f} |"
        )
    if args.json:
        from clipforge.data_tools.atomic import write_json_atomic

        write_json_atomic(
            Path(args.json),
            {
                "rows": rows,
                "load_average": [load_before, load_after],
                "cpus": os.cpu_count(),
                "requests": args.requests,
                "concurrency": args.concurrency,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
