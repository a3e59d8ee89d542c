"""Checksums of the files a stage writes, recorded in its manifest and verified when the files are opened.

A manifest's ``checksums`` maps each file's path (relative to the folder) to one entry:

* ``{"bytes": size, "sha256": digest}`` for files of up to ``SMALL_FILE`` bytes (the whole content);
* ``{"bytes": size, "sha256_ends": digest}`` above that: the digest of the first and the last
  ``ENDS`` bytes, so that opening a dataset of many gigabytes reads 2 MiB per array, not all of it.

The size is always compared. A ``.npy`` file is also checked against its own header (the data must
fill exactly the shape the header promises), which catches a cut file even where no manifest
recorded it. Reading goes through :func:`reading`, which turns the exceptions that libraries raise
for damaged files (``EOFError``, ``BadZipFile``, numpy's "mmap length is greater than file size", a
JSON decode error, ...) into one :class:`~brainmclip.errors.InvalidInputError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
import zlib
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from brainmclip.errors import BrainmclipError, InvalidInputError

__all__ = ["SMALL_FILE", "ENDS", "sha256_file", "file_checksum", "folder_checksums", "verify_file", "check_npy_size",
           "load_npy", "read_json", "reading", "corrupt"]

# Files up to this size are hashed whole; larger ones by their two ends.
SMALL_FILE = 4 * 2**20
ENDS = 2**20
_BLOCK = 2**22


def corrupt(path, detail: str, hint: str) -> InvalidInputError:
    """The one error every damaged file gives: what was found, and how to make the file again."""
    return InvalidInputError(f"{path}: truncated or corrupt ({detail}); {hint}")


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a whole file, read in blocks (memory stays bounded whatever its size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest(path: Path, size: int) -> tuple[str, str]:
    """("sha256", whole-file digest) for small files, ("sha256_ends", digest of both ends) for large ones."""
    if size <= SMALL_FILE:
        return "sha256", sha256_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(ENDS))
        f.seek(size - ENDS)
        digest.update(f.read(ENDS))
        return "sha256_ends", digest.hexdigest()


def file_checksum(path: str | os.PathLike) -> dict:
    """``{"bytes": size, "sha256" or "sha256_ends": digest}`` of one file."""
    path = Path(path)
    size = path.stat().st_size
    kind, value = _digest(path, size)
    return {"bytes": size, kind: value}


def folder_checksums(folder: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, dict]:
    """Checksums of ``names`` (paths relative to ``folder``; default: every file under it), keyed by name."""
    folder = Path(folder)
    if names is None:
        names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return {name: file_checksum(folder / name) for name in sorted(names)}


def verify_file(path: str | os.PathLike, entry: dict | None, hint: str) -> None:
    """Check ``path`` against its recorded ``entry`` (nothing to check when None)."""
    if not entry:
        return
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise corrupt(path, "missing, but its manifest lists it", hint) from None
    if size != entry.get("bytes"):
        raise corrupt(path, f"{size} bytes; its manifest records {entry.get('bytes')}", hint)
    kind = "sha256" if "sha256" in entry else "sha256_ends" if "sha256_ends" in entry else None
    if kind is None:
        return
    found_kind, value = _digest(path, size)
    if found_kind != kind or value != entry[kind]:
        part = "content" if kind == "sha256" else "first or last MiB"
        raise corrupt(path, f"its {part} differs from the checksum its manifest records", hint)


def check_npy_size(path: str | os.PathLike, hint: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a ``.npy`` header, once the file is checked to hold exactly that much data."""
    path = Path(path)
    with reading(path, "a .npy array", hint), open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise corrupt(path, f"unknown .npy version {version}", hint)
        shape, fortran, dtype = read(f)
        start = f.tell()
    if dtype.hasobject:
        return shape, dtype  # pickled objects have no fixed size (and are never written here)
    expected = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise corrupt(path, f"{size} bytes; its header describes {shape} {dtype}, {expected} bytes", hint)
    return shape, dtype


def load_npy(path: str | os.PathLike, hint: str, mmap: bool = False, entry: dict | None = None) -> np.ndarray:
    """``np.load`` of a checked ``.npy`` (recorded checksum, then size against its header); never unpickles."""
    path = Path(path)
    verify_file(path, entry, hint)
    check_npy_size(path, hint)
    with reading(path, "a .npy array", hint):
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def read_json(path: str | os.PathLike, hint: str, entry: dict | None = None):
    """The parsed content of a checked JSON file."""
    path = Path(path)
    verify_file(path, entry, hint)
    with reading(path, "JSON", hint):
        return json.loads(path.read_bytes().decode("utf-8"))


@contextmanager
def reading(path, what: str, hint: str):
    """Turn the errors libraries raise for a damaged ``path`` into one error naming it.

    Our own errors pass unchanged, and so do operating-system errors with an error number
    (permission denied, missing file), which already name their file.
    """
    try:
        yield
    except BrainmclipError:
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise corrupt(path, f"not readable as {what}: {_first_line(exc)}", hint) from None
    except (EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError) as exc:
        raise corrupt(path, f"not readable as {what}: {_first_line(exc)}", hint) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
