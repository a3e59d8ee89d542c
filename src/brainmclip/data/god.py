"""The Generic Object Decoding dataset (GOD, Horikawa & Kamitani 2017) to a prepared dataset.

GOD's preprocessed fMRI data are published as one bdpy "BData" HDF5 file per subject
(``Subject1.h5`` ... ``Subject5.h5``). The layout, as bdpy reads and writes it:

``dataset``
    float (samples x columns). Every per-sample quantity is a column: voxel amplitudes, and
    also ``DataType``, ``Run``, ``Block`` and the stimulus label.
``metadata/key``, ``metadata/description``
    one string per metadata row (stored as bytes).
``metadata/value``
    float (metadata rows x columns). A key *marks* the columns where its value is 1
    (``VoxelData``, ``ROI_V1``, ``DataType``, ...: bdpy's ``select('ROI_V1')`` is "value = 1"),
    or carries a per-column number (``voxel_x``/``_y``/``_z``: voxel coordinates in mm); NaN where
    a row does not apply to a column.

Files written by bdpy before 2017-10 name the two ``dataSet`` and ``metaData``; both spellings are
read here. In GOD, ``DataType`` is 1 for training samples (1,200 images of 150 categories, 8 per
category), 2 for the perception test (50 images of 50 other categories, 35 presentations each)
and 3 for imagery (skipped here). The label is the column ``stimulus_id`` (files published from
2019; the older MATLAB files call it ``Label``, whose first column is the same number): the
WordNet id number plus the image number / 10^6, e.g. ``1518878.005958`` is ``n01518878_5958``.
The ROI keys are ``ROI_V1``, ``ROI_V2``, ``ROI_V3``, ``ROI_V4``, ``ROI_LOC``, ``ROI_FFA``,
``ROI_PPA``, ``ROI_LVC`` (V1-V3), ``ROI_HVC`` (the region covering LOC, FFA and PPA) and
``ROI_VC`` (all of them). The stimulus images (ImageNet JPEGs named like ``n01518878_5958.JPEG``)
are not in these files; users obtain them separately.

:func:`prepare_god` writes the prepared layout of :mod:`brainmclip.data.prepared`:

- rows: one per image; repeated presentations are averaged (every test image's 35), and
  ``trial_ids`` lists the BData sample rows (0-based) each row came from, padded with -1.
  Rows follow each image's first presentation in the file; ``val`` is the last ``val_size``
  training images in that order (default 5% of them: GOD has only 1,200 training images).
- voxels: the ``VoxelData`` columns inside ``ROI_VC``; groups ``all`` (VC), ``semantic`` and
  ``high_level`` (HVC), ``detail`` and ``low_level`` (LVC), and each ROI by its name
  (``V1`` ... ``VC``).
- stimulus ids: ``wordnet number * 1,000,000 + image number`` (``n01518878_5958`` ->
  1518878005958): stable across subjects and files, and reversible (:func:`god_image_name`).
  The manifest's ``god.images`` maps every id to its image name as well.
- captions: GOD has none; each image gets one, its class name in the template
  ``"a photo of a {name}."``; class names come from a ``wnid,name`` file, else the WordNet id.
- ``labels.json`` (:mod:`brainmclip.data.labels`): every image's category; GOD's test categories
  are disjoint from its training ones.
- normalisation: ``zscore`` (default) z-scores every voxel with the mean and sd (ddof=1) of the
  training rows (train and val), as GOD's own decoding code does before fitting; ``none`` keeps
  the published values.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from brainmclip import __version__
from brainmclip.atomic import atomic_path, locks_output
from brainmclip.data.build_common import ROW_CHUNK, build_prepared, file_identity, open_h5, zscore_with_non_test
from brainmclip.data.labels import write_class_labels
from brainmclip.data.prepared import PREPARED_FORMAT, PreparedSubject, PreparedWriter, VoxelSet
from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.paths import record_path

__all__ = ["BData", "BDataBuilder", "CAPTION_TEMPLATE", "DATATYPE_IMAGERY", "DATATYPE_TEST", "DATATYPE_TRAIN",
           "DEFAULT_IMAGE_SIZE", "DEFAULT_VAL_FRACTION", "GOD_ROIS", "GOD_SUBJECTS", "NORMALIZATIONS", "add_arguments",
           "god_image_name", "god_stimulus_id", "load_stimulus", "prepare_god", "read_class_names", "run"]

log = logging.getLogger("brainmclip.prepare")

GOD_SUBJECTS = (1, 2, 3, 4, 5)
DATATYPE_TRAIN, DATATYPE_TEST, DATATYPE_IMAGERY = 1, 2, 3
GOD_ROIS = ("V1", "V2", "V3", "V4", "LOC", "FFA", "PPA", "LVC", "HVC", "VC")
# The label column: 'stimulus_id' in the files published from 2019, 'Label' in the older ones.
LABEL_KEYS = ("stimulus_id", "Label")
CAPTION_TEMPLATE = "a photo of a {}."
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_IMAGE_SIZE = 256
NORMALIZATIONS = ("zscore", "none")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# Stimulus id = WordNet number * ID_SCALE + image number (GOD's labels carry the image number in 6 decimals).
ID_SCALE = 1_000_000
_WNID = re.compile(r"n\d{8}")
# BData's two spellings: bdpy's current one, and the one of files written before 2017-10.
_BDATA_NAMES = (("dataset", "metadata"), ("dataSet", "metaData"))
_WHAT = "a bdpy BData HDF5 file such as GOD's SubjectN.h5"


# ---------------------------------------------------------------------------- BData
def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


class BData:
    """A BData HDF5 file opened for reading: metadata held in memory, the dataset read on demand.

    Use as a context manager. ``columns(key)`` are the columns a key marks (value 1, as bdpy's
    ``select(key)``), ``metadata(key, where)`` a metadata row (optionally at the columns ``where`` marks).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open_h5(self.path, _WHAT)
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    def _parse(self) -> None:
        f, path = self._file, self.path
        for data_name, meta_name in _BDATA_NAMES:
            if data_name in f and meta_name in f:
                break
        else:
            raise InvalidInputError(f"{path}: no 'dataset' and 'metadata' (nor 'dataSet' and 'metaData'); expected {_WHAT}")
        data, meta = f[data_name], f[meta_name]
        if not isinstance(data, h5py.Dataset) or data.ndim != 2 or data.dtype.kind not in "fiu":
            raise InvalidInputError(f"{path}: '{data_name}' is not a 2-D numeric array (samples x columns); "
                                    f"expected {_WHAT}")
        if not isinstance(meta, h5py.Group) or any(k not in meta for k in ("key", "description", "value")):
            raise InvalidInputError(f"{path}: '{meta_name}' lacks 'key', 'description' or 'value'; expected {_WHAT}")
        try:
            keys = [_text(k) for k in np.atleast_1d(meta["key"][()])]
            descriptions = [_text(d) for d in np.atleast_1d(meta["description"][()])]
            values = np.asarray(meta["value"][()], np.float64)
        except (OSError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"{path}: unreadable metadata ({str(exc).splitlines()[0]}); expected {_WHAT}") from None
        if values.ndim == 1 and len(keys) == 1:
            values = values[None]
        if values.shape != (len(keys), data.shape[1]) or len(descriptions) != len(keys):
            raise InvalidInputError(f"{path}: metadata value {values.shape} for {len(keys)} keys and {data.shape[1]} "
                                    f"columns; expected (keys, columns) as bdpy writes it")
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise InvalidInputError(f"{path}: metadata key {repeated[0]!r} appears twice; expected unique keys")
        self._data, self.keys, self.descriptions, self._values = data, keys, descriptions, values
        self.n_samples, self.n_columns = (int(s) for s in data.shape)

    def __enter__(self) -> BData:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def has(self, key: str) -> bool:
        return key in self.keys

    def description(self, key: str) -> str:
        return self.descriptions[self._index(key)]

    def metadata(self, key: str, where: str | None = None) -> np.ndarray:
        """The metadata row of ``key`` (NaN where it does not apply); at ``where``'s columns if given."""
        row = self._values[self._index(key)]
        return row[self.columns(where)] if where is not None else row.copy()

    def columns(self, key: str) -> np.ndarray:
        """Indices of the columns ``key`` marks (metadata value 1)."""
        return np.flatnonzero(self._values[self._index(key)] == 1)

    def _index(self, key: str) -> int:
        if key not in self.keys:
            raise InvalidInputError(f"{self.path}: no metadata key {key!r} (it has {self.keys[:12]}"
                                    f"{' ...' if len(self.keys) > 12 else ''})")
        return self.keys.index(key)

    def read(self, start: int, stop: int, columns: np.ndarray) -> np.ndarray:
        """float64 ``dataset[start:stop, columns]``, read as one contiguous span of columns."""
        columns = np.asarray(columns, np.int64)
        if not len(columns):
            return np.zeros((max(0, stop - start), 0))
        lo, hi = int(columns.min()), int(columns.max()) + 1
        try:
            block = self._data[start:stop, lo:hi]
        except OSError as exc:
            if exc.errno is not None:
                raise
            raise InvalidInputError(f"{self.path}: truncated or corrupt HDF5 ({str(exc).splitlines()[0]}); "
                                    "download it again") from None
        return np.asarray(block, np.float64)[:, columns - lo]

    def select(self, key: str) -> np.ndarray:
        """All samples of the columns ``key`` marks, (samples, columns) float64 (bdpy's ``select(key)``)."""
        return self.read(0, self.n_samples, self.columns(key))


