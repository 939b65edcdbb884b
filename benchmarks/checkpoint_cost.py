"""What a step checkpoint costs: whole-state (gathered on rank 0) vs sharded (DCP), sync and async.

    python -m benchmarks.checkpoint_cost [--model ViT-L-14] [--ranks 2] [--work-dir DIR]
        [--threads 1] [--json OUT]

Builds the model (an open_clip name or model-config JSON, as ``model.name`` takes it) on
``--ranks`` gloo ranks on the CPU, wrapped with FSDP2 as ``model.fsdp=true`` wraps it, gives
AdamW its state (one step on random gradients: both moments filled), then saves it through the
trainer's own functions, each form in turn, and on one process loads it back:

- ``whole``: :func:`~clipforge.pretrain.parallelize.full_state_dicts` gathers the whole state on
  rank 0, :func:`~clipforge.pretrain.checkpoint.save_checkpoint` writes ``step-N.pt``; the other
  ranks wait for it (the trainer's error broadcast);
- ``sharded``: every rank writes its own shards (:func:`~clipforge.pretrain.sharded_checkpoint.
  save_shards`), rank 0 publishes the directory;
- ``sharded async``: training is blocked only while the shards are staged to host memory; the
  write then completes in the background (the time to completion is reported beside it);
- ``load``: a 1-process resume of each (another world size: DCP reads every slice), through
  :func:`~clipforge.pretrain.sharded_checkpoint.load_shards` and
  :func:`~clipforge.pretrain.checkpoint.load_checkpoint` + ``load_full_state_dicts``.

Each rank is its own process, so peak RSS is per rank: the kernel's high-water mark
(``VmHWM`` in ``/proc/self/status``), reset before each phase through ``/proc/self/clear_refs``,
beside the RSS the phase started from. The machine's load (``uptime``) is printed with the
figures: other jobs sharing the cores or the disk slow every phase alike.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from clipforge.data_tools.atomic import write_json_atomic
from clipforge.pretrain.config import Config, ConfigError, load_config

PROG = "benchmarks.checkpoint_cost"
DEFAULT_MODEL = "ViT-L-14"
STEP = 1  # the step number the checkpoints are written under
# whole: rank 0 holds its shard plus the gathered whole state; the 1-rank whole load holds the
# loaded file beside the model and optimizer it fills: about twice the state either way
MEMORY_FACTOR = 2.0
OVERHEAD_BYTES = 2 * 2**30  # interpreters, torch, open_clip, the model build's transient copy


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="open_clip model name or model-config JSON (default: %(default)s)",
    )
    p.add_argument(
        "--ranks", type=int, default=2, help="gloo ranks that save (default: %(default)s)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per rank (default: %(default)s)"
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the checkpoints are written (default: a temporary folder, removed after)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures here "
                   "(default: printed only)")  # fmt: skip
    p.add_argument(
        "--worker",
        choices=("save", "load"),
        default=None,
        help="run as one of the processes the driver starts: a save rank or the 1-process load "
        "(default: the driver, which starts them and prints the table)",
    )
    return p


def _config(model: str, fsdp: bool) -> Config:
    return load_config(
        "tiny",
        [f"model.name={model}", f"model.fsdp={str(fsdp).lower()}", "model.pooled_forward=false"],
    )


# ------------------------------------------------------------------ memory from /proc
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Set the high-water mark (VmHWM) back to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def _release_freed_memory() -> None:
    """Give freed heap back to the kernel, so a phase's RSS does not carry the last one's."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS may carry freed memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _du_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _phase(name: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
    """Run ``fn`` timed, with this rank's RSS before it and its peak RSS during it."""
    _release_freed_memory()
    before = _status_mb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    extra = fn() or {}
    seconds = time.perf_counter() - t0
    return {
        "phase": name,
        "seconds": round(seconds, 2),
        "rss_before_mb": round(before),
        "peak_rss_mb": round(_status_mb("VmHWM")),
        **extra,
    }


