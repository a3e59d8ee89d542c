"""What both preparers share: the official NSD reader (``prepare``) and the published-format readers.

Output-folder state and input identities, the nsdgeneral voxels with their ROI groups,
Brain-Diffuser's z-score, the checks of caption and stimulus files made before any heavy
step, and the copy of NSD's stimuli. Every error a user can cause is a one-line
``ValueError`` or ``FileNotFoundError`` naming the file and what was expected.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from brainmclip.atomic import output_entries
from brainmclip.data import nsd_paths
from brainmclip.data.nsd_official import read_roi_volume
from brainmclip.data.nsd_paths import ROI_NAMES
from brainmclip.data.prepared import PreparedWriter, VoxelSet
from brainmclip.errors import InvalidInputError, MissingInputError, OutputInTheWayError

__all__ = ["ROW_CHUNK", "build_prepared", "check_out", "file_identity", "nsd_voxels", "zscore_with_non_test", "open_h5",
           "to_uint8", "check_ids", "require_readable", "check_curated_captions", "coco_caption_files", "check_nsd_stimuli",
           "copy_nsd_stimuli"]

# Rows per block when streaming a split's betas (memory: one block, not the split).
ROW_CHUNK = 256
# Images per block when copying stimuli.
IMAGE_CHUNK = 64
# Inputs larger than this are identified by size + mtime unless full hashing is asked for.
HASH_LIMIT = 64 * 2**20


# ---------------------------------------------------------------------------- output folder and inputs
def file_identity(path: Path, full_hash: bool) -> dict:
    """Size and SHA-256 of a file; size and mtime instead above ``HASH_LIMIT`` unless ``full_hash``."""
    stat = path.stat()
    if full_hash or stat.st_size <= HASH_LIMIT:
        from brainmclip.integrity import sha256_file

        return {"bytes": stat.st_size, "sha256": sha256_file(path)}
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def check_out(out: Path, identity: dict, force: bool) -> str:
    """'fresh', 'resume' or 'complete'; refuses a folder holding something else unless ``force``."""
    if not output_entries(out):  # missing, empty, or holding only the lock of the running command
        return "fresh"
    same = json.loads(json.dumps(identity, sort_keys=True))
    manifest = out / "manifest.json"
    if manifest.is_file() and not force:
        existing = _json_or_none(manifest)
        if not isinstance(existing, dict):
            raise InvalidInputError(f"{manifest}: truncated or corrupt (not a JSON object); rerun brainmclip prepare "
                                    "with --force")
        if existing.get("complete") and {k: existing.get(k) for k in same} == same:
            return "complete"
    work_identity = out / ".work" / "identity.json"
    # An unreadable identity (a cut write) cannot match: that work is not resumed.
    if work_identity.is_file() and _json_or_none(work_identity) == same and not force:
        return "resume"
    known = {"manifest.json", "voxels.npz", ".work", ".staging", "train", "val", "test", "labels.json"}
    if not force:
        if {p.name for p in output_entries(out)} <= known:
            raise OutputInTheWayError(f"{out} holds a dataset prepared from other inputs or options; "
                                  "pass --force to replace it or choose another folder")
        raise OutputInTheWayError(f"{out} is not empty and is not a prepared dataset; choose another folder or pass --force")
    for name in known:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return "fresh"


def build_prepared(out: Path, identity: dict, force: bool, voxels: VoxelSet, build):
    """Check ``out`` against ``identity`` (:func:`check_out`), then, unless it is up to date, write a prepared
    dataset: ``build(writer)`` fills the staging folder and returns the manifest, which is committed last.

    A failed build leaves no staging or work folder behind, so it can be repeated without ``--force``.
    Returns the prepared dataset and whether it was built now.
    """
    import logging

    from brainmclip.data.prepared import load_prepared

    out = Path(out)
    if check_out(out, identity, force) == "complete":
        logging.getLogger("brainmclip.prepare").info("%s is up to date; nothing to do", out)
        return load_prepared(out), False
    work = out / ".work"
    try:
        work.mkdir(parents=True, exist_ok=True)
        (work / "identity.json").write_text(json.dumps(identity, sort_keys=True))
        writer = PreparedWriter(out)
        writer.save_voxels(voxels)
        writer.commit(build(writer))
    except BaseException:
        shutil.rmtree(out / ".staging", ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return load_prepared(out), True


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None


def nsd_voxels(root: Path, subject: int, detail: str) -> tuple[VoxelSet, dict[str, Path]]:
    """The nsdgeneral voxels (C order on the (X, Y, Z) grid), their ROI labels and groups, and the ROI files."""
    labels, paths = {}, {}
    nsdgeneral, affine = read_roi_volume(root, subject, "nsdgeneral")
    grid = nsdgeneral.shape
    mask = nsdgeneral > 0
    if not mask.any():
        raise InvalidInputError(f"{nsd_paths.roi_path(root, subject, 'nsdgeneral')}: no voxel labelled > 0")
    ijk = np.argwhere(mask)  # C order on (X, Y, Z): the order every NSD pipeline uses
    for roi in ROI_NAMES:
        volume, roi_affine = (nsdgeneral, affine) if roi == "nsdgeneral" else read_roi_volume(root, subject, roi)
        path = nsd_paths.roi_path(root, subject, roi)
        paths[roi] = path
        if volume.shape != grid or not np.allclose(roi_affine, affine, atol=1e-3):
            raise InvalidInputError(f"{path}: grid {volume.shape} does not match nsdgeneral's {grid} (or its affine); "
                             "expected ROI files of the same func1pt8mm space")
        labels[roi] = np.clip(volume[mask], 0, None).astype(np.int16)
    return VoxelSet.from_rois(grid, ijk, labels, detail), paths


# ---------------------------------------------------------------------------- Brain-Diffuser's z-score
def zscore_with_non_test(outputs: dict[str, np.ndarray], source) -> None:
    """Brain-Diffuser's normalisation, in place: z-score every voxel of every split with the mean and sd
    (ddof=1) of all non-test rows, i.e. train and val together.

    Brain-Diffuser fits these statistics on all of its training images and has no validation
    split; our val rows are carved out of those images, so they belong to the fit. Sums are
    float64 over blocks of ``ROW_CHUNK`` rows (two passes: mean, then squared deviations), so
    memory holds one block, never a split.
    """
    fit = [outputs[split] for split in outputs if split != "test"]
    n = sum(len(x) for x in fit)
    if n < 2:
        raise InvalidInputError(f"{source}: {n} non-test rows (train + val); z-scoring with their statistics needs at "
                         "least 2")
    n_voxels = fit[0].shape[1]
    total = np.zeros(n_voxels, np.float64)
    for x in fit:
        for start in range(0, len(x), ROW_CHUNK):
            total += x[start:start + ROW_CHUNK].sum(0, dtype=np.float64)
    mean = total / n
    squares = np.zeros(n_voxels, np.float64)
    for x in fit:
        for start in range(0, len(x), ROW_CHUNK):
            squares += ((x[start:start + ROW_CHUNK] - mean) ** 2).sum(0)
    sd = np.sqrt(squares / (n - 1))
    constant = np.flatnonzero(sd == 0)
    if len(constant):
        raise InvalidInputError(f"{source}: {len(constant)} voxels are constant over the {n} non-test rows (train + val; "
                         f"first column {int(constant[0])}); cannot z-score them (use normalize 'none')")
    for out in outputs.values():
        for start in range(0, len(out), ROW_CHUNK):
            out[start:start + ROW_CHUNK] = (out[start:start + ROW_CHUNK] - mean) / sd


# ---------------------------------------------------------------------------- file checks
def require_readable(path: Path, what: str) -> Path:
    """``path`` if it is a file this process can open, else a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: missing ({what})")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot be read ({exc.strerror or exc}); expected {what}") from None
    return path


