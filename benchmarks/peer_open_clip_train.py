"""Training throughput of ``python -m open_clip_train.main`` (a PEER tool), for
``python -m benchmarks.train_throughput``.

Registers the given model-config JSON with open_clip, runs open_clip_train's own ``main`` for
``--steps`` steps on resampled webdataset shards with one log line per step, reads those lines
back and prints one line of JSON: the median samples/s over the steps after ``--warmup-steps-
excluded`` (open_clip_train logs each step's own rate when it logs every step, because its
meters are reset at each log line), the mean data-wait fraction (``Data (t)`` / ``Batch (t)``),
the last loss and peak memory.

This script does NOT import clipforge. It runs only in the peer virtual environment
(torch 2.14.1, open_clip_torch 3.3.0, webdataset==0.2.86, pandas; see benchmarks/README.md).
"""

import argparse
import json
import re
import resource
import statistics
import sys
from pathlib import Path

import open_clip
import torch
from open_clip_train.main import main as open_clip_train_main

# "Train Epoch: 0 [ 128/3840 (3%)] Data (t): 0.012 Batch (t): 3.301, 38.8/s, ... Loss: 4.85 (4.9)"
STEP_LINE = re.compile(
    r"Train Epoch: \d+ .*?Data \(t\): (?P<data>[\d.]+) Batch \(t\): (?P<batch>[\d.]+),"
    r".*? Loss: (?P<loss>[\d.eE+-]+) "
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-config", required=True, help="open_clip model-config JSON file")
    p.add_argument("--train-data", required=True, help="brace pattern or '::'-joined shards")
    p.add_argument("--train-num-samples", type=int, default=0, help="samples in the shards")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--precision", default="fp32", help="open_clip_train --precision")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--logs", required=True, help="scratch folder for open_clip_train's logs")
    p.add_argument("--warmup-steps-excluded", type=int, default=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config_path = Path(args.model_config)
    open_clip.add_model_config(config_path)
    name = "peer-bench"
    # train_num_samples fixes the epoch length: exactly --steps batches in one resampled epoch.
    train_argv = [
        "--model", config_path.stem,
        "--train-data", args.train_data,
        "--dataset-type", "webdataset",
        "--dataset-resampled",
        "--train-num-samples", str(args.steps * args.batch_size),
        "--batch-size", str(args.batch_size),
        "--workers", str(args.workers),
        "--epochs", "1",
        "--lr", str(args.lr),
        "--warmup", str(args.warmup),
        "--precision", args.precision,
        "--log-every-n-steps", "1",
        "--logs", args.logs,
        "--name", name,
        "--save-frequency", "0",
        "--seed", "0",
        "--device", "cpu" if not torch.cuda.is_available() else "cuda",
        "--report-to", "",
    ]  # fmt: skip
    open_clip_train_main(train_argv)

    log_file = Path(args.logs) / name / "out.log"
    steps = [m.groupdict() for m in STEP_LINE.finditer(log_file.read_text(encoding="utf-8"))]
    if len(steps) <= args.warmup_steps_excluded:
        sys.exit(f"only {len(steps)} step lines in {log_file}: nothing left to time")
    timed = steps[args.warmup_steps_excluded :]
    rates = [args.batch_size / float(s["batch"]) for s in timed]
    waits = [float(s["data"]) / float(s["batch"]) for s in timed]
    # this process + its largest reaped child (the data worker), as clipforge's figure
    peak_kb = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    print(
        json.dumps(
            {
                "tool": "open_clip_train",
                "median_samples_per_s": round(statistics.median(rates), 2),
                "data_wait_frac": round(statistics.mean(waits), 4),
                "last_loss": round(float(steps[-1]["loss"]), 4),
                "peak_rss_mb": round(peak_kb / 1024, 1),
                "steps_timed": len(timed),
            }
        )
    )


if __name__ == "__main__":
    main()
