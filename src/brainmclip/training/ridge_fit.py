"""The ridge baseline: fMRI -> the same CLIP targets, alpha chosen by cross-validation on train.

With ``ridge.targets = "tokens"`` (BrainMCLIP's baseline) one :class:`~brainmclip.models.ridge.RidgeDecoder`
per target block (e_I,S, e_I,D, E_T), each solving all of its columns through one shared SVD per fold.
With ``"clip_image"`` or ``"clip_text"`` (BrainCLIP's baseline, the paper's "Baseline-Ridge V / T") one
decoder to CLIP's pooled image embedding or to the mean of the image's caption embeddings; its
prediction is one CLIP-space vector per image, written like BrainCLIP's. Runs and predictions have the
same layout as the other methods', so every later stage treats all alike.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainmclip import __version__
from brainmclip.atomic import output_lock, write_json_atomic
from brainmclip.config import apply_overrides, check_choice, check_float, check_int, check_sections, load_config, merge
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import InvalidInputError, OutputInTheWayError
from brainmclip.features.feature_store import TARGETS, open_feature_store
from brainmclip.models.ridge import _ALPHA_MODES, RidgeDecoder
from brainmclip.paths import record_path
from brainmclip.training.checkpoint import identity_of
from brainmclip.training.data import PairedSplit, voxel_mismatch
from brainmclip.training.run_folder import RUN_FILE, clear_run_folder

__all__ = ["DEFAULT_RIDGE_CONFIG", "train_ridge", "ridge_outputs", "RidgeResult"]

log = logging.getLogger("brainmclip.train")

# The defaults live in the config file ``ridge.json`` (logspace(1, 6, 8) alphas, 5 folds, one alpha per block).
DEFAULT_RIDGE_CONFIG = load_config("ridge")
RIDGE_TARGETS = ("tokens", "clip_image", "clip_text")


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
    check_choice("ridge.targets", ridge["targets"], RIDGE_TARGETS)
    return cfg


def resolve_ridge_config(config=None, overrides: list[str] | None = None) -> dict:
    """Defaults, then config files (names or paths, e.g. ``ridge_clip_image``), then ``--set`` overrides; checked."""
    cfg = merge(DEFAULT_RIDGE_CONFIG, load_config(config)) if config else DEFAULT_RIDGE_CONFIG
    unknown = {k: sorted(set(v) - set(DEFAULT_RIDGE_CONFIG[k])) for k, v in cfg.items()
               if isinstance(v, dict) and k in DEFAULT_RIDGE_CONFIG and set(v) - set(DEFAULT_RIDGE_CONFIG[k])}
    if unknown:
        section, keys = next(iter(unknown.items()))
        raise InvalidInputError(f"Unknown {section} config keys {keys}; known: {sorted(DEFAULT_RIDGE_CONFIG[section])}")
    if cfg.get("method", "ridge") != "ridge":
        raise InvalidInputError(f"method={cfg['method']!r}: a ridge config needs method 'ridge'")
    return check_ridge_config(apply_overrides(cfg, overrides or []))


def train_ridge(data, features, out, config=None, overrides: list[str] | None = None, progress: bool = True,
                force: bool = False) -> RidgeResult:
    """Fit the ridge baseline into ``out``; ``force`` first deletes a run (and its predictions) there."""
    start = time.perf_counter()
    out = Path(out)
    cfg = resolve_ridge_config(config, overrides)
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
    alphas, params, extra = {}, {}, {}
    design = None  # the voxel matrix's decompositions, made once for all targets
    for target, Y in _targets(cfg, store, prepared, train.stimulus_ids[rows]):
        decoder = RidgeDecoder(alphas=cfg["ridge"]["alphas"], n_folds=cfg["ridge"]["n_folds"],
                               alpha_per=cfg["ridge"]["alpha_per"])
        design = design or decoder.design_for(X)
        decoder.fit(X, Y, design=design)
        decoder.save(out / f"ridge_{target}.npz")
        alphas[target] = float(np.median(np.atleast_1d(decoder.alpha_)))
        params[target] = int(X.shape[1] * np.prod(Y.shape[1:]))
        log.info("ridge %s: alpha %g (CV over %d alphas, %d folds)", target, alphas[target],
                 len(cfg["ridge"]["alphas"]), cfg["ridge"]["n_folds"])
    if cfg["ridge"]["targets"] != "tokens":
        from brainmclip.features.pooled import clip_name_of

        extra["clip"] = clip_name_of(store)
    params["total"] = sum(params.values())
    identities = {"data": identity_of(Path(data) / "manifest.json"),
                  "features": identity_of(Path(features) / "manifest.json")}
    write_json_atomic(out / RUN_FILE, {"method": "ridge", "config": cfg, "identities": identities,
                                         "data": record_path(data, out), "features": record_path(features, out),
                                         "subject": prepared.subject, "alphas": alphas, "parameters": params,
                                         "code_version": __version__, **extra})
    return RidgeResult(out, alphas, time.perf_counter() - start, params)


def _targets(cfg: dict, store, prepared, ids: np.ndarray):
    """``(name, Y)`` for each decoder the run fits."""
    kind = cfg["ridge"]["targets"]
    if kind == "tokens":
        for target in TARGETS:
            yield target, store.get(ids, [target])[target]
        return
    from brainmclip.features import pooled

    if kind == "clip_image":
        yield "clip", pooled.image_embeddings(store, ids)
    else:
        yield "clip", pooled.caption_embeddings(store, [prepared], ids).mean()


def ridge_outputs(run_dir: Path, split: PairedSplit) -> dict[str, np.ndarray]:
    import json

    run = json.loads((Path(run_dir) / RUN_FILE).read_text())
    voxels = run["config"]["data"]["voxels"]
    X = _inputs(split, np.arange(len(split)), voxels)
    outputs = {}
    if run["config"]["ridge"].get("targets", "tokens") != "tokens":
        from brainmclip.features.pooled import unit

        decoder = RidgeDecoder.load(Path(run_dir) / "ridge_clip.npz")
        _check_width(decoder, X, run_dir, run, split, voxels)
        f = unit(decoder.predict(X))[:, None, :]
        return {"image": f, "text": f.copy()}
    for target in TARGETS:
        decoder = RidgeDecoder.load(Path(run_dir) / f"ridge_{target}.npz")
        _check_width(decoder, X, run_dir, run, split, voxels)
        outputs[target] = decoder.predict(X).astype(np.float32)
    return {"image": (outputs["image_semantic"] + outputs["image_detail"]) / 2, "text": outputs["text"],
            "image_semantic": outputs["image_semantic"], "image_detail": outputs["image_detail"]}


def _check_width(decoder, X: np.ndarray, run_dir, run: dict, split: PairedSplit, voxels: str) -> None:
    if decoder.n_features_in_ != X.shape[1]:
        what = "nsdgeneral voxels" if voxels == "all" else "detail voxels"
        raise voxel_mismatch(run_dir, run.get("subject"), f"{decoder.n_features_in_} {what}", split, f"{X.shape[1]}")
