"""Keep freed memory in the process on CPU runs, so activations are not page-faulted in anew.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it to the kernel on ``free``. A CPU training step allocates and frees the
same large activations every step (a ViT-B MLP activation at batch 128 is 8,320 x 1,024 floats
= 34 MB in the tiny benchmark config, far more for real ones), so each step first-touches --
page-faults and zero-fills -- hundreds of MB: a quarter of the image tower's step time in
``benchmarks.train_throughput``. Turning mmap off for malloc and never trimming the heap makes
freed blocks come back for the next step's tensors, already mapped. The CUDA caching allocator
does the same for GPU memory; this is its CPU counterpart, with the same price: peak memory stays
reserved by the process. Heap fragmentation is the risk: an allocation pattern of ever-growing
blocks each pinned by a long-lived small one would grow the heap step after step. A training
step's pattern repeats, so the heap settles: the demo's 800 steps with captions of varying length
stay at 1,070-1,075 MB RSS throughout (1,041-1,073 MB untuned). Only the training process
is switched (CPU devices); inference, the search service and data loading outside training keep
glibc's defaults.

Set ``CLIPFORGE_MALLOC_TUNING=0`` to leave malloc alone (e.g. with jemalloc/tcmalloc preloaded).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

TOP_PAD_BYTES = 64 << 20
"""Extra heap requested whenever the heap grows, so it grows rarely."""

_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module doc). Idempotent; True if
    the setting is in effect, False where it cannot apply (not glibc) or is turned off."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("CLIPFORGE_MALLOC_TUNING", "1") == "0":
        log.info("CLIPFORGE_MALLOC_TUNING=0: malloc left as it is")
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = (
        mallopt(_M_MMAP_MAX, 0) == 1
        and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
        and mallopt(_M_TOP_PAD, TOP_PAD_BYTES) == 1
    )
    if ok:
        log.info("malloc keeps freed memory for reuse (CLIPFORGE_MALLOC_TUNING=0 to not)")
    _tuned = ok
    return ok
