"""On CPU, freed activations are kept for reuse instead of being unmapped and page-faulted in
again every step (the speed-up itself is measured by ``python -m benchmarks.train_throughput``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Allocates, fills and frees a 64 MB tensor, then 30 times more; reports whether the block lay in
# the brk heap, how much the free gave back to the kernel, and how much resident memory the last 15
# rounds added (kept memory is reused once the heap has settled: nothing; without reuse: 960 MB).
_SCRIPT = """
import json, sys, torch
from clipforge.pretrain.cpu_memory import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else None
def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return lo, hi
    return 0, 0
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
t = torch.empty(16 << 20)  # 64 MB of float32
t.fill_(1.0)
first = t.data_ptr()
lo, hi = heap()
in_heap = lo <= first < hi
rss_full = rss_mb()
del t
rss_freed = rss_mb()
def rounds(n):
    for _ in range(n):
        again = torch.empty(16 << 20)
        again.fill_(2.0)
        del again
rounds(15)
rss_warm = rss_mb()
rounds(15)
print(json.dumps({"tuned": tuned, "in_heap": in_heap, "released_mb": rss_full - rss_freed,
                  "steady_growth_mb": rss_mb() - rss_warm}))
"""


def _run(mode: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning: Linux only")
def test_freed_memory_is_kept_and_reused() -> None:
    plain = _run("plain")
    # glibc's default: a fresh mapping, unmapped on free and mapped + faulted in again
    assert not plain["in_heap"] and plain["released_mb"] > 60
    tuned = _run("tuned")
    assert tuned["tuned"] is True
    assert tuned["in_heap"] and tuned["released_mb"] < 1 and tuned["steady_growth_mb"] < 1, tuned


def test_opt_out_leaves_malloc_alone() -> None:
    off = _run("tuned", CLIPFORGE_MALLOC_TUNING="0")
    assert off["tuned"] is False and not off["in_heap"]
