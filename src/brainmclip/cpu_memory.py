"""Keep freed memory in the process while training or fitting on CPU (glibc only).

Every backward pass allocates fresh gradient buffers (about 3 GB at the paper's size) and the
optimizer frees them again. glibc serves allocations that large with ``mmap`` and returns them to
the kernel on ``free``, so every step pays for the kernel zeroing and page-faulting gigabytes
again: on 2 CPU cores that was 11-13% of a BrainMCLIP step in ``bench/train_step_flops.py``
(batch 32 / 64), and more in a fresh process.
Telling glibc to serve them from its heap and never trim it makes the second step reuse the
first step's pages. The process keeps its peak footprint until the block ends, which a training
process reaches anyway after one step; on exit the kept free pages go back to the kernel. Ridge's
CV allocates its per-fold temporaries (hundreds of MB) the same way, fold after fold.
Blocks nest: only the outermost one sets and restores glibc's settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["keep_freed_memory"]

log = logging.getLogger("brainmclip.memory")

# mallopt parameters (malloc.h) and glibc's defaults, restored afterwards.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_INT_MAX = 2**31 - 1
_depth = 0  # open keep_freed_memory blocks (the outermost one owns glibc's settings)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (not musl)
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, large allocations come from glibc's heap and freed memory stays there.

    Yields whether the setting took effect (False off glibc, or when ``enabled`` is False). On
    exit glibc's defaults are restored and the free memory kept so far goes back to the kernel
    (``malloc_trim``), wherever it sits in the heap.
    """
    global _depth
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    if _depth:
        _depth += 1
        try:
            yield True
        finally:
            _depth -= 1
        return
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    if ok:
        log.debug("glibc malloc: no mmap for large blocks, no trimming (reuses freed memory)")
    _depth = 1
    try:
        yield ok
    finally:
        _depth = 0
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
