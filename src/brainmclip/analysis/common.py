"""The output contract every analysis follows, so the report can show any of them.

    OUT/manifest.json   {"format", "analysis", "title", "caption", "figure", "table", "settings",
                         "complete": true, "code_version"}
    OUT/figure.png      the figure the report shows
    OUT/*.npz, *.csv    the numbers behind it

``table`` is a list of rows (dicts of column -> value) that the report renders under the figure.
``manifest.json`` is written last, so a folder without it is an unfinished run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from brainmclip import __version__
from brainmclip.atomic import atomic_path, read_manifest, write_bytes_atomic
from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = ["ANALYSIS_FORMAT", "ANALYSIS_FILE", "save_figure", "write_analysis", "load_analysis", "find_analyses",
           "first_rows"]

ANALYSIS_FORMAT = "brainmclip-analysis/1"
ANALYSIS_FILE = "manifest.json"


def first_rows(prepared, split: str):
    """A split of a prepared dataset that holds images, and its first row of each image (in order of appearance).

    Returns ``(samples, stimulus_ids of every row, row indices)``; one clear error for an unknown
    split or a split prepared without images.
    """
    import numpy as np

    if split not in prepared.splits:
        raise InvalidInputError(f"Unknown split={split!r}; choose from {sorted(prepared.splits)}")
    samples = prepared.splits[split]
    if samples.images is None:
        raise InvalidInputError(f"{prepared.root}: the {split} split has no images.npy (prepare with images)")
    ids = np.asarray(samples.stimulus_ids)
    _, first = np.unique(ids, return_index=True)
    return samples, ids, np.sort(first)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def write_analysis(out: str | Path, name: str, title: str, caption: str, table: Sequence[Mapping] = (),
                   settings: Mapping | None = None, figure: str = "figure.png") -> Path:
    """Write ``OUT/manifest.json`` last, once the figure and data files are in place."""
    out = Path(out)
    if not (out / figure).is_file():
        raise MissingInputError(f"{out / figure}: write the figure before the analysis summary")
    rows = [dict(row) for row in table]
    # Not sorted: the table's columns keep the order the analysis gave them, which the report shows.
    text = json.dumps({"format": ANALYSIS_FORMAT, "analysis": name, "title": title, "caption": caption,
                       "figure": figure, "table": rows, "settings": dict(settings or {}), "complete": True,
                       "code_version": __version__}, indent=2, default=_plain)
    write_bytes_atomic(out / ANALYSIS_FILE, (text + "\n").encode())
    return out / ANALYSIS_FILE


def _plain(value):
    """JSON for numpy scalars and paths in tables and settings."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def load_analysis(folder: str | Path) -> dict:
    """The summary of a finished analysis folder (one clear error if unfinished or not one)."""
    folder = Path(folder)
    summary = read_manifest(folder, ANALYSIS_FORMAT, "an analysis folder", "analyze")
    summary["folder"] = str(folder)
    return summary


def find_analyses(root: str | Path) -> list[dict]:
    """Finished analyses in ``root`` itself or its direct sub-folders, in the order of ``ANALYSES``."""
    from brainmclip.analysis import ANALYSES

    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"{root}: no such analysis folder")
    folders = [root] if (root / ANALYSIS_FILE).is_file() else sorted(p for p in root.iterdir() if p.is_dir())
    found = [load_analysis(f) for f in folders if (f / ANALYSIS_FILE).is_file()]
    if not found:
        raise MissingInputError(f"{root}: holds no finished analysis (manifest.json from brainmclip analyze/ablate)")
    order = {name: i for i, name in enumerate(ANALYSES)}
    return sorted(found, key=lambda s: (order.get(s["analysis"], len(order)), s["folder"]))
