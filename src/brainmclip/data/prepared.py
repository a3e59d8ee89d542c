"""The prepared subject dataset: the one form in which every later stage gets its fMRI data.

On disk (a folder)::

    manifest.json              options, input identities, code version, shapes, checksums; "complete": true last
    voxels.npz                 nsdgeneral mask, voxel (i, j, k), per-voxel ROI labels, voxel groups
    {train,val,test}/betas.npy          float32 (n_samples, n_voxels), memory-mapped on load
    {train,val,test}/stimulus_ids.npy   int64 (n_samples,), 0-based NSD index (-1 unknown)
    {train,val,test}/trial_ids.npy      int64 (n_samples, max_repeats), global trials, -1 padded
    {train,val,test}/captions.json      list of caption lists
    {train,val,test}/images.npy         uint8 (n_samples, H, W, 3), optional

Files are staged in ``.staging/`` and moved into place by :meth:`PreparedWriter.commit`,
which writes the manifest last: a folder without a complete manifest is never loaded. The
manifest's ``checksums`` (:mod:`brainmclip.integrity`) are verified by :func:`load_prepared`, so
a damaged file fails with its name instead of feeding wrong numbers to a later stage.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainmclip.atomic import read_manifest, write_json_atomic
from brainmclip.errors import InvalidInputError
from brainmclip.integrity import folder_checksums, load_npy, read_json, reading, verify_file
from brainmclip.types import FmriSamples

__all__ = ["PREPARED_FORMAT", "SPLITS", "VoxelSet", "PreparedSubject", "PreparedWriter", "load_prepared",
           "VOXEL_GROUPS"]

PREPARED_FORMAT = "brainmclip-prepared/1"
SPLITS = ("train", "val", "test")
# BrainMCLIP's voxel groups (semantic: floc ROIs; detail: early visual plus floc) plus the two ROI families they
# are built from.
VOXEL_GROUPS = ("all", "low_level", "high_level", "semantic", "detail")
# What to do about a damaged file of a prepared dataset.
REPAIR_HINT = "rerun brainmclip prepare with --force"


@dataclass(frozen=True)
class VoxelSet:
    """Which voxels the columns of ``betas`` are, and the groups models select.

    Attributes
    ----------
    grid_shape : tuple of int or None
        (X, Y, Z) of the subject's volume; None when the source had no volume information.
    voxel_ijk : int array of shape (n_voxels, 3) or None
        Grid position of each column (nsdgeneral voxels in C order).
    roi_labels : dict of str to int16 array of shape (n_voxels,)
        Label of each column in each NSD ROI file (0 = not in that ROI).
    groups : dict of str to int64 array
        Column indices of ``all``, ``low_level`` (prf-visualrois), ``high_level`` (floc union),
        ``semantic`` (= high_level, fMRI-Semantic F_S) and ``detail`` (fMRI-Detail F_D:
        low ∪ high, or all nsdgeneral voxels when prepared with that option).
    """

    n_voxels: int
    grid_shape: tuple[int, int, int] | None
    voxel_ijk: np.ndarray | None
    roi_labels: dict[str, np.ndarray]
    groups: dict[str, np.ndarray]

    def group(self, name: str) -> np.ndarray:
        if name not in self.groups:
            available = sorted(self.groups)
            raise InvalidInputError(f"voxel group {name!r} is not available in this dataset (it has {available}); "
                             "ROI-based groups need the NSD ROI files (prepare with --nsd-root)")
        return self.groups[name]

    def save(self, path: Path) -> None:
        arrays = {f"roi_{k}": v for k, v in self.roi_labels.items()}
        arrays.update({f"group_{k}": v for k, v in self.groups.items()})
        arrays["n_voxels"] = np.int64(self.n_voxels)
        if self.voxel_ijk is not None:
            arrays["voxel_ijk"] = self.voxel_ijk
            arrays["grid_shape"] = np.asarray(self.grid_shape)
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path, hint: str = REPAIR_HINT) -> VoxelSet:
        # Every array is read here, inside the check: a damaged member (zip CRC, short data) names the file.
        with reading(path, "a voxels .npz archive", hint), np.load(path, allow_pickle=False) as data:
            ijk = data["voxel_ijk"] if "voxel_ijk" in data.files else None
            grid = tuple(int(v) for v in data["grid_shape"]) if "grid_shape" in data.files else None
            return cls(int(data["n_voxels"]), grid, ijk,
                       {k[4:]: data[k] for k in data.files if k.startswith("roi_")},
                       {k[6:]: data[k] for k in data.files if k.startswith("group_")})

    @classmethod
    def from_rois(cls, grid_shape, voxel_ijk: np.ndarray, roi_labels: dict[str, np.ndarray],
                  detail: str = "roi") -> VoxelSet:
        """Build the groups from per-voxel labels of the six NSD ROI files."""
        n = len(voxel_ijk)
        low = roi_labels["prf-visualrois"] > 0
        high = np.zeros(n, bool)
        for roi in ("floc-bodies", "floc-faces", "floc-places", "floc-words"):
            high |= roi_labels[roi] > 0
        if detail not in ("roi", "nsdgeneral"):
            raise InvalidInputError(f"Unknown detail={detail!r}; choose 'roi' (prf-visualrois ∪ floc) or 'nsdgeneral'")
        detail_mask = (low | high) if detail == "roi" else np.ones(n, bool)
        groups = {"all": np.arange(n), "low_level": np.flatnonzero(low), "high_level": np.flatnonzero(high),
                  "semantic": np.flatnonzero(high), "detail": np.flatnonzero(detail_mask)}
        return cls(n, tuple(int(s) for s in grid_shape), np.asarray(voxel_ijk, np.int16), roi_labels, groups)


@dataclass(frozen=True)
class PreparedSubject:
    """A loaded prepared dataset: three splits of :class:`FmriSamples` and their voxels."""

    root: Path
    subject: int
    manifest: dict
    voxels: VoxelSet
    splits: dict[str, FmriSamples]

    @property
    def train(self) -> FmriSamples:
        return self.splits["train"]

    @property
    def val(self) -> FmriSamples:
        return self.splits["val"]

    @property
    def test(self) -> FmriSamples:
        return self.splits["test"]

    @property
    def single_trial(self) -> bool:
        return bool(self.manifest["options"].get("single_trial", False))

    def summary(self) -> str:
        opts = self.manifest["options"]
        sizes = ", ".join(f"{name} {len(s)}" for name, s in self.splits.items())
        groups = ", ".join(f"{k} {len(v)}" for k, v in self.voxels.groups.items())
        return "\n".join([
            f"prepared subject {self.subject} at {self.root} (source: {self.manifest['source']})",
            f"  {'trials' if self.single_trial else 'images'}: {sizes}; test set: {self.manifest.get('test_set')}",
            f"  voxels: {self.voxels.n_voxels} ({groups})",
            f"  normalisation: {opts.get('normalize')}; sessions: {_ranges(self.manifest.get('sessions', []))}",
        ])


def _ranges(values) -> str:
    values = sorted(values)
    if not values:
        return "n/a"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}-{prev}" if start != prev else f"{start}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


def load_prepared(path: str | os.PathLike, images: bool = True) -> PreparedSubject:
    """Open a prepared dataset; arrays are memory-mapped, not read whole.

    Every file is checked against the manifest's checksums (datasets written before checksums
    were recorded get the size checks of :func:`brainmclip.integrity.load_npy` only).
    """
    root = Path(path)
    manifest = read_manifest(root, PREPARED_FORMAT, "a prepared dataset", "prepare")
    sums = manifest.get("checksums") or {}

    def npy(name: str, mmap: bool = False) -> np.ndarray:
        return load_npy(root / name, REPAIR_HINT, mmap, sums.get(name))

    verify_file(root / "voxels.npz", sums.get("voxels.npz"), REPAIR_HINT)
    voxels = VoxelSet.load(root / "voxels.npz")
    splits = {}
    for split in SPLITS:
        folder = root / split
        betas = npy(f"{split}/betas.npy", mmap=True)
        if betas.ndim != 2 or betas.shape[1] != voxels.n_voxels:
            raise InvalidInputError(f"{folder / 'betas.npy'}: shape {betas.shape}; voxels.npz describes "
                                    f"{voxels.n_voxels} voxels")
        image_file = folder / "images.npy"
        splits[split] = FmriSamples(
            betas=betas,
            stimulus_ids=npy(f"{split}/stimulus_ids.npy"),
            trial_ids=npy(f"{split}/trial_ids.npy"),
            images=npy(f"{split}/images.npy", mmap=True) if images and image_file.exists() else None,
            captions=read_json(folder / "captions.json", REPAIR_HINT, sums.get(f"{split}/captions.json")),
            subject=int(manifest["subject"]),
            split=split,
        )
    return PreparedSubject(root, int(manifest["subject"]), manifest, voxels, splits)


class _RowStream:
    def __init__(self, path: Path, shape, dtype):
        self.shape, self.dtype, self.written = tuple(int(s) for s in shape), np.dtype(dtype), 0
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        # The header np.save and np.lib.format.open_memmap write: version 1.0 unless it is too long.
        try:
            np.lib.format.write_array_header_1_0(self._file, header)
        except ValueError:
            np.lib.format.write_array_header_2_0(self._file, header)

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, self.dtype)
        if block.shape[1:] != self.shape[1:] or self.written + len(block) > self.shape[0]:
            raise InvalidInputError(f"{self._file.name}: block {block.shape} does not fit {self.shape} after "
                             f"{self.written} rows")
        self._file.write(block.tobytes())
        self.written += len(block)

    def close(self) -> None:
        self._file.close()
        if self.written != self.shape[0]:
            raise InvalidInputError(f"{self._file.name}: {self.written} rows written, expected {self.shape[0]}")


class PreparedWriter:
    """Stage a prepared dataset's files, then move them into place at once.

    Large arrays are created as memory maps in the staging folder so that writers can
    fill them row by row without holding them in memory.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.staging = self.out / ".staging"
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A writable memory-mapped ``.npy`` at ``name`` (e.g. 'train/betas.npy')."""
        path = self.staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def rows(self, name: str, shape: tuple[int, ...], dtype) -> _RowStream:
        """A ``.npy`` written front to back (``write(block)`` appends rows), never mapped into memory."""
        path = self.staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return _RowStream(path, shape, dtype)

    def save(self, name: str, array: np.ndarray) -> None:
        path = self.staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(array))

    def save_json(self, name: str, obj) -> None:
        path = self.staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))

    def save_voxels(self, voxels: VoxelSet) -> None:
        voxels.save(self.staging / "voxels.npz")

    def save_split(self, split: str, stimulus_ids, trial_ids, captions) -> None:
        self.save(f"{split}/stimulus_ids.npy", np.asarray(stimulus_ids, np.int64))
        self.save(f"{split}/trial_ids.npy", np.asarray(trial_ids, np.int64))
        self.save_json(f"{split}/captions.json", [list(c) for c in captions])

    def commit(self, manifest: dict) -> None:
        """Flush, move every staged file into place, then write the complete manifest with their checksums."""
        checksums = folder_checksums(self.staging)
        old_manifest = self.out / "manifest.json"
        old_manifest.unlink(missing_ok=True)  # from here until the end the folder reads as incomplete
        for path in sorted(self.staging.rglob("*")):
            if path.is_file():
                target = self.out / path.relative_to(self.staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
        for split in SPLITS:  # stale files of an earlier run with other options
            if (self.out / split / "images.npy").exists() and not manifest.get("images", True):
                (self.out / split / "images.npy").unlink()
        shutil.rmtree(self.staging)
        write_json_atomic(old_manifest, {**manifest, "format": PREPARED_FORMAT, "checksums": checksums,
                                         "complete": True})
