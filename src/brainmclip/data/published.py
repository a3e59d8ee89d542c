"""``prepare_published``: NSD data as published preprocessed by other projects, to a prepared dataset.

Three formats are read, each into the same prepared layout as :func:`prepare_subject`:

``brain-diffuser``
    ``processed_data/subjNN/nsd_{train,test}_{fmriavg_nsdgeneral,stim,cap}_subN.npy``: betas averaged
    over repeats in raw NSD scale (int16 units, percent signal change x 300), stimuli, captions.
    Sessions 1-37 ("old" test set); rows follow the first appearance of each image.
``mindeye1``
    webdataset shards ``{train,val,test}/*.tar``; per sample ``jpg``, ``nsdgeneral.npy`` (3 repeats
    x voxels, all-NaN rows = repeat not available), ``coco73k.npy`` and ``trial.npy``.
``mindeye2``
    ``betas_all_subjNN_fp32_renorm.hdf5`` (one row per global trial, session-normalised) and
    webdataset shards ``wds/subjNN/{train,test,new_test}/*.tar`` whose ``behav.npy`` rows give the
    NSD index (column 0) and the global trial (column 5) of each sample.

The files hold nsdgeneral voxel vectors only (nsdgeneral mask in C order on the (X, Y, Z)
volume); the ROI-based voxel groups need NSD's ROI files (``nsd_root``). Every error a user
can cause is a one-line ``ValueError`` or ``FileNotFoundError`` naming the file and what was
expected.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from brainmclip import __version__
from brainmclip.data import nsd_paths
from brainmclip.data.nsd_official import ExpDesign, read_coco_captions, read_curated_captions, read_expdesign, read_stim_info
from brainmclip.data.nsd_paths import BETA_SCALE, NSD_SESSIONS_PER_SUBJECT, ROI_NAMES, check_subject
from brainmclip.data.prepare import (
    DEFAULT_VAL_FRACTION,
    NORMALIZATIONS,
    OLD_TEST_SET_SESSIONS,
    TEST_SETS,
    _check_out,
    _file_identity,
    _voxels,
    session_plan,
)
from brainmclip.data.prepared import PREPARED_FORMAT, PreparedSubject, PreparedWriter, VoxelSet, load_prepared

__all__ = ["PUBLISHED_FORMATS", "prepare_published", "prepare_brain_diffuser", "prepare_mindeye1",
           "prepare_mindeye2"]

log = logging.getLogger("brainmclip.prepare")

PUBLISHED_FORMATS = ("brain-diffuser", "mindeye1", "mindeye2")
# Trials per NSD session; used to name sessions when the design file is not at hand.
NSD_TRIALS_PER_SESSION = 750
CURATED_CAPTIONS = "COCO_73k_annots_curated.npy"
MINDEYE2_IMAGES = "coco_images_224_float16.hdf5"
_ROW_CHUNK = 256
_IMAGE_CHUNK = 32
_H5_BLOCK = 1024


# ---------------------------------------------------------------------------- entry point
def prepare_published(fmt: str, input_dir, subject: int, out, nsd_root=None, normalize: str = "none",
                      val_size: int | None = None, detail_voxels: str = "roi", force: bool = False,
                      test_set: str | None = None, images: bool = True, single_trial: bool = False,
                      full_hash: bool = False) -> PreparedSubject:
    """Prepare one subject from a published preprocessed format into ``out``.

    Parameters
    ----------
    fmt : {'brain-diffuser', 'mindeye1', 'mindeye2'}
    input_dir : path
        The published files (see the module docstring for each layout).
    subject : int
        NSD subject 1-8.
    out : path
        Output folder; rerunning with the same inputs and options returns it at once.
    nsd_root : path, optional
        NSD root: its ROI files give the voxel groups, its design recovers Brain-Diffuser's
        NSD ids, its stimulus table and COCO files give captions, its stimuli give images.
    normalize : {'none', 'brain-diffuser'}
        'none' keeps the published scale (Brain-Diffuser: percent signal change; MindEye:
        the authors' normalisation); 'brain-diffuser' z-scores every voxel with the train
        split's mean and sd (ddof=1). 'session' is refused: the files have no session betas.
    val_size : int, optional
        Images held out from the end of train; default 859/8859 of train.
    detail_voxels : {'roi', 'nsdgeneral'}
    force : bool
        Replace an existing dataset prepared from other inputs or options.
    test_set : {'new', 'old'}, optional
        MindEye2 only: 'new' (default, ``new_test`` shards) or 'old' (``test`` shards).
    images : bool
        Copy the stimuli into the dataset.
    single_trial : bool
        MindEye2 only: one row per trial instead of per image.
    full_hash : bool
        Identify inputs above 64 MB by SHA-256 instead of size and mtime.
    """
    if fmt not in PUBLISHED_FORMATS:
        raise ValueError(f"Unknown format={fmt!r}; choose from {list(PUBLISHED_FORMATS)}")
    common = dict(nsd_root=nsd_root, normalize=normalize, val_size=val_size, detail_voxels=detail_voxels,
                  images=images, force=force, full_hash=full_hash)
    if fmt == "mindeye2":
        return prepare_mindeye2(input_dir, subject, out, test_set=test_set or "new", single_trial=single_trial,
                                **common)
    if test_set not in (None, "old"):
        raise ValueError(f"test_set={test_set!r}: {fmt} files hold the old test set only; leave test_set unset")
    if single_trial:
        raise ValueError(f"single_trial=True: {fmt} files hold betas averaged over repeats; use mindeye2 or the "
                         "official NSD files for single trials")
    reader = prepare_brain_diffuser if fmt == "brain-diffuser" else prepare_mindeye1
    return reader(input_dir, subject, out, **common)


# ---------------------------------------------------------------------------- shared machinery
@dataclass
class _Job:
    """One preparation: the arguments, the inputs found so far, and the shared steps."""

    fmt: str
    subject: int
    input_dir: Path
    out: Path
    nsd_root: Path | None
    normalize: str
    val_size: int | None
    detail_voxels: str
    images: bool
    force: bool
    full_hash: bool
    single_trial: bool = False
    extra_options: dict = field(default_factory=dict)
    inputs: dict[str, Path] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def add_input(self, path: Path) -> None:
        """Record an input under its path relative to the input folder (or ``nsd_root/...``)."""
        path = Path(os.path.abspath(path))
        for prefix, base in (("", self.input_dir), ("nsd_root/", self.nsd_root)):
            if base is None:
                continue
            try:
                self.inputs[prefix + path.relative_to(os.path.abspath(base)).as_posix()] = path
                return
            except ValueError:
                continue
        self.inputs[str(path)] = path

    def options(self) -> dict:
        return {"normalize": self.normalize, "single_trial": self.single_trial, "val_size": self.val_size,
                "detail_voxels": self.detail_voxels, "images": self.images, **self.extra_options}


def _new_job(fmt: str, input_dir, subject, out, nsd_root, normalize: str, val_size, detail_voxels: str,
             images: bool, force: bool, full_hash: bool, why_no_session: str) -> _Job:
    subject = check_subject(subject)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"Unknown normalize={normalize!r}; choose from {list(NORMALIZATIONS)}")
    if normalize == "session":
        raise ValueError(f"normalize='session' is not possible for {fmt} files: {why_no_session}; "
                         "use normalize 'brain-diffuser' or 'none'")
    if detail_voxels not in ("roi", "nsdgeneral"):
        raise ValueError(f"Unknown detail_voxels={detail_voxels!r}; choose 'roi' or 'nsdgeneral'")
    if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer))
                                 or val_size < 0):
        raise ValueError(f"val_size={val_size!r}; expected a non-negative number of images")
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: folder not found (the {fmt} files of subject {subject})")
    root = None
    if nsd_root is not None:
        root = Path(nsd_root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: NSD root folder not found")
    return _Job(fmt, subject, input_dir, Path(out), root, normalize, None if val_size is None else int(val_size),
                detail_voxels, bool(images), bool(force), bool(full_hash))


def _run(job: _Job, voxels: VoxelSet, build: Callable[[PreparedWriter], dict]) -> PreparedSubject:
    """Check the output folder, then build (unless up to date) and commit."""
    identity = {"subject": job.subject, "source": job.fmt, "options": job.options(), "code_version": __version__,
                "inputs": {key: _file_identity(path, job.full_hash) for key, path in sorted(job.inputs.items())}}
    out = job.out
    state = _check_out(out, identity, job.force)
    if state == "complete":
        log.info("%s is up to date; nothing to do", out)
        return load_prepared(out)
    work = out / ".work"
    try:
        work.mkdir(parents=True, exist_ok=True)
        (work / "identity.json").write_text(json.dumps(identity, sort_keys=True))
        writer = PreparedWriter(out)
        writer.save_voxels(voxels)
        details = build(writer)
        manifest = {
            **identity,
            "format": PREPARED_FORMAT,
            "input": str(job.input_dir.resolve()),
            "nsd_root": str(job.nsd_root.resolve()) if job.nsd_root is not None else None,
            "n_voxels": voxels.n_voxels,
            "voxel_groups": {k: len(v) for k, v in voxels.groups.items()},
            **details,
            "seconds": round(time.perf_counter() - job.start, 2),
        }
        writer.commit(manifest)
    except BaseException:
        # Leave no half-built state behind: a failed run can be repeated (or fixed) without --force.
        shutil.rmtree(out / ".staging", ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    log.info("prepared subject %d from %s files in %.1f s", job.subject, job.fmt, time.perf_counter() - job.start)
    return load_prepared(out)


def _voxel_set(job: _Job, n_voxels: int, source: Path) -> VoxelSet:
    """The nsdgeneral voxels with ROI groups when ``nsd_root`` has the ROI files, else only 'all'."""
    root = job.nsd_root
    if root is not None:
        paths = [nsd_paths.roi_path(root, job.subject, roi) for roi in ROI_NAMES]
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            voxels, roi_paths = _voxels(root, job.subject, job.detail_voxels)
            if voxels.n_voxels != n_voxels:
                raise ValueError(f"{source}: {n_voxels} voxels, but {roi_paths['nsdgeneral']} has "
                                 f"{voxels.n_voxels} nsdgeneral voxels; expected files of the same subject "
                                 f"({job.subject})")
            for path in roi_paths.values():
                job.add_input(path)
            return voxels
        reason = f"{missing[0]} is missing"
    else:
        reason = "no NSD root was given"
    groups = {"all": np.arange(n_voxels)}
    lacking = "low_level/high_level/semantic/detail"
    if job.detail_voxels == "nsdgeneral":  # fMRI-Detail = every nsdgeneral voxel needs no ROI file
        groups["detail"] = np.arange(n_voxels)
        lacking = "low_level/high_level/semantic"
    log.warning("subject %d: only voxel groups %s are available (%s); %s need NSD's ROI files; pass --nsd-root "
                "with nsddata/ppdata/subj%02d/func1pt8mm/roi/*.nii.gz", job.subject, sorted(groups), reason,
                lacking, job.subject)
    return VoxelSet(n_voxels, None, None, {}, groups)


def _n_val(n_train: int, val_size: int | None, source) -> int:
    n_val = round(n_train * DEFAULT_VAL_FRACTION) if val_size is None else val_size
    if n_val >= n_train:
        raise ValueError(f"{source}: val_size={n_val} leaves no training images (train has {n_train})")
    return n_val


def _design(job: _Job) -> ExpDesign | None:
    if job.nsd_root is not None and nsd_paths.expdesign_path(job.nsd_root).is_file():
        job.add_input(nsd_paths.expdesign_path(job.nsd_root))
        return read_expdesign(job.nsd_root)
    return None


def _pad(lists: list[list[int]]) -> np.ndarray:
    """Per-row trial lists to an int64 array padded with -1 (at least one column)."""
    width = max((len(t) for t in lists), default=1) or 1
    out = np.full((len(lists), width), -1, np.int64)
    for r, ts in enumerate(lists):
        out[r, : len(ts)] = ts
    return out


def _first_appearance(values: np.ndarray) -> np.ndarray:
    _, first = np.unique(values, return_index=True)
    return values[np.sort(first)]


def _sessions(trial_ids: list[np.ndarray], trials_per_session: int) -> list[int]:
    trials = np.concatenate([t.ravel() for t in trial_ids]) if trial_ids else np.zeros(0, np.int64)
    trials = trials[trials >= 0]
    return sorted(int(s) + 1 for s in np.unique(trials // trials_per_session))


def _caption_source(job: _Job) -> Callable[[np.ndarray], list[list[str]]] | None:
    """Captions by NSD id: NSD's stimulus table + COCO files, else the curated file, else None."""
    root = job.nsd_root
    if root is not None and nsd_paths.stim_info_path(root).is_file():
        job.add_input(nsd_paths.stim_info_path(root))
        for split in ("train2017", "val2017"):
            if nsd_paths.captions_path(root, split).is_file():
                job.add_input(nsd_paths.captions_path(root, split))

        def coco(ids: np.ndarray) -> list[list[str]]:
            info = read_stim_info(root)
            _check_ids(ids, len(info["cocoId"]), nsd_paths.stim_info_path(root))
            return read_coco_captions(root, info["cocoId"][ids], info["cocoSplit"][ids])

        return coco
    for folder in (job.input_dir, root):
        if folder is not None and (folder / CURATED_CAPTIONS).is_file():
            path = folder / CURATED_CAPTIONS
            job.add_input(path)
            return lambda ids: read_curated_captions(path, ids)
    return None


def _check_ids(ids: np.ndarray, n_images: int, path: Path) -> None:
    if len(ids) and (ids.min() < 0 or ids.max() >= n_images):
        bad = ids[(ids < 0) | (ids >= n_images)][0]
        raise ValueError(f"{path}: has {n_images} images; NSD id {int(bad)} is outside it")


def _split_captions(source, split_ids: dict[str, np.ndarray], what: str) -> dict[str, list[list[str]]]:
    """Captions of every split, looked up in one call (COCO's caption files are large)."""
    empty = {split: [[] for _ in ids] for split, ids in split_ids.items()}
    if source is None or not any(len(ids) for ids in split_ids.values()):
        return empty
    if any(len(ids) and ids.min() < 0 for ids in split_ids.values()):
        log.warning("%s: NSD ids unknown; captions left empty", what)
        return empty
    found = source(np.concatenate(list(split_ids.values())))
    out, start = {}, 0
    for split, ids in split_ids.items():
        out[split] = found[start:start + len(ids)]
        start += len(ids)
    return out


def _no_captions_warning(job: _Job) -> None:
    log.warning("subject %d: no captions (pass --nsd-root with nsd_stim_info_merged.csv and COCO's caption files, "
                "or put %s in %s)", job.subject, CURATED_CAPTIONS, job.input_dir)


def _finish_betas(outputs: dict[str, np.ndarray], normalize: str, source) -> None:
    """Check every value is finite, then z-score with the train split's statistics if asked."""
    for split, out in outputs.items():
        for start in range(0, len(out), _ROW_CHUNK):
            block = out[start:start + _ROW_CHUNK]
            if not np.isfinite(block).all():
                row = start + int(np.flatnonzero(~np.isfinite(block).all(1))[0])
                raise ValueError(f"{source}: {split} row {row} holds NaN or inf after averaging; expected finite betas")
    if normalize == "brain-diffuser":
        train = outputs["train"]
        n = len(train)
        if n < 2:
            raise ValueError(f"{source}: {n} training images; z-scoring with train statistics needs at least 2")
        total = np.zeros(train.shape[1], np.float64)
        for start in range(0, n, _ROW_CHUNK):
            total += train[start:start + _ROW_CHUNK].sum(0, dtype=np.float64)
        mean = total / n
        squares = np.zeros_like(mean)
        for start in range(0, n, _ROW_CHUNK):
            squares += ((train[start:start + _ROW_CHUNK] - mean) ** 2).sum(0)
        sd = np.sqrt(squares / (n - 1))
        if (sd == 0).any():
            raise ValueError(f"{source}: {int((sd == 0).sum())} voxels are constant over the training images; "
                             "cannot z-score them (use normalize 'none')")
        for out in outputs.values():
            for start in range(0, len(out), _ROW_CHUNK):
                out[start:start + _ROW_CHUNK] = (out[start:start + _ROW_CHUNK] - mean) / sd
    for out in outputs.values():
        out.flush()


def _load_npy(path: Path, what: str, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({what})")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: not a readable .npy array ({message}); expected {what}") from None


def _npy_bytes(data: bytes, where: str, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{where}: not a readable .npy array ({message}); expected {what}") from None


def _integers(values, where: str, what: str) -> np.ndarray:
    """Integer values of an array that may be stored as floats; NaN becomes -1."""
    values = np.asarray(values).ravel()
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not np.array_equal(values[finite], np.round(values[finite])):
            raise ValueError(f"{where}: {what} holds non-integer values; expected integers")
        return np.where(finite, values, -1).astype(np.int64)
    raise ValueError(f"{where}: {what} has dtype {values.dtype}; expected integers")


def _to_uint8(block: np.ndarray, path: Path, scale: float) -> np.ndarray:
    """Pixel values (0-255, or 0-1 with scale=255) to uint8."""
    if block.dtype == np.uint8:
        return block
    x = np.asarray(block, np.float64) * scale
    if not np.isfinite(x).all() or x.min() < -0.5 or x.max() > 255.5:
        expected = "0-255" if scale == 1 else "0-1"
        raise ValueError(f"{path}: pixel values {np.nanmin(block):g}..{np.nanmax(block):g}; expected {expected}")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _copy_nsd_stimuli(writer: PreparedWriter, stimuli: Path, split_ids: dict[str, np.ndarray]) -> None:
    """Images from NSD's ``nsd_stimuli.hdf5`` (``imgBrick``), read in increasing-index chunks."""
    with _open_h5(stimuli, "NSD stimuli") as f:
        if "imgBrick" not in f or f["imgBrick"].ndim != 4 or f["imgBrick"].shape[3] != 3:
            raise ValueError(f"{stimuli}: no dataset 'imgBrick' of shape (n, H, W, 3); expected NSD's stimuli file")
        brick = f["imgBrick"]
        for split, ids in split_ids.items():
            _check_ids(ids, brick.shape[0], stimuli)
            out = writer.array(f"{split}/images.npy", (len(ids), *brick.shape[1:]), np.uint8)
            for start in range(0, len(ids), 256):
                chunk = ids[start:start + 256]
                unique = np.unique(chunk)
                out[start:start + len(chunk)] = _to_uint8(brick[unique], stimuli, 1.0)[np.searchsorted(unique, chunk)]
            out.flush()


def _open_h5(path: Path, what: str) -> h5py.File:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({what})")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0]}); expected {what}") from None


# ---------------------------------------------------------------------------- webdataset shards
def _split_member(name: str) -> tuple[str, str]:
    """webdataset naming: the key is the path up to the first dot of the file name; the rest is the extension."""
    name = name[2:] if name.startswith("./") else name
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext


class _Shards:
    """The samples of a split's webdataset tar files, grouped by key (tar files stay open)."""

    def __init__(self, paths: list[Path], what: str):
        self.what = what
        self.tars: dict[Path, tarfile.TarFile] = {}
        self.samples: dict[str, tuple[Path, dict[str, tarfile.TarInfo]]] = {}
        try:
            for path in paths:
                self._index(path)
        except BaseException:
            self.close()
            raise

    def _index(self, path: Path) -> None:
        try:
            tar = tarfile.open(path, "r:*")  # noqa: SIM115 (kept open for reads; closed by close())
            self.tars[path] = tar
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a readable tar file ({exc}); expected {self.what}") from None
        grouped: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in members:
            if not member.isfile():
                continue
            key, ext = _split_member(member.name)
            if ext:
                grouped.setdefault(key, {})[ext] = member
        for key, exts in grouped.items():
            if key in self.samples:
                raise ValueError(f"{path}: sample {key!r} is also in {self.samples[key][0]}; expected each sample "
                                 "once per split")
            self.samples[key] = (path, exts)

    def sorted_keys(self) -> list[str]:
        return sorted(self.samples)

    def where(self, key: str) -> str:
        return f"{self.samples[key][0]}: sample {key!r}"

    def has(self, key: str, ext: str) -> bool:
        return ext in self.samples[key][1]

    def read(self, key: str, ext: str) -> bytes:
        path, members = self.samples[key]
        if ext not in members:
            raise ValueError(f"{path}: sample {key!r} has no '{ext}' member (it has {sorted(members)}); "
                             f"expected {self.what}")
        try:
            handle = self.tars[path].extractfile(members[ext])
            return handle.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ValueError(f"{path}: cannot read {members[ext].name} ({exc}); truncated tar file?") from None

    def npy(self, key: str, ext: str) -> np.ndarray:
        return _npy_bytes(self.read(key, ext), self.where(key), f"'{ext}' in {self.what}")

    def close(self) -> None:
        for tar in self.tars.values():
            tar.close()
        self.tars.clear()


def _tar_files(folder: Path, subject: int, what: str, example: str) -> list[Path]:
    """The ``*.tar`` files of a folder; names that mention another subject (``subjNN``) are skipped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder missing ({what}); expected {example}")
    paths = []
    for path in sorted(folder.glob("*.tar")):
        tag = re.search(r"subj0*(\d+)", path.name)
        if tag is None or int(tag.group(1)) == subject:
            paths.append(path)
    if not paths:
        raise FileNotFoundError(f"{folder}: no .tar files for subject {subject} ({what}); expected {example}")
    return paths


def _decode_jpeg(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{where}: 'jpg' is not a readable image ({exc})") from None


# ---------------------------------------------------------------------------- Brain-Diffuser
def _brain_diffuser_folder(input_dir: Path, subject: int) -> Path:
    name = f"nsd_train_fmriavg_nsdgeneral_sub{subject}.npy"
    for folder in (input_dir, input_dir / f"subj{subject:02d}"):
        if (folder / name).is_file():
            return folder
    raise FileNotFoundError(f"{input_dir / name}: missing (Brain-Diffuser averaged train betas of subject {subject}); "
                            f"expected --input processed_data or processed_data/subj{subject:02d}")


def prepare_brain_diffuser(input_dir, subject: int, out, nsd_root=None, normalize: str = "none",
                           val_size: int | None = None, detail_voxels: str = "roi", images: bool = True,
                           force: bool = False, full_hash: bool = False) -> PreparedSubject:
    """Brain-Diffuser's ``processed_data`` (sessions 1-37, old test set) to a prepared dataset.

    Betas are divided by 300 (percent signal change). Brain-Diffuser's files hold no NSD ids:
    with ``nsd_root``'s design they are recovered (rows follow the first appearance of each
    image in sessions 1-37, as Brain-Diffuser wrote them); without it they are -1.
    """
    job = _new_job("brain-diffuser", input_dir, subject, out, nsd_root, normalize, val_size, detail_voxels, images,
                   force, full_hash, "they hold betas averaged over sessions, without session information")
    subject = job.subject
    folder = _brain_diffuser_folder(job.input_dir, subject)
    job.input_dir = folder

    def file(split: str, kind: str) -> Path:
        return folder / f"nsd_{split}_{kind}_sub{subject}.npy"

    fmri, stim, caps = {}, {}, {}
    for split in ("train", "test"):
        path = file(split, "fmriavg_nsdgeneral")
        fmri[split] = _load_npy(path, f"Brain-Diffuser averaged {split} betas (images x nsdgeneral voxels)", mmap=True)
        if fmri[split].ndim != 2 or fmri[split].dtype.kind not in "fiu" or 0 in fmri[split].shape:
            raise ValueError(f"{path}: shape {fmri[split].shape} {fmri[split].dtype}; expected a 2-D numeric array "
                             "(images, nsdgeneral voxels)")
        job.add_input(path)
    n_voxels = fmri["train"].shape[1]
    if fmri["test"].shape[1] != n_voxels:
        raise ValueError(f"{file('test', 'fmriavg_nsdgeneral')}: {fmri['test'].shape[1]} voxels; expected "
                         f"{n_voxels} as in {file('train', 'fmriavg_nsdgeneral').name}")
    for split in ("train", "test"):
        n = len(fmri[split])
        if images:
            path = file(split, "stim")
            stim[split] = _load_npy(path, f"Brain-Diffuser {split} stimuli; prepare without images to skip them",
                                    mmap=True)
            shape = stim[split].shape
            if len(shape) != 4 or shape[3] != 3 or shape[0] != n or stim[split].dtype.kind not in "fiu":
                raise ValueError(f"{path}: shape {shape} {stim[split].dtype}; expected ({n}, H, W, 3) pixel values, "
                                 f"one image per row of {file(split, 'fmriavg_nsdgeneral').name}")
            job.add_input(path)
        path = file(split, "cap")
        if path.is_file():
            caps[split] = _load_npy(path, f"Brain-Diffuser {split} captions")
            if caps[split].ndim != 2 or len(caps[split]) != n or caps[split].dtype.kind not in "US":
                raise ValueError(f"{path}: shape {caps[split].shape} {caps[split].dtype}; expected ({n}, n_captions) "
                                 "strings")
            job.add_input(path)
    if images and stim["train"].shape[1:] != stim["test"].shape[1:]:
        raise ValueError(f"{file('test', 'stim')}: images of {stim['test'].shape[1:]}; expected "
                         f"{stim['train'].shape[1:]} as in {file('train', 'stim').name}")

    voxels = _voxel_set(job, n_voxels, file("train", "fmriavg_nsdgeneral"))
    last = min(OLD_TEST_SET_SESSIONS, NSD_SESSIONS_PER_SUBJECT[subject - 1])
    sessions = list(range(1, last + 1))
    design = _design(job)
    if design is not None:
        plan = session_plan(design, subject, sessions, val_size=0)
        ids = {"train": plan.split_images["train"], "test": plan.split_images["test"]}
        trials = {}
        for split in ("train", "test"):
            if len(ids[split]) != len(fmri[split]):
                raise ValueError(f"{file(split, 'fmriavg_nsdgeneral')}: {len(fmri[split])} rows, but "
                                 f"{nsd_paths.expdesign_path(job.nsd_root)} gives {len(ids[split])} {split} images in "
                                 f"sessions 1-{last} of subject {subject}; expected Brain-Diffuser files of that "
                                 "subject")
            index = {int(v): r for r, v in enumerate(ids[split])}
            per_row: list[list[int]] = [[] for _ in ids[split]]
            for t, image in zip(plan.trial_ids.tolist(), plan.trial_images.tolist(), strict=True):
                if image in index:
                    per_row[index[image]].append(t)
            trials[split] = per_row
        trials_per_session = design.trials_per_session
    else:
        log.warning("subject %d: Brain-Diffuser files do not store NSD ids; stimulus and trial ids are -1 (pass "
                    "--nsd-root with nsddata/experiments/nsd/nsd_expdesign.mat to recover them)", subject)
        ids = {split: np.full(len(fmri[split]), -1, np.int64) for split in ("train", "test")}
        trials = {split: [[] for _ in range(len(fmri[split]))] for split in ("train", "test")}
        trials_per_session = None
    caption_source = None
    if len(caps) < 2:
        caption_source = _caption_source(job) if design is not None else None
        if caption_source is None:
            log.warning("subject %d: %s missing; captions left empty", subject,
                        " and ".join(file(s, "cap").name for s in ("train", "test") if s not in caps))

    n_train = len(fmri["train"])
    n_val = _n_val(n_train, job.val_size, file("train", "fmriavg_nsdgeneral"))
    cut = n_train - n_val
    rows = {"train": ("train", 0, cut), "val": ("train", cut, n_train), "test": ("test", 0, len(fmri["test"]))}

    def build(writer: PreparedWriter) -> dict:
        looked_up = _split_captions(caption_source, {split: ids[source][a:b] for split, (source, a, b) in rows.items()
                                                     if source not in caps}, str(folder))
        outputs = {}
        for split, (source, a, b) in rows.items():
            if source in caps:
                captions = [[str(c).strip() for c in row if str(c).strip()] for row in caps[source][a:b]]
            else:
                captions = looked_up[split]
            writer.save_split(split, ids[source][a:b], _pad(trials[source][a:b]), captions)
            out = writer.array(f"{split}/betas.npy", (b - a, n_voxels), np.float32)
            for start in range(a, b, _ROW_CHUNK):
                stop = min(start + _ROW_CHUNK, b)
                block = np.asarray(fmri[source][start:stop], np.float64)
                if not np.isfinite(block).all():
                    row = start + int(np.flatnonzero(~np.isfinite(block).all(1))[0])
                    raise ValueError(f"{file(source, 'fmriavg_nsdgeneral')}: row {row} holds NaN or inf; expected "
                                     "finite averaged betas")
                out[start - a:stop - a] = block / BETA_SCALE
            outputs[split] = out
            if images:
                img_path = file(source, "stim")
                img = writer.array(f"{split}/images.npy", (b - a, *stim[source].shape[1:]), np.uint8)
                brightest = 0
                for start in range(a, b, _IMAGE_CHUNK):
                    stop = min(start + _IMAGE_CHUNK, b)
                    block = _to_uint8(np.asarray(stim[source][start:stop]), img_path, 1.0)
                    brightest = max(brightest, int(block.max()))
                    img[start - a:stop - a] = block
                if b > a and stim[source].dtype.kind == "f" and brightest <= 1:
                    raise ValueError(f"{img_path}: pixel values within 0-1; expected 0-255 as Brain-Diffuser "
                                     "saves them")
                img.flush()
        _finish_betas(outputs, job.normalize, file("train", "fmriavg_nsdgeneral"))
        return {
            "test_set": f"old ({len(fmri['test'])} images, sessions 1-{last}) as published by Brain-Diffuser",
            "sessions": sessions,
            "trials_per_session": trials_per_session,
            "stimulus_ids_known": design is not None,
            "shapes": {split: [b - a, n_voxels] for split, (_, a, b) in rows.items()},
            "images": bool(images),
        }

    return _run(job, voxels, build)


# ---------------------------------------------------------------------------- MindEye1
_MINDEYE1_SAMPLE = "MindEye1 webdataset samples (jpg, nsdgeneral.npy, coco73k.npy, trial.npy)"


def prepare_mindeye1(input_dir, subject: int, out, nsd_root=None, normalize: str = "none",
                     val_size: int | None = None, detail_voxels: str = "roi", images: bool = True,
                     force: bool = False, full_hash: bool = False) -> PreparedSubject:
    """MindEye1's webdataset shards ``{train,val,test}/*.tar`` to a prepared dataset.

    MindEye1's train and val shards both form our train (in that order, samples sorted by key
    within each); our val is then the last images of it. Each row averages the available
    repeats of ``nsdgeneral.npy`` (all-NaN rows are repeats not available).
    """
    job = _new_job("mindeye1", input_dir, subject, out, nsd_root, normalize, val_size, detail_voxels, images,
                   force, full_hash, "their betas are already normalised and averaged, without session information")
    subject = job.subject
    example = f"{job.input_dir}/{{train,val,test}}/*.tar (e.g. train_subj{subject:02d}_0.tar)"
    paths = {"train": _tar_files(job.input_dir / "train", subject, "MindEye1 train shards", example),
             "val": [], "test": _tar_files(job.input_dir / "test", subject, "MindEye1 test shards", example)}
    if (job.input_dir / "val").is_dir():
        paths["val"] = _tar_files(job.input_dir / "val", subject, "MindEye1 val shards", example)
    shards: dict[str, _Shards] = {}
    try:
        for split, files in paths.items():
            shards[split] = _Shards(files, _MINDEYE1_SAMPLE)
            for path in files:
                job.add_input(path)
        return _mindeye1(job, shards)
    finally:
        for s in shards.values():
            s.close()


def _mindeye1(job: _Job, shards: dict[str, _Shards]) -> PreparedSubject:
    # Our train = MindEye1 train then val (samples sorted by key within each); test = test.
    samples = {"train": [(shards[s], k) for s in ("train", "val") for k in shards[s].sorted_keys()],
               "test": [(shards["test"], k) for k in shards["test"].sorted_keys()]}
    for split, items in samples.items():
        if not items:
            raise ValueError(f"{', '.join(str(p) for p in shards[split].tars)}: no samples; expected "
                             f"{_MINDEYE1_SAMPLE}")
    first_shards, first_key = samples["train"][0]
    first = first_shards.npy(first_key, "nsdgeneral.npy")
    if first.ndim != 2 or first.shape[0] != 3 or first.shape[1] == 0:
        raise ValueError(f"{first_shards.where(first_key)}: nsdgeneral.npy has shape {first.shape}; expected "
                         "(3, n_voxels): three repeats of the nsdgeneral voxels")
    n_voxels = first.shape[1]

    ids, trials = {}, {}
    for split, items in samples.items():
        ids_list, trial_list = [], []
        for sh, key in items:
            coco = _integers(sh.npy(key, "coco73k.npy"), sh.where(key), "coco73k.npy")
            if coco.size != 1 or coco[0] < 0:
                raise ValueError(f"{sh.where(key)}: coco73k.npy holds {coco.tolist()[:3]}; expected one NSD index")
            trial = _integers(sh.npy(key, "trial.npy"), sh.where(key), "trial.npy")
            ids_list.append(int(coco[0]))
            trial_list.append(sorted(int(t) for t in trial if t >= 0))
        ids[split] = np.array(ids_list, np.int64)
        trials[split] = trial_list
    _check_no_overlap(ids, f"{job.input_dir} (MindEye1 train/val and test shards)")

    voxels = _voxel_set(job, n_voxels, first_shards.samples[first_key][0])
    design = _design(job)
    trials_per_session = design.trials_per_session if design is not None else NSD_TRIALS_PER_SESSION
    caption_source = _caption_source(job)
    if caption_source is None:
        _no_captions_warning(job)
    n_train = len(ids["train"])
    n_val = _n_val(n_train, job.val_size, job.input_dir / "train")
    cut = n_train - n_val
    rows = {"train": ("train", 0, cut), "val": ("train", cut, n_train), "test": ("test", 0, len(ids["test"]))}

    def build(writer: PreparedWriter) -> dict:
        captions = _split_captions(caption_source, {s: ids[src][a:b] for s, (src, a, b) in rows.items()},
                                   str(job.input_dir))
        outputs = {}
        image_shape = None
        for split, (source, a, b) in rows.items():
            stim = ids[source][a:b]
            writer.save_split(split, stim, _pad(trials[source][a:b]), captions[split])
            out = writer.array(f"{split}/betas.npy", (b - a, n_voxels), np.float32)
            for r, (sh, key) in enumerate(samples[source][a:b]):
                out[r] = _average_repeats(sh.npy(key, "nsdgeneral.npy"), n_voxels, sh.where(key))
            outputs[split] = out
            if job.images:
                img = None
                for r, (sh, key) in enumerate(samples[source][a:b]):
                    pixels = _decode_jpeg(sh.read(key, "jpg"), sh.where(key))
                    if image_shape is None:
                        image_shape = pixels.shape
                    if pixels.shape != image_shape:
                        raise ValueError(f"{sh.where(key)}: image of {pixels.shape}; expected {image_shape} like the "
                                         "other samples")
                    if img is None:
                        img = writer.array(f"{split}/images.npy", (b - a, *image_shape), np.uint8)
                    img[r] = pixels
                if img is None:
                    shape = image_shape or (0, 0, 3)
                    img = writer.array(f"{split}/images.npy", (0, *shape), np.uint8)
                img.flush()
        _finish_betas(outputs, job.normalize, job.input_dir)
        n_test = len(ids["test"])
        return {
            "test_set": f"old ({n_test} images) as published by MindEye1",
            "sessions": _sessions([_pad(t) for t in trials.values()], trials_per_session),
            "trials_per_session": trials_per_session,
            "shapes": {split: [b - a, n_voxels] for split, (_, a, b) in rows.items()},
            "images": bool(job.images),
        }

    return _run(job, voxels, build)


def _average_repeats(repeats: np.ndarray, n_voxels: int, where: str) -> np.ndarray:
    if repeats.shape != (3, n_voxels) or repeats.dtype.kind not in "fiu":
        raise ValueError(f"{where}: nsdgeneral.npy has shape {repeats.shape} {repeats.dtype}; expected (3, {n_voxels}) "
                         "numbers: three repeats of the nsdgeneral voxels")
    x = repeats.astype(np.float64)
    available = ~np.isnan(x).all(1)
    if not available.any():
        raise ValueError(f"{where}: all 3 repeats in nsdgeneral.npy are NaN; expected at least one repeat")
    x = x[available]
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: nsdgeneral.npy holds NaN or inf inside an available repeat; expected finite "
                         "betas (or a whole row of NaN for a missing repeat)")
    return x.mean(0).astype(np.float32)


def _check_no_overlap(ids: dict[str, np.ndarray], where: str) -> None:
    train, test = ids["train"], ids["test"]
    both = np.intersect1d(train[train >= 0], test[test >= 0])
    if len(both):
        raise ValueError(f"{where}: {len(both)} NSD images are in both train and test (first {int(both[0])}); "
                         "expected disjoint splits")


# ---------------------------------------------------------------------------- MindEye2
def prepare_mindeye2(input_dir, subject: int, out, nsd_root=None, normalize: str = "none",
                     val_size: int | None = None, detail_voxels: str = "roi", images: bool = True,
                     force: bool = False, full_hash: bool = False, test_set: str = "new",
                     single_trial: bool = False) -> PreparedSubject:
    """MindEye2's ``betas_all_subjNN_fp32_renorm.hdf5`` and ``wds/subjNN`` shards to a prepared dataset.

    Rows average the trials of each image (in order of first appearance over the trials sorted
    by global trial), or are single trials with ``single_trial``. Train = every image of the
    ``train`` shards, then our val rule; test = the ``new_test`` (test_set 'new') or ``test``
    ('old') shards. Only the needed rows of the betas file are read, in increasing order.
    """
    job = _new_job("mindeye2", input_dir, subject, out, nsd_root, normalize, val_size, detail_voxels, images,
                   force, full_hash, "its betas file is already session-normalised by its authors (use none)")
    if test_set not in TEST_SETS:
        raise ValueError(f"Unknown test_set={test_set!r}; choose from {list(TEST_SETS)}")
    job.single_trial = bool(single_trial)
    job.extra_options = {"test_set": test_set}
    subject = job.subject
    betas_path = job.input_dir / f"betas_all_subj{subject:02d}_fp32_renorm.hdf5"
    if not betas_path.is_file():
        raise FileNotFoundError(f"{betas_path}: missing (MindEye2 betas of subject {subject}, one row per trial)")
    wds = job.input_dir / "wds" / f"subj{subject:02d}"
    test_folder = "new_test" if test_set == "new" else "test"
    example = f"{wds}/{{train,test,new_test}}/*.tar"
    paths = {"train": _tar_files(wds / "train", subject, "MindEye2 train shards", example),
             "test": _tar_files(wds / test_folder, subject, f"MindEye2 {test_folder} shards (test_set {test_set!r})",
                                example)}
    shards: dict[str, _Shards] = {}
    try:
        for split, files in paths.items():
            shards[split] = _Shards(files, "MindEye2 webdataset samples with behav.npy of shape (1, 17)")
            for path in files:
                job.add_input(path)
        return _mindeye2(job, shards, betas_path, test_set, test_folder)
    finally:
        for s in shards.values():
            s.close()


def _mindeye2(job: _Job, shards: dict[str, _Shards], betas_path: Path, test_set: str,
              test_folder: str) -> PreparedSubject:
    # 1. Trials of each split from behav.npy: (global trial, NSD id), sorted by trial.
    split_trials: dict[str, np.ndarray] = {}
    split_images: dict[str, np.ndarray] = {}
    origin: dict[int, str] = {}
    for split, sh in shards.items():
        found: dict[int, tuple[int, str]] = {}
        for key in sh.sorted_keys():
            behav = sh.npy(key, "behav.npy")
            if behav.shape != (1, 17):
                raise ValueError(f"{sh.where(key)}: behav.npy has shape {behav.shape}; expected (1, 17) "
                                 "(MindEye2's behaviour row)")
            row = _integers(behav[0, [0, 5]], sh.where(key), "behav.npy columns 0 and 5")
            image, trial = int(row[0]), int(row[1])
            if image < 0 or trial < 0:
                raise ValueError(f"{sh.where(key)}: behav.npy gives NSD index {image} and trial {trial}; expected "
                                 "both (-1 means missing)")
            if trial in found and found[trial][0] != image:
                raise ValueError(f"{sh.where(key)}: trial {trial} shows NSD image {image}, but {found[trial][1]} "
                                 f"says {found[trial][0]}; expected one image per trial")
            found.setdefault(trial, (image, sh.where(key)))
        if not found:
            raise ValueError(f"{', '.join(map(str, sh.tars))}: no samples; expected MindEye2 samples with behav.npy")
        order = sorted(found)
        if split == "test":
            origin = {t: w for t, (_, w) in found.items()}
        split_trials[split] = np.array(order, np.int64)
        split_images[split] = np.array([found[t][0] for t in order], np.int64)
    clash = np.intersect1d(split_trials["train"], split_trials["test"])
    if len(clash):
        raise ValueError(f"{origin[int(clash[0])]}: trial {int(clash[0])} is also in the train "
                         "shards; expected disjoint train and test trials")
    _check_no_overlap(split_images, f"{job.input_dir / 'wds' / f'subj{job.subject:02d}'} (train and "
                                    f"{test_folder} shards)")

    # 2. The betas file: shape only (rows are read later, in increasing order).
    with _open_h5(betas_path, "MindEye2 betas") as f:
        if "betas" not in f or f["betas"].ndim != 2:
            shape = f["betas"].shape if "betas" in f else None
            raise ValueError(f"{betas_path}: dataset 'betas' of shape {shape}; expected (trials, nsdgeneral voxels)")
        n_rows, n_voxels = f["betas"].shape
    needed_max = int(max(split_trials["train"].max(), split_trials["test"].max()))
    if needed_max >= n_rows:
        raise ValueError(f"{betas_path}: {n_rows} rows, but the shards refer to trial {needed_max}; expected one row "
                         "per global trial of the subject")
    voxels = _voxel_set(job, n_voxels, betas_path)
    design = _design(job)
    trials_per_session = design.trials_per_session if design is not None else NSD_TRIALS_PER_SESSION

    # 3. Rows: per image (first appearance) or per trial; val = the last images of train.
    train_order = _first_appearance(split_images["train"])
    n_val = _n_val(len(train_order), job.val_size, f"{job.input_dir / 'wds' / f'subj{job.subject:02d}' / 'train'}")
    val_images = set(train_order[len(train_order) - n_val:].tolist())
    in_val = np.array([i in val_images for i in split_images["train"].tolist()], bool)
    groups = {"train": (split_trials["train"][~in_val], split_images["train"][~in_val]),
              "val": (split_trials["train"][in_val], split_images["train"][in_val]),
              "test": (split_trials["test"], split_images["test"])}
    layout = {}  # split -> (stimulus ids, trial lists, row of each trial)
    for split, (trials, images_) in groups.items():
        if job.single_trial:
            layout[split] = (images_, [[int(t)] for t in trials], np.arange(len(trials)))
        else:
            stim = _first_appearance(images_)
            index = {int(v): r for r, v in enumerate(stim)}
            row_of = np.array([index[int(i)] for i in images_], np.int64)
            lists: list[list[int]] = [[] for _ in stim]
            for t, r in zip(trials.tolist(), row_of.tolist(), strict=True):
                lists[r].append(t)
            layout[split] = (stim, lists, row_of)

    # 4. Images and captions: where from.
    image_source = None
    if job.images:
        coco = job.input_dir / MINDEYE2_IMAGES
        stimuli = nsd_paths.stimuli_path(job.nsd_root) if job.nsd_root is not None else None
        if coco.is_file():
            image_source = coco
        elif stimuli is not None and stimuli.is_file():
            image_source = stimuli
        else:
            log.warning("subject %d: no images (%s not in %s, and no NSD stimuli file under --nsd-root)",
                        job.subject, MINDEYE2_IMAGES, job.input_dir)
        if image_source is not None:
            job.add_input(image_source)
    caption_source = _caption_source(job)
    if caption_source is None:
        _no_captions_warning(job)

    def build(writer: PreparedWriter) -> dict:
        captions = _split_captions(caption_source, {split: layout[split][0] for split in layout}, str(job.input_dir))
        outputs, counts = {}, {}
        for split, (stim, lists, _) in layout.items():
            writer.save_split(split, stim, _pad(lists), captions[split])
            outputs[split] = writer.array(f"{split}/betas.npy", (len(stim), n_voxels), np.float32)
            counts[split] = np.array([len(t) for t in lists], np.float32)
        # Every needed trial once, ascending, with its split and row.
        names = list(layout)
        trial_all = np.concatenate([groups[s][0] for s in names])
        split_all = np.concatenate([np.full(len(groups[s][0]), i) for i, s in enumerate(names)])
        row_all = np.concatenate([layout[s][2] for s in names])
        order = np.argsort(trial_all, kind="stable")
        trial_all, split_all, row_all = trial_all[order], split_all[order], row_all[order]
        with _open_h5(betas_path, "MindEye2 betas") as f:
            ds = f["betas"]
            for start in range(0, len(trial_all), _H5_BLOCK):
                t = trial_all[start:start + _H5_BLOCK]
                lo = int(t[0])
                # Contiguous reads when the trials are dense (the usual case), else point selection.
                if t[-1] - lo < 4 * len(t):
                    data = np.asarray(ds[lo:int(t[-1]) + 1], np.float32)[t - lo]
                else:
                    data = np.asarray(ds[t], np.float32)
                bad = ~np.isfinite(data).all(1)
                if bad.any():
                    raise ValueError(f"{betas_path}: row {int(t[np.flatnonzero(bad)[0]])} holds NaN or inf; "
                                     "expected finite betas")
                for i, split in enumerate(names):
                    sel = split_all[start:start + _H5_BLOCK] == i
                    if sel.any():
                        np.add.at(outputs[split], row_all[start:start + _H5_BLOCK][sel], data[sel])
        for split, out in outputs.items():
            if len(out):
                out /= counts[split][:, None]
        _finish_betas(outputs, job.normalize, betas_path)
        if image_source is not None:
            split_ids = {split: layout[split][0] for split in layout}
            if image_source.name == MINDEYE2_IMAGES:
                _copy_mindeye2_images(writer, image_source, split_ids)
            else:
                _copy_nsd_stimuli(writer, image_source, split_ids)
        all_trials = [np.concatenate([groups[s][0] for s in names])]
        n_test = len(np.unique(layout["test"][0]))
        described = (f"new ({n_test} images, all sessions) as published by MindEye2 (wds new_test)"
                     if test_set == "new" else f"old ({n_test} images) as published by MindEye2 (wds test)")
        return {
            "test_set": described,
            "sessions": _sessions(all_trials, trials_per_session),
            "trials_per_session": trials_per_session,
            "shapes": {split: [len(layout[split][0]), n_voxels] for split in layout},
            "images": image_source is not None,
        }

    return _run(job, voxels, build)


def _copy_mindeye2_images(writer: PreparedWriter, path: Path, split_ids: dict[str, np.ndarray]) -> None:
    """MindEye2's ``images`` (n, 3, H, W) float16 in [0, 1] to uint8 (n, H, W, 3)."""
    with _open_h5(path, "MindEye2 COCO images") as f:
        if "images" not in f or f["images"].ndim != 4 or f["images"].shape[1] != 3:
            shape = f["images"].shape if "images" in f else None
            raise ValueError(f"{path}: dataset 'images' of shape {shape}; expected (73000, 3, H, W) values in 0-1")
        ds = f["images"]
        for split, ids in split_ids.items():
            _check_ids(ids, ds.shape[0], path)
            out = writer.array(f"{split}/images.npy", (len(ids), ds.shape[2], ds.shape[3], 3), np.uint8)
            for start in range(0, len(ids), 256):
                chunk = ids[start:start + 256]
                unique = np.unique(chunk)
                block = _to_uint8(np.asarray(ds[unique]), path, 255.0)
                out[start:start + len(chunk)] = block.transpose(0, 2, 3, 1)[np.searchsorted(unique, chunk)]
            out.flush()