def check_ids(ids: np.ndarray, n_images: int, path: Path) -> None:
    """Every NSD id in ``ids`` indexes a table of ``n_images`` rows read from ``path``."""
    if len(ids) and (ids.min() < 0 or ids.max() >= n_images):
        bad = ids[(ids < 0) | (ids >= n_images)][0]
        raise InvalidInputError(f"{path}: has {n_images} images; NSD id {int(bad)} is outside it (a truncated or "
                                "wrong file?)")


def check_curated_captions(path: Path, nsd_ids: np.ndarray | None = None) -> None:
    """``COCO_73k_annots_curated.npy`` is readable and holds (images, n_captions) strings covering ``nsd_ids``.

    Only the ``.npy`` header is read.
    """
    what = "curated COCO captions, (73000, n_captions) strings"
    require_readable(path, what)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (ValueError, OSError, EOFError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInputError(f"{path}: not a readable .npy array ({message}); expected {what}") from None
    if len(shape) != 2 or dtype.kind not in "US":
        raise InvalidInputError(f"{path}: shape {shape} {dtype}; expected {what}")
    if nsd_ids is not None:
        check_ids(np.asarray(nsd_ids), shape[0], path)


def coco_caption_files(root: Path, coco_splits) -> list[Path]:
    """COCO's caption files for these splits ('train2017', 'val2017'), each checked to be readable."""
    return [require_readable(nsd_paths.captions_path(root, split), f"COCO captions for {split}")
            for split in sorted(set(coco_splits))]


def open_h5(path: Path, what: str) -> h5py.File:
    """An HDF5 file opened for reading, or a one-line error naming it."""
    if not path.is_file():
        raise MissingInputError(f"{path}: missing ({what})")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InvalidInputError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0]}); expected {what}") from None


