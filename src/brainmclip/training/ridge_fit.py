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
from brainmclip.atomic import output_lock, write_json_atomic
from brainmclip.config import apply_overrides, check_choice, check_float, check_int, check_sections
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import InvalidInputError, OutputInTheWayError
from brainmclip.features.feature_store import TARGETS, open_feature_store
from brainmclip.models.ridge import _ALPHA_MODES, DEFAULT_ALPHAS, RidgeDecoder
from brainmclip.paths import record_path
from brainmclip.training.checkpoint import identity_of
from brainmclip.training.data import PairedSplit, voxel_mismatch
from brainmclip.training.run_folder import RUN_FILE, clear_run_folder

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


def check_ridge_config(cfg: dict) -> dict:
    """``cfg`` if every value of a ridge run config is usable; else one error naming the first bad one."""
    check_sections(cfg, ("method", "data", "ridge"))
    data = cfg["data"]
    check_choice("data.voxels", data["voxels"], ("all", "detail"))
    for key in ("semantic_group", "detail_group"):
        if not isinstance(data[key], str):
            raise InvalidInputError(f"data.{key}={data[key]!r}: expected the name of a voxel group")
    ridge = cfg["ridge"]
    alphas = ridge["alphas"]
    if not isinstance(alphas, list) or not alphas:
        raise InvalidInputError(f"ridge.alphas={alphas!r}: expected a non-empty list of positive numbers")
    for alpha in alphas:
        check_float("ridge.alphas[]", alpha, 0, low_open=True)
    check_int("ridge.n_folds", ridge["n_folds"], 2)
    check_choice("ridge.alpha_per", ridge["alpha_per"], _ALPHA_MODES)
    return cfg


def train_ridge(data, features, out, overrides: list[str] | None = None, progress: bool = True,
                force: bool = False) -> RidgeResult:
    """Fit the ridge baseline into ``out``; ``force`` first deletes a run (and its predictions) there."""
    start = time.perf_counter()
    out = Path(out)
    cfg = check_ridge_config(apply_overrides(DEFAULT_RIDGE_CONFIG, overrides or []))
    with output_lock(out):
        if (out / RUN_FILE).exists() and not force:
            raise OutputInTheWayError(f"{out} already holds a run; pass --force to replace it or choose another --out")
        prepared = load_prepared(data)
        store = open_feature_store(features)
        train = PairedSplit(prepared, "train", store, cfg["data"]["semantic_group"], cfg["data"]["detail_group"])
        train.check_finite(f"{data} train split", all_voxels=cfg["data"]["voxels"] == "all")
        if len(train) < cfg["ridge"]["n_folds"]:
            raise InvalidInputError(f"ridge.n_folds={cfg['ridge']['n_folds']}: {data} has only {len(train)} training "
                                    "rows; lower it")
        if force:
            clear_run_folder(out, predictions=True)
        return _fit(cfg, prepared, store, train, data, features, out, start)


def _fit(cfg, prepared, store, train: PairedSplit, data, features, out: Path, start: float) -> RidgeResult:
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
    write_json_atomic(out / RUN_FILE, {"method": "ridge", "config": cfg, "identities": identities,
                                         "data": record_path(data, out), "features": record_path(features, out),
                                         "subject": prepared.subject, "alphas": alphas, "parameters": params,
                                         "code_version": __version__})
    return RidgeResult(out, alphas, time.perf_counter() - start, params)


def ridge_outputs(run_dir: Path, split: PairedSplit) -> dict[str, np.ndarray]:
    import json

    run = json.loads((Path(run_dir) / RUN_FILE).read_text())
    voxels = run["config"]["data"]["voxels"]
    X = _inputs(split, np.arange(len(split)), voxels)
    outputs = {}
    for target in TARGETS:
        decoder = RidgeDecoder.load(Path(run_dir) / f"ridge_{target}.npz")
        if decoder.n_features_in_ != X.shape[1]:
            what = "nsdgeneral voxels" if voxels == "all" else "detail voxels"
            raise voxel_mismatch(run_dir, run.get("subject"), f"{decoder.n_features_in_} {what}", split,
                                 f"{X.shape[1]}")
        outputs[target] = decoder.predict(X).astype(np.float32)
    return {"image": (outputs["image_semantic"] + outputs["image_detail"]) / 2, "text": outputs["text"],
            "image_semantic": outputs["image_semantic"], "image_detail": outputs["image_detail"]}
