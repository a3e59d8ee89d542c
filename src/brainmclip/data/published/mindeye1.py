"""MindEye1's webdataset shards ``{train,val,test}/*.tar`` to a prepared dataset.

Per sample: ``jpg``, ``nsdgeneral.npy`` (3 repeats x voxels, all-NaN rows = repeat not
available), ``coco73k.npy`` (NSD index) and ``trial.npy`` (global trials).
"""

from __future__ import annotations

import numpy as np

from brainmclip.data.prepared import PreparedSubject, PreparedWriter
from brainmclip.errors import InvalidInputError

from .build import (
    NSD_TRIALS_PER_SESSION,
    Job,
    caption_source,
    check_no_overlap,
    finish_betas,
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
from .webdataset import Shards, decode_jpeg, tar_files

__all__ = ["prepare_mindeye1"]

_MINDEYE1_SAMPLE = "MindEye1 webdataset samples (jpg, nsdgeneral.npy, coco73k.npy, trial.npy)"


def prepare_mindeye1(input_dir, subject: int, out, nsd_root=None, normalize: str = "none",
                     val_size: int | None = None, detail_voxels: str = "roi", images: bool = True,
                     force: bool = False, full_hash: bool = False) -> PreparedSubject:
    """MindEye1's webdataset shards ``{train,val,test}/*.tar`` to a prepared dataset.

    MindEye1's train and val shards both form our train (in that order, samples sorted by key
    within each); our val is then the last images of it. Each row averages the available
    repeats of ``nsdgeneral.npy`` (all-NaN rows are repeats not available).
    """
    job = new_job("mindeye1", input_dir, subject, out, nsd_root, normalize, val_size, detail_voxels, images,
                  force, full_hash, "their betas are already normalised and averaged, without session information")
    subject = job.subject
    example = f"{job.input_dir}/{{train,val,test}}/*.tar (e.g. train_subj{subject:02d}_0.tar)"
    paths = {"train": tar_files(job.input_dir / "train", subject, "MindEye1 train shards", example),
             "val": [], "test": tar_files(job.input_dir / "test", subject, "MindEye1 test shards", example)}
    if (job.input_dir / "val").is_dir():
        paths["val"] = tar_files(job.input_dir / "val", subject, "MindEye1 val shards", example)
    # Caption files are checked before the first shard is opened.
    captions_from = caption_source(job)
    if captions_from is None:
        no_captions_warning(job)
    shards: dict[str, Shards] = {}
    try:
        for split, files in paths.items():
            shards[split] = Shards(files, _MINDEYE1_SAMPLE)
            for path in files:
                job.add_input(path)
        return _mindeye1(job, shards, captions_from)
    finally:
        for s in shards.values():
            s.close()


def _mindeye1(job: Job, shards: dict[str, Shards], captions_from) -> PreparedSubject:
    # Our train = MindEye1 train then val (samples sorted by key within each); test = test.
    samples = {"train": [(shards[s], k) for s in ("train", "val") for k in shards[s].sorted_keys()],
               "test": [(shards["test"], k) for k in shards["test"].sorted_keys()]}
    for split, items in samples.items():
        if not items:
            raise InvalidInputError(f"{', '.join(str(p) for p in shards[split].tars)}: no samples; expected "
                             f"{_MINDEYE1_SAMPLE}")
    first_shards, first_key = samples["train"][0]
    first = first_shards.npy(first_key, "nsdgeneral.npy")
    if first.ndim != 2 or first.shape[0] != 3 or first.shape[1] == 0:
        raise InvalidInputError(f"{first_shards.where(first_key)}: nsdgeneral.npy has shape {first.shape}; expected "
                         "(3, n_voxels): three repeats of the nsdgeneral voxels")
    n_voxels = first.shape[1]

    ids, trials = {}, {}
    for split, items in samples.items():
        ids_list, trial_list = [], []
        for sh, key in items:
            coco = integers(sh.npy(key, "coco73k.npy"), sh.where(key), "coco73k.npy")
            if coco.size != 1 or coco[0] < 0:
                raise InvalidInputError(f"{sh.where(key)}: coco73k.npy holds {coco.tolist()[:3]}; expected one NSD index")
            trial = integers(sh.npy(key, "trial.npy"), sh.where(key), "trial.npy")
            ids_list.append(int(coco[0]))
            trial_list.append(sorted(int(t) for t in trial if t >= 0))
        ids[split] = np.array(ids_list, np.int64)
        trials[split] = trial_list
    check_no_overlap(ids, f"{job.input_dir} (MindEye1 train/val and test shards)")

    voxels = voxel_set(job, n_voxels, first_shards.samples[first_key][0])
    design = job.design
    trials_per_session = design.trials_per_session if design is not None else NSD_TRIALS_PER_SESSION
    n_train = len(ids["train"])
    cut = n_train - n_val(n_train, job.val_size, job.input_dir / "train")
    rows = {"train": ("train", 0, cut), "val": ("train", cut, n_train), "test": ("test", 0, len(ids["test"]))}

    def build(writer: PreparedWriter) -> dict:
        captions = split_captions(captions_from, {s: ids[src][a:b] for s, (src, a, b) in rows.items()},
                                  str(job.input_dir))
        outputs = {}
        image_shape = None
        for split, (source, a, b) in rows.items():
            stim = ids[source][a:b]
            writer.save_split(split, stim, pad(trials[source][a:b]), captions[split])
            out = writer.array(f"{split}/betas.npy", (b - a, n_voxels), np.float32)
            for r, (sh, key) in enumerate(samples[source][a:b]):
                out[r] = _average_repeats(sh.npy(key, "nsdgeneral.npy"), n_voxels, sh.where(key))
            outputs[split] = out
            if job.images:
                img = None
                for r, (sh, key) in enumerate(samples[source][a:b]):
                    pixels = decode_jpeg(sh.read(key, "jpg"), sh.where(key))
                    if image_shape is None:
                        image_shape = pixels.shape
                    if pixels.shape != image_shape:
                        raise InvalidInputError(f"{sh.where(key)}: image of {pixels.shape}; expected {image_shape} like the "
                                         "other samples")
                    if img is None:
                        img = writer.array(f"{split}/images.npy", (b - a, *image_shape), np.uint8)
                    img[r] = pixels
                if img is None:
                    shape = image_shape or (0, 0, 3)
                    img = writer.array(f"{split}/images.npy", (0, *shape), np.uint8)
                img.flush()
        finish_betas(outputs, job.normalize, job.input_dir)
        n_test = len(ids["test"])
        return {
            "test_set": f"old ({n_test} images) as published by MindEye1",
            "sessions": sessions_of([pad(t) for t in trials.values()], trials_per_session),
            "trials_per_session": trials_per_session,
            "shapes": {split: [b - a, n_voxels] for split, (_, a, b) in rows.items()},
            "images": bool(job.images),
        }

    return run_job(job, voxels, build)


def _average_repeats(repeats: np.ndarray, n_voxels: int, where: str) -> np.ndarray:
    if repeats.shape != (3, n_voxels) or repeats.dtype.kind not in "fiu":
        raise InvalidInputError(f"{where}: nsdgeneral.npy has shape {repeats.shape} {repeats.dtype}; expected "
                                f"(3, {n_voxels}) "
                         "numbers: three repeats of the nsdgeneral voxels")
    x = repeats.astype(np.float64)
    available = ~np.isnan(x).all(1)
    if not available.any():
        raise InvalidInputError(f"{where}: all 3 repeats in nsdgeneral.npy are NaN; expected at least one repeat")
    x = x[available]
    if not np.isfinite(x).all():
        raise InvalidInputError(f"{where}: nsdgeneral.npy holds NaN or inf inside an available repeat; expected finite "
                         "betas (or a whole row of NaN for a missing repeat)")
    return x.mean(0).astype(np.float32)
