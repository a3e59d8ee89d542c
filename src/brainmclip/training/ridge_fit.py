"""The ridge baseline: fMRI -> the same CLIP targets, alpha chosen by cross-validation on train.

One :class:`~brainmclip.models.ridge.RidgeDecoder` per target block (e_I,S, e_I,D, E_T), each
solving all of its columns through one shared SVD per fold. Runs and predictions have the
same layout as BrainMCLIP's, so every later stage treats both alike.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainmclip import __version__
from brainmclip.atomic import write_json_atomic
from brainmclip.config import apply_overrides
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import OutputInTheWayError
from brainmclip.features.feature_store import TARGETS, open_feature_store
from brainmclip.models.ridge import DEFAULT_ALPHAS, RidgeDecoder
from brainmclip.paths import record_path
from brainmclip.training.checkpoint import identity_of
from brainmclip.training.data import PairedSplit

__all__ = ["DEFAULT_RIDGE_CONFIG", "train_ridge", "ridge_outputs", "RidgeResult"]

log = logging.getLogger("brainmclip.train")

DEFAULT_RIDGE_CONFIG = {
    "method": "ridge",
    "data": {"voxels": "all", "semantic_group": "semantic", "detail_group": "detail"},
    "ridge": {"alphas": list(DEFAULT_ALPHAS), "n_folds": 5, "alpha_per": "block"},
}


@dataclass(frozen=True)
class RidgeResult:
    run_dir: Path
    alphas: dict[str, float]
    seconds: float
    parameters: dict[str, int]

    def summary(self) -> str:
        chosen = ", ".join(f"{k} {v:g}" for k, v in self.alphas.items())
        return (f"ridge run at {self.run_dir}: alphas chosen by CV on train: {chosen}; "
                f"{self.parameters['total'] / 1e6:.1f}M effective parameters; {self.seconds:.1f} s")


def _inputs(split: PairedSplit, rows: np.ndarray, voxels: str) -> np.ndarray:
    betas = np.asarray(split.samples.betas[np.sort(rows)], np.float32)
    return betas if voxels == "all" else betas[:, split.detail_idx]


def train_ridge(data, features, out, overrides: list[str] | None = None, progress: bool = True) -> RidgeResult:
    start = time.perf_counter()
    out = Path(out)
    if (out / "run.json").exists():
        raise OutputInTheWayError(f"{out} already holds a run; choose another --out")
    cfg = apply_overrides(DEFAULT_RIDGE_CONFIG, overrides or [])
    prepared = load_prepared(data)
    store = open_feature_store(features)
    train = PairedSplit(prepared, "train", store, cfg["data"]["semantic_group"], cfg["data"]["detail_group"])
    rows = np.arange(len(train))
    X = _inputs(train, rows, cfg["data"]["voxels"])
    out.mkdir(parents=True, exist_ok=True)
    alphas, params = {}, {}
    for target in TARGETS:
        Y = store.get(train.stimulus_ids[rows], [target])[target]
        decoder = RidgeDecoder(alphas=cfg["ridge"]["alphas"], n_folds=cfg["ridge"]["n_folds"],
                               alpha_per=cfg["ridge"]["alpha_per"]).fit(X, Y)
        decoder.save(out / f"ridge_{target}.npz")
        alphas[target] = float(np.median(np.atleast_1d(decoder.alpha_)))
        params[target] = int(X.shape[1] * np.prod(Y.shape[1:]))
        log.info("ridge %s: alpha %g (CV over %d alphas, %d folds)", target, alphas[target],
                 len(cfg["ridge"]["alphas"]), cfg["ridge"]["n_folds"])
    params["total"] = sum(params.values())
    identities = {"data": identity_of(Path(data) / "manifest.json"),
                  "features": identity_of(Path(features) / "manifest.json")}
    write_json_atomic(out / "run.json", {"method": "ridge", "config": cfg, "identities": identities,
                                         "data": record_path(data, out), "features": record_path(features, out),
                                         "subject": prepared.subject, "alphas": alphas, "parameters": params,
                                         "code_version": __version__})
    return RidgeResult(out, alphas, time.perf_counter() - start, params)


def ridge_outputs(run_dir: Path, split: PairedSplit) -> dict[str, np.ndarray]:
    import json

    cfg = json.loads((Path(run_dir) / "run.json").read_text())["config"]
    X = _inputs(split, np.arange(len(split)), cfg["data"]["voxels"])
    outputs = {}
    for target in TARGETS:
        decoder = RidgeDecoder.load(Path(run_dir) / f"ridge_{target}.npz")
        outputs[target] = decoder.predict(X).astype(np.float32)
    return {"image": (outputs["image_semantic"] + outputs["image_detail"]) / 2, "text": outputs["text"],
            "image_semantic": outputs["image_semantic"], "image_detail": outputs["image_detail"]}
