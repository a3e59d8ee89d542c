"""keep_freed_memory: freed large blocks stay in the process inside the block, not after it."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from brainmclip.training.cpu_memory import _glibc, keep_freed_memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_left_after_freeing(size: int) -> int:
    block = torch.ones(size // 4)  # touched, so resident
    before_free = _rss_bytes()
    del block
    return _rss_bytes() - (before_free - size)


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc() is None, reason="glibc-specific setting")
def test_freed_gradients_stay_resident_only_inside_the_block():
    size = 256 * 2**20
    with keep_freed_memory() as kept:
        assert kept is True
        kept_inside = _rss_left_after_freeing(size)
    returned_after = _rss_left_after_freeing(size)
    assert kept_inside > 0.9 * size  # the freed block's pages are still ours, ready for the next step
    assert returned_after < 0.1 * size  # glibc's defaults are back: large blocks go back to the kernel


def test_disabled_is_a_no_op():
    with keep_freed_memory(enabled=False) as kept:
        assert kept is False
