"""``prepare_subject``: official NSD files (or the simulated tree) to a prepared subject dataset.

First every input the run needs is checked (design, ROI files, each session's betas
header, stimuli, caption files), so a missing or unreadable file fails before the first
session is read. Per session: read the betas of the nsdgeneral voxels volume by volume,
check them, normalise them and keep the result in ``.work/`` (this is what makes an
interrupted run resume per session). Then assemble the splits, average repeats (unless
single-trial), copy the stimuli and captions, and commit. Memory holds one session plus
one volume; the outputs are filled through memory maps.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from brainmclip import __version__
from brainmclip.atomic import atomic_path, crash_point, locks_output, remove_stale_temporaries
from brainmclip.data import nsd_paths
from brainmclip.data.build_common import (
    check_curated_captions,
    check_ids,
    check_nsd_stimuli,
    check_out,
    coco_caption_files,
    copy_nsd_stimuli,
    file_identity,
    nsd_voxels,
    zscore_with_non_test,
)
from brainmclip.data.nsd_official import (
    ExpDesign,
    available_sessions,
    open_betas_session,
    read_coco_captions,
    read_curated_captions,
    read_expdesign,
    read_stim_info,
)
from brainmclip.data.nsd_paths import NSD_SESSIONS_PER_SUBJECT, check_subject
from brainmclip.data.prepared import PREPARED_FORMAT, PreparedSubject, PreparedWriter, VoxelSet, load_prepared
from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.integrity import check_npy_size, load_npy
from brainmclip.paths import record_path

__all__ = ["PrepareOptions", "prepare_subject", "NORMALIZATIONS", "TEST_SETS", "session_plan"]

log = logging.getLogger("brainmclip.prepare")

NORMALIZATIONS = ("session", "brain-diffuser", "none")
TEST_SETS = ("old", "new")
# The "old" test set uses sessions 1-37: NSD withheld 38-40 for the Algonauts challenge.
OLD_TEST_SET_SESSIONS = 37
# MindDiffuser's validation slice: the last 859 of 8859 training images.
DEFAULT_VAL_FRACTION = 859 / 8859


@dataclass(frozen=True)
class PrepareOptions:
    """How to turn NSD files into a prepared dataset (saved in the manifest).

    Attributes
    ----------
    test_set : {'old', 'new'}
        'old': sessions 1-37, the 982-image test set of most papers; 'new': all sessions,
        MindEye2's 1000 images.
    sessions : tuple of int, optional
        Explicit 1-based sessions, overriding the test set's default range.
    betas_version : str
        Folder under ``func1pt8mm`` (``betas_fithrf_GLMdenoise_RR``, ``betas_fithrf``, ...).
    normalize : {'session', 'brain-diffuser', 'none'}
        'session' (default, leakage-safe): z-score each voxel per session with that
        session's train trials, then average repeats. 'brain-diffuser': percent signal
        change, average, then z-score each voxel of every split with the mean and sd
        (ddof=1) of all non-test rows, train and val together (Brain-Diffuser fits them on
        all its training images and has no validation split). 'none': percent signal
        change, averaged.
    single_trial : bool
        Keep repeats as separate rows (train on trials, average model outputs at test).
    val_size : int, optional
        Images (or their trials) held out from the end of train; default 859/8859 of train.
    detail_voxels : {'roi', 'nsdgeneral'}
        fMRI-Detail = prf-visualrois ∪ floc (default) or all nsdgeneral voxels.
    images : bool
        Copy the stimuli into the dataset.
    captions_file : str, optional
        ``COCO_73k_annots_curated.npy`` to take captions from instead of COCO's JSON files.
    full_hash : bool
        Identify large inputs by SHA-256 instead of size and mtime.
    """

    test_set: str = "old"
    sessions: tuple[int, ...] | None = None
    betas_version: str = "betas_fithrf_GLMdenoise_RR"
    normalize: str = "session"
    single_trial: bool = False
    val_size: int | None = None
    detail_voxels: str = "roi"
    images: bool = True
    captions_file: str | None = None
    full_hash: bool = False

    def __post_init__(self):
        if self.test_set not in TEST_SETS:
            raise InvalidInputError(f"Unknown test_set={self.test_set!r}; choose from {list(TEST_SETS)}")
        if self.normalize not in NORMALIZATIONS:
            raise InvalidInputError(f"Unknown normalize={self.normalize!r}; choose from {list(NORMALIZATIONS)}")
        if self.detail_voxels not in ("roi", "nsdgeneral"):
            raise InvalidInputError(f"Unknown detail_voxels={self.detail_voxels!r}; choose 'roi' or 'nsdgeneral'")
        if self.sessions is not None and (not self.sessions or min(self.sessions) < 1):
            raise InvalidInputError(f"sessions={self.sessions!r}; expected 1-based session numbers")
        if self.val_size is not None and self.val_size < 0:
            raise InvalidInputError(f"val_size={self.val_size!r}; expected a non-negative number of images")

    def identity(self) -> dict:
        """The options that change the output (full_hash only changes how inputs are identified)."""
        d = asdict(self)
        d.pop("full_hash")
        d["sessions"] = list(self.sessions) if self.sessions else None
        return d


@dataclass
class SessionPlan:
    """Which trials go where. Rows of each split follow the first appearance of each image."""

    sessions: list[int]
    trials_per_session: int
    trial_ids: np.ndarray            # (n_trials,) global 0-based trial numbers, session order
    trial_images: np.ndarray         # (n_trials,) 0-based NSD index
    split_images: dict[str, np.ndarray] = field(default_factory=dict)  # NSD ids per split, row order


def session_plan(design: ExpDesign, subject: int, sessions: list[int], val_size: int | None) -> SessionPlan:
    T = design.trials_per_session
    trial_ids = np.concatenate([np.arange((s - 1) * T, s * T) for s in sessions])
    images = design.trial_images(subject)[trial_ids]
    is_test = design.is_test_trial()[trial_ids]
    plan = SessionPlan(sessions, T, trial_ids, images)

    def first_appearance(ids):
        _, first = np.unique(ids, return_index=True)
        return ids[np.sort(first)]

    train = first_appearance(images[~is_test])
    test = first_appearance(images[is_test])
    n_val = round(len(train) * DEFAULT_VAL_FRACTION) if val_size is None else val_size
    if n_val >= len(train):
        raise InvalidInputError(f"val_size={n_val} leaves no training images (train has {len(train)})")
    plan.split_images = {"train": train[: len(train) - n_val], "val": train[len(train) - n_val:], "test": test}
    return plan


def _choose_sessions(root: Path, subject: int, options: PrepareOptions, design: ExpDesign) -> list[int]:
    """The requested sessions, each planned by the design and present as a betas file."""
    completed = NSD_SESSIONS_PER_SUBJECT[subject - 1]
    if options.sessions:
        wanted = sorted(set(options.sessions))
    else:
        last = min(OLD_TEST_SET_SESSIONS, completed) if options.test_set == "old" else completed
        wanted = list(range(1, last + 1))
    planned = len(design.masterordering) // design.trials_per_session
    if wanted[-1] > planned:
        raise InvalidInputError(f"{nsd_paths.expdesign_path(root)}: the design plans sessions 1-{planned}; session "
                         f"{wanted[-1]} was requested; choose sessions with --sessions")
    found = available_sessions(root, subject, options.betas_version)
    missing = [s for s in wanted if s not in found]
    if missing:
        folder = nsd_paths.betas_dir(root, subject, options.betas_version)
        have = f"found sessions {_short(found)}" if found else "found no betas_sessionNN files"
        raise MissingInputError(f"{folder}: betas_session{missing[0]:02d} missing ({len(missing)} of the requested "
                                f"sessions {_short(wanted)} absent; {have}); choose sessions with --sessions")
    return wanted


def _short(values) -> str:
    from brainmclip.data.prepared import _ranges

    return _ranges(list(values))


@locks_output("out_dir")
def prepare_subject(nsd_root, subject: int, out_dir, options: PrepareOptions | None = None, force: bool = False,
                    keep_work: bool = False, progress: bool = True, workers: int = 2) -> PreparedSubject:
    """Prepare one subject of an NSD tree into ``out_dir``; see :class:`PrepareOptions`.

    Rerunning with the same inputs and options returns the existing dataset at once; an
    interrupted run resumes with the sessions it had finished. ``workers`` sessions are read
    at once (each holds one session of betas in memory).
    """
    start = time.perf_counter()
    options = options or PrepareOptions()
    subject = check_subject(subject)
    root, out = Path(nsd_root), Path(out_dir)
    if not root.is_dir():
        raise MissingInputError(f"{root}: NSD root folder not found")

    # 1. Inputs: design, voxels, sessions, stimuli, captions, and their identities. Every file
    # the run reads is checked here, so that none is found missing after hours of sessions.
    design = read_expdesign(root)
    voxels, roi_paths = nsd_voxels(root, subject, options.detail_voxels)
    sessions = _choose_sessions(root, subject, options, design)
    plan = session_plan(design, subject, sessions, options.val_size)
    stimuli = nsd_paths.stimuli_path(root)
    # Open every session's header first: a wrong grid or trial count fails before any work.
    betas_paths = {}
    for s in sessions:
        reader = open_betas_session(root, subject, s, options.betas_version, voxels.grid_shape)
        _check_trial_count(reader, plan, root)
        betas_paths[s] = reader.path
    inputs = [nsd_paths.expdesign_path(root), *roi_paths.values(), *betas_paths.values()]
    used_ids = np.unique(np.concatenate(list(plan.split_images.values())))
    if options.images:
        check_nsd_stimuli(stimuli, used_ids)
        inputs.append(stimuli)
    captions = _captions(root, options, used_ids)
    if options.captions_file:
        inputs.append(Path(options.captions_file))
    else:
        inputs.append(nsd_paths.stim_info_path(root))
    identity = {"subject": subject, "options": options.identity(), "code_version": __version__,
                "inputs": {_rel(p, root): file_identity(p, options.full_hash) for p in inputs}}

    # 2. Up to date, resumable, or in the way?
    state = check_out(out, identity, force)
    if state == "complete":
        log.info("%s is up to date; nothing to do", out)
        return load_prepared(out)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    (work / "identity.json").write_text(json.dumps(identity, sort_keys=True))

    # 3. Sessions: read, check, normalise, keep. zlib and numpy release the GIL, so two
    # sessions in threads decompress on two cores (memory: two sessions).
    is_test = design.is_test_trial()
    todo = [s for s in sessions
            if not _session_done(work / f"session_{s:02d}.npy", plan.trials_per_session, voxels.n_voxels)]
    job = partial(_prepare_session, root, subject, options, voxels, plan, is_test, work)
    bar = tqdm(total=len(sessions), initial=len(sessions) - len(todo), desc=f"subj{subject:02d} sessions",
               unit="session", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(job, s) for s in todo]
        try:
            for future in as_completed(futures):
                future.result()
                bar.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    bar.close()

    # 4. Assemble splits, images, captions; commit.
    writer = PreparedWriter(out)
    writer.save_voxels(voxels)
    _assemble(writer, work, plan, voxels.n_voxels, options, captions, stimuli, progress,
              nsd_paths.betas_dir(root, subject, options.betas_version))
    manifest = {
        **identity,
        "format": PREPARED_FORMAT,
        "source": "nsd",
        "nsd_root": record_path(root, out),  # relative to the dataset, so the two can move together
        "test_set": options.test_set if not options.sessions else f"custom ({options.test_set} split rule)",
        "sessions": sessions,
        "trials_per_session": plan.trials_per_session,
        "n_voxels": voxels.n_voxels,
        "voxel_groups": {k: len(v) for k, v in voxels.groups.items()},
        "shapes": {split: [len(ids), voxels.n_voxels] for split, ids in _split_rows(plan, options).items()},
        "images": options.images,
        "seconds": round(time.perf_counter() - start, 2),
    }
    crash_point("prepare-commit")
    writer.commit(manifest)
    if not keep_work:
        shutil.rmtree(work)
    return load_prepared(out)


def _prepare_session(root, subject, options, voxels, plan, is_test, work, session) -> None:
    reader = open_betas_session(root, subject, session, options.betas_version, voxels.grid_shape)
    _check_trial_count(reader, plan, root)
    betas = reader.read(voxels.voxel_ijk)
    _check_betas(betas, reader.path, voxels)
    if options.normalize == "session":
        trials = np.arange((session - 1) * plan.trials_per_session, session * plan.trials_per_session)
        betas = _zscore_with_train(betas, ~is_test[trials], reader.path)
    with atomic_path(work / f"session_{session:02d}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, betas)
    crash_point("prepare-session")
    log.debug("session %02d: %s", session, reader.path)


def _session_done(path: Path, n_trials: int, n_voxels: int) -> bool:
    """Whether an earlier run left this session's betas complete; a damaged file is removed and read again."""
    if not path.exists():
        return False
    try:
        shape, dtype = check_npy_size(path, "reading the session again")
    except InvalidInputError as exc:
        log.warning("%s", exc)
    else:
        if shape == (n_trials, n_voxels) and dtype == np.float32:
            return True
        log.warning("%s: shape %s %s, expected (%d, %d) float32; reading the session again", path, shape, dtype,
                    n_trials, n_voxels)
    path.unlink()
    return False


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(Path(path).resolve())


