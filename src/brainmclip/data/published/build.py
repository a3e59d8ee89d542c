"""The steps every published-format reader shares: the job, the NSD-root side, captions, checks, commit.

A reader makes a :class:`Job` with :func:`new_job` (arguments checked, NSD root's ROI files and
design read), checks every input it will need, then hands :func:`run_job` a ``build`` function
that fills a :class:`PreparedWriter`; :func:`run_job` skips it when the output is up to date
and commits the dataset when it succeeds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainmclip import __version__
from brainmclip.data import nsd_paths
from brainmclip.data.build_common import (
    ROW_CHUNK,
    build_prepared,
    check_curated_captions,
    check_ids,
    coco_caption_files,
    file_identity,
    nsd_voxels,
    zscore_with_non_test,
)
from brainmclip.data.nsd_official import (
    ExpDesign,
    read_coco_captions,
    read_curated_captions,
    read_expdesign,
    read_stim_info,
)
from brainmclip.data.nsd_paths import ROI_NAMES, check_subject
from brainmclip.data.prepare import DEFAULT_VAL_FRACTION, NORMALIZATIONS
from brainmclip.data.prepared import PREPARED_FORMAT, PreparedSubject, PreparedWriter, VoxelSet
from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.paths import record_path

log = logging.getLogger("brainmclip.prepare")

# Trials per NSD session; used to name sessions when the design file is not at hand.
NSD_TRIALS_PER_SESSION = 750
CURATED_CAPTIONS = "COCO_73k_annots_curated.npy"


@dataclass
class Job:
    """One preparation: the arguments, what the NSD root offers, and the inputs found so far."""

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
    design: ExpDesign | None = None
    # Voxels and ROI files from the NSD root, or why there are none.
    rois: tuple[VoxelSet, dict[str, Path]] | None = None
    no_rois: str = "no NSD root was given"

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


def new_job(fmt: str, input_dir, subject, out, nsd_root, normalize: str, val_size, detail_voxels: str,
            images: bool, force: bool, full_hash: bool, why_no_session: str) -> Job:
    """Check the arguments, then read the NSD root's ROI files (when all are there) and design."""
    subject = check_subject(subject)
    if normalize not in NORMALIZATIONS:
        raise InvalidInputError(f"Unknown normalize={normalize!r}; choose from {list(NORMALIZATIONS)}")
    if normalize == "session":
        raise InvalidInputError(f"normalize='session' is not possible for {fmt} files: {why_no_session}; "
                         "use normalize 'brain-diffuser' or 'none'")
    if detail_voxels not in ("roi", "nsdgeneral"):
        raise InvalidInputError(f"Unknown detail_voxels={detail_voxels!r}; choose 'roi' or 'nsdgeneral'")
    if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer))
                                 or val_size < 0):
        raise InvalidInputError(f"val_size={val_size!r}; expected a non-negative number of images")
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise MissingInputError(f"{input_dir}: folder not found (the {fmt} files of subject {subject})")
    root = None
    if nsd_root is not None:
        root = Path(nsd_root)
        if not root.is_dir():
            raise MissingInputError(f"{root}: NSD root folder not found")
    job = Job(fmt, subject, input_dir, Path(out), root, normalize, None if val_size is None else int(val_size),
              detail_voxels, bool(images), bool(force), bool(full_hash))
    if root is not None:
        missing = [p for p in (nsd_paths.roi_path(root, subject, roi) for roi in ROI_NAMES) if not p.is_file()]
        if missing:
            job.no_rois = f"{missing[0]} is missing"
        else:
            job.rois = nsd_voxels(root, subject, detail_voxels)
        if nsd_paths.expdesign_path(root).is_file():
            job.add_input(nsd_paths.expdesign_path(root))
            job.design = read_expdesign(root)
    return job


def run_job(job: Job, voxels: VoxelSet, build: Callable[[PreparedWriter], dict]) -> PreparedSubject:
    """Check the output folder, then build (unless up to date) and commit."""
    identity = {"subject": job.subject, "source": job.fmt, "options": job.options(), "code_version": __version__,
                "inputs": {key: file_identity(path, job.full_hash) for key, path in sorted(job.inputs.items())}}
    out = job.out

    def write(writer: PreparedWriter) -> dict:
        details = build(writer)
        return {
            **identity,
            "format": PREPARED_FORMAT,
            "input": record_path(job.input_dir, out),
            "nsd_root": record_path(job.nsd_root, out) if job.nsd_root is not None else None,
            "n_voxels": voxels.n_voxels,
            "voxel_groups": {k: len(v) for k, v in voxels.groups.items()},
            **details,
            "seconds": round(time.perf_counter() - job.start, 2),
        }

    prepared, built = build_prepared(out, identity, job.force, voxels, write)
    if not built:
        return prepared
    log.info("prepared subject %d from %s files in %.1f s", job.subject, job.fmt, time.perf_counter() - job.start)
    return prepared


