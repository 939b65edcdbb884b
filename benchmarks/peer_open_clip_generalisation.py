"""Train with ``python -m open_clip_train.main`` (a PEER tool) for
``python -m benchmarks.generalisation``, and keep its checkpoint.

Registers the given model-config JSON with open_clip under the file's stem, runs
open_clip_train's own ``main`` for exactly ``--steps`` steps (one resampled epoch of
``steps x batch`` samples, so that its cosine schedule ends at the last step) and saves its
checkpoint. Everything not named here is open_clip_train's own default: batch size, learning
rate, weight decay, warmup, AdamW betas and eps (which it picks from the model *name*), the
augmentation. ``--batch-size``/``--lr``/``--wd``/``--warmup`` override them (the benchmark's
"clipforge recipe" row). The machine settings are the benchmark's: device, fp32, data workers,
threads. Prints one line of JSON: the hyperparameters it trained with, the training seconds
(the wall-clock of ``main``: model and data set-up, the steps, the checkpoint save), the median
samples/s of the steps after ``--warmup-steps-excluded``, the last loss and the checkpoint path.

This script does NOT import clipforge. It runs only in the peer virtual environment
(torch 2.14.1, open_clip_torch 3.3.0, webdataset==0.2.86, pandas; see benchmarks/README.md).
"""

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch
from open_clip_train.main import main as open_clip_train_main
from open_clip_train.params import parse_args as open_clip_train_args

# "Train Epoch: 0 [ 128/3840 (3%)] Data (t): 0.012 Batch (t): 3.301, 38.8/s, ... Loss: 4.85 (4.9)"
STEP_LINE = re.compile(
    r"Train Epoch: \d+ .*?Data \(t\): (?P<data>[\d.]+) Batch \(t\): (?P<batch>[\d.]+),"
    r".*? Loss: (?P<loss>[\d.eE+-]+) "
)
RUN_NAME = "generalisation"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-config", required=True, help="open_clip model-config JSON file")
    p.add_argument("--train-data", required=True, help="brace pattern or '::'-joined shards")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--precision", default="fp32", help="open_clip_train --precision")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--logs", required=True, help="folder for open_clip_train's logs/checkpoint")
    p.add_argument("--batch-size", type=int, help="default: open_clip_train's own")
    p.add_argument("--lr", type=float, help="default: open_clip_train's own")
    p.add_argument("--wd", type=float, help="default: open_clip_train's own")
    p.add_argument("--warmup", type=int, help="default: open_clip_train's own")
    p.add_argument("--warmup-steps-excluded", type=int, default=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config_path = Path(args.model_config)
    open_clip.add_model_config(config_path)
    model = config_path.stem
    base = ["--model", model]
    defaults = open_clip_train_args(base)  # what open_clip_train picks when not told
    batch = args.batch_size or defaults.batch_size
    train_argv = [
        *base,
        "--train-data", args.train_data,
        "--dataset-type", "webdataset",
        "--dataset-resampled",
        "--train-num-samples", str(args.steps * batch),
        "--batch-size", str(batch),
        "--workers", str(args.workers),
        "--epochs", "1",
        "--precision", args.precision,
        "--log-every-n-steps", "1",
        "--logs", args.logs,
        "--name", RUN_NAME,
        "--save-frequency", "1",
        "--seed", str(args.seed),
        "--device", "cuda" if torch.cuda.is_available() else "cpu",
        "--report-to", "",
    ]  # fmt: skip
    for flag, value in (("--lr", args.lr), ("--wd", args.wd), ("--warmup", args.warmup)):
        if value is not None:
            train_argv += [flag, str(value)]
    used = open_clip_train_args(train_argv)
    t0 = time.perf_counter()
    open_clip_train_main(train_argv)
    seconds = time.perf_counter() - t0

    run = Path(args.logs) / RUN_NAME
    steps = [m.groupdict() for m in STEP_LINE.finditer((run / "out.log").read_text("utf-8"))]
    if not steps:
        sys.exit(f"no step lines in {run / 'out.log'}")
    timed = steps[args.warmup_steps_excluded :] or steps
    checkpoint = run / "checkpoints" / "epoch_1.pt"
    if not checkpoint.is_file():
        sys.exit(f"open_clip_train wrote no checkpoint at {checkpoint}")
    print(
        json.dumps(
            {
                "tool": "open_clip_train",
                "model": model,
                "steps": len(steps),
                "batch_size": batch,
                "lr": used.lr,
                "wd": used.wd,
                "warmup": used.warmup,
                "beta1": used.beta1,
                "beta2": used.beta2,
                "eps": used.eps,
                "train_seconds": round(seconds, 2),
                "median_samples_per_s": round(
                    statistics.median(batch / float(s["batch"]) for s in timed), 2
                ),
                "last_loss": round(float(steps[-1]["loss"]), 4),
                "checkpoint": str(checkpoint),
            }
        )
    )


if __name__ == "__main__":
    main()