class BDataBuilder:
    """Assemble a BData in memory the way bdpy's ``add`` / ``add_metadata`` do, then save it as HDF5.

    ``add(x, name)`` appends columns and a metadata row ``name`` that is 1 on them and NaN elsewhere
    (description ``"1 = name"``, as bdpy writes it); ``add_metadata(key, value, description, where)``
    adds a row with ``value`` on the columns ``where`` marks (or on all columns) and NaN elsewhere.
    """

    def __init__(self):
        self._blocks: list[np.ndarray] = []
        self.keys: list[str] = []
        self.descriptions: list[str] = []
        self._rows: list[np.ndarray] = []
        self.n_columns = 0

    def add(self, x, name: str, description: str | None = None) -> None:
        x = np.asarray(x, np.float64)
        x = x[:, None] if x.ndim == 1 else x
        if self._blocks and len(x) != len(self._blocks[0]):
            raise InvalidInputError(f"add({name!r}): {len(x)} samples; the dataset has {len(self._blocks[0])}")
        start = self.n_columns
        self._blocks.append(x)
        self.n_columns += x.shape[1]
        self._rows = [np.concatenate([r, np.full(x.shape[1], np.nan)]) for r in self._rows]
        row = np.full(self.n_columns, np.nan)
        row[start:] = 1
        self._set(name, row, f"1 = {name}" if description is None else description)

    def add_metadata(self, key: str, value, description: str = "", where: str | None = None) -> None:
        row = np.full(self.n_columns, np.nan)
        if where is None:
            row[:] = value
        else:
            row[np.asarray(self._rows[self.keys.index(where)]) == 1] = value
        self._set(key, row, description)

    def _set(self, key: str, row: np.ndarray, description: str) -> None:
        if key in self.keys:
            i = self.keys.index(key)
            self._rows[i], self.descriptions[i] = row, description
        else:
            self.keys.append(key)
            self._rows.append(row)
            self.descriptions.append(description)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``dataset`` and ``metadata/{key,description,value}`` atomically; same content, same bytes."""
        data = np.concatenate(self._blocks, axis=1) if self._blocks else np.zeros((0, 0))
        with atomic_path(path) as tmp, h5py.File(tmp, "w", libver="earliest", track_order=False) as f:
            f.create_dataset("dataset", data=data, track_times=False)
            meta = f.create_group("metadata")
            meta.create_dataset("key", data=np.array([k.encode() for k in self.keys]), track_times=False)
            meta.create_dataset("description", data=np.array([d.encode() for d in self.descriptions]),
                                track_times=False)
            meta.create_dataset("value", data=np.array(self._rows, np.float64).reshape(len(self.keys), -1),
                                track_times=False)


# ---------------------------------------------------------------------------- labels and names
def god_stimulus_id(label: float) -> int:
    """GOD's float label (``1518878.005958``) as our integer stimulus id (``1518878005958``)."""
    label = float(label)
    if not np.isfinite(label) or label <= 0:
        raise ValueError(f"label {label!r} is not a positive number")
    wnid = int(np.floor(label))
    image = (label - wnid) * ID_SCALE
    if abs(image - round(image)) > 0.1 or wnid >= 10**8:
        raise ValueError(f"label {label!r} is not 'wordnet number.image number (6 digits)'")
    return wnid * ID_SCALE + int(round(image))


