"""MindEye2's ``betas_all_subjNN_fp32_renorm.hdf5`` and ``wds/subjNN`` shards to a prepared dataset.

The betas file holds one row per global trial, session-normalised by MindEye2's authors; the
``behav.npy`` rows of the webdataset shards ``wds/subjNN/{train,test,new_test}/*.tar`` give
the NSD index (column 0) and the global trial (column 5) of each sample. Images come from
MindEye2's ``coco_images_224_float16.hdf5`` or, failing that, NSD's stimuli.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from brainmclip.data import nsd_paths
from brainmclip.data.build_common import check_ids, check_nsd_stimuli, copy_nsd_stimuli, open_h5, to_uint8
from brainmclip.data.prepare import TEST_SETS
from brainmclip.data.prepared import PreparedSubject, PreparedWriter
from brainmclip.errors import InvalidInputError, MissingInputError

from .build import (
    NSD_TRIALS_PER_SESSION,
    Job,
    caption_source,
    check_no_overlap,
    finish_betas,
    first_appearance,
    integers,
    n_val,
    new_job,
    no_captions_warning,
    pad,
    run_job,
    sessions_of,
    split_captions,
    voxel_set,
)
from .webdataset import Shards, tar_files

__all__ = ["prepare_mindeye2", "MINDEYE2_IMAGES"]

log = logging.getLogger("brainmclip.prepare")

MINDEYE2_IMAGES = "coco_images_224_float16.hdf5"
# Betas rows per read of the HDF5 file.
_H5_BLOCK = 1024
# Images per read of MindEye2's image file.
_IMAGE_CHUNK = 256


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
    job = new_job("mindeye2", input_dir, subject, out, nsd_root, normalize, val_size, detail_voxels, images,
                  force, full_hash, "its betas file is already session-normalised by its authors (use none)")
    if test_set not in TEST_SETS:
        raise InvalidInputError(f"Unknown test_set={test_set!r}; choose from {list(TEST_SETS)}")
    job.single_trial = bool(single_trial)
    job.extra_options = {"test_set": test_set}
    subject = job.subject
    betas_path = job.input_dir / f"betas_all_subj{subject:02d}_fp32_renorm.hdf5"
    if not betas_path.is_file():
        raise MissingInputError(f"{betas_path}: missing (MindEye2 betas of subject {subject}, one row per trial)")
    wds = job.input_dir / "wds" / f"subj{subject:02d}"
    test_folder = "new_test" if test_set == "new" else "test"
    example = f"{wds}/{{train,test,new_test}}/*.tar"
    paths = {"train": tar_files(wds / "train", subject, "MindEye2 train shards", example),
             "test": tar_files(wds / test_folder, subject, f"MindEye2 {test_folder} shards (test_set {test_set!r})",
                               example)}

    # Every other input is checked before the first shard is opened: betas shape, images, captions.
    with open_h5(betas_path, "MindEye2 betas") as f:
        if "betas" not in f or f["betas"].ndim != 2:
            shape = f["betas"].shape if "betas" in f else None
            raise InvalidInputError(f"{betas_path}: dataset 'betas' of shape {shape}; expected (trials, nsdgeneral voxels)")
        betas_shape = f["betas"].shape
    voxels = voxel_set(job, betas_shape[1], betas_path)
    image_source = _image_source(job) if job.images else None
    captions_from = caption_source(job)
    if captions_from is None:
        no_captions_warning(job)

    shards: dict[str, Shards] = {}
    try:
        for split, files in paths.items():
            shards[split] = Shards(files, "MindEye2 webdataset samples with behav.npy of shape (1, 17)")
            for path in files:
                job.add_input(path)
        return _mindeye2(job, shards, betas_path, betas_shape, voxels, image_source, captions_from, test_set,
                         test_folder)
    finally:
        for s in shards.values():
            s.close()


def _image_source(job: Job) -> Path | None:
    """MindEye2's image file in the input folder, else NSD's stimuli, each checked; None (with a warning) if neither."""
    coco = job.input_dir / MINDEYE2_IMAGES
    stimuli = nsd_paths.stimuli_path(job.nsd_root) if job.nsd_root is not None else None
    if coco.is_file():
        _mindeye2_images(coco)
        source = coco
    elif stimuli is not None and stimuli.is_file():
        check_nsd_stimuli(stimuli)
        source = stimuli
    else:
        log.warning("subject %d: no images (%s not in %s, and no NSD stimuli file under --nsd-root)",
                    job.subject, MINDEYE2_IMAGES, job.input_dir)
        return None
    job.add_input(source)
    return source


def _mindeye2(job: Job, shards: dict[str, Shards], betas_path: Path, betas_shape: tuple[int, int], voxels,
              image_source: Path | None, captions_from, test_set: str, test_folder: str) -> PreparedSubject:
    # 1. Trials of each split from behav.npy: (global trial, NSD id), sorted by trial.
    split_trials: dict[str, np.ndarray] = {}
    split_images: dict[str, np.ndarray] = {}
    origin: dict[int, str] = {}
    for split, sh in shards.items():
        found: dict[int, tuple[int, str]] = {}
        for key in sh.sorted_keys():
            behav = sh.npy(key, "behav.npy")
            if behav.shape != (1, 17):
                raise InvalidInputError(f"{sh.where(key)}: behav.npy has shape {behav.shape}; expected (1, 17) "
                                 "(MindEye2's behaviour row)")
            row = integers(behav[0, [0, 5]], sh.where(key), "behav.npy columns 0 and 5")
            image, trial = int(row[0]), int(row[1])
            if image < 0 or trial < 0:
                raise InvalidInputError(f"{sh.where(key)}: behav.npy gives NSD index {image} and trial {trial}; expected "
                                 "both (-1 means missing)")
            if trial in found and found[trial][0] != image:
                raise InvalidInputError(f"{sh.where(key)}: trial {trial} shows NSD image {image}, but {found[trial][1]} "
                                 f"says {found[trial][0]}; expected one image per trial")
            found.setdefault(trial, (image, sh.where(key)))
        if not found:
            raise InvalidInputError(f"{', '.join(map(str, sh.tars))}: no samples; expected MindEye2 samples with behav.npy")
        order = sorted(found)
        if split == "test":
            origin = {t: w for t, (_, w) in found.items()}
        split_trials[split] = np.array(order, np.int64)
        split_images[split] = np.array([found[t][0] for t in order], np.int64)
    clash = np.intersect1d(split_trials["train"], split_trials["test"])
    if len(clash):
        raise InvalidInputError(f"{origin[int(clash[0])]}: trial {int(clash[0])} is also in the train "
                         "shards; expected disjoint train and test trials")
    check_no_overlap(split_images, f"{job.input_dir / 'wds' / f'subj{job.subject:02d}'} (train and "
                                   f"{test_folder} shards)")

    # 2. The betas file: only its shape so far (rows are read later, in increasing order).
    n_rows, n_voxels = betas_shape
    needed_max = int(max(split_trials["train"].max(), split_trials["test"].max()))
    if needed_max >= n_rows:
        raise InvalidInputError(f"{betas_path}: {n_rows} rows, but the shards refer to trial {needed_max}; expected one row "
                         "per global trial of the subject")
    design = job.design
    trials_per_session = design.trials_per_session if design is not None else NSD_TRIALS_PER_SESSION

    # 3. Rows: per image (first appearance) or per trial; val = the last images of train.
    train_order = first_appearance(split_images["train"])
    n_held = n_val(len(train_order), job.val_size, f"{job.input_dir / 'wds' / f'subj{job.subject:02d}' / 'train'}")
    val_images = set(train_order[len(train_order) - n_held:].tolist())
    in_val = np.array([i in val_images for i in split_images["train"].tolist()], bool)
    groups = {"train": (split_trials["train"][~in_val], split_images["train"][~in_val]),
              "val": (split_trials["train"][in_val], split_images["train"][in_val]),
              "test": (split_trials["test"], split_images["test"])}
    layout = {}  # split -> (stimulus ids, trial lists, row of each trial)
    for split, (trials, images_) in groups.items():
        if job.single_trial:
            layout[split] = (images_, [[int(t)] for t in trials], np.arange(len(trials)))
        else:
            stim = first_appearance(images_)
            index = {int(v): r for r, v in enumerate(stim)}
            row_of = np.array([index[int(i)] for i in images_], np.int64)
            lists: list[list[int]] = [[] for _ in stim]
            for t, r in zip(trials.tolist(), row_of.tolist(), strict=True):
                lists[r].append(t)
            layout[split] = (stim, lists, row_of)

    def build(writer: PreparedWriter) -> dict:
        captions = split_captions(captions_from, {split: layout[split][0] for split in layout}, str(job.input_dir))
        outputs, counts = {}, {}
        for split, (stim, lists, _) in layout.items():
            writer.save_split(split, stim, pad(lists), captions[split])
            outputs[split] = writer.array(f"{split}/betas.npy", (len(stim), n_voxels), np.float32)
            counts[split] = np.array([len(t) for t in lists], np.float32)
        # Every needed trial once, ascending, with its split and row.
        names = list(layout)
        trial_all = np.concatenate([groups[s][0] for s in names])
        split_all = np.concatenate([np.full(len(groups[s][0]), i) for i, s in enumerate(names)])
        row_all = np.concatenate([layout[s][2] for s in names])
        order = np.argsort(trial_all, kind="stable")
        trial_all, split_all, row_all = trial_all[order], split_all[order], row_all[order]
        with open_h5(betas_path, "MindEye2 betas") as f:
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
                    raise InvalidInputError(f"{betas_path}: row {int(t[np.flatnonzero(bad)[0]])} holds NaN or inf; "
                                     "expected finite betas")
                for i, split in enumerate(names):
                    sel = split_all[start:start + _H5_BLOCK] == i
                    if sel.any():
                        np.add.at(outputs[split], row_all[start:start + _H5_BLOCK][sel], data[sel])
        for split, out in outputs.items():
            if len(out):
                out /= counts[split][:, None]
        finish_betas(outputs, job.normalize, betas_path)
        if image_source is not None:
            split_ids = {split: layout[split][0] for split in layout}
            if image_source.name == MINDEYE2_IMAGES:
                _copy_mindeye2_images(writer, image_source, split_ids)
            else:
                copy_nsd_stimuli(writer, image_source, split_ids)
        all_trials = [np.concatenate([groups[s][0] for s in names])]
        n_test = len(np.unique(layout["test"][0]))
        described = (f"new ({n_test} images, all sessions) as published by MindEye2 (wds new_test)"
                     if test_set == "new" else f"old ({n_test} images) as published by MindEye2 (wds test)")
        return {
            "test_set": described,
            "sessions": sessions_of(all_trials, trials_per_session),
            "trials_per_session": trials_per_session,
            "shapes": {split: [len(layout[split][0]), n_voxels] for split in layout},
            "images": image_source is not None,
        }

    return run_job(job, voxels, build)


def _mindeye2_images(path: Path) -> tuple[int, ...]:
    """Shape of MindEye2's ``images`` dataset, checked to be (n, 3, H, W)."""
    with open_h5(path, "MindEye2 COCO images") as f:
        if "images" not in f or f["images"].ndim != 4 or f["images"].shape[1] != 3:
            shape = f["images"].shape if "images" in f else None
            raise InvalidInputError(f"{path}: dataset 'images' of shape {shape}; expected (73000, 3, H, W) values in 0-1")
        return f["images"].shape


def _copy_mindeye2_images(writer: PreparedWriter, path: Path, split_ids: dict[str, np.ndarray]) -> None:
    """MindEye2's ``images`` (n, 3, H, W) float16 in [0, 1] to uint8 (n, H, W, 3)."""
    shape = _mindeye2_images(path)
    with open_h5(path, "MindEye2 COCO images") as f:
        ds = f["images"]
        for split, ids in split_ids.items():
            check_ids(ids, shape[0], path)
            out = writer.array(f"{split}/images.npy", (len(ids), shape[2], shape[3], 3), np.uint8)
            for start in range(0, len(ids), _IMAGE_CHUNK):
                chunk = ids[start:start + _IMAGE_CHUNK]
                unique = np.unique(chunk)
                block = to_uint8(np.asarray(ds[unique]), path, 255.0)
                out[start:start + len(chunk)] = block.transpose(0, 2, 3, 1)[np.searchsorted(unique, chunk)]
            out.flush()