def _check_trial_count(reader, plan: SessionPlan, root: Path) -> None:
    if reader.n_trials != plan.trials_per_session:
        raise InvalidInputError(f"{reader.path}: {reader.n_trials} trials; {nsd_paths.expdesign_path(root).name} "
                         f"expects {plan.trials_per_session} per session (wrong design or betas file?)")


def _check_betas(betas: np.ndarray, path: Path, voxels: VoxelSet) -> None:
    bad = ~np.isfinite(betas).all(0)
    if bad.any():
        i, j, k = voxels.voxel_ijk[np.flatnonzero(bad)[0]]
        raise InvalidInputError(f"{path}: {int(bad.sum())} nsdgeneral voxels hold NaN or inf (first at voxel {i},{j},{k}); "
                         "expected finite betas")
    zero = ~betas.any(0)
    if zero.any():
        i, j, k = voxels.voxel_ijk[np.flatnonzero(zero)[0]]
        raise InvalidInputError(f"{path}: {int(zero.sum())} nsdgeneral voxels are all zero (first at voxel {i},{j},{k}); "
                         "expected betas for every nsdgeneral voxel (wrong mask or subject?)")


def _zscore_with_train(betas: np.ndarray, train_rows: np.ndarray, path: Path) -> np.ndarray:
    if train_rows.sum() < 2:
        raise InvalidInputError(f"{path}: fewer than 2 training trials in this session; cannot z-score with "
                                f"train statistics")
    fit = betas[train_rows].astype(np.float64)
    mean, sd = fit.mean(0), fit.std(0)
    if (sd == 0).any():
        raise InvalidInputError(f"{path}: {int((sd == 0).sum())} voxels are constant over the session's train trials; "
                         "cannot z-score them")
    return ((betas - mean) / sd).astype(np.float32)


