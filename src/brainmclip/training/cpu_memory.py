"""Keep freed memory in the process while training on CPU (glibc only).

Every backward pass allocates fresh gradient buffers (about 3 GB at the paper's size) and the
optimizer frees them again. glibc serves allocations that large with ``mmap`` and returns them to
the kernel on ``free``, so every step pays for the kernel zeroing and page-faulting gigabytes
again: on 2 CPU cores that was 11-13% of a BrainMCLIP step in ``bench/train_step_flops.py``
(batch 32 / 64), and more in a fresh process.
Telling glibc to serve them from its heap and never trim it makes the second step reuse the
first step's pages. The process keeps its peak footprint until the block ends, which a training
process reaches anyway after one step; on exit the kept free pages go back to the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["keep_freed_memory"]

log = logging.getLogger("brainmclip.train")

# mallopt parameters (malloc.h) and glibc's defaults, restored afterwards.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_INT_MAX = 2**31 - 1


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
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    if ok:
        log.debug("glibc malloc: no mmap for large blocks, no trimming (reuses freed gradient memory)")
    try:
        yield ok
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
