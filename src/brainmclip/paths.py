"""Paths that one output records of another, kept valid when a folder tree moves as a whole.

A manifest records the folders it was made from (a run's prepared dataset and feature store, a
prediction folder's run, a reconstruction folder's predictions) relative to the folder that holds
the manifest. Moving or copying ``runs/`` together with its data then keeps every link; absolute
paths, which older manifests hold, are still read as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["record_path", "resolve_path"]


def record_path(path: str | os.PathLike, base_dir: str | os.PathLike) -> str:
    """``path`` as a POSIX string relative to ``base_dir``, for a manifest written in ``base_dir``.

    Both are resolved first (symbolic links followed), so ``..`` steps in the result mean what the
    file system makes of them. Where no relative path exists (another drive on Windows), the
    absolute path is recorded instead.
    """
    target = Path(path).resolve()
    base = Path(base_dir).resolve()
    try:
        relative = os.path.relpath(target, base)
    except ValueError:
        return target.as_posix()
    return Path(relative).as_posix()


def resolve_path(value: str | os.PathLike, base_dir: str | os.PathLike) -> Path:
    """A recorded path as a usable one: absolute values as they are, relative ones joined to ``base_dir``."""
    path = Path(value)
    if path.is_absolute():
        return path
    return (Path(base_dir) / path).resolve()
