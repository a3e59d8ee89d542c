"""Fixtures of the fault-injection suite (its helper functions are in faults.py)."""

from __future__ import annotations

import pytest
from faults import run_cli


@pytest.fixture
def cli(capsys):
    """``cli(args) -> (code, stderr)`` of ``brainmclip -q ARGS``."""
    return lambda args: run_cli(args, capsys)