def voxel_set(job: Job, n_voxels: int, source: Path) -> VoxelSet:
    """The nsdgeneral voxels with ROI groups when ``nsd_root`` has the ROI files, else only 'all'."""
    if job.rois is not None:
        voxels, roi_paths = job.rois
        if voxels.n_voxels != n_voxels:
            raise InvalidInputError(f"{source}: {n_voxels} voxels, but {roi_paths['nsdgeneral']} has "
                             f"{voxels.n_voxels} nsdgeneral voxels; expected files of the same subject "
                             f"({job.subject})")
        for path in roi_paths.values():
            job.add_input(path)
        return voxels
    groups = {"all": np.arange(n_voxels)}
    lacking = "low_level/high_level/semantic/detail"
    if job.detail_voxels == "nsdgeneral":  # fMRI-Detail = every nsdgeneral voxel needs no ROI file
        groups["detail"] = np.arange(n_voxels)
        lacking = "low_level/high_level/semantic"
    log.warning("subject %d: only voxel groups %s are available (%s); %s need NSD's ROI files; pass --nsd-root "
                "with nsddata/ppdata/subj%02d/func1pt8mm/roi/*.nii.gz", job.subject, sorted(groups), job.no_rois,
                lacking, job.subject)
    return VoxelSet(n_voxels, None, None, {}, groups)


def n_val(n_train: int, val_size: int | None, source) -> int:
    """Images held out from the end of train: ``val_size``, or the default fraction."""
    n = round(n_train * DEFAULT_VAL_FRACTION) if val_size is None else val_size
    if n >= n_train:
        raise InvalidInputError(f"{source}: val_size={n} leaves no training images (train has {n_train})")
    return n


def pad(lists: list[list[int]]) -> np.ndarray:
    """Per-row trial lists to an int64 array padded with -1 (at least one column)."""
    width = max((len(t) for t in lists), default=1) or 1
    out = np.full((len(lists), width), -1, np.int64)
    for r, ts in enumerate(lists):
        out[r, : len(ts)] = ts
    return out


def first_appearance(values: np.ndarray) -> np.ndarray:
    _, first = np.unique(values, return_index=True)
    return values[np.sort(first)]


def sessions_of(trial_ids: list[np.ndarray], trials_per_session: int) -> list[int]:
    """1-based sessions of the (non-negative) global trials."""
    trials = np.concatenate([t.ravel() for t in trial_ids]) if trial_ids else np.zeros(0, np.int64)
    trials = trials[trials >= 0]
    return sorted(int(s) + 1 for s in np.unique(trials // trials_per_session))


def caption_source(job: Job) -> Callable[[np.ndarray], list[list[str]]] | None:
    """Captions by NSD id: NSD's stimulus table + COCO files, else the curated file, else None.

    The files are checked here, before any shard or betas file is read: the stimulus table is
    read and every COCO caption file it refers to must be readable.
    """
    root = job.nsd_root
    if root is not None and nsd_paths.stim_info_path(root).is_file():
        table = nsd_paths.stim_info_path(root)
        info = read_stim_info(root)
        job.add_input(table)
        for path in coco_caption_files(root, info["cocoSplit"]):
            job.add_input(path)

        def coco(ids: np.ndarray) -> list[list[str]]:
            check_ids(ids, len(info["cocoId"]), table)
            return read_coco_captions(root, info["cocoId"][ids], info["cocoSplit"][ids])

        return coco
    for folder in (job.input_dir, root):
        if folder is not None and (folder / CURATED_CAPTIONS).is_file():
            path = folder / CURATED_CAPTIONS
            check_curated_captions(path)
            job.add_input(path)
            return lambda ids: read_curated_captions(path, ids)
    return None


def split_captions(source, split_ids: dict[str, np.ndarray], what: str) -> dict[str, list[list[str]]]:
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


def no_captions_warning(job: Job) -> None:
    log.warning("subject %d: no captions (pass --nsd-root with nsd_stim_info_merged.csv and COCO's caption files, "
                "or put %s in %s)", job.subject, CURATED_CAPTIONS, job.input_dir)


def finish_betas(outputs: dict[str, np.ndarray], normalize: str, source) -> None:
    """Check every value is finite, then apply Brain-Diffuser's z-score if asked, and flush."""
    for split, out in outputs.items():
        for start in range(0, len(out), ROW_CHUNK):
            block = out[start:start + ROW_CHUNK]
            if not np.isfinite(block).all():
                row = start + int(np.flatnonzero(~np.isfinite(block).all(1))[0])
                raise InvalidInputError(f"{source}: {split} row {row} holds NaN or inf after averaging; "
                                        f"expected finite betas")
    if normalize == "brain-diffuser":
        zscore_with_non_test(outputs, source)
    for out in outputs.values():
        out.flush()


def load_npy(path: Path, what: str, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise MissingInputError(f"{path}: missing ({what})")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInputError(f"{path}: not a readable .npy array ({message}); expected {what}") from None


def integers(values, where: str, what: str) -> np.ndarray:
    """Integer values of an array that may be stored as floats; NaN becomes -1."""
    values = np.asarray(values).ravel()
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not np.array_equal(values[finite], np.round(values[finite])):
            raise InvalidInputError(f"{where}: {what} holds non-integer values; expected integers")
        return np.where(finite, values, -1).astype(np.int64)
    raise InvalidInputError(f"{where}: {what} has dtype {values.dtype}; expected integers")


def check_no_overlap(ids: dict[str, np.ndarray], where: str) -> None:
    train, test = ids["train"], ids["test"]
    both = np.intersect1d(train[train >= 0], test[test >= 0])
    if len(both):
        raise InvalidInputError(f"{where}: {len(both)} NSD images are in both train and test (first {int(both[0])}); "
                         "expected disjoint splits")
