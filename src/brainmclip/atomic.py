"""Write files so that a reader never sees a half-written one.

Every output of every stage goes through :func:`atomic_path`: the data is written to a
hidden temporary name in the same folder and renamed over the final name only once
complete, so an interrupted job leaves either the old file, the new file, or no file.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = ["TEMP_MARKER", "atomic_path", "remove_stale_temporaries", "write_bytes_atomic", "write_json_atomic"]

TEMP_MARKER = ".tmp-"


def _temporary_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{TEMP_MARKER}{os.getpid()}")


@contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path; on success rename it to ``final``, on error remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(final: str | os.PathLike, obj) -> None:
    # sort_keys and a fixed indent keep the bytes identical for identical content.
    write_bytes_atomic(final, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def remove_stale_temporaries(root: str | os.PathLike) -> int:
    """Delete temporaries left by interrupted runs under ``root``; return how many."""
    count = 0
    for path in Path(root).rglob(f".*{TEMP_MARKER}*"):
        if path.is_file():
            path.unlink()
            count += 1
    return count


def read_manifest(root: str | os.PathLike, fmt: str, what: str, command: str, complete: bool = True) -> dict:
    """``root/manifest.json`` of a stage's output, checked: present, of format ``fmt`` and (optionally) complete.

    ``what`` names the output ("a prepared dataset") and ``command`` the one that makes it, for
    the one-line error a user sees.
    """
    root = Path(root)
    manifest_file = root / "manifest.json"
    if not manifest_file.is_file():
        raise MissingInputError(f"{manifest_file}: missing; {root} is not {what} (run brainmclip {command})")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != fmt:
        raise InvalidInputError(f"{manifest_file}: format {manifest.get('format')!r}; expected {fmt!r}")
    if complete and not manifest.get("complete"):
        raise InvalidInputError(f"{root}: brainmclip {command} did not finish; rerun the same command to resume")
    return manifest


def stage_arrays(final: str | os.PathLike, ids, arrays: dict, ids_name: str, dtype="float16") -> Path:
    """Write ``ids`` and ``arrays`` as ``.npy`` files into a fresh hidden folder beside ``final``.

    Returns the staging folder; the caller renames it (or its files) into place once complete,
    so a reader never sees a partial set. Arrays are stored as ``dtype`` (float16 halves disk).
    """
    import numpy as np

    final = Path(final)
    stage = final.with_name(f".{final.name}{TEMP_MARKER}{os.getpid()}")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    np.save(stage / f"{ids_name}.npy", ids)
    for name, array in arrays.items():
        np.save(stage / f"{name}.npy", np.asarray(array, dtype))
    return stage
