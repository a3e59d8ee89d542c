"""Training MindDiffuser's decoders: voxel-selected ridge per target, and the structural feature selection.

Three target families from a MindDiffuser target store (``brainmclip extract-minddiffuser``): SD's text
conditioning c (``sd_text``), SD's VAE latent z (``sd_latent``) and CLIP structural features (``struct_NN``).
Every target dimension gets its own ridge on the ``n_voxels`` voxels most correlated with it on the training
rows (the paper: 250 for c, 4000 for z, 350 for structural features), alpha by contiguous K-fold CV
(:class:`~brainmclip.models.voxel_ridge.VoxelSelectedRidge`). ``n_voxels`` above the subject's voxel count
takes every voxel.

Feature selection (the paper's Algorithm 1): for each structural layer, the dimensions are ranked by their
decoding accuracy on the validation split (Pearson r between decoded and true values across the validation
images) and the top ``top_percent`` % are kept: a boolean mask M_l per layer, saved as
``structural_masks.npz`` beside the decoders, which Stage 2 of the reconstruction weighs its loss with.

One ``decoder_<target>.npz`` per target and ``run.json``; a rerun finishes the decoders that are missing
(each is written atomically when fitted), so an interrupted training resumes by target.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainmclip import __version__
from brainmclip.atomic import atomic_path, output_lock, write_json_atomic
from brainmclip.config import apply_overrides, check_choice, check_float, check_int, load_config, merge
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import InvalidInputError, OutputInTheWayError
from brainmclip.features.feature_store import open_feature_store
from brainmclip.paths import record_path
from brainmclip.training.checkpoint import identity_of, same_identities
from brainmclip.training.run_folder import RUN_FILE, clear_run_folder, read_run_record

__all__ = ["MASKS_FILE", "MindDiffuserResult", "minddiffuser_outputs", "resolve_minddiffuser_config",
           "train_minddiffuser"]

log = logging.getLogger("brainmclip.train")

MASKS_FILE = "structural_masks.npz"
_KEYS = {"data": {"voxels"}, "decoders": {"sd_text", "sd_latent", "structural"},
         "ridge": {"alphas", "n_folds", "alpha_per"}, "selection": {"top_percent"}}


def resolve_minddiffuser_config(config=None, overrides=None) -> dict:
    """The defaults of ``minddiffuser.json``, then config files or a dict, then ``--set`` overrides; checked."""
    base = load_config("minddiffuser")
    given = config if isinstance(config, dict) else (load_config(config) if config else {})
    cfg = apply_overrides(merge(base, given), overrides or [])
    if cfg.get("method") != "minddiffuser":
        raise InvalidInputError(f"method={cfg.get('method')!r}: a MindDiffuser config needs method 'minddiffuser'")
    for section, keys in _KEYS.items():
        unknown = set(cfg.get(section, {})) - keys
        if unknown:
            raise InvalidInputError(f"Unknown {section} config keys {sorted(unknown)}; known: {sorted(keys)}")
    unknown = set(cfg) - set(_KEYS) - {"method"}
    if unknown:
        raise InvalidInputError(f"Unknown config sections {sorted(unknown)}; known: {sorted(_KEYS)}")
    if not isinstance(cfg["data"]["voxels"], str):
        raise InvalidInputError(f"data.voxels={cfg['data']['voxels']!r}: expected the name of a voxel group")
    for key in _KEYS["decoders"]:
        check_int(f"decoders.{key}", cfg["decoders"][key], 1)
    alphas = cfg["ridge"]["alphas"]
    if not isinstance(alphas, list) or not alphas:
        raise InvalidInputError(f"ridge.alphas={alphas!r}: expected a non-empty list of positive numbers")
    for alpha in alphas:
        check_float("ridge.alphas[]", alpha, 0, low_open=True)
    check_int("ridge.n_folds", cfg["ridge"]["n_folds"], 2)
    check_choice("ridge.alpha_per", cfg["ridge"]["alpha_per"], ("target", "block"))
    check_float("selection.top_percent", cfg["selection"]["top_percent"], 0, 100, low_open=True)
    return cfg


@dataclass(frozen=True)
class MindDiffuserResult:
    run_dir: Path
    targets: dict
    seconds: float

    def summary(self) -> str:
        parts = ", ".join(f"{name} (k={t['n_voxels']}, val r {t['val_r']:.3f})" for name, t in self.targets.items())
        return f"MindDiffuser run at {self.run_dir}: decoders {parts}; {self.seconds:.1f} s"


def _group(name: str) -> str:
    return "structural" if name.startswith("struct_") else name


def _rows(samples, columns: np.ndarray) -> np.ndarray:
    return np.asarray(samples.betas, np.float32)[:, columns]


def _column_r(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r per column across rows (0 where a column is constant)."""
    p, t = pred - pred.mean(0), true - true.mean(0)
    den = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    return np.divide((p * t).sum(0), den, out=np.zeros(p.shape[1]), where=den > 0)


