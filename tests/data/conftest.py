"""Fixtures shared by the data tests."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture
def linked_tree(tiny_nsd, tmp_path):
    """A copy of the tiny tree made of symbolic links: a file can be removed or replaced, the original stays."""
    root = tmp_path / "linked_nsd"
    shutil.copytree(tiny_nsd.root, root, copy_function=os.symlink)
    return root