# ------------------------------------------------------------------ the save ranks
def _save_worker(model_name: str, work: Path, threads: int) -> None:
    from clipforge.pretrain.checkpoint import checkpoint_path, rng_state, save_checkpoint
    from clipforge.pretrain.distributed import (
        barrier,
        broadcast_object,
        init_distributed,
        new_cpu_group,
        shutdown,
    )
    from clipforge.pretrain.models import build_model
    from clipforge.pretrain.optim import make_optimizer
    from clipforge.pretrain.parallelize import full_state_dicts, parallelize, unwrap
    from clipforge.pretrain.sharded_checkpoint import (
        PendingSave,
        model_optimizer_state,
        publish,
        save_shards,
        start_async_save,
    )

    torch.set_num_threads(threads)
    info = init_distributed("cpu", timeout_s=3600)
    config = _config(model_name, fsdp=True)
    torch.manual_seed(0)
    model, _ = build_model(config.model)
    model = parallelize(model, config.model, info)
    optimizer = make_optimizer(unwrap(model), config)
    for p in model.parameters():  # one AdamW step: both moments hold real values
        if p.requires_grad:
            p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    group = new_cpu_group(info, 3600)
    # what resume requires of a step checkpoint's non-tensor state (the trainer adds the
    # schedule, config and the like: a few kB)
    sidecar = {
        "step": STEP,
        "samples_seen": 0,
        "rng": rng_state(),
        "data_positions": [{} for _ in range(info.world_size)],
        "written_by": PROG,
    }
    results: list[dict[str, Any]] = []

    def whole() -> dict[str, Any]:
        model_sd, optim_sd = full_state_dicts(model, optimizer)  # every rank
        if info.is_main:
            state = {"model": model_sd, "optimizer": optim_sd, **sidecar}
            save_checkpoint(work / "whole", STEP, state, keep=1)
        del model_sd, optim_sd
        broadcast_object(None, info)  # the trainer's ranks wait for rank 0's write here
        return {}

    def sharded(folder: Path) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            final = checkpoint_path(folder, STEP, sharded=True)
            tmp = final.with_name(final.name + ".tmp-bench")
            save_shards(tmp, model_optimizer_state(unwrap(model), optimizer), group)
            if info.is_main:
                publish(tmp, final, sidecar)
            broadcast_object(None, info)
            return {}

        return run

    def sharded_async() -> dict[str, Any]:
        final = checkpoint_path(work / "sharded-async", STEP, sharded=True)
        tmp = final.with_name(final.name + ".tmp-bench")
        t0 = time.perf_counter()
        state = model_optimizer_state(unwrap(model), optimizer)
        future = start_async_save(tmp, state, group)
        pending = PendingSave(future, tmp, final, sidecar if info.is_main else None)
        blocked = time.perf_counter() - t0  # training would go on from here
        del state
        pending.wait()
        return {"blocked_seconds": round(blocked, 2)}

    for name, fn in (
        ("whole", whole),
        ("sharded", sharded(work / "sharded")),
        ("sharded async", sharded_async),
    ):
        barrier(info)
        results.append(_phase(name, fn))
        barrier(info)
    write_json_atomic(work / f"save-rank{info.rank}.json", results)
    shutdown(info)


# ------------------------------------------------------------------ the 1-process load
def _load_worker(model_name: str, work: Path, threads: int) -> None:
    from clipforge.pretrain.checkpoint import checkpoint_path, load_checkpoint
    from clipforge.pretrain.models import build_model
    from clipforge.pretrain.optim import make_optimizer
    from clipforge.pretrain.parallelize import load_full_state_dicts
    from clipforge.pretrain.sharded_checkpoint import load_shards

    torch.set_num_threads(threads)
    config = _config(model_name, fsdp=False)
    model, _ = build_model(config.model)
    optimizer = make_optimizer(model, config)

    def sharded() -> None:
        load_shards(model, optimizer, checkpoint_path(work / "sharded", STEP, sharded=True))

    def whole() -> None:
        state = load_checkpoint(checkpoint_path(work / "whole", STEP))
        load_full_state_dicts(model, optimizer, state["model"], state["optimizer"])

    results = [_phase("load sharded", sharded), _phase("load whole", whole)]
    write_json_atomic(work / "load.json", results)


