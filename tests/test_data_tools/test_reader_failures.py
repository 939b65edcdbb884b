"""The reader on data that cannot be read: a resampled stream of unreadable shards stops with a
clear error, data-loader workers die with their parent, and a truncated shard counts the
samples it lost (from its manifest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clipforge.data_tools.reader import (
    ReaderConfig,
    ShardSpecError,
    ShardsUnreadableError,
    make_loader,
)
from clipforge.data_tools.shardformat import read_manifest
from clipforge.data_tools.transforms import clip_image_transforms
from clipforge.data_tools.writer import WriteConfig, write_shards
from tests.test_data_tools.shard_helpers import make_folder_source


def _unreadable_shards(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i}.tar").write_bytes(os.urandom(3000))  # not a tar: no member readable
    return folder


@pytest.mark.parametrize("workers", [0, 1])
def test_resampled_stream_of_unreadable_shards_stops_with_a_clear_error(
    tmp_path: Path, workers: int
) -> None:
    bad = _unreadable_shards(tmp_path / "bad")
    transform, _ = clip_image_transforms(8)
    config = ReaderConfig(batch_size=4, resampled=True, max_consecutive_shard_failures=10)
    loader = make_loader(bad, transform, config=config, num_workers=workers)
    t0 = time.monotonic()
    with pytest.raises(ShardsUnreadableError) as info:
        next(iter(loader))
    assert time.monotonic() - t0 < 60  # bounded: before the fix it never returned
    message = str(info.value)
    assert message.startswith("the data yields no samples: 10 shards in a row")
    assert "unreadable_shard" in message and str(bad) in message
    assert "\n" not in message and "Traceback" not in message  # one line, not a worker dump
    # a ShardSpecError, so every CLI reports it as its one-line usage error
    assert isinstance(info.value, ShardSpecError)
    if workers:
        assert loader.skipped == {"unreadable_shard": 10}


def test_a_readable_shard_resets_the_count_of_failures(tmp_path: Path) -> None:
    data = tmp_path / "mixed"
    write_shards(_make_source(tmp_path / "src", 4), data, WriteConfig(image_size=8), progress=False)
    _unreadable_shards(data, count=1)  # 1 of 2 shards is bad: as many bad draws as good ones
    transform, _ = clip_image_transforms(8)
    config = ReaderConfig(batch_size=4, resampled=True, seed=5, max_consecutive_shard_failures=12)
    loader = make_loader(data, transform, config=config, num_workers=0)
    for n, _batch in enumerate(loader):
        if n == 40:  # 41 good draws (4 samples each) and about as many bad ones, seeded
            break
    # far more failures than the bound in all, never the bound in a row: the count was reset
    assert loader.skipped["unreadable_shard"] > 2 * 12


def test_max_consecutive_shard_failures_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_consecutive_shard_failures must be >= 1, got 0"):
        ReaderConfig(max_consecutive_shard_failures=0)


_PARENT_SCRIPT = textwrap.dedent(
    """
    import sys
    from clipforge.data_tools import reader
    from clipforge.data_tools.transforms import clip_image_transforms

    if sys.argv[2] == "watchdog":  # no kernel death signal: the parent-pid check alone
        reader._set_parent_death_signal = lambda: None
    transform, _ = clip_image_transforms(8)
    # a worker that would draw unreadable shards for ever (the bound is out of reach)
    config = reader.ReaderConfig(resampled=True, max_consecutive_shard_failures=10**12)
    loader = reader.make_loader(sys.argv[1], transform, config=config, num_workers=1)
    print("iterating", flush=True)
    next(iter(loader))
    """
)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing paren
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, waiting to be reaped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("mechanism", ["pdeathsig", "watchdog"])
def test_a_worker_does_not_survive_its_parent_being_killed(tmp_path: Path, mechanism: str) -> None:
    bad = _unreadable_shards(tmp_path / "bad")
    repo = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT_SCRIPT, str(bad), mechanism],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == "iterating", parent.stderr.read()  # type: ignore[union-attr]
        workers: list[int] = []
        deadline = time.monotonic() + 60
        while not workers and time.monotonic() < deadline:
            workers = [p for p in _children(parent.pid) if _alive(p)]
            time.sleep(0.1)
        assert workers, "the loader started no worker process"
        time.sleep(0.5)  # the worker is past its init and drawing shards
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in workers if _alive(p)]
        for p in survivors:  # do not leave a spinning orphan behind a failing test
            os.kill(p, signal.SIGKILL)
        assert not survivors, f"worker(s) {survivors} outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def _make_source(root: Path, count: int) -> Path:
    make_folder_source(root, count, size=(8, 8))
    return root


def test_a_truncated_shard_counts_the_samples_it_lost(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(
        _make_source(tmp_path / "src", 150),
        shards,
        WriteConfig(image_size=8, image_format="png", shard_size=150),
        progress=False,
    )
    (shard,) = sorted(shards.glob("*.tar"))
    manifest = read_manifest(shards)
    assert manifest is not None and manifest.shards[0].samples == 150
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # cut in the middle, inside some member
    transform, _ = clip_image_transforms(8)
    loader = make_loader(shards, transform, config=ReaderConfig(batch_size=32), num_workers=0)
    read = sum(len(b["key"]) for b in loader)
    assert 50 < read < 100
    assert dict(loader.skipped) == {"truncated_shard": 150 - read}