def god_image_name(stimulus_id: int) -> str:
    """The ImageNet file stem of a stimulus id: 1518878005958 -> 'n01518878_5958'."""
    wnid, image = divmod(int(stimulus_id), ID_SCALE)
    return f"n{wnid:08d}_{image}"


def _wnid(stimulus_id: int) -> str:
    return f"n{int(stimulus_id) // ID_SCALE:08d}"


def read_class_names(path: str | os.PathLike) -> dict[str, str]:
    """``wnid -> name`` from a CSV, TSV or ImageNet-style ``wnid name, synonym`` file (first name of a list).

    Lines whose first field is not a WordNet id (``n`` and 8 digits) are a header only on line 1.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: missing (class names, lines 'wnid,name')")
    names: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: cannot be read as text ({exc}); expected lines 'wnid,name'") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        match = re.match(r"\s*(n\d{8})[\t, ]+(.*)$", line)
        if match is None:
            if number == 1:
                continue
            raise InvalidInputError(f"{path}:{number}: {line[:60]!r}; expected 'wnid,name' (e.g. 'n01518878,ostrich')")
        rest = match.group(2).strip()
        if rest.startswith('"'):
            rest = next(csv.reader([rest]))[0]
        name = rest.split(",")[0].split("\t")[0].strip()
        if not name:
            raise InvalidInputError(f"{path}:{number}: no name after {match.group(1)}; expected 'wnid,name'")
        names[match.group(1)] = name
    if not names:
        raise InvalidInputError(f"{path}: no lines 'wnid,name'")
    return names


def _class_list(wnids: list[str], given: dict[str, str] | None, source) -> list[str]:
    """Prompt names of ``wnids`` (sorted); ImageNet repeats a few names (two 'crane's): those get their wnid."""
    if given is not None:
        missing = [w for w in wnids if w not in given]
        if missing:
            raise InvalidInputError(f"{source}: no name for {len(missing)} of the {len(wnids)} categories (first "
                                    f"{missing[0]}); expected a line 'wnid,name' for each")
    names = [given[w] if given is not None else w for w in wnids]
    return [f"{n} ({w})" if names.count(n) > 1 else n for n, w in zip(names, wnids, strict=True)]


# ---------------------------------------------------------------------------- images
def load_stimulus(path: Path, size: int) -> np.ndarray:
    """uint8 (size, size, 3): shortest side resized to ``size`` (PIL bicubic), then the centre square."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable image ({str(exc).splitlines()[0] if str(exc) else exc}); "
                                "expected a JPEG or PNG stimulus") from None