def _split_rows(plan: SessionPlan, options: PrepareOptions) -> dict[str, np.ndarray]:
    """Per split, the trial positions (into plan.trial_ids) of each row's source, as row lists."""
    rows = {}
    for split, ids in plan.split_images.items():
        if options.single_trial:
            rows[split] = np.flatnonzero(np.isin(plan.trial_images, ids))
        else:
            rows[split] = ids
    return rows


def _captions(root: Path, options: PrepareOptions, used_ids: np.ndarray):
    """Captions by NSD id, once the files they come from are checked to cover ``used_ids``."""
    if options.captions_file:
        path = Path(options.captions_file)
        check_curated_captions(path, used_ids)
        return lambda ids: read_curated_captions(path, ids)
    info = read_stim_info(root)
    check_ids(used_ids, len(info["cocoId"]), nsd_paths.stim_info_path(root))
    coco_caption_files(root, info["cocoSplit"][used_ids])
    return lambda ids: read_coco_captions(root, info["cocoId"][ids], info["cocoSplit"][ids])


def _assemble(writer: PreparedWriter, work: Path, plan: SessionPlan, n_voxels: int, options: PrepareOptions,
              captions, stimuli: Path, progress: bool, betas_dir: Path) -> None:
    T = plan.trials_per_session
    position = {s: i for i, s in enumerate(plan.sessions)}
    outputs, counts, row_of_trial = {}, {}, {}
    for split, ids in plan.split_images.items():
        if options.single_trial:
            trials = np.flatnonzero(np.isin(plan.trial_images, ids))  # positions in plan order
            row_of_trial[split] = dict(zip(trials.tolist(), range(len(trials)), strict=True))
            stim = plan.trial_images[trials]
            trial_ids = plan.trial_ids[trials][:, None]
        else:
            index = {int(v): r for r, v in enumerate(ids)}
            rows = np.array([index.get(int(v), -1) for v in plan.trial_images])
            sel = np.flatnonzero(rows >= 0)
            row_of_trial[split] = dict(zip(sel.tolist(), rows[sel].tolist(), strict=True))
            stim = ids
            per_row: list[list[int]] = [[] for _ in ids]
            for p in sel:
                per_row[rows[p]].append(int(plan.trial_ids[p]))
            trial_ids = np.full((len(ids), max(map(len, per_row), default=1)), -1, np.int64)
            for r, ts in enumerate(per_row):
                trial_ids[r, : len(ts)] = ts
        n_rows = len(stim)
        outputs[split] = writer.array(f"{split}/betas.npy", (n_rows, n_voxels), np.float32)
        counts[split] = np.zeros(n_rows, np.int64)
        writer.save_split(split, stim, trial_ids, captions(stim))

    # Accumulate each session's trials into their rows (sums; divided below).
    for session in tqdm(plan.sessions, desc="assembling", unit="session", disable=not progress):
        betas = load_npy(work / f"session_{session:02d}.npy", "rerun brainmclip prepare", mmap=True)
        base = position[session] * T
        for split in outputs:
            for t in range(T):
                row = row_of_trial[split].get(base + t)
                if row is not None:
                    outputs[split][row] += betas[t]
                    counts[split][row] += 1
    for split, out in outputs.items():
        out /= np.maximum(counts[split], 1)[:, None].astype(np.float32)

    if options.normalize == "brain-diffuser":
        zscore_with_non_test(outputs, betas_dir)
    for out in outputs.values():
        out.flush()

    if options.images:
        split_ids = {split: plan.trial_images[rows] if options.single_trial else rows
                     for split, rows in _split_rows(plan, options).items()}
        copy_nsd_stimuli(writer, stimuli, split_ids, progress)
