"""``predict``: a trained run's embeddings for one split, in the shared prediction format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from brainmclip import __version__
from brainmclip.atomic import output_lock
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.models.predictions import write_predictions
from brainmclip.paths import record_path, resolve_path
from brainmclip.training.checkpoint import identity_of
from brainmclip.training.data import PairedSplit, voxel_mismatch

__all__ = ["predict", "average_by_stimulus", "brain_mclip_outputs"]


def average_by_stimulus(stimulus_ids: np.ndarray, arrays: dict[str, np.ndarray]):
    """Average rows that show the same image (single-trial data); rows follow first appearance."""
    _, first, inverse = np.unique(stimulus_ids, return_index=True, return_inverse=True)
    order = np.argsort(first)  # unique ids in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    group = rank[inverse]
    counts = np.bincount(group)
    out = {}
    for name, value in arrays.items():
        sums = np.zeros((len(order), *value.shape[1:]), np.float64)
        np.add.at(sums, group, value)
        out[name] = (sums / counts.reshape(-1, *([1] * (value.ndim - 1)))).astype(np.float32)
    return stimulus_ids[np.sort(first)], out


def _read_run(run_dir: Path) -> dict:
    from brainmclip.training.loop import RUN_FILE

    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise MissingInputError(f"{path}: missing; {run_dir} is not a training run (brainmclip train --out)")
    try:
        run = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        run = None
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict) or "method" not in run:
        raise InvalidInputError(f"{path}: damaged run record; train the run again (brainmclip train --force)")
    return run


@torch.no_grad()
def brain_mclip_outputs(run_dir: Path, run: dict, split: PairedSplit, batch_size: int = 64) -> dict[str, np.ndarray]:
    from brainmclip.training.loop import load_best_model

    model = load_best_model(run_dir)
    trained = (model.config.n_semantic_voxels, model.config.n_detail_voxels)
    has = (len(split.semantic_idx), len(split.detail_idx))
    if trained != has:
        raise voxel_mismatch(run_dir, run.get("subject"), f"{trained[0]} semantic and {trained[1]} detail voxels",
                             split, f"{has[0]} and {has[1]}")
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(split), batch_size):
        semantic, detail = split.fmri(np.arange(start, min(start + batch_size, len(split))))
        out = model(semantic, detail)
        for name in ("image", "text", "image_semantic", "image_detail"):
            value = getattr(out, name)
            if value is not None:
                parts.setdefault(name, []).append(value.float().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def predict(run_dir, split: str = "test", out=None, data=None) -> Path:
    """Write the run's predictions for ``split`` of its prepared dataset (or ``data``) to ``out``."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / f"predictions_{split}"
    with output_lock(out):
        return _predict(run_dir, split, out, data)


def _predict(run_dir: Path, split: str, out: Path, data) -> Path:
    run = _read_run(run_dir)
    data = Path(data) if data else resolve_path(run["data"], run_dir)
    prepared = load_prepared(data)
    if split not in prepared.splits:
        raise InvalidInputError(f"Unknown split={split!r}; choose from {sorted(prepared.splits)}")
    from brainmclip.models.registry import get_method

    arrays = get_method(run["method"]).outputs(run_dir, run, prepared, split)
    ids = prepared.splits[split].stimulus_ids
    averaged = len(np.unique(ids)) < len(ids)
    if averaged:
        ids, arrays = average_by_stimulus(ids, arrays)
    manifest = {"method": run["method"], "subject": prepared.subject, "split": split, "run": record_path(run_dir, out),
                "data": identity_of(data / "manifest.json"), "test_set": prepared.manifest.get("test_set"),
                "averaged_over_repeats": averaged, "parameters": run.get("parameters", {}),
                "code_version": __version__, **({"clip": run["clip"]} if run.get("clip") else {})}
    return write_predictions(out, ids, arrays, manifest)
