"""Write files so that a reader never sees a half-written one.

Every output of every stage goes through :func:`atomic_path`: the data is written to a
hidden temporary name in the same folder and renamed over the final name only once
complete, so an interrupted job leaves either the old file, the new file, or no file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from brainmclip.errors import InvalidInputError, MissingInputError, OutputInTheWayError

__all__ = ["LOCK_FILE", "TEMP_MARKER", "atomic_path", "crash_point", "locks_output", "output_entries", "output_lock",
           "remove_stale_temporaries", "write_bytes_atomic", "write_json_atomic"]

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
    try:
        manifest = json.loads(manifest_file.read_bytes().decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: a cut or overwritten file
        raise InvalidInputError(f"{manifest_file}: truncated or corrupt ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0]}); make {root} again with brainmclip {command}") from None
    if not isinstance(manifest, dict):
        raise InvalidInputError(f"{manifest_file}: not a JSON object; make {root} again with brainmclip {command}")
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


# -- one writer per output folder ------------------------------------------------------------

LOCK_FILE = ".brainmclip.lock"

# Folders this process holds locked (resolved path -> depth), so that a stage called from another
# stage on the same folder does not lock itself out: flock locks belong to an open file, not a process.
_held: dict[Path, int] = {}


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def output_lock(folder: str | os.PathLike):
    """Hold ``folder/.brainmclip.lock`` (an advisory ``flock``) while writing into ``folder``.

    Two brainmclip processes writing into one folder would mix their outputs (a ``run.json`` of one
    run beside the weights of another); the second one raises :class:`OutputInTheWayError` at once
    instead. The folder (and its parents) are created as needed. On exit, normal or not, the lock
    is released and its file deleted, and a folder this call created that still holds nothing is
    removed again, so a command that fails before writing leaves the disk as it found it. A
    process killed outright (SIGKILL, power loss) leaves the lock file behind, unlocked: the next
    command takes it over, and the stages' "is this folder empty" checks ignore it (see
    :func:`output_entries`). In a job of several processes (``WORLD_SIZE`` > 1) only process 0
    (``RANK`` 0) takes the lock, for all of them. Nested calls on one folder in one process share
    the outer call's lock.
    """
    import fcntl

    folder = Path(folder)
    key = folder.resolve()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        # One job of several processes (torchrun, accelerate launch): process 0 holds the lock for all of them.
        yield folder
        return
    if key in _held:
        _held[key] += 1
        try:
            yield folder
        finally:
            _held[key] -= 1
        return
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _remove_created(created)
            raise OutputInTheWayError(f"{folder}: another brainmclip process is writing here (pid "
                                      f"{_lock_holder(path)}); wait for it or use another --out") from None
        except BaseException:
            os.close(fd)
            raise
        # The holder before us deletes the file on release; a lock on a file no longer at `path` guards nothing.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = 0
        yield folder
    finally:
        _held.pop(key, None)
        try:  # only our own file: if the body replaced the folder, the file there now may be another process's
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)  # closing releases the lock
        _remove_created(created)


def _remove_created(created: list[Path]) -> None:
    """Remove the folders a lock created, deepest first, while they are still empty."""
    for path in created:
        try:
            path.rmdir()
        except OSError:  # not empty (or gone): the command wrote something there
            return


def output_entries(folder: str | os.PathLike) -> list[Path]:
    """What ``folder`` holds apart from its lock file; [] when it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name != LOCK_FILE]


def locks_output(parameter: str = "out"):
    """Decorator: hold :func:`output_lock` on the folder the call's ``parameter`` names (no lock when it is None)."""
    import functools
    import inspect

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            folder = signature.bind(*args, **kwargs).arguments.get(parameter)
            if folder is None:
                return function(*args, **kwargs)
            with output_lock(folder):
                return function(*args, **kwargs)
        return locked
    return decorate


_crash_counts: dict[str, int] = {}
_crash_lock = threading.Lock()  # sessions of prepare reach their crash point from worker threads


def crash_point(name: str) -> None:
    """Fault-injection hook for tests; never set in normal use.

    When the environment variable ``BRAINMCLIP_CRASH_AT`` is ``"<name>:<k>"``, the k-th call
    with this ``name`` (1-based, counted per name in this process) kills the process with
    SIGKILL, as an out-of-memory killer or a lost node would: no cleanup, no finally blocks.
    Stages call it right after a unit of work is durably written, so a test can check that
    rerunning the command continues from there. Unset, it costs one environment lookup.
    """
    target = os.environ.get("BRAINMCLIP_CRASH_AT")
    if not target or target.rpartition(":")[0] != name:
        return
    with _crash_lock:
        _crash_counts[name] = _crash_counts.get(name, 0) + 1
        if target == f"{name}:{_crash_counts[name]}":
            os.kill(os.getpid(), signal.SIGKILL)
