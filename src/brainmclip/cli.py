"""Command line: thin wiring over the Python API, one subcommand per stage.

Every error a user can cause (bad arguments, missing or malformed files) ends as one line on
stderr and a non-zero exit; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from brainmclip import __version__

__all__ = ["main"]

log = logging.getLogger("brainmclip")


def _subject_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of subject numbers, e.g. 1,2")


def _add_simulate(sub) -> None:
    from brainmclip.data.synthetic import list_presets

    p = sub.add_parser("simulate", help="write a simulated NSD tree (official file names and formats)",
                       description="Write a simulated Natural Scenes Dataset with NSD's file layout.")
    p.add_argument("--out", required=True, type=Path, help="output folder (empty or missing)")
    p.add_argument("--preset", default="tiny", choices=list_presets(),
                   help="tiny: tests (seconds); small: the demo; nsd: real NSD sizes (default: tiny)")
    p.add_argument("--subjects", default=[1], type=_subject_list, help="comma-separated NSD subjects 1-8 (default: 1)")
    p.add_argument("--seed", default=0, type=int, help="random seed; same seed, same bytes (default: 0)")
    p.add_argument("--sessions", default=None, type=int,
                   help="write only the first K sessions per subject (a full nsd preset is tens of GB)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args) -> int:
    from brainmclip.data.synthetic import make_synthetic_nsd

    result = make_synthetic_nsd(args.out, preset=args.preset, subjects=args.subjects, seed=args.seed,
                                sessions=args.sessions, force=args.force, progress=not args.quiet)
    print(result.summary())
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the whole chain on simulated data (what `make demo` runs)")
    p.add_argument("--out", default=Path("runs/demo"), type=Path, help="output folder (default: runs/demo)")
    p.add_argument("--tiny", action="store_true", help="use the tiny preset (seconds) instead of small")
    p.add_argument("--seed", default=0, type=int)
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from brainmclip.demo import run_synthetic_demo

    print(run_synthetic_demo(args.out, tiny=args.tiny, seed=args.seed, progress=not args.quiet))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainmclip", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"brainmclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_simulate(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"brainmclip {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"brainmclip {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