def check_nsd_stimuli(stimuli: Path, nsd_ids: np.ndarray | None = None) -> tuple[int, ...]:
    """Shape of ``imgBrick`` in NSD's ``nsd_stimuli.hdf5``, checked to be (n, H, W, 3) and to hold ``nsd_ids``."""
    with open_h5(stimuli, "NSD stimuli; prepare with --no-images to skip them") as f:
        shape = _img_brick(f, stimuli).shape
    if nsd_ids is not None:
        check_ids(np.asarray(nsd_ids), shape[0], stimuli)
    return shape


def _img_brick(f: h5py.File, path: Path) -> h5py.Dataset:
    if "imgBrick" not in f or f["imgBrick"].ndim != 4 or f["imgBrick"].shape[3] != 3:
        raise InvalidInputError(f"{path}: no dataset 'imgBrick' of shape (n, H, W, 3); expected NSD's stimuli file")
    return f["imgBrick"]


# ---------------------------------------------------------------------------- stimuli
def to_uint8(block: np.ndarray, path: Path, scale: float) -> np.ndarray:
    """Pixel values (0-255, or 0-1 with scale=255) to uint8."""
    if block.dtype == np.uint8:
        return block
    x = np.asarray(block, np.float64) * scale
    if not np.isfinite(x).all() or x.min() < -0.5 or x.max() > 255.5:
        expected = "0-255" if scale == 1 else "0-1"
        raise InvalidInputError(f"{path}: pixel values {np.nanmin(block):g}..{np.nanmax(block):g}; expected {expected}")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def copy_nsd_stimuli(writer: PreparedWriter, stimuli: Path, split_ids: dict[str, np.ndarray],
                     progress: bool = False) -> None:
    """``{split}/images.npy`` from NSD's ``imgBrick``, one row per id, written front to back.

    h5py reads fancy indices only when they increase, so each block reads its unique ids in
    order and puts them back in row order.
    """
    with open_h5(stimuli, "NSD stimuli; prepare with --no-images to skip them") as f:
        brick = _img_brick(f, stimuli)
        for split, ids in split_ids.items():
            check_ids(ids, brick.shape[0], stimuli)
            out = writer.rows(f"{split}/images.npy", (len(ids), *brick.shape[1:]), np.uint8)
            for start in tqdm(range(0, len(ids), IMAGE_CHUNK), desc=f"{split} images", disable=not progress,
                              leave=False):
                chunk = ids[start:start + IMAGE_CHUNK]
                unique = np.unique(chunk)
                out.write(to_uint8(_read_rows(brick, unique, stimuli), stimuli, 1.0)[np.searchsorted(unique, chunk)])
            out.close()


def _read_rows(brick: h5py.Dataset, rows: np.ndarray, path: Path) -> np.ndarray:
    """``brick[rows]``; h5py's error for a damaged chunk names no file, so name it here."""
    try:
        return brick[rows]
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise InvalidInputError(f"{path}: truncated or corrupt HDF5 ({str(exc).splitlines()[0]}); "
                                "re-download it") from None
