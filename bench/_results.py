"""Shared by the benchmark scripts: print results one per line and optionally save them as JSON."""

from __future__ import annotations

import json
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
