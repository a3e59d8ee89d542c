"""Brain-Diffuser's ``processed_data/subjNN`` folder to a prepared dataset.

``nsd_{train,test}_{fmriavg_nsdgeneral,stim,cap}_subN.npy``: betas averaged over repeats in
raw NSD scale (int16 units, percent signal change x 300), stimuli, captions. Sessions 1-37
("old" test set); rows follow the first appearance of each image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from brainmclip.data import nsd_paths
from brainmclip.data.build_common import ROW_CHUNK, to_uint8
from brainmclip.data.nsd_paths import BETA_SCALE, NSD_SESSIONS_PER_SUBJECT
from brainmclip.data.prepare import OLD_TEST_SET_SESSIONS, session_plan
from brainmclip.data.prepared import PreparedSubject, PreparedWriter
from brainmclip.errors import InvalidInputError, MissingInputError

from .build import (
    caption_source,
    finish_betas,
    load_npy,
    n_val,
    new_job,
    pad,
    run_job,
    split_captions,
    voxel_set,
)

__all__ = ["prepare_brain_diffuser"]

log = logging.getLogger("brainmclip.prepare")

# Images per block when copying Brain-Diffuser's stimuli.
_IMAGE_CHUNK = 32


def _brain_diffuser_folder(input_dir: Path, subject: int) -> Path:
    name = f"nsd_train_fmriavg_nsdgeneral_sub{subject}.npy"
    for folder in (input_dir, input_dir / f"subj{subject:02d}"):
        if (folder / name).is_file():
            return folder
    raise MissingInputError(f"{input_dir / name}: missing (Brain-Diffuser averaged train betas of subject {subject}); "
                            f"expected --input processed_data or processed_data/subj{subject:02d}")


def prepare_brain_diffuser(input_dir, subject: int, out, nsd_root=None, normalize: str = "none",
                           val_size: int | None = None, detail_voxels: str = "roi", images: bool = True,
                           force: bool = False, full_hash: bool = False) -> PreparedSubject:
    """Brain-Diffuser's ``processed_data`` (sessions 1-37, old test set) to a prepared dataset.

    Betas are divided by 300 (percent signal change). Brain-Diffuser's files hold no NSD ids:
    with ``nsd_root``'s design they are recovered (rows follow the first appearance of each
    image in sessions 1-37, as Brain-Diffuser wrote them); without it they are -1.
    """
    job = new_job("brain-diffuser", input_dir, subject, out, nsd_root, normalize, val_size, detail_voxels, images,
                  force, full_hash, "they hold betas averaged over sessions, without session information")
    subject = job.subject
    folder = _brain_diffuser_folder(job.input_dir, subject)
    job.input_dir = folder

    def file(split: str, kind: str) -> Path:
        return folder / f"nsd_{split}_{kind}_sub{subject}.npy"

    fmri, stim, caps = {}, {}, {}
    for split in ("train", "test"):
        path = file(split, "fmriavg_nsdgeneral")
        fmri[split] = load_npy(path, f"Brain-Diffuser averaged {split} betas (images x nsdgeneral voxels)", mmap=True)
        if fmri[split].ndim != 2 or fmri[split].dtype.kind not in "fiu" or 0 in fmri[split].shape:
            raise InvalidInputError(f"{path}: shape {fmri[split].shape} {fmri[split].dtype}; expected a 2-D numeric array "
                             "(images, nsdgeneral voxels)")
        job.add_input(path)
    n_voxels = fmri["train"].shape[1]
    if fmri["test"].shape[1] != n_voxels:
        raise InvalidInputError(f"{file('test', 'fmriavg_nsdgeneral')}: {fmri['test'].shape[1]} voxels; expected "
                         f"{n_voxels} as in {file('train', 'fmriavg_nsdgeneral').name}")
    for split in ("train", "test"):
        n = len(fmri[split])
        if images:
            path = file(split, "stim")
            stim[split] = load_npy(path, f"Brain-Diffuser {split} stimuli; prepare without images to skip them",
                                   mmap=True)
            shape = stim[split].shape
            if len(shape) != 4 or shape[3] != 3 or shape[0] != n or stim[split].dtype.kind not in "fiu":
                raise InvalidInputError(f"{path}: shape {shape} {stim[split].dtype}; expected ({n}, H, W, 3) pixel values, "
                                 f"one image per row of {file(split, 'fmriavg_nsdgeneral').name}")
            job.add_input(path)
        path = file(split, "cap")
        if path.is_file():
            caps[split] = load_npy(path, f"Brain-Diffuser {split} captions")
            if caps[split].ndim != 2 or len(caps[split]) != n or caps[split].dtype.kind not in "US":
                raise InvalidInputError(f"{path}: shape {caps[split].shape} {caps[split].dtype}; expected ({n}, n_captions) "
                                 "strings")
            job.add_input(path)
    if images and stim["train"].shape[1:] != stim["test"].shape[1:]:
        raise InvalidInputError(f"{file('test', 'stim')}: images of {stim['test'].shape[1:]}; expected "
                         f"{stim['train'].shape[1:]} as in {file('train', 'stim').name}")

    voxels = voxel_set(job, n_voxels, file("train", "fmriavg_nsdgeneral"))
    last = min(OLD_TEST_SET_SESSIONS, NSD_SESSIONS_PER_SUBJECT[subject - 1])
    sessions = list(range(1, last + 1))
    design = job.design
    if design is not None:
        plan = session_plan(design, subject, sessions, val_size=0)
        ids = {"train": plan.split_images["train"], "test": plan.split_images["test"]}
        trials = {}
        for split in ("train", "test"):
            if len(ids[split]) != len(fmri[split]):
                raise InvalidInputError(f"{file(split, 'fmriavg_nsdgeneral')}: {len(fmri[split])} rows, but "
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
    captions_from = None
    if len(caps) < 2:
        captions_from = caption_source(job) if design is not None else None
        if captions_from is None:
            log.warning("subject %d: %s missing; captions left empty", subject,
                        " and ".join(file(s, "cap").name for s in ("train", "test") if s not in caps))

    n_train = len(fmri["train"])
    cut = n_train - n_val(n_train, job.val_size, file("train", "fmriavg_nsdgeneral"))
    rows = {"train": ("train", 0, cut), "val": ("train", cut, n_train), "test": ("test", 0, len(fmri["test"]))}

    def build(writer: PreparedWriter) -> dict:
        looked_up = split_captions(captions_from, {split: ids[source][a:b] for split, (source, a, b) in rows.items()
                                                   if source not in caps}, str(folder))
        outputs = {}
        for split, (source, a, b) in rows.items():
            if source in caps:
                captions = [[str(c).strip() for c in row if str(c).strip()] for row in caps[source][a:b]]
            else:
                captions = looked_up[split]
            writer.save_split(split, ids[source][a:b], pad(trials[source][a:b]), captions)
            out = writer.array(f"{split}/betas.npy", (b - a, n_voxels), np.float32)
            for start in range(a, b, ROW_CHUNK):
                stop = min(start + ROW_CHUNK, b)
                block = np.asarray(fmri[source][start:stop], np.float64)
                if not np.isfinite(block).all():
                    row = start + int(np.flatnonzero(~np.isfinite(block).all(1))[0])
                    raise InvalidInputError(f"{file(source, 'fmriavg_nsdgeneral')}: row {row} holds NaN or inf; expected "
                                     "finite averaged betas")
                out[start - a:stop - a] = block / BETA_SCALE
            outputs[split] = out
            if images:
                img_path = file(source, "stim")
                img = writer.array(f"{split}/images.npy", (b - a, *stim[source].shape[1:]), np.uint8)
                brightest = 0
                for start in range(a, b, _IMAGE_CHUNK):
                    stop = min(start + _IMAGE_CHUNK, b)
                    block = to_uint8(np.asarray(stim[source][start:stop]), img_path, 1.0)
                    brightest = max(brightest, int(block.max()))
                    img[start - a:stop - a] = block
                if b > a and stim[source].dtype.kind == "f" and brightest <= 1:
                    raise InvalidInputError(f"{img_path}: pixel values within 0-1; expected 0-255 as Brain-Diffuser "
                                     "saves them")
                img.flush()
        finish_betas(outputs, job.normalize, file("train", "fmriavg_nsdgeneral"))
        return {
            "test_set": f"old ({len(fmri['test'])} images, sessions 1-{last}) as published by Brain-Diffuser",
            "sessions": sessions,
            "trials_per_session": trials_per_session,
            "stimulus_ids_known": design is not None,
            "shapes": {split: [b - a, n_voxels] for split, (_, a, b) in rows.items()},
            "images": bool(images),
        }

    return run_job(job, voxels, build)
