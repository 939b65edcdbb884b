"""``clipforge-pretrain --benchmark``: training throughput side by side with open_clip_train.

Trains the configured model for ``train.steps`` steps on the configured data with one metrics
line per step, and reports the median samples/s over the steps after a warm-up, the data-wait
fraction and peak memory. With the peer venv present (see shared/PEERS.md), runs
``python -m open_clip_train.main`` through ``peer_open_clip_train.py`` with the same model
config, batch size, precision, data, data workers and threads, and prints the ratio.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from clipforge.data_tools.reader import parse_shard_spec
from clipforge.pretrain.config import Config, ConfigError
from clipforge.pretrain.models import resolve_model_config

PEER_SCRIPT = Path(__file__).with_name("peer_open_clip_train.py")
DEFAULT_PEER_PYTHON = "/work/peers/openclip/bin/python"


def _peak_rss_mb() -> float:
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    ) / 1024


def bench_clipforge(config: Config, warmup: int) -> dict[str, Any]:
    from clipforge.pretrain.train import train

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


def bench_peer(config: Config, warmup: int, peer_python: str) -> dict[str, Any] | str:
    if not Path(peer_python).exists():
        return (
            f"peer skipped: no open_clip_train venv at {peer_python} "
            "(create it as shared/PEERS.md says; --peer-python PATH)"
        )
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
            peer_python,
            "-P",
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
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return f"peer failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_peer(config: Config, peer_python: str) -> None:
    """Fail before anything runs when open_clip_train's half could not: a missing or broken
    interpreter, or data it cannot read (ConfigError naming what to do)."""
    how = (
        "create its venv as the benchmark docs say and pass --peer-python PATH (or set "
        "CLIPFORGE_PEER_OPENCLIP), or measure clipforge alone with --no-peer"
    )
    if not Path(peer_python).is_file():
        raise ConfigError(f"--benchmark: no open_clip_train interpreter at {peer_python}: {how}")
    if len(parse_shard_spec(config.data.train)) != 1:
        raise ConfigError(
            "--benchmark: the open_clip_train comparison needs a single data.train source "
            "(no '::' mixing), or --no-peer"
        )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    try:
        proc = subprocess.run(
            [peer_python, "-P", "-c", "import open_clip_train.main"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"--benchmark: {peer_python} does not run ({e}): {how}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(
            f"--benchmark: {peer_python} cannot import open_clip_train.main ({last}): {how}"
        )


def run_benchmark(
    config: Config, warmup: int = 5, peer_python: str | None = None, peer: bool = True
) -> dict:
    """Both tools on the same settings, one after the other; prints a table. The peer's
    interpreter is checked first (:func:`check_peer`), so a missing one fails in seconds."""
    peer_python = peer_python or os.environ.get("CLIPFORGE_PEER_OPENCLIP", DEFAULT_PEER_PYTHON)
    if peer:
        check_peer(config, peer_python)
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
    theirs = bench_peer(config, warmup, peer_python) if peer else "peer not run (--no-peer)"
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
