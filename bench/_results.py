"""Shared by the benchmark scripts: results printed one per line (optionally saved as JSON), the load
average, and a competing busy process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def report(results: dict, json_path: Path | None = None) -> None:
    width = max(map(len, results)) + 2
    for key, value in results.items():
        print(f"{key:>{width}}: {value}")
    save_json(results, json_path)


def save_json(results: dict, json_path: Path | None) -> None:
    """Write ``results`` to ``json_path`` (if one was given) for comparing runs later."""
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


def load_average() -> float:
    """The 1-minute load average: printed beside each timing, since a shared CPU changes every figure."""
    return round(os.getloadavg()[0], 2)


@contextlib.contextmanager
def busy_process(enabled: bool = True):
    """One competing process spinning on a core (a pure-Python busy loop, like a browser tab or another job)."""
    if not enabled:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        yield proc
    finally:
        proc.kill()
        proc.wait()
