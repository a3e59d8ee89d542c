"""``make_synthetic_nsd``: write a complete, small Natural Scenes Dataset tree.

The tree has NSD's file names and formats (see :mod:`brainmclip.data.nsd_paths`), so the
real loaders run on it unchanged, and a ``simulation/`` folder beside them holds the
ground truth (scene descriptions, voxel tuning, noise ceilings) that no real dataset has.

Every random draw is seeded from (seed, purpose, subject, session), so the same image,
voxel or session comes out whatever else a run asks for, and two runs with the same
arguments write the same bytes. Each file appears atomically; a rerun with the same
arguments resumes where an interrupted one stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from brainmclip import __version__
from brainmclip.atomic import (
    atomic_path,
    locks_output,
    output_entries,
    remove_stale_temporaries,
    write_bytes_atomic,
    write_json_atomic,
)
from brainmclip.data import nsd_paths
from brainmclip.data.nsd_paths import BETA_SCALE, N_SUBJECTS, ROI_NAMES, check_subject
from brainmclip.errors import InvalidInputError, MissingInputError, OutputInTheWayError

from .anatomy import make_anatomy
from .encoding import N_NOISE_FACTORS, SHARED_NOISE_FRACTION, SignalModel, VoxelTuning, make_tuning
from .presets import REPEATS, SimulationPreset, load_preset
from .render import low_level_maps, render_scene
from .scenes import Scene, make_captions, sample_scene, scene_attributes
from .writer import (
    NiftiStreamWriter,
    StimulusWriter,
    write_coco_captions,
    write_ctab,
    write_expdesign,
    write_nifti,
    write_stim_info,
)

__all__ = ["FORMAT", "SimulatedNSD", "load_scenes", "load_truth", "make_synthetic_nsd", "simulation_dir",
           "truth_path"]

log = logging.getLogger("brainmclip.simulate")

FORMAT = "brainmclip-simulated-nsd/1"
# Purposes that seed independent random streams.
_DESIGN, _SCENE, _CAPTION, _ANATOMY, _TUNING, _SESSION, _BRAIN = range(7)
# Trials generated at once: bounds memory, and fixed so random streams do not depend on it.
_TRIAL_CHUNK = 64
# NSD's dataset folders; --force removes exactly these (and simulation/) before writing.
_OWNED = ("nsddata", "nsddata_betas", "nsddata_stimuli", "simulation")


def simulation_dir(root: Path) -> Path:
    return Path(root) / "simulation"


def truth_path(root: Path, subject: int) -> Path:
    return simulation_dir(root) / f"{nsd_paths.subject_dir_name(subject)}_truth.npz"


def _manifest_path(root: Path) -> Path:
    return simulation_dir(root) / "simulation.json"


def _features_path(root: Path) -> Path:
    return simulation_dir(root) / "image_features.npz"


def load_scenes(root: Path) -> dict[int, Scene]:
    """What each simulated image shows, by NSD id (0-based), from ``simulation/scenes.jsonl``."""
    path = simulation_dir(root) / "scenes.jsonl"
    if not path.is_file():
        raise MissingInputError(f"{path}: missing; {root} is not a simulated NSD (brainmclip simulate writes it)")
    scenes = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            scenes[int(record["nsd_id"])] = Scene.from_dict(record)
    return scenes


def load_truth(root: Path, subject: int) -> tuple[VoxelTuning, dict[str, np.ndarray]]:
    """The simulator's ground truth for one subject: voxel tuning and all stored arrays."""
    path = truth_path(root, subject)
    if not path.exists():
        raise MissingInputError(f"{path}: no simulation ground truth for subject {subject}")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return VoxelTuning.from_arrays(arrays), arrays


