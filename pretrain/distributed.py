"""Process-group setup from torchrun or SLURM environments, and small collective helpers."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
import torch.distributed as dist

_T = TypeVar("_T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    device: torch.device
    """The device this rank computes on."""
    backend: str | None
    """``nccl`` / ``gloo``, or None for a single process without a process group."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def detect_launch() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun (RANK...) or SLURM (SLURM_PROCID...)."""
    world = _env_int("WORLD_SIZE")
    if world is not None:
        return _env_int("RANK") or 0, world, _env_int("LOCAL_RANK") or 0
    world = _env_int("SLURM_NTASKS")
    if world is not None and world > 1:
        return _env_int("SLURM_PROCID") or 0, world, _env_int("SLURM_LOCALID") or 0
    return 0, 1, 0


def init_distributed(device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Initialise the process group when launched with several processes.

    NCCL when this rank computes on CUDA, gloo on CPU. Under SLURM without torchrun,
    MASTER_ADDR must be exported by the sbatch script (the README shows how).

    ``timeout_s`` bounds every collective: gloo raises in the waiting rank; NCCL's watchdog
    aborts the communicator and ends the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by
    default in the torch this project pins), so a dead peer ends the job instead of hanging it,
    and a launcher with restarts left (``torchrun --max-restarts``) starts the group again.
    """
    rank, world, local_rank = detect_launch()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible to this process")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: only "
                f"{torch.cuda.device_count()} visible on this node"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world == 1:
        return DistInfo(0, 1, 0, dev, None)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "a multi-process launch without MASTER_ADDR: use torchrun, or export "
                "MASTER_ADDR (the first node's host name) in the SLURM script"
            )
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend,
            store=_attempt_store(timeout),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=dev if use_cuda else None,
        )
    return DistInfo(rank, world, local_rank, dev, backend)


def _attempt_store(timeout: datetime.timedelta) -> dist.Store:
    """The env:// rendezvous store, under a prefix of its own for each torchrun restart.

    A restarted group may meet in the same store as the one that died (the agent's): the dead
    ranks' keys (gloo's listening addresses among them) would be read as the new ranks', and
    the new group's connect fails ("connection refused") or hangs. A fresh prefix per attempt
    (``TORCHELASTIC_RESTART_COUNT``) keeps each attempt's keys apart.
    """
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"clipforge/attempt-{attempt}", store)


def all_reduce_max(value: float, info: DistInfo) -> float:
    """The maximum of ``value`` over all ranks (the value itself when single-process)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """The mean of ``value`` over all ranks."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj: _T, info: DistInfo) -> _T:
    """Rank 0's ``obj`` on every rank (every rank passes a value of the same type)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def new_cpu_group(info: DistInfo, timeout_s: int) -> dist.ProcessGroup | None:
    """A gloo group over all ranks, of its own (None when single-process): for collectives that
    run in a background thread beside training's (an asynchronous checkpoint's), which must not
    interleave with the default group's. Every rank calls it, in the same order."""
    if not info.distributed:
        return None
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    # every rank is a member: never GroupMember.NON_GROUP_MEMBER
    return cast(dist.ProcessGroup, group)


def all_gather_objects(obj: _T, info: DistInfo) -> list[_T]:
    """Every rank's ``obj``, in rank order (``[obj]`` when single-process)."""
    if not info.distributed:
        return [obj]
    out: list[_T | None] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return cast(list[_T], out)  # every slot filled by all_gather_object
