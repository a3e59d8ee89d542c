"""The ground-truth "decoder": the test images' own CLIP targets, as if decoding from the brain were perfect.

Its predictions are the feature store's targets for each image (Ê_I = (e_I,S + e_I,D) / 2, Ê_T = E_T, and the two
image parts), written in the shared prediction format. Generated and scored like any method, they are the upper
bound of a pipeline: how good reconstructions can be when the embeddings are exactly right, which shows how much is
lost by decoding them from fMRI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainmclip import __version__
from brainmclip.atomic import output_lock, write_json_atomic
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import OutputInTheWayError
from brainmclip.features.feature_store import open_feature_store
from brainmclip.paths import record_path, resolve_path
from brainmclip.training.checkpoint import identity_of
from brainmclip.training.data import PairedSplit
from brainmclip.training.run_folder import RUN_FILE, clear_run_folder

__all__ = ["GROUND_TRUTH_METHOD", "ground_truth_outputs", "write_ground_truth_run"]

GROUND_TRUTH_METHOD = "gt_embedding"


def write_ground_truth_run(data, features, out, force: bool = False) -> Path:
    """A run folder (``run.json`` only: nothing is fitted) that ``predict`` turns into ground-truth predictions.

    ``force`` first deletes a run (and its predictions) in ``out``.
    """
    out = Path(out)
    with output_lock(out):
        if (out / RUN_FILE).exists() and not force:
            raise OutputInTheWayError(f"{out} already holds a run; pass --force to replace it or choose another --out")
        prepared = load_prepared(data, images=False)
        store = open_feature_store(features)
        for split in prepared.splits:  # fail now, not at predict time, when the store lacks images
            PairedSplit(prepared, split, store)
        if force:
            clear_run_folder(out, predictions=True)
        _write_record(data, features, out, prepared.subject)
    return out


def _write_record(data, features, out: Path, subject: int) -> None:
    write_json_atomic(out / RUN_FILE, {
        "method": GROUND_TRUTH_METHOD, "config": {"data": {"semantic_group": "semantic", "detail_group": "detail"}},
        "identities": {"data": identity_of(Path(data) / "manifest.json"),
                       "features": identity_of(Path(features) / "manifest.json")},
        "data": record_path(data, out), "features": record_path(features, out), "subject": subject,
        "parameters": {"total": 0}, "code_version": __version__})


def ground_truth_outputs(run: dict, split: PairedSplit, run_dir) -> dict[str, np.ndarray]:
    """The feature store's targets of ``split``; ``run`` is ``run_dir/run.json``, whose paths are relative to it."""
    store = open_feature_store(resolve_path(run["features"], run_dir))
    targets = store.get(split.stimulus_ids)
    semantic = np.asarray(targets["image_semantic"], np.float32)
    detail = np.asarray(targets["image_detail"], np.float32)
    return {"image": (semantic + detail) / 2, "text": np.asarray(targets["text"], np.float32),
            "image_semantic": semantic, "image_detail": detail}
