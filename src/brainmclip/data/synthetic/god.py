"""``make_synthetic_god``: a simulated Generic Object Decoding dataset in GOD's published form.

Written to ``OUT``:

``Subject<N>.h5``
    one bdpy BData file per subject, laid out as GOD's (see :mod:`brainmclip.data.god`): the
    ``dataset`` holds the ``VoxelData`` columns, then ``Run``, ``Block``, ``DataType`` (1 training,
    2 perception test, 3 imagery) and ``stimulus_id`` (WordNet number + image number / 10^6);
    metadata ``ROI_V1`` ... ``ROI_VC`` mark voxel columns (1 inside, 0 outside, NaN on the other
    columns) and ``voxel_x``/``_y``/``_z`` give their coordinates in mm. Rows: the training runs
    (each training image once), the test runs (every test image once per run, ``test_repeats``
    runs: 35 as in GOD), then the imagery runs; ``Run`` and ``Block`` count up through the file.
``images/training/*.JPEG``, ``images/test/*.JPEG``
    the stimuli, named like GOD's (``n90000004_12.JPEG``); JPEG as ImageNet's are.
``class_names.csv``
    ``wnid,name`` for the ten categories.
``simulation.json``, ``scenes.jsonl``
    settings and the category table; what each image shows.

The world is the simulator's scene world: the ten categories of
:data:`brainmclip.data.synthetic.scenes.CATEGORIES`, each with an invented WordNet id
``n9000000k`` (k = its position in that table: person n90000000 ... ball n90000009). As in GOD,
training and test categories are disjoint, by a fixed list that does not depend on the seed:
test = dog, house, sign (one each for the body/face, place and word domains of the encoding
model); train = the other seven. Each image is drawn from scenes whose objects are all of the
image's category, the largest not small, so no training image shows a test category at all.

Random draws come from ``numpy.random.default_rng([seed, 2000, purpose, ...])``: stream code 2000
is used neither by the simulated NSD (purposes 0-6) nor by the miniature world (codes 1000 and 1001),
so the three never share a stream. fMRI responses reuse the simulated NSD's anatomy and
encoding model (:mod:`.anatomy`, :mod:`.encoding`): early visual voxels are pRFs over the image's
low-level maps, category-selective voxels read the scene's attributes. GOD's ROIs are read off
the NSD-style anatomy: V1-V4 from prf-visualrois, FFA = floc-faces, PPA = floc-places, LOC =
floc-bodies or floc-words, LVC = V1-V3, HVC = every voxel outside V1-V4, VC = all voxels.
GOD's samples are 9-s block averages, so their noise is lower than one NSD trial's: the noise sd
is the NSD model's divided by ``_BLOCK_GAIN``. Same arguments, same bytes; files appear
atomically and a rerun resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
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
from brainmclip.data.god import DATATYPE_IMAGERY, DATATYPE_TEST, DATATYPE_TRAIN, GOD_SUBJECTS, ID_SCALE, BDataBuilder
from brainmclip.errors import InvalidInputError, OutputInTheWayError

from .anatomy import make_anatomy
from .encoding import N_NOISE_FACTORS, SHARED_NOISE_FRACTION, SignalModel, make_tuning
from .render import low_level_maps, render_scene
from .scenes import CATEGORIES, Scene, sample_scene, scene_attributes

__all__ = ["GOD_PRESETS", "GodPreset", "SimulatedGOD", "STREAM", "TEST_CATEGORIES", "TRAIN_CATEGORIES", "WNIDS",
           "add_arguments", "make_synthetic_god", "run"]

log = logging.getLogger("brainmclip.simulate")

FORMAT = "brainmclip-simulated-god/1"
#: Stream code of every draw here: disjoint from the simulated NSD's purposes (0-6) and the miniature world's (>= 1000).
STREAM = 2000
_DESIGN, _SCENE, _ANATOMY, _TUNING, _NOISE = range(5)
#: Invented WordNet ids: n9000000k for the k-th category of the scene world.
WNIDS = {category: f"n9{k:07d}" for k, category in enumerate(CATEGORIES)}
TEST_CATEGORIES = ("dog", "house", "sign")
TRAIN_CATEGORIES = tuple(c for c in CATEGORIES if c not in TEST_CATEGORIES)
# Noise sd divisor: a GOD sample averages a 9-s block of volumes, an NSD beta is one trial.
_BLOCK_GAIN = 2.0
# Per-run offsets (x amplitude): GOD's amplitudes are normalised to each run's rest period, so these stay small.
_RUN_OFFSET = 0.2
# Imagery responses: this share of the mean response to the category's test images, plus the usual noise.
_IMAGERY_SIGNAL = 0.3
_OWNED = ("images", "class_names.csv", "simulation.json", "scenes.jsonl")


@dataclass(frozen=True)
class GodPreset:
    """Sizes of a simulated GOD."""

    name: str
    train_per_category: int
    test_per_category: int
    test_repeats: int
    imagery_repeats: int
    train_runs: int
    image_size: int
    feature_grid: int
    grid_shape: tuple[int, int, int]
    n_voxels: int


GOD_PRESETS = {
    "tiny": GodPreset("tiny", 6, 2, 35, 2, 3, 64, 8, (12, 16, 13), 300),
    "small": GodPreset("small", 40, 6, 35, 4, 7, 128, 16, (26, 32, 26), 1500),
}


@dataclass(frozen=True)
class SimulatedGOD:
    """What :func:`make_synthetic_god` wrote."""

    root: Path
    preset: GodPreset
    subjects: tuple[int, ...]
    seed: int
    n_train_images: int
    n_test_images: int
    n_samples: int
    seconds: float
    resumed: bool

    def summary(self) -> str:
        p = self.preset
        return "\n".join([
            f"simulated GOD ({p.name} preset, seed {self.seed}) at {self.root}",
            f"  subjects {', '.join(map(str, self.subjects))}: Subject<N>.h5 of {self.n_samples} samples x "
            f"{p.n_voxels} voxels (+ Run, Block, DataType, stimulus_id)",
            f"  training: {self.n_train_images} images ({len(TRAIN_CATEGORIES)} categories x {p.train_per_category}), "
            f"once each; test: {self.n_test_images} images ({len(TEST_CATEGORIES)} categories x "
            f"{p.test_per_category}), {p.test_repeats} presentations each; imagery: {p.imagery_repeats} per test "
            "category",
            f"  images/training, images/test ({p.image_size}px JPEG), class_names.csv; "
            f"{self.seconds:.1f} s" + (" (resumed or already complete)" if self.resumed else ""),
        ])


@dataclass(frozen=True)
class _Image:
    category: str
    number: int
    split: str
    scene: Scene

    @property
    def name(self) -> str:
        return f"{WNIDS[self.category]}_{self.number}"

    @property
    def label(self) -> float:
        return int(WNIDS[self.category][1:]) + self.number / ID_SCALE


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), STREAM, *key])


def _category_scene(seed: int, category: str, number: int) -> Scene:
    """The first scene of its stream whose objects are all of ``category``, the largest medium or large.

    GOD's images are object-centred photographs of one category; a scene here never shows another category
    either, so no training image holds an object of a test category (the test is zero-shot)."""
    rng = _rng(seed, _SCENE, list(CATEGORIES).index(category), number)
    for _ in range(10_000):
        scene = sample_scene(rng)
        largest = max(o.size for o in scene.objects)
        main = [o for o in scene.objects if o.size == largest]
        if all(o.category == category for o in scene.objects) and main[0].size_name != "small":
            return scene
    raise RuntimeError(f"no scene with a main {category} in 10000 draws")  # pragma: no cover - p ~ 1e-300


def _images(preset: GodPreset, seed: int) -> list[_Image]:
    out = []
    for split, cats, n in (("training", TRAIN_CATEGORIES, preset.train_per_category),
                           ("test", TEST_CATEGORIES, preset.test_per_category)):
        for category in cats:
            for number in range(1, n + 1):
                out.append(_Image(category, number, split, _category_scene(seed, category, number)))
    return out


def _check_out(out: Path, settings: dict, force: bool) -> str:
    if not output_entries(out):
        return "fresh"
    manifest = out / "simulation.json"
    previous = None
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text())
        except ValueError:
            previous = None
    if isinstance(previous, dict) and previous.get("settings") == json.loads(json.dumps(settings)) and not force:
        return "complete" if previous.get("complete") else "resume"
    if not force:
        what = "a simulated GOD with other settings" if previous is not None else "files that are not a simulated GOD"
        raise OutputInTheWayError(f"{out} is not empty (it holds {what}); choose an empty folder or pass --force")
    for name in _OWNED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for path in out.glob("Subject*.h5"):
        path.unlink()
    return "fresh"


@locks_output()
def make_synthetic_god(out, subjects=(1,), seed: int = 0, preset: str = "small", force: bool = False,
                       progress: bool = True) -> SimulatedGOD:
    """Write a simulated GOD (BData files, stimulus JPEGs, class names) to ``out``.

    Parameters
    ----------
    out : path
        Empty or missing folder; an interrupted run with the same arguments is resumed, anything
        else is refused unless ``force``.
    subjects : sequence of int
        GOD subjects 1-5.
    seed : int
    preset : {'tiny', 'small'}
        'tiny': 7 x 6 training and 3 x 2 test images, 300 voxels (tests, seconds); 'small': 7 x 40
        and 3 x 6 images, 1,500 voxels.
    force : bool
        Replace what ``out`` holds (the simulated GOD's own files only).
    progress : bool
    """
    start = time.perf_counter()
    if preset not in GOD_PRESETS:
        raise InvalidInputError(f"Unknown preset={preset!r}; choose from {sorted(GOD_PRESETS)}")
    p = GOD_PRESETS[preset]
    try:
        subjects = tuple(sorted({int(s) for s in subjects}))
    except (TypeError, ValueError):
        raise InvalidInputError(f"subjects={subjects!r}; expected GOD subject numbers 1-5") from None
    if not subjects or any(s not in GOD_SUBJECTS for s in subjects):
        raise InvalidInputError(f"subjects={subjects!r}; expected one or more GOD subject numbers 1-5")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"seed={seed!r}; expected a non-negative integer")
    out = Path(out)
    settings = {"format": FORMAT, "preset": asdict(p), "seed": int(seed), "subjects": list(subjects)}
    state = _check_out(out, settings, force)
    images = _images(p, int(seed))
    if state != "complete":
        if state == "resume":
            remove_stale_temporaries(out)
        record = {"settings": settings, "code_version": __version__,
                  "categories": {c: {"wnid": WNIDS[c], "split": "test" if c in TEST_CATEGORIES else "training"}
                                 for c in CATEGORIES}}
        write_json_atomic(out / "simulation.json", {**record, "complete": False})
        _write_descriptions(out, images)
        low_maps = _render(out, p, images, progress)
        attributes = np.stack([scene_attributes(im.scene) for im in images])
        for subject in tqdm(subjects, desc="subjects", disable=not progress, leave=False):
            path = out / f"Subject{subject}.h5"
            if not path.exists():
                _write_subject(path, p, int(seed), subject, images, low_maps, attributes)
        write_json_atomic(out / "simulation.json", {**record, "complete": True})
    n_train = sum(im.split == "training" for im in images)
    n_samples = n_train + (len(images) - n_train) * p.test_repeats + len(TEST_CATEGORIES) * p.imagery_repeats
    return SimulatedGOD(out, p, subjects, int(seed), n_train, len(images) - n_train, n_samples,
                        time.perf_counter() - start, state != "fresh")


def _write_descriptions(out: Path, images: list[_Image]) -> None:
    lines = ["wnid,name"] + [f"{WNIDS[c]},{c}" for c in CATEGORIES]
    write_bytes_atomic(out / "class_names.csv", ("\n".join(lines) + "\n").encode())
    records = [json.dumps({"name": im.name, "stimulus_id": int(WNIDS[im.category][1:]) * ID_SCALE + im.number,
                           "split": im.split, "category": im.category, **im.scene.to_dict()}, sort_keys=True)
               for im in images]
    write_bytes_atomic(out / "scenes.jsonl", ("\n".join(records) + "\n").encode())


def _render(out: Path, p: GodPreset, images: list[_Image], progress: bool) -> np.ndarray:
    from PIL import Image

    low_maps = np.empty((len(images), 3, p.feature_grid, p.feature_grid), np.float32)
    for row, im in enumerate(tqdm(images, desc="images", unit="img", disable=not progress, leave=False)):
        pixels = render_scene(im.scene, p.image_size)
        low_maps[row] = low_level_maps(pixels, p.feature_grid)
        path = out / "images" / im.split / f"{im.name}.JPEG"
        if not path.exists():
            with atomic_path(path) as tmp:
                Image.fromarray(pixels).save(tmp, format="JPEG", quality=95)
    return low_maps


def _design(p: GodPreset, seed: int, subject: int, images: list[_Image]):
    """Rows of the file: (image index or -(category index + 1) for imagery, run, block, data type)."""
    rng = _rng(seed, _DESIGN, subject)
    train = [i for i, im in enumerate(images) if im.split == "training"]
    test = [i for i, im in enumerate(images) if im.split == "test"]
    rows, run = [], 0
    for part in np.array_split(rng.permutation(train), p.train_runs):
        run += 1
        rows += [(int(i), run, DATATYPE_TRAIN) for i in part]
    for _ in range(p.test_repeats):
        run += 1
        rows += [(int(i), run, DATATYPE_TEST) for i in rng.permutation(test)]
    for _ in range(p.imagery_repeats):
        run += 1
        rows += [(-(int(k) + 1), run, DATATYPE_IMAGERY) for k in rng.permutation(len(TEST_CATEGORIES))]
    return rows


def _write_subject(path: Path, p: GodPreset, seed: int, subject: int, images: list[_Image], low_maps: np.ndarray,
                   attributes: np.ndarray) -> None:
    anatomy = make_anatomy(p.grid_shape, p.n_voxels, _rng(seed, _ANATOMY, subject))
    tuning = make_tuning(anatomy, _rng(seed, _TUNING, subject))
    signal = SignalModel(tuning, p.feature_grid, low_maps, attributes)(low_maps, attributes).astype(np.float64)
    test_of = [[i for i, im in enumerate(images) if im.category == c] for c in TEST_CATEGORIES]
    rows = _design(p, seed, subject, images)
    n, v = len(rows), tuning.n_voxels
    rng = _rng(seed, _NOISE, subject)
    n_runs = rows[-1][1]
    offsets = _RUN_OFFSET * tuning.amplitude * rng.standard_normal((n_runs, v))
    factors = rng.standard_normal((n, N_NOISE_FACTORS))
    noise = (np.sqrt(1 - SHARED_NOISE_FRACTION) * rng.standard_normal((n, v))
             + np.sqrt(SHARED_NOISE_FRACTION) * factors @ tuning.noise_loadings.T.astype(np.float64))
    drive = np.empty((n, v))
    labels = np.empty(n)
    for r, (item, _, _) in enumerate(rows):
        if item >= 0:
            drive[r], labels[r] = signal[item], images[item].label
        else:
            k = -item - 1
            drive[r] = _IMAGERY_SIGNAL * signal[test_of[k]].mean(0)
            labels[r] = float(int(WNIDS[TEST_CATEGORIES[k]][1:]))
    run = np.array([r[1] for r in rows])
    data = (tuning.baseline + tuning.amplitude * (drive + noise / (tuning.ncsnr * _BLOCK_GAIN))
            + offsets[run - 1])

    prf = anatomy.voxel_labels("prf-visualrois")
    floc = {roi: anatomy.voxel_labels(roi) > 0 for roi in ("floc-faces", "floc-places", "floc-bodies", "floc-words")}
    rois = {"V1": np.isin(prf, (1, 2)), "V2": np.isin(prf, (3, 4)), "V3": np.isin(prf, (5, 6)), "V4": prf == 7,
            "LOC": floc["floc-bodies"] | floc["floc-words"], "FFA": floc["floc-faces"], "PPA": floc["floc-places"]}
    rois["LVC"] = rois["V1"] | rois["V2"] | rois["V3"]
    rois["HVC"] = ~(rois["LVC"] | rois["V4"])
    rois["VC"] = np.ones(v, bool)
    xyz = tuning.voxel_ijk.astype(np.float64) @ anatomy.affine[:3, :3].T + anatomy.affine[:3, 3]

    bdata = BDataBuilder()
    bdata.add(data, "VoxelData")
    bdata.add(run, "Run")
    bdata.add(np.arange(1, n + 1), "Block")
    bdata.add(np.array([r[2] for r in rows]), "DataType",
              "DataType: 1 = training, 2 = test (perception), 3 = test (imagery)")
    bdata.add(labels, "stimulus_id", "stimulus_id: WordNet id number + image number / 1e6 (category number for imagery)")
    for roi, mask in rois.items():
        bdata.add_metadata(f"ROI_{roi}", mask.astype(np.float64), f"1 = ROI {roi}", where="VoxelData")
    for axis, name in enumerate("xyz"):
        bdata.add_metadata(f"voxel_{name}", xyz[:, axis], f"Voxel {name} coordinate", where="VoxelData")
    bdata.save(path)


# ---------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (empty or missing)")
    parser.add_argument("--preset", default="small", choices=sorted(GOD_PRESETS),
                        help="tiny: tests (seconds); small: 280 training and 18 test images (default)")
    parser.add_argument("--subjects", default="1", help="comma-separated GOD subjects 1-5 (default: 1)")
    parser.add_argument("--seed", default=0, type=int, help="random seed; same seed, same bytes (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace what the output folder holds")


def run(args) -> int:
    try:
        subjects = [int(s) for s in str(args.subjects).split(",") if s.strip()]
    except ValueError:
        raise InvalidInputError(f"--subjects {args.subjects!r}; expected e.g. 1,2") from None
    result = make_synthetic_god(args.out, subjects=subjects, seed=args.seed, preset=args.preset, force=args.force,
                                progress=not getattr(args, "quiet", False))
    print(result.summary())
    return 0
