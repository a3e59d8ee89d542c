"""keep_freed_memory: freed large blocks stay in the process inside the block and go back on exit."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from brainmclip.cpu_memory import _glibc, keep_freed_memory


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
        rss_at_exit = _rss_bytes()
    returned_on_exit = rss_at_exit - _rss_bytes()
    assert kept_inside > 0.9 * size  # the freed block's pages are still ours, ready for the next step
    # Whatever else the process allocated meanwhile, the kept block's pages go back when the block ends.
    assert returned_on_exit > 0.9 * size


def test_disabled_is_a_no_op():
    with keep_freed_memory(enabled=False) as kept:
        assert kept is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc() is None, reason="glibc-specific setting")
def test_nested_blocks_keep_memory_until_the_outermost_ends():
    size = 256 * 2**20
    with keep_freed_memory():
        with keep_freed_memory() as inner:
            assert inner is True
            _rss_left_after_freeing(size)
        after_inner = _rss_bytes()
        # The inner block's end must not restore glibc's settings or trim: the freed pages are still ours.
        kept_after_inner = _rss_left_after_freeing(size)
        assert kept_after_inner > 0.9 * size
        rss_at_exit = _rss_bytes()
    assert rss_at_exit - _rss_bytes() > 0.9 * size
    assert after_inner > 0
