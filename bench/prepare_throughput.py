"""Benchmark: `prepare` throughput against the bare cost of decompressing the same betas files.

    python bench/prepare_throughput.py [--nsd-root DIR] [--sessions 3] [--repeats 2]

Without --nsd-root it simulates the `nsd` preset (subject 1, first K sessions) into
runs/bench/nsd (about 2 minutes, reused afterwards). Both timings are taken in the same run,
alternating, best of --repeats; the ratio bare / prepare is what to compare across machines
(goal >= 0.7). Peak memory of a prepare run is measured in a child process.
"""

from __future__ import annotations

import argparse
import gzip
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import report

from brainmclip.data import nsd_paths
from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.synthetic import make_synthetic_nsd


def bare_read(paths) -> float:
    """Decompress every file to the end, keeping nothing: the floor for any reader."""
    start = time.perf_counter()
    for path in paths:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - start


def timed_prepare(root, sessions, out) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    prepare_subject(root, 1, out, PrepareOptions(sessions=tuple(sessions), images=False), progress=False)
    return time.perf_counter() - start


def peak_rss_mb(root, sessions, out) -> float:
    shutil.rmtree(out, ignore_errors=True)
    code = ("import sys; from brainmclip.cli import main; "
            f"sys.exit(main(['-q', 'prepare', '--nsd-root', {str(root)!r}, '--subject', '1', '--out', {str(out)!r}, "
            f"'--sessions', '1-{max(sessions)}']))")
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsd-root", type=Path)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    root = args.nsd_root or Path("runs/bench/nsd")
    if args.nsd_root is None:
        make_synthetic_nsd(root, "nsd", subjects=[1], sessions=args.sessions, progress=True)
    sessions = list(range(1, args.sessions + 1))
    paths = [nsd_paths.betas_path(root, 1, s) for s in sessions]
    n_bytes = sum(p.stat().st_size for p in paths)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "prepared"
        bare, prep = [], []
        for _ in range(args.repeats):
            bare.append(bare_read(paths))
            prep.append(timed_prepare(root, sessions, out))
        rss = peak_rss_mb(root, sessions, out)
    best_bare, best_prep = min(bare), min(prep)
    results = {
        "sessions": len(sessions),
        "compressed_mb": round(n_bytes / 1e6, 1),
        "bare_decompress_s": round(best_bare, 2),
        "prepare_s": round(best_prep, 2),
        "ratio_bare_over_prepare": round(best_bare / best_prep, 3),
        "goal": ">= 0.7",
        "prepare_peak_rss_mb": round(rss, 1),
    }
    report(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