def _find_images(folder: Path, names: list[str]) -> dict[str, Path]:
    """The file of every stimulus name under ``folder`` (searched recursively, matched by stem)."""
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: folder not found (GOD's stimulus images, e.g. n01518878_5958.JPEG)")
    found: dict[str, list[Path]] = {}
    wanted = set(names)
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.stem in wanted and path.is_file():
            found.setdefault(path.stem, []).append(path)
    missing = [n for n in names if n not in found]
    if missing:
        raise MissingInputError(f"{folder}: {len(missing)} of the {len(names)} stimulus images are missing (first "
                                f"{missing[0]}.JPEG); expected every training and test image, or prepare without images")
    twice = [n for n in names if len(found[n]) > 1]
    if twice:
        a, b = found[twice[0]][:2]
        raise InvalidInputError(f"{folder}: two files for stimulus {twice[0]} ({a} and {b}); keep one")
    from PIL import Image, UnidentifiedImageError

    for name in names:  # headers only: a file that is no image fails here, before any output
        try:
            with Image.open(found[name][0]):
                pass
        except (UnidentifiedImageError, OSError) as exc:
            raise InvalidInputError(f"{found[name][0]}: not a readable image ({exc}); expected a JPEG or PNG") from None
    return {n: found[n][0] for n in names}


def _images_identity(files: dict[str, Path]) -> dict:
    digest = hashlib.sha256()
    for name in sorted(files):
        stat = files[name].stat()
        digest.update(f"{name}\t{files[name].name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return {"files": len(files), "names_sizes_mtimes_sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------- the GOD file
@dataclass
class _Plan:
    """What to read: the voxel columns, and per split its images and the sample rows of each."""

    voxel_columns: np.ndarray
    voxels: VoxelSet
    roi_source: dict[str, str]
    label_key: str
    ids: dict[str, np.ndarray]
    rows: dict[str, list[list[int]]]
    runs: list[int]
    counts: dict[str, int]


def _god_file(input_path: Path, subject: int) -> Path:
    if input_path.is_dir():
        path = input_path / f"Subject{subject}.h5"
        if not path.is_file():
            present = sorted(p.name for p in input_path.glob("Subject*.h5"))
            raise MissingInputError(f"{path}: missing (GOD's preprocessed fMRI of subject {subject}); the folder has "
                                    f"{present or 'no SubjectN.h5'}")
        return path
    if not input_path.exists():
        raise MissingInputError(f"{input_path}: missing (GOD's SubjectN.h5, or the folder holding it)")
    return input_path


def _one_column(bd: BData, key: str) -> int:
    cols = bd.columns(key)
    if not len(cols):
        raise InvalidInputError(f"{bd.path}: metadata key {key!r} marks no column; expected one per-sample column")
    return int(cols[0])


def _voxels(bd: BData) -> tuple[np.ndarray, VoxelSet, dict[str, str]]:
    """Betas columns (VoxelData inside ROI_VC), their ROI labels and groups."""
    if not bd.has("VoxelData"):
        raise InvalidInputError(f"{bd.path}: no metadata key 'VoxelData'; expected GOD's fMRI BData")
    columns = bd.columns("VoxelData")
    if bd.has("ROI_VC"):
        columns = np.intersect1d(columns, bd.columns("ROI_VC"))
    if not len(columns):
        raise InvalidInputError(f"{bd.path}: no 'VoxelData' column inside 'ROI_VC'; expected GOD's fMRI BData")
    n = len(columns)
    masks, source = {}, {}
    for roi in GOD_ROIS:
        if bd.has(f"ROI_{roi}"):
            masks[roi] = np.isin(columns, bd.columns(f"ROI_{roi}"))
            source[roi] = f"ROI_{roi}"
    for union, parts in (("LVC", ("V1", "V2", "V3")), ("HVC", ("LOC", "FFA", "PPA"))):
        if union not in masks and all(p in masks for p in parts):
            masks[union] = np.any([masks[p] for p in parts], axis=0)
            source[union] = " | ".join(f"ROI_{p}" for p in parts)
    groups = {"all": np.arange(n)}
    for roi, mask in masks.items():
        if mask.any():
            groups[roi] = np.flatnonzero(mask)
    for alias, roi in (("low_level", "LVC"), ("detail", "LVC"), ("high_level", "HVC"), ("semantic", "HVC")):
        if roi in groups:
            groups[alias] = groups[roi]
    lacking = [g for g in ("semantic", "detail") if g not in groups]
    if lacking:
        log.warning("%s: no %s voxel group (ROI_LVC / ROI_HVC or their parts are missing)", bd.path, "/".join(lacking))
    ijk, grid = _voxel_grid(bd, columns)
    labels = {roi: mask.astype(np.int16) for roi, mask in masks.items()}
    return columns, VoxelSet(n, grid, ijk, labels, groups), source


def _voxel_grid(bd: BData, columns: np.ndarray):
    """Integer grid positions from ``voxel_i/j/k``, else from the mm coordinates ``voxel_x/y/z`` on their lattice."""
    keys = ("voxel_i", "voxel_j", "voxel_k") if all(bd.has(k) for k in ("voxel_i", "voxel_j", "voxel_k")) else \
        ("voxel_x", "voxel_y", "voxel_z")
    if not all(bd.has(k) for k in keys):
        return None, None
    xyz = np.stack([bd.metadata(k)[columns] for k in keys], axis=1)
    if not np.isfinite(xyz).all():
        return None, None
    ijk = np.zeros(xyz.shape, np.int64)
    for axis in range(3):
        values = np.unique(xyz[:, axis])
        steps = np.diff(values)
        step = steps.min() if len(steps) else 1.0
        position = (xyz[:, axis] - values[0]) / step
        if not np.allclose(position, np.round(position), atol=1e-3) or position.max() >= 2**15:
            log.warning("%s: voxel coordinates %s are not on a regular grid; no voxel positions kept", bd.path, keys)
            return None, None
        ijk[:, axis] = np.round(position)
    return ijk.astype(np.int16), tuple(int(v) + 1 for v in ijk.max(0))


def _plan(bd: BData, val_size: int | None) -> _Plan:
    columns, voxels, roi_source = _voxels(bd)
    if not bd.has("DataType"):
        raise InvalidInputError(f"{bd.path}: no metadata key 'DataType'; expected GOD's fMRI BData "
                                "(1 = training, 2 = test, 3 = imagery)")
    label_key = next((k for k in LABEL_KEYS if bd.has(k)), None)
    if label_key is None:
        raise InvalidInputError(f"{bd.path}: no label column ('stimulus_id' or 'Label'); expected GOD's fMRI BData")
    wanted = [_one_column(bd, "DataType"), _one_column(bd, label_key)]
    wanted += [_one_column(bd, key) if bd.has(key) else -1 for key in ("Run", "Block")]
    table = np.full((bd.n_samples, len(wanted)), np.nan)
    for j, c in enumerate(wanted):  # one column at a time: memory stays one column, wherever the columns are
        if c >= 0:
            table[:, j] = bd.read(0, bd.n_samples, np.array([c]))[:, 0]
    datatype, labels, runs = table[:, 0], table[:, 1], table[:, 2]
    counts = {"train": int((datatype == DATATYPE_TRAIN).sum()), "test": int((datatype == DATATYPE_TEST).sum()),
              "imagery_skipped": int((datatype == DATATYPE_IMAGERY).sum())}
    counts["other_skipped"] = bd.n_samples - sum(counts.values())
    if counts["test"] == 0:
        raise InvalidInputError(f"{bd.path}: no test samples (DataType 2); expected GOD's perception test "
                                "presentations")
    if counts["train"] == 0:
        raise InvalidInputError(f"{bd.path}: no training samples (DataType 1); expected GOD's training presentations")
    ids, rows = {}, {}
    for split, code in (("train", DATATYPE_TRAIN), ("test", DATATYPE_TEST)):
        by_id: dict[int, list[int]] = {}
        for row in np.flatnonzero(datatype == code).tolist():
            try:
                sid = god_stimulus_id(labels[row])
            except ValueError as exc:
                raise InvalidInputError(f"{bd.path}: sample {row}: {label_key} {exc}; expected GOD labels such as "
                                        "1518878.005958") from None
            by_id.setdefault(sid, []).append(row)  # dicts keep insertion order: first presentation first
        ids[split] = np.array(list(by_id), np.int64)
        rows[split] = list(by_id.values())
    both = np.intersect1d(ids["train"], ids["test"])
    if len(both):
        raise InvalidInputError(f"{bd.path}: image {god_image_name(both[0])} is both a training and a test image; "
                                "expected disjoint splits")
    n_train = len(ids["train"])
    n_val = round(n_train * DEFAULT_VAL_FRACTION) if val_size is None else val_size
    if n_val >= n_train:
        raise InvalidInputError(f"{bd.path}: val_size={n_val} leaves no training images (there are {n_train})")
    cut = n_train - n_val
    ids = {"train": ids["train"][:cut], "val": ids["train"][cut:], "test": ids["test"]}
    rows = {"train": rows["train"][:cut], "val": rows["train"][cut:], "test": rows["test"]}
    used = np.concatenate([np.asarray(r, np.int64) for split in rows for r in rows[split]])
    run_values = runs[used]
    run_list = sorted({int(r) for r in run_values[np.isfinite(run_values)]})
    return _Plan(columns, voxels, roi_source, label_key, ids, rows, run_list, counts)


def _check_args(subject, val_size, normalize, image_size) -> int:
    if isinstance(subject, bool) or not isinstance(subject, (int, np.integer)) or int(subject) not in GOD_SUBJECTS:
        raise InvalidInputError(f"subject={subject!r} is not a GOD subject; expected an integer 1-5")
    if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer))
                                 or val_size < 0):
        raise InvalidInputError(f"val_size={val_size!r}; expected a non-negative number of images")
    if normalize not in NORMALIZATIONS:
        raise InvalidInputError(f"Unknown normalize={normalize!r}; choose from {list(NORMALIZATIONS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not 8 <= image_size <= 4096:
        raise InvalidInputError(f"image_size={image_size!r}; expected a side in pixels, 8-4096")
    return int(subject)


# ---------------------------------------------------------------------------- prepare
@locks_output()
def prepare_god(input, subject: int, out, images=None, class_names=None, val_size: int | None = None,
                force: bool = False, progress: bool = True, normalize: str = "zscore",
                image_size: int = DEFAULT_IMAGE_SIZE, full_hash: bool = False) -> PreparedSubject:
    """Prepare one GOD subject from its published BData file into ``out``.

    Parameters
    ----------
    input : path
        ``SubjectN.h5`` itself, or the folder holding it.
    subject : int
        GOD subject 1-5.
    out : path
        Output folder; rerunning with the same inputs and options returns it at once.
    images : path, optional
        Folder with the stimulus images (JPEG or PNG named like ``n01518878_5958.JPEG``, searched
        recursively). Without it the dataset has no images, and ``extract`` cannot run on it.
    class_names : path, optional
        ``wnid,name`` lines (CSV, TSV or ImageNet's ``wnid name, synonym``); the first name is
        used. Default: the WordNet id as the name.
    val_size : int, optional
        Training images held out as ``val`` (the last ones presented); default 5% of them.
    force : bool
        Replace a dataset prepared from other inputs or options.
    progress : bool
        Show progress bars.
    normalize : {'zscore', 'none'}
        'zscore': every voxel minus the mean, over the sd (ddof=1), of the train and val rows.
    image_size : int
        Side of the square images stored (shortest side resized, PIL bicubic; centre crop).
    full_hash : bool
        Identify the BData file above 64 MB by SHA-256 instead of size and mtime.
    """
    start = time.perf_counter()
    subject = _check_args(subject, val_size, normalize, image_size)
    path = _god_file(Path(input), subject)
    names = read_class_names(class_names) if class_names is not None else None
    with BData(path) as bd:
        plan = _plan(bd, val_size)
        all_ids = np.concatenate([plan.ids[s] for s in ("train", "val", "test")])
        wnids = sorted({_wnid(i) for i in all_ids.tolist()})
        classes = _class_list(wnids, names, class_names)
        files = _find_images(Path(images), [god_image_name(i) for i in all_ids.tolist()]) if images is not None \
            else None
        options = {"normalize": normalize, "single_trial": False, "val_size": val_size, "images": files is not None,
                   "image_size": int(image_size) if files is not None else None}
        inputs = {path.name: file_identity(path, full_hash)}
        if class_names is not None:
            inputs["class_names"] = file_identity(Path(class_names), True)
        if files is not None:
            inputs["images"] = _images_identity(files)
        identity = {"subject": subject, "source": "god", "options": options, "code_version": __version__,
                    "inputs": inputs}
        out = Path(out)

        def write(writer: PreparedWriter) -> dict:
            class_of = {w: k for k, w in enumerate(wnids)}
            _write_betas(writer, bd, plan, normalize, progress)
            for split in ("train", "val", "test"):
                captions = [[CAPTION_TEMPLATE.format(classes[class_of[_wnid(i)]])] for i in plan.ids[split].tolist()]
                writer.save_split(split, plan.ids[split], _pad(plan.rows[split]), captions)
            if files is not None:
                _write_images(writer, plan, files, int(image_size), progress)
            write_class_labels(writer.staging, classes, all_ids, [class_of[_wnid(i)] for i in all_ids.tolist()])
            return _manifest(identity, plan, path, out, images, class_names, classes, wnids, normalize, start)

        prepared, built = build_prepared(out, identity, force, plan.voxels, write)
        if not built:
            return prepared
    if files is None:
        log.warning("subject %d: prepared without images; extract needs them (pass the folder of GOD's stimulus "
                    "images)", subject)
    log.info("prepared GOD subject %d in %.1f s", subject, time.perf_counter() - start)
    return prepared


def _pad(lists: list[list[int]]) -> np.ndarray:
    width = max((len(t) for t in lists), default=1) or 1
    out = np.full((len(lists), width), -1, np.int64)
    for r, ts in enumerate(lists):
        out[r, :len(ts)] = ts
    return out


def _write_betas(writer: PreparedWriter, bd: BData, plan: _Plan, normalize: str, progress: bool) -> None:
    """Average each image's samples in one pass over the file, ``ROW_CHUNK`` rows at a time."""
    splits = ("train", "val", "test")
    sizes = [len(plan.ids[s]) for s in splits]
    target = np.full(bd.n_samples, -1, np.int64)
    out_row = 0
    for split in splits:
        for rows in plan.rows[split]:
            target[rows] = out_row
            out_row += 1
    n_vox = len(plan.voxel_columns)
    sums = np.zeros((out_row, n_vox), np.float64)
    counts = np.bincount(target[target >= 0], minlength=out_row)
    for start in tqdm(range(0, bd.n_samples, ROW_CHUNK), desc="betas", disable=not progress, leave=False):
        stop = min(start + ROW_CHUNK, bd.n_samples)
        sel = target[start:stop] >= 0
        if not sel.any():
            continue
        block = bd.read(start, stop, plan.voxel_columns)[sel]
        bad = ~np.isfinite(block).all(1)
        if bad.any():
            row = start + int(np.flatnonzero(sel)[np.flatnonzero(bad)[0]])
            raise InvalidInputError(f"{bd.path}: sample {row} holds NaN or inf voxel values; expected finite data")
        np.add.at(sums, target[start:stop][sel], block)
    outputs, first = {}, 0
    for split, n in zip(splits, sizes, strict=True):
        out = writer.array(f"{split}/betas.npy", (n, n_vox), np.float32)
        out[:] = sums[first:first + n] / counts[first:first + n, None]
        outputs[split] = out
        first += n
    if normalize == "zscore":
        zscore_with_non_test(outputs, bd.path)
    for out in outputs.values():
        out.flush()


def _write_images(writer: PreparedWriter, plan: _Plan, files: dict[str, Path], size: int, progress: bool) -> None:
    total = sum(len(plan.ids[s]) for s in plan.ids)
    bar = tqdm(total=total, desc="images", unit="img", disable=not progress, leave=False)
    for split in ("train", "val", "test"):
        ids = plan.ids[split]
        out = writer.rows(f"{split}/images.npy", (len(ids), size, size, 3), np.uint8)
        for sid in ids.tolist():
            out.write(load_stimulus(files[god_image_name(sid)], size)[None])
            bar.update(1)
        out.close()
    bar.close()


def _manifest(identity, plan: _Plan, path: Path, out: Path, images, class_names, classes, wnids, normalize,
              start) -> dict:
    n_test = len(plan.ids["test"])
    repeats = sorted({len(r) for r in plan.rows["test"]})
    train_cats = {_wnid(i) for s in ("train", "val") for i in plan.ids[s].tolist()}
    test_cats = {_wnid(i) for i in plan.ids["test"].tolist()}
    voxels = plan.voxels
    return {
        **identity,
        "format": PREPARED_FORMAT,
        "input": record_path(path, out),
        "images_folder": record_path(images, out) if images is not None else None,
        "class_names": record_path(class_names, out) if class_names is not None else None,
        "nsd_root": None,
        "n_voxels": voxels.n_voxels,
        "voxel_groups": {k: len(v) for k, v in voxels.groups.items()},
        "test_set": (f"GOD perception test ({n_test} images, responses averaged over "
                     f"{'/'.join(map(str, repeats))} presentations)"),
        "sessions": [],
        "runs": plan.runs,
        "stimulus_ids_known": True,
        "shapes": {s: [len(plan.ids[s]), voxels.n_voxels] for s in ("train", "val", "test")},
        "images": images is not None,
        "god": {
            "label_key": plan.label_key,
            "stimulus_id_rule": "wordnet number * 1000000 + image number (n01518878_5958 -> 1518878005958)",
            "images": {str(i): god_image_name(i) for s in ("train", "val", "test") for i in plan.ids[s].tolist()},
            "classes": dict(zip(wnids, classes, strict=True)),
            "caption_template": CAPTION_TEMPLATE,
            "samples": plan.counts,
            "categories": {"train": len(train_cats), "test": len(test_cats), "shared": len(train_cats & test_cats)},
            "roi_source": plan.roi_source,
            "normalize": normalize,
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


# ---------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, type=Path, help="GOD's SubjectN.h5, or the folder holding them")
    parser.add_argument("--subject", required=True, type=int, help="GOD subject 1-5")
    parser.add_argument("--out", required=True, type=Path, help="output folder (the prepared dataset)")
    parser.add_argument("--images", type=Path, default=None,
                        help="folder of the stimulus images (n01518878_5958.JPEG ...; searched recursively); "
                             "without it there are no images and extract cannot run")
    parser.add_argument("--class-names", type=Path, default=None,
                        help="file of 'wnid,name' lines (CSV/TSV/ImageNet synset list); default: the WordNet ids")
    parser.add_argument("--val-size", type=int, default=None,
                        help="training images held out as val (default: 5%%, the last ones presented)")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default="zscore",
                        help="zscore: per voxel with the training rows' mean and sd (default); none: as published")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                        help=f"side of the stored square images (default {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--force", action="store_true", help="replace a dataset prepared with other settings")
    parser.add_argument("--full-hash", action="store_true", help="identify a large BData file by SHA-256")


def run(args) -> int:
    prepared = prepare_god(args.input, args.subject, args.out, images=args.images, class_names=args.class_names,
                           val_size=args.val_size, force=args.force, progress=not getattr(args, "quiet", False),
                           normalize=args.normalize, image_size=args.image_size, full_hash=args.full_hash)
    print(prepared.summary())
    if prepared.train.images is None:
        print("  no images: extract needs them (rerun with --images FOLDER of GOD's stimulus images)")
    return 0
