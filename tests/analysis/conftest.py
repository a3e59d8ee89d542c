"""Fixtures shared by the analysis tests."""

from __future__ import annotations

import re

import pytest

from brainmclip.cli import main


@pytest.fixture
def fails(capsys):
    """``fails(argv, pattern)``: the command exits with status 1 and one error line matching ``pattern``."""

    def check(argv, pattern) -> str:
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(pattern, err), err
        return err

    return check
