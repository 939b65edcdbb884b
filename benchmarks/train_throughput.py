"""Training throughput, side by side with open_clip_train.

    python -m benchmarks.train_throughput --config bench-tiny --set data.train=demo-data \
        [--peer-python VENV/bin/python | --no-peer] [--warmup 5] [--json OUT]

Trains the configured model (``--config``/``--set`` as ``clipforge-pretrain`` takes them) for
``train.steps`` steps on the configured data with one metrics line per step, and reports the
median samples/s over the steps after a warm-up, the data-wait fraction and peak memory. Then
runs ``python -m open_clip_train.main`` in the peer venv through ``peer_open_clip_train.py``
with the same model config, batch size, precision, data, data workers and threads, and prints
the ratio. The peer's python comes from ``--peer-python`` or ``$CLIPFORGE_PEER_OPENCLIP``
(README.md in this folder says how to make it) and is checked before anything is trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.peer_python import OPEN_CLIP_TRAIN, PeerError, peer_env, peer_python
from clipforge.data_tools.atomic import write_json_atomic
from clipforge.data_tools.reader import ShardSpecError, parse_shard_spec
from clipforge.pretrain.config import Config, ConfigError, load_config
from clipforge.pretrain.models import resolve_model_config
from clipforge.pretrain.train import TrainingAborted, train

PROG = "benchmarks.train_throughput"
PEER_SCRIPT = Path(__file__).with_name("peer_open_clip_train.py")


def _peak_rss_mb() -> float:
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    ) / 1024


def bench_clipforge(config: Config, warmup: int) -> dict[str, Any]:
    """Train ``config`` in a scratch run directory, one metrics line per step, no checkpoints
    but the last; the figures of the steps after ``warmup``."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(
            config,
            train=replace(
                config.train,
                run_dir=tmp,
                log_every=1,
                resume=False,
                checkpoint_every=10**9,
                progress="lines",
            ),
        )
        train(cfg)
        records = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > warmup]
    return {
        "tool": "clipforge",
        "median_samples_per_s": round(statistics.median(r["samples_per_s"] for r in timed), 2),
        "data_wait_frac": round(statistics.mean(r["data_wait_frac"] for r in timed), 4),
        "last_loss": round(records[-1]["loss"], 4),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "steps_timed": len(timed),
    }


def bench_peer(config: Config, warmup: int, python: str) -> dict[str, Any] | str:
    """open_clip_train on the same settings through ``python`` (checked by :func:`check_peer`);
    its figures, or why it failed."""
    _, model_cfg = resolve_model_config(config.model.name)
    sources = parse_shard_spec(config.data.train)
    if len(sources) != 1:
        return "peer skipped: open_clip_train comparison needs a single data source"
    urls = sources[0].urls
    samples = sources[0].samples or 0
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / f"{Path(config.model.name).stem}.json"
        cfg_path.write_text(json.dumps(model_cfg))
        cmd = [
            python,
            "-P",  # keep this folder off the peer's sys.path
            str(PEER_SCRIPT),
            "--model-config",
            str(cfg_path),
            "--train-data",
            "::".join(urls) if len(urls) > 1 else urls[0],
            "--train-num-samples",
            str(samples),
            "--batch-size",
            str(config.data.batch_size),
            "--workers",
            str(config.data.workers),
            "--steps",
            str(config.train.steps),
            "--precision",
            {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[config.train.precision],
            "--lr",
            str(config.optim.lr),
            "--warmup",
            str(config.optim.warmup_steps),
            "--threads",
            str(torch.get_num_threads()),
            "--logs",
            str(Path(tmp) / "logs"),
            "--warmup-steps-excluded",
            str(warmup),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), check=False)
    if proc.returncode != 0:
        return f"peer failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_peer(config: Config, flag_value: str | None) -> str:
    """The open_clip_train python, checked before anything runs: a missing or broken
    interpreter, or data it cannot read, raise :class:`PeerError` naming what to do."""
    python = peer_python(OPEN_CLIP_TRAIN, flag_value, alone="--no-peer")
    if len(parse_shard_spec(config.data.train)) != 1:
        raise PeerError(
            "the open_clip_train comparison needs a single data.train source "
            "(no '::' mixing), or --no-peer"
        )
    return python


def run_benchmark(config: Config, warmup: int = 5, python: str | None = None) -> dict[str, Any]:
    """Both tools on the same settings, one after the other; prints a table. ``python``: the
    peer's interpreter, checked by :func:`check_peer` (None: clipforge alone)."""
    print(
        f"benchmark: model {config.model.name}, batch {config.data.batch_size}, "
        f"{config.train.precision}, {config.data.workers} data worker(s), "
        f"{torch.get_num_threads()} threads, {config.train.steps} steps "
        f"(first {warmup} not timed), data {config.data.train}",
        flush=True,
    )
    # clipforge first: the peer runs as a child process, and a child's peak RSS would otherwise
    # count in this process's RUSAGE_CHILDREN figure.
    ours = bench_clipforge(config, warmup)
    theirs = bench_peer(config, warmup, python) if python else "peer not run (--no-peer)"
    peer_rate = theirs.get("median_samples_per_s") if isinstance(theirs, dict) else None
    print(f"{'tool':<16} {'samples/s':>10} {'data-wait':>10} {'peak RSS MB':>12}")
    print(
        f"{'clipforge':<16} {ours['median_samples_per_s']:>10} "
        f"{ours['data_wait_frac']:>10.1%} {ours['peak_rss_mb']:>12}"
    )
    if isinstance(theirs, dict):
        print(
            f"{'open_clip_train':<16} {peer_rate:>10} {theirs['data_wait_frac']:>10.1%} "
            f"{theirs['peak_rss_mb']:>12}"
        )
        print(f"ratio clipforge / open_clip_train: {ours['median_samples_per_s'] / peer_rate:.2f}x")
    else:
        print(theirs)
    return {"clipforge": ours, "open_clip_train": theirs}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default="bench-tiny", help="preset name or YAML file (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), as clipforge-pretrain takes them",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="steps excluded from the median (default: %(default)s)",
    )
    parser.add_argument(
        "--peer-python",
        help=f"python of the open_clip_train venv (default ${OPEN_CLIP_TRAIN.env_var})",
    )
    parser.add_argument(
        "--no-peer",
        action="store_true",
        help="measure clipforge alone (no open_clip_train venv needed)",
    )
    parser.add_argument("--json", help="also write the figures here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 2 with a one-line error for a bad config or a missing peer, 3 when
    clipforge's training aborts."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipforge").setLevel(logging.INFO)
    try:
        config = load_config(args.config, args.overrides)
        python = None if args.no_peer else check_peer(config, args.peer_python)
        figures = run_benchmark(config, args.warmup, python)
    except (ConfigError, ShardSpecError, PeerError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"{PROG}: training aborted: {e}", file=sys.stderr)
        return 3
    if args.json:
        write_json_atomic(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
