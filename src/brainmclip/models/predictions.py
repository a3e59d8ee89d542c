"""The prediction format every decoder writes and every later stage reads.

    PRED/manifest.json           method, subject, split, identities of run, data and features
    PRED/stimulus_ids.npy        int64 (n,)
    PRED/image.npy               float16 (n, 257, embed_dim)   Ê_I (absent for text-only models)
    PRED/text.npy                float16 (n, 77, embed_dim)    Ê_T (optional)
    PRED/image_semantic.npy      float16 (n, 257, embed_dim)   ê_I,S (optional)
    PRED/image_detail.npy        float16 (n, 257, embed_dim)   ê_I,D (optional)
    PRED/<target>.npy            float16 (n, a, b)             other decoded targets (MindDiffuser: sd_text,
                                                               sd_latent, struct_NN), see TARGET_ARRAY

Files are staged and renamed; the manifest is written last with ``"complete": true`` and the
arrays' ``checksums`` (:mod:`brainmclip.integrity`), which :func:`load_predictions` verifies. Its ``run``
(the training run folder) is recorded relative to PRED (:func:`brainmclip.paths.record_path`); read
it with :func:`brainmclip.paths.resolve_path` against PRED.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from brainmclip.atomic import read_manifest, stage_arrays, write_json_atomic
from brainmclip.errors import InvalidInputError
from brainmclip.integrity import folder_checksums, load_npy
from brainmclip.types import DecodedEmbeddings

__all__ = ["PREDICTION_FORMAT", "PREDICTION_ARRAYS", "TARGET_ARRAY", "write_predictions", "load_predictions",
           "prediction_run"]

PREDICTION_FORMAT = "brainmclip-predictions/1"
PREDICTION_ARRAYS = ("image", "text", "image_semantic", "image_detail")
#: Names of decoded targets outside CLIP's space (MindDiffuser's SD text embedding, VAE latent, structural features).
TARGET_ARRAY = re.compile(r"sd_text|sd_latent|struct_\d\d")
# What to do about a damaged prediction file.
REPAIR_HINT = "rerun brainmclip predict"


def write_predictions(out: str | os.PathLike, stimulus_ids: np.ndarray, arrays: dict[str, np.ndarray],
                      manifest: dict) -> Path:
    """Write predictions; ``arrays`` needs 'image' or 'text' (text-only ablations have no image)."""
    out = Path(out)
    unknown = {k for k in arrays if k not in PREDICTION_ARRAYS and not TARGET_ARRAY.fullmatch(k)}
    if unknown or not arrays or (set(arrays) & set(PREDICTION_ARRAYS) and not {"image", "text"} & set(arrays)):
        raise InvalidInputError(f"prediction arrays {sorted(arrays)}; expected 'image' and/or 'text' (plus optionally "
                                f"{PREDICTION_ARRAYS[2:]}), or decoded targets named sd_text, sd_latent, struct_NN")
    ids = np.asarray(stimulus_ids, np.int64)
    for name, value in arrays.items():
        if value.ndim != 3 or len(value) != len(ids):
            raise InvalidInputError(f"{name}: shape {value.shape}; expected ({len(ids)}, tokens, embed_dim)")
        if not np.isfinite(value).all():
            raise InvalidInputError(f"{name}: predictions hold NaN or inf; refusing to write them")
    stage = stage_arrays(out / "staging", ids, arrays, "stimulus_ids")
    checksums = folder_checksums(stage)
    (out / "manifest.json").unlink(missing_ok=True)
    for path in stage.iterdir():
        os.replace(path, out / path.name)
    for path in out.glob("*.npy"):  # arrays of an earlier, different prediction
        name = path.stem
        if name not in arrays and name != "stimulus_ids" and (name in PREDICTION_ARRAYS or TARGET_ARRAY.fullmatch(name)):
            path.unlink()
    stage.rmdir()
    shapes = {name: list(value.shape) for name, value in arrays.items()}
    write_json_atomic(out / "manifest.json", {**manifest, "format": PREDICTION_FORMAT, "shapes": shapes,
                                              "n_images": len(ids), "checksums": checksums, "complete": True})
    return out


def load_predictions(path: str | os.PathLike, mmap: bool = True) -> DecodedEmbeddings:
    root = Path(path)
    manifest = read_manifest(root, PREDICTION_FORMAT, "a prediction folder", "predict")
    sums = manifest.get("checksums") or {}

    def npy(name: str, mapped: bool) -> np.ndarray:
        return load_npy(root / f"{name}.npy", REPAIR_HINT, mapped, sums.get(f"{name}.npy"))

    arrays = {name: npy(name, mmap) if (root / f"{name}.npy").exists() or f"{name}.npy" in sums else None
              for name in PREDICTION_ARRAYS}
    ids = npy("stimulus_ids", False)
    names = {n[:-4] for n in sums if n.endswith(".npy")} | {p.stem for p in root.glob("*.npy")}
    targets = {name: npy(name, mmap) for name in sorted(names) if TARGET_ARRAY.fullmatch(name)}
    for name, value in {**arrays, **targets}.items():
        if value is not None and (value.ndim != 3 or len(value) != len(ids)):
            raise InvalidInputError(f"{root / f'{name}.npy'}: shape {tuple(value.shape)}; stimulus_ids.npy names "
                                    f"{len(ids)} images, so expected ({len(ids)}, tokens, embed_dim); {REPAIR_HINT}")
    return DecodedEmbeddings(stimulus_ids=ids, subject=int(manifest.get("subject", 0)),
                             # image is None only for text-only ablations
                             split=manifest.get("split", "test"), method=manifest.get("method", "unknown"),
                             manifest=manifest, targets=targets, **arrays)


def prediction_run(pred: DecodedEmbeddings, pred_dir: str | os.PathLike) -> tuple[Path | None, dict]:
    """The training run folder behind predictions in ``pred_dir`` and its ``run.json`` content.

    ``(None, {})`` when the manifest names no run, ``(run_dir, {})`` when the run's record is not there;
    a record that is not a JSON object is an error naming it.
    """
    import json

    from brainmclip.paths import resolve_path

    recorded = pred.manifest.get("run")
    if not recorded:
        return None, {}
    run_dir = resolve_path(recorded, Path(pred_dir))
    record = run_dir / "run.json"
    if not record.is_file():
        return run_dir, {}
    try:
        data = json.loads(record.read_bytes().decode("utf-8"))
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise InvalidInputError(f"{record}: truncated or corrupt JSON; expected the training run's record")
    return run_dir, data
