"""What a training run folder holds, and how a new run may reuse a folder.

A run folder is ours when it holds only the files ``brainmclip train`` and ``brainmclip predict``
write (:data:`RUN_FILES`, :data:`PREDICTION_FOLDERS`); :func:`clear_run_folder` deletes exactly
those and leaves anything else a user put there.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from brainmclip.atomic import TEMP_MARKER
from brainmclip.errors import InvalidInputError

__all__ = ["CHECKPOINT_FILE", "PREDICTION_FOLDERS", "RUN_FILE", "RUN_FILES", "clear_run_folder", "differing_keys",
           "read_run_record", "run_files_present"]

RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint_last.pt"
# Files and folders the trainers write into a run folder (BrainMCLIP, ridge and the ground-truth run).
RUN_FILES = (RUN_FILE, CHECKPOINT_FILE, "model_best.safetensors", "balance.json", "train.log", "tensorboard",
             "ridge_image_semantic.npz", "ridge_image_detail.npz", "ridge_text.npz", "ridge_clip.npz",
             "embedding_vae.safetensors", "structural_masks.npz")
# MindDiffuser's per-target decoders.
_DECODER_FILE = re.compile(r"decoder_(sd_text|sd_latent|struct_\d\d)\.npz")
# brainmclip predict's default outputs inside a run; stale once the run is trained again.
PREDICTION_FOLDERS = ("predictions_train", "predictions_val", "predictions_test")
_PREDICTION_FORMAT_PREFIX = "brainmclip-predictions/"


def read_run_record(out: Path) -> dict | None:
    """``out/run.json`` as a dict; None when absent. A damaged one is an error naming the way out."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise InvalidInputError(f"{path}: damaged run record; pass --force to start the run again or choose "
                                "another --out")
    return record


def run_files_present(out: Path) -> list[str]:
    """Names of :data:`RUN_FILES` (and their temporaries) present in ``out``."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name in RUN_FILES or _DECODER_FILE.fullmatch(p.name) or _our_temporary(p.name))


def _our_temporary(name: str) -> bool:
    return any(name.startswith(f".{own}{TEMP_MARKER}") for own in RUN_FILES)


def _is_prediction_folder(path: Path) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(_PREDICTION_FORMAT_PREFIX)


def clear_run_folder(out: Path, predictions: bool = False) -> list[str]:
    """Delete what the trainers wrote into ``out`` (and, with ``predictions``, predict's default outputs).

    Returns the names deleted. Other files stay; the ``tensorboard`` folder loses only its event files.
    """
    out = Path(out)
    removed = []
    for name in run_files_present(out):
        path = out / name
        if name == "tensorboard" and path.is_dir():
            for events in path.glob("events.out.tfevents.*"):
                events.unlink()
            if any(path.iterdir()):
                continue
            path.rmdir()
        elif path.is_dir():
            continue  # a folder under one of our file names is not ours
        else:
            path.unlink()
        removed.append(name)
    if predictions:
        for name in PREDICTION_FOLDERS:
            if _is_prediction_folder(out / name):
                shutil.rmtree(out / name)
                removed.append(name)
    return removed


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def differing_keys(a: dict, b: dict) -> list[str]:
    """Dotted keys whose values differ between two configs (as JSON sees them: tuples are lists)."""
    fa, fb = _flatten(json.loads(json.dumps(a))), _flatten(json.loads(json.dumps(b)))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, ...) != fb.get(k, ...))