@dataclass(frozen=True)
class SimulatedNSD:
    """What :func:`make_synthetic_nsd` wrote: the root of an NSD-format tree."""

    root: Path
    preset: SimulationPreset
    subjects: tuple[int, ...]
    sessions: dict[int, int]
    seed: int
    n_images_rendered: int
    n_files: int
    n_bytes: int
    seconds: float
    resumed: bool

    def summary(self) -> str:
        lines = [
            f"simulated NSD ({self.preset.name} preset, seed {self.seed}) at {self.root}",
            f"  subjects {', '.join(map(str, self.subjects))}; sessions "
            + ", ".join(f"subj{s:02d}: {n}" for s, n in self.sessions.items())
            + f" of {self.preset.trials_per_session} trials",
            (f"  {self.n_images_rendered} images of {self.preset.image_size}px rendered "
             f"(NSD index of {self.preset.n_total_images}, {self.preset.n_shared} shared)"),
            "  nsdgeneral voxels: " + ", ".join(f"subj{s:02d}: {self.preset.nsdgeneral_counts[s - 1]}"
                                                   for s in self.subjects),
            f"  {self.n_files} files, {self.n_bytes / 1e6:.1f} MB, {self.seconds:.1f} s"
            + (" (resumed or already complete)" if self.resumed else ""),
        ]
        return "\n".join(lines)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def make_design(preset: SimulationPreset, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NSD's experimental design at the preset's size.

    Returns
    -------
    masterordering : int array of shape (n_trials,)
        1-based subject-image index shown at each trial; the same for all subjects.
    subjectim : int array of shape (8, n_images)
        1-based NSD index of each subject image; the first ``n_shared`` columns are the
        shared images, identical for all subjects, so ``masterordering <= n_shared`` marks
        the test trials.
    sharedix : int array of shape (n_shared,)
        1-based NSD indices of the shared images, ascending.
    """
    rng = _rng(seed, _DESIGN)
    n_unique = preset.n_images - preset.n_shared
    perm = rng.permutation(preset.n_total_images)
    shared = np.sort(perm[:preset.n_shared])
    subjectim = np.empty((N_SUBJECTS, preset.n_images), np.int64)
    for s in range(N_SUBJECTS):
        own = np.sort(perm[preset.n_shared + s * n_unique: preset.n_shared + (s + 1) * n_unique])
        subjectim[s] = np.concatenate([shared, own]) + 1
    masterordering = rng.permutation(np.repeat(np.arange(1, preset.n_images + 1), REPEATS))
    return masterordering, subjectim, shared + 1


def _scene(seed: int, nsd_id: int) -> Scene:
    return sample_scene(_rng(seed, _SCENE, nsd_id))


def _check_out_dir(out: Path, settings: dict, force: bool) -> str:
    """Return 'fresh', 'resume' or 'complete' for ``out``, or refuse it."""
    if not output_entries(out):  # missing, empty, or holding only the lock of the running command
        return "fresh"
    manifest = _manifest_path(out)
    previous = None
    if manifest.exists():
        try:
            previous = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            previous = None
    # Compare as JSON sees them (tuples come back as lists).
    if previous is not None and previous.get("settings") == json.loads(json.dumps(settings)) and not force:
        return "complete" if previous.get("complete") else "resume"
    if not force:
        what = ("a simulation with other settings" if previous is not None else "files that are not a simulation")
        raise OutputInTheWayError(f"{out} is not empty (it holds {what}); choose an empty folder or pass --force")
    for name in _OWNED:
        if (out / name).exists():
            shutil.rmtree(out / name)
    return "fresh"


@locks_output("out_dir")
def make_synthetic_nsd(out_dir, preset: str | SimulationPreset = "tiny", subjects=(1,), seed: int = 0,
                       sessions: int | None = None, force: bool = False, progress: bool = True) -> SimulatedNSD:
    """Write a simulated NSD tree to ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Empty (or missing) folder; a folder holding an interrupted run with the same
        arguments is resumed, anything else is refused unless ``force``.
    preset : str or SimulationPreset
        'tiny' (tests), 'small' (demo) or 'nsd' (real sizes, for benchmarks).
    subjects : sequence of int
        NSD subject numbers 1-8 to write betas and ROIs for.
    seed : int
    sessions : int, optional
        Write only the first ``sessions`` sessions of each subject (default: all the
        subject completed: 40/40/32/30/40/32/40/30 scaled to the preset).
    force : bool
        Overwrite a non-empty folder (removes its NSD folders and ``simulation/`` first).
    progress : bool
        Show progress bars.
    """
    start = time.perf_counter()
    preset = load_preset(preset) if isinstance(preset, str) else preset
    subjects = tuple(sorted({check_subject(int(s)) for s in subjects}))
    if not subjects:
        raise InvalidInputError("subjects is empty; expected at least one NSD subject number 1-8")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"seed={seed!r}; expected a non-negative integer")
    if sessions is not None and not 1 <= sessions <= preset.n_sessions:
        raise InvalidInputError(f"sessions={sessions!r}; expected 1-{preset.n_sessions} for the {preset.name!r} preset")
    n_sessions = {s: min(sessions or preset.n_sessions, preset.sessions_for_subject(s)) for s in subjects}

    out = Path(out_dir)
    settings = {"format": FORMAT, "preset": preset.to_dict(), "seed": int(seed), "subjects": list(subjects),
                "sessions": {str(s): n for s, n in n_sessions.items()}}
    state = _check_out_dir(out, settings, force)
    resumed = state != "fresh"
    if state == "complete":
        log.info("%s already holds this simulation; nothing to do", out)
    else:
        if state == "resume":
            removed = remove_stale_temporaries(out)
            log.info("resuming the simulation in %s (%d partial files removed)", out, removed)
        write_json_atomic(_manifest_path(out), {"settings": settings, "complete": False, "code_version": __version__})
        handler = logging.FileHandler(simulation_dir(out) / "simulate.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        try:
            _write_tree(out, preset, subjects, int(seed), n_sessions, progress)
            log.info("finished %s in %.1f s", out, time.perf_counter() - start)
        finally:
            log.removeHandler(handler)
            handler.close()
        write_json_atomic(_manifest_path(out), {"settings": settings, "complete": True, "code_version": __version__,
                                                "files": _file_list(out)})
    files = _file_list(out)
    rendered = len(_rendered_ids(make_design(preset, int(seed))[1], subjects))
    result = SimulatedNSD(out, preset, subjects, n_sessions, int(seed), rendered, len(files),
                          sum(files.values()), time.perf_counter() - start, resumed)
    return result


def _file_list(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("simulation.json", "simulate.log")}


def _rendered_ids(subjectim: np.ndarray, subjects) -> np.ndarray:
    """0-based NSD indices of all images the chosen subjects see."""
    return np.unique(np.concatenate([subjectim[s - 1] - 1 for s in subjects]))


def _write_tree(out: Path, preset: SimulationPreset, subjects, seed: int, n_sessions: dict[int, int],
                progress: bool) -> None:
    masterordering, subjectim, sharedix = make_design(preset, seed)
    if not nsd_paths.expdesign_path(out).exists():
        write_expdesign(nsd_paths.expdesign_path(out), masterordering, subjectim, sharedix)

    # 1. Scenes and captions for the whole NSD index (cheap: no pixels yet).
    n_total = preset.n_total_images
    scenes = [_scene(seed, i) for i in range(n_total)]
    _write_descriptions(out, preset, seed, scenes, subjectim, masterordering, sharedix)

    # 2. Pixels and low-level feature maps of the images the chosen subjects see.
    ids = _rendered_ids(subjectim, subjects)
    low_maps = _render_stimuli(out, preset, scenes, ids, progress)
    attributes = np.stack([scene_attributes(s) for s in scenes])

    # 3. Per subject: anatomy, tuning, then the betas session by session.
    total = sum(n_sessions.values())
    bar = tqdm(total=total, desc="sessions", unit="session", disable=not progress)
    for subject in subjects:
        _write_subject(out, preset, seed, subject, n_sessions[subject], masterordering, subjectim, ids,
                       low_maps, attributes, bar)
    bar.close()


def _write_descriptions(out, preset, seed, scenes, subjectim, masterordering, sharedix):
    n_total = len(scenes)
    rng = _rng(seed, _CAPTION)
    coco_ids = rng.choice(np.arange(1, 600_000), n_total, replace=False)
    # About 7% of NSD's images come from COCO's val2017 split; keep a similar share.
    splits = np.where(rng.random(n_total) < 0.07, "val2017", "train2017")
    shared = np.zeros(n_total, bool)
    shared[sharedix - 1] = True
    if not nsd_paths.stim_info_path(out).exists():
        write_stim_info(nsd_paths.stim_info_path(out), coco_ids, list(splits), shared, subjectim, masterordering)
    scenes_file = simulation_dir(out) / "scenes.jsonl"
    missing_captions = [s for s in ("train2017", "val2017") if not nsd_paths.captions_path(out, s).exists()]
    if not missing_captions and scenes_file.exists():
        return
    captions = []
    for i, scene in enumerate(scenes):
        crng = _rng(seed, _CAPTION, i)
        captions.append(make_captions(scene, crng, n=6 if crng.random() < 0.1 else 5))
    next_id = 1
    for split in ("train2017", "val2017"):
        sel = np.flatnonzero(splits == split)
        # Annotation ids continue across the two files, as in COCO.
        next_id = write_coco_captions(nsd_paths.captions_path(out, split), split, coco_ids[sel],
                                      [captions[i] for i in sel], preset.image_size, next_id)
    lines = [json.dumps({"nsd_id": i, "coco_id": int(coco_ids[i]), **scene.to_dict()}, sort_keys=True)
             for i, scene in enumerate(scenes)]
    write_bytes_atomic(scenes_file, ("\n".join(lines) + "\n").encode())


def _render_stimuli(out, preset, scenes, ids, progress) -> np.ndarray:
    """Render ``ids`` into the stimulus HDF5; return their low-level maps (rows follow ``ids``)."""
    features_file = _features_path(out)
    stimuli_file = nsd_paths.stimuli_path(out)
    if features_file.exists() and stimuli_file.exists():
        with np.load(features_file) as data:
            if np.array_equal(data["nsd_ids"], ids):
                return data["low_maps"]
    grid = preset.feature_grid
    low_maps = np.empty((len(ids), 3, grid, grid), np.float32)
    writer = StimulusWriter(stimuli_file, preset.n_total_images, preset.image_size)
    try:
        for row, nsd_id in enumerate(tqdm(ids, desc="images", unit="img", disable=not progress)):
            image = render_scene(scenes[nsd_id], preset.image_size)
            writer.write(int(nsd_id), image)
            low_maps[row] = low_level_maps(image, grid)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    with atomic_path(features_file) as tmp, open(tmp, "wb") as f:
        np.savez(f, nsd_ids=ids, low_maps=low_maps)
    log.info("rendered %d images of %dpx", len(ids), preset.image_size)
    return low_maps


def _write_subject(out, preset, seed, subject, n_sessions, masterordering, subjectim, ids, low_maps,
                   attributes, bar):
    shape = preset.grid_shapes[subject - 1]
    anatomy = make_anatomy(shape, preset.nsdgeneral_counts[subject - 1], _rng(seed, _ANATOMY, subject))
    for roi in ROI_NAMES:
        if not nsd_paths.roi_path(out, subject, roi).exists():
            write_nifti(nsd_paths.roi_path(out, subject, roi), anatomy.rois[roi], anatomy.affine)
        if not nsd_paths.roi_ctab_path(out, subject, roi).exists():
            write_ctab(nsd_paths.roi_ctab_path(out, subject, roi), roi)
    if not nsd_paths.brainmask_path(out, subject).exists():
        write_nifti(nsd_paths.brainmask_path(out, subject), anatomy.brain.astype(np.int16), anatomy.affine)

    tuning = make_tuning(anatomy, _rng(seed, _TUNING, subject))
    rows = np.searchsorted(ids, subjectim[subject - 1] - 1)  # subject image j -> row in low_maps
    signal = SignalModel(tuning, preset.feature_grid, low_maps[rows], attributes[subjectim[subject - 1] - 1])
    ng = anatomy.nsdgeneral
    if not truth_path(out, subject).exists():
        with atomic_path(truth_path(out, subject)) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **tuning.to_arrays(), **{f"signal_{k}": v for k, v in signal.stats().items()},
                                feature_grid=np.int64(preset.feature_grid))
    if not nsd_paths.ncsnr_path(out, subject).exists():
        volume = np.zeros(shape, np.float32)
        volume[ng] = tuning.ncsnr
        write_nifti(nsd_paths.ncsnr_path(out, subject), volume, anatomy.affine)

    # Brain voxels outside nsdgeneral carry noise and session effects only.
    other = anatomy.brain & ~ng
    brng = _rng(seed, _BRAIN, subject)
    n_other = int(other.sum())
    other_baseline = brng.normal(0.5, 0.5, n_other).astype(np.float32)
    other_amplitude = brng.uniform(0.8, 2.5, n_other).astype(np.float32)

    for session in range(1, n_sessions + 1):
        path = nsd_paths.betas_path(out, subject, session)
        if not path.exists():
            _write_session(path, preset, seed, subject, session, masterordering, subjectim, rows, low_maps,
                           attributes, signal, tuning, anatomy, other, other_baseline, other_amplitude)
            log.debug("subj%02d session %02d written", subject, session)
        bar.update(1)


def _write_session(path, preset, seed, subject, session, masterordering, subjectim, rows, low_maps, attributes,
                   signal, tuning, anatomy, other, other_baseline, other_amplitude):
    T = preset.trials_per_session
    trials = np.arange((session - 1) * T, session * T)
    image_index = masterordering[trials] - 1  # 0-based subject image of each trial
    nsd_ids = subjectim[subject - 1, image_index] - 1
    rng = _rng(seed, _SESSION, subject, session)
    n_ng, n_other = tuning.n_voxels, len(other_baseline)
    offset = rng.standard_normal(n_ng, np.float32) * tuning.offset_sd
    drift = rng.standard_normal(n_ng, np.float32) * tuning.drift_sd
    offset_other = rng.standard_normal(n_other, np.float32) * 0.5 * other_amplitude
    ng_flat = np.flatnonzero(anatomy.nsdgeneral.ravel())
    other_flat = np.flatnonzero(other.ravel())
    shared_sd, own_sd = np.sqrt(SHARED_NOISE_FRACTION), np.sqrt(1 - SHARED_NOISE_FRACTION)
    shape = preset.grid_shapes[subject - 1]
    with NiftiStreamWriter(path, (*shape, T), np.int16, anatomy.affine, preset.compress_level) as writer:
        for start in range(0, T, _TRIAL_CHUNK):
            chunk = slice(start, min(start + _TRIAL_CHUNK, T))
            n = chunk.stop - chunk.start
            s = signal(low_maps[rows[image_index[chunk]]], attributes[nsd_ids[chunk]])
            factors = rng.standard_normal((n, N_NOISE_FACTORS), np.float32)
            noise = own_sd * rng.standard_normal((n, n_ng), np.float32) + shared_sd * factors @ tuning.noise_loadings.T
            tau = ((np.arange(chunk.start, chunk.stop) + 0.5) / T - 0.5)[:, None].astype(np.float32)
            psc = (tuning.baseline + tuning.amplitude * (s + noise / tuning.ncsnr) + offset + drift * tau)
            psc_other = other_baseline + other_amplitude * rng.standard_normal((n, n_other), np.float32) + offset_other
            volume = np.zeros(int(np.prod(shape)), np.int16)
            for t in range(n):
                volume[ng_flat] = _to_int16(psc[t])
                volume[other_flat] = _to_int16(psc_other[t])
                writer.write_volume(volume.reshape(shape))


def _to_int16(psc: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(psc * BETA_SCALE), -32768, 32767).astype(np.int16)
