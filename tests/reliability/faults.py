"""Tools of the fault-injection suite: run a command line, fingerprint what is on disk, check a user error.

A module of its own name (not conftest.py, which every test folder has) so the suite's files can import it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from brainmclip.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``brainmclip -q ARGS`` (stdout is discarded)."""
    capsys.readouterr()
    code = main(["-q", *[str(a) for a in args]])
    return code, capsys.readouterr().err.strip()


def tree_checksums(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest); {} when it does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    """A user error: exit 1, one line on stderr, and it names what is wrong (each of ``words``)."""
    assert code == 1, f"exit {code}; stderr: {err}"
    assert err.count("\n") == 0 and err.startswith("brainmclip "), err
    assert "Traceback" not in err and "weights_only" not in err, err
    for word in words:
        assert str(word) in err, (word, err)