# ------------------------------------------------------------------ the driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_workers(args: argparse.Namespace, work: Path) -> None:
    base = [sys.executable, "-m", PROG, "--model", args.model, "--work-dir", str(work)]
    base += ["--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(_free_port())
    procs = [
        subprocess.Popen(
            [*base, "--worker", "save"],
            env={**env, "WORLD_SIZE": str(args.ranks), "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(args.ranks)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"a save rank failed (exit codes {codes})")
    one = {k: v for k, v in env.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    code = subprocess.run([*base, "--worker", "load"], env={**one, "WORLD_SIZE": "1"}).returncode
    if code:
        raise RuntimeError(f"the load process failed (exit code {code})")


def _model_size(model_name: str) -> tuple[int, int]:
    """(parameters, bytes of parameters + both AdamW moments), from a build on the meta device
    (no memory, no init)."""
    import open_clip

    from clipforge.pretrain.models import resolve_model_config

    name, _ = resolve_model_config(_config(model_name, fsdp=False).model.name)
    quiet = logging.getLogger()
    level, quiet.level = quiet.level, logging.ERROR  # "no pretrained weights": none are meant
    try:
        with torch.device("meta"):
            model = open_clip.create_model(name, pretrained=None, device="meta")
    finally:
        quiet.setLevel(level)
    params = [p for p in model.parameters()]
    count = sum(p.numel() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return count, sum(p.numel() * p.element_size() for p in params) + 2 * trainable


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("form", "rank", "training blocked s", "until written s", "peak RSS MiB",
            "RSS before MiB", "on disk")  # fmt: skip
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("-" * (len(h) + 2) for h in head) + "|",
    ]
    for r in rows:
        blocked = r.get("blocked_seconds", r["seconds"])
        cells = (
            r["phase"],
            str(r["rank"]),
            f"{blocked:.2f}",
            f"{r['seconds']:.2f}",
            f"{r['peak_rss_mb']:,}",
            f"{r['rss_before_mb']:,}",
            r.get("on_disk", ""),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker is not None:
        assert args.work_dir is not None
        worker = _save_worker if args.worker == "save" else _load_worker
        worker(args.model, args.work_dir, args.threads)
        return 0
    if args.ranks < 2:
        print(f"{PROG}: --ranks must be >= 2 (a sharded save needs shards), got {args.ranks}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        params, state_bytes = _model_size(args.model)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"{PROG}: --model {args.model}: {e}", file=sys.stderr)
        return 2
    needed = int(MEMORY_FACTOR * state_bytes) + OVERHEAD_BYTES * args.ranks
    available = _mem_available_bytes()
    if needed > available:
        print(
            f"{PROG}: --model {args.model} ({params:,} parameters, {_gb(state_bytes)} of weights "
            f"+ AdamW state) needs about {_gb(needed)} of host memory, {_gb(available)} is "
            "available: pick a smaller --model",
            file=sys.stderr,
        )
        return 2
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    owned = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="checkpoint-cost-")) if owned else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    print(f"{PROG}: {args.model}, {params:,} parameters, {_gb(state_bytes)} of float32 weights "
          f"+ AdamW moments; {args.ranks} gloo ranks (FSDP2) on the CPU, {args.threads} "
          f"thread(s) each; checkpoints in {work}", flush=True)  # fmt: skip
    print(f"uptime before: {uptime}", flush=True)
    try:
        _run_workers(args, work)
        rows: list[dict[str, Any]] = []
        for rank in range(args.ranks):
            for r in json.loads((work / f"save-rank{rank}.json").read_text()):
                rows.append({**r, "rank": rank})
        for r in json.loads((work / "load.json").read_text()):
            rows.append({**r, "rank": "0 of 1"})
        sizes = {
            "whole": _du_bytes(work / "whole" / f"step-{STEP}.pt"),
            "sharded": _du_bytes(work / "sharded" / f"step-{STEP}"),
            "sharded async": _du_bytes(work / "sharded-async" / f"step-{STEP}"),
        }
        for r in rows:
            if r["rank"] == 0 and r["phase"] in sizes:
                r["on_disk"] = _gb(sizes[r["phase"]])
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(_table(rows))
    print(f"uptime after: {after}")
    if args.json is not None:
        write_json_atomic(
            args.json,
            {
                "model": args.model,
                "parameters": params,
                "state_bytes": state_bytes,
                "ranks": args.ranks,
                "uptime_before": uptime,
                "uptime_after": after,
                "rows": rows,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