def train_minddiffuser(data, features, out, config=None, overrides=None, force: bool = False,
                       progress: bool = True) -> MindDiffuserResult:
    """Fit every decoder of a MindDiffuser run into ``out`` (a rerun with the same settings finishes what is missing)."""
    from brainmclip.models.voxel_ridge import VoxelSelectedRidge

    start = time.perf_counter()
    data, features, out = Path(data), Path(features), Path(out)
    with output_lock(out):
        cfg = resolve_minddiffuser_config(config, overrides)
        prepared = load_prepared(data, images=False)
        store = open_feature_store(features)
        targets = list(store.targets)
        if store.manifest["settings"].get("method") != "minddiffuser":
            raise InvalidInputError(f"{features} is not a MindDiffuser target store (it holds {targets}); make one "
                                    "with brainmclip extract-minddiffuser")
        identities = {"data": identity_of(data / "manifest.json"), "features": identity_of(features / "manifest.json")}
        record = read_run_record(out)
        if force:
            clear_run_folder(out, predictions=True)
        elif record is not None and (record.get("config") != cfg
                                     or not same_identities(record.get("identities", {}), identities)):
            raise OutputInTheWayError(f"{out} holds a run with other settings or inputs; pass --force to replace it "
                                      "or choose another --out")
        columns = prepared.voxels.group(cfg["data"]["voxels"])
        train, val = prepared.splits["train"], prepared.splits["val"]
        missing = store.missing(np.concatenate([train.stimulus_ids, val.stimulus_ids]))
        if len(missing):
            raise InvalidInputError(f"{features} lacks {len(missing)} images of {data} (first id {missing[0]}); run "
                                    "brainmclip extract-minddiffuser on this dataset")
        X, X_val = _rows(train, columns), _rows(val, columns)
        if not (np.isfinite(X).all() and np.isfinite(X_val).all()):
            raise InvalidInputError(f"{data}: fMRI holds NaN or inf; prepare the dataset again from clean inputs")
        out.mkdir(parents=True, exist_ok=True)
        base = {"method": "minddiffuser", "config": cfg, "identities": identities, "data": record_path(data, out),
                "features": record_path(features, out), "subject": prepared.subject, "code_version": __version__,
                "targets_shape": {t: list(store.get(train.stimulus_ids[:1], [t])[t].shape[1:]) for t in targets}}
        write_json_atomic(out / RUN_FILE, {**base, "complete": False})
        summary, masks = {}, {}
        for name in targets:
            path = out / f"decoder_{name}.npz"
            Y = store.get(train.stimulus_ids, [name])[name]
            shape = Y.shape[1:]
            k = min(cfg["decoders"][_group(name)], len(columns))
            if path.is_file():
                decoder = VoxelSelectedRidge.load(path)
            else:
                log.info("MindDiffuser %s: %d target dimensions, %d voxels each", name, int(np.prod(shape)), k)
                decoder = VoxelSelectedRidge(n_voxels=k, alphas=cfg["ridge"]["alphas"], n_folds=cfg["ridge"]["n_folds"],
                                             alpha_per=cfg["ridge"]["alpha_per"], progress=progress)
                decoder.fit(X, Y.reshape(len(Y), -1))
                decoder.save(path)
            true_val = store.get(val.stimulus_ids, [name])[name].reshape(len(val.stimulus_ids), -1)
            r = _column_r(decoder.predict(X_val).astype(np.float64), true_val.astype(np.float64))
            summary[name] = {"n_voxels": k, "dimensions": int(np.prod(shape)), "val_r": float(np.mean(r))}
            if name.startswith("struct_"):
                keep = max(1, int(round(len(r) * cfg["selection"]["top_percent"] / 100)))
                mask = np.zeros(len(r), bool)
                mask[np.argsort(-r, kind="stable")[:keep]] = True
                masks[name] = mask.reshape(shape)
                summary[name]["val_r_kept"] = float(r[mask].mean())
        if masks:
            with atomic_path(out / MASKS_FILE) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **masks)
        write_json_atomic(out / RUN_FILE, {**base, "complete": True, "decoders": summary,
                                             "parameters": {"total": int(sum(d["n_voxels"] * d["dimensions"]
                                                                             for d in summary.values()))}})
    return MindDiffuserResult(out, summary, time.perf_counter() - start)


def minddiffuser_outputs(run_dir: Path, run: dict, prepared, split: str) -> dict[str, np.ndarray]:
    """Every decoded target of ``split``'s rows, in the store's layout (``sd_latent`` as (n, C, H*W))."""
    from brainmclip.models.voxel_ridge import VoxelSelectedRidge

    columns = prepared.voxels.group(run["config"]["data"]["voxels"])
    X = _rows(prepared.splits[split], columns)
    outputs = {}
    for name, shape in run["targets_shape"].items():
        decoder = VoxelSelectedRidge.load(Path(run_dir) / f"decoder_{name}.npz")
        if decoder.n_features_in_ != X.shape[1]:
            raise InvalidInputError(f"{run_dir} was trained on {decoder.n_features_in_} voxels (subject "
                                    f"{run.get('subject')}); {prepared.root} has {X.shape[1]} (subject "
                                    f"{prepared.subject}); predict from a dataset of the run's subject")
        outputs[name] = decoder.predict(X).astype(np.float32).reshape(len(X), *shape)
    return outputs
