"""The project's error type for problems a user can fix: bad inputs, options, files or output folders.

The command line prints these (and operating-system errors that name their file) as one line and exits
with status 1; any other exception is a bug and keeps its traceback. Each subclass also derives from the
built-in exception that describes it, so ``except ValueError`` / ``except FileNotFoundError`` keep working.
"""

from __future__ import annotations

__all__ = ["BrainmclipError", "InvalidInputError", "MissingInputError", "OutputInTheWayError"]


class BrainmclipError(Exception):
    """A problem with what the user gave (message: what is wrong and what was expected)."""


class InvalidInputError(BrainmclipError, ValueError):
    """An input file, option or config value that is wrong: its message names it and what was expected."""


class MissingInputError(BrainmclipError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class OutputInTheWayError(BrainmclipError, FileExistsError):
    """The output folder holds something this command did not write, or written with other settings."""
