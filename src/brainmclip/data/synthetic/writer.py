"""Writers for the official NSD file formats, byte-for-byte deterministic.

Timestamps are the usual source of non-determinism: gzip headers carry an mtime, MAT-files
a creation date, HDF5 objects modification times. Each writer here pins them.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
from collections.abc import Iterable
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from brainmclip.atomic import atomic_path, write_bytes_atomic
from brainmclip.data.nsd_paths import N_SUBJECTS, ROI_LABELS
from brainmclip.errors import InvalidInputError

__all__ = [
    "NiftiStreamWriter",
    "StimulusWriter",
    "write_coco_captions",
    "write_ctab",
    "write_expdesign",
    "write_nifti",
    "write_stim_info",
]

_MAT_HEADER_TEXT = 116  # bytes of descriptive text at the start of a v5 MAT-file


def write_expdesign(path: Path, masterordering: np.ndarray, subjectim: np.ndarray, sharedix: np.ndarray) -> None:
    """``nsd_expdesign.mat``: 1-based indices with NSD's shapes (1, n_trials), (8, n_images), (1, n_shared)."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {
        "masterordering": masterordering.reshape(1, -1).astype(np.float64),
        "subjectim": subjectim.astype(np.float64),
        "sharedix": sharedix.reshape(1, -1).astype(np.float64),
    }, format="5", do_compression=False)
    data = bytearray(buffer.getvalue())
    # scipy writes "Created on: <date>" into the header text; replace it with fixed text.
    text = b"MATLAB 5.0 MAT-file, Platform: posix, written by brainmclip simulate"
    data[:_MAT_HEADER_TEXT] = text.ljust(_MAT_HEADER_TEXT, b" ")
    write_bytes_atomic(path, bytes(data))


def write_stim_info(path: Path, coco_ids: np.ndarray, coco_splits: list[str], shared: np.ndarray,
                    subjectim: np.ndarray, masterordering: np.ndarray) -> None:
    """``nsd_stim_info_merged.csv``: one row per NSD image, NSD's columns.

    ``subjectK_repR`` is the 1-based trial number of the R-th showing of the image to
    subject K (0 when not shown), over the full design.
    """
    n_total = len(coco_ids)
    seen = np.zeros((N_SUBJECTS, n_total), np.int8)
    reps = np.zeros((N_SUBJECTS, n_total, 3), np.int64)
    # Trial numbers of each subject image: masterordering is shared by all subjects.
    order = np.argsort(masterordering, kind="stable")
    trials_of_image = (order + 1).reshape(-1, 3)  # row j: trials showing subject image j+1
    for s in range(N_SUBJECTS):
        ids = subjectim[s] - 1
        seen[s, ids] = 1
        reps[s, ids] = trials_of_image
    columns = ["", "cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000", "shared1000"]
    columns += [f"subject{s + 1}" for s in range(N_SUBJECTS)]
    columns += [f"subject{s + 1}_rep{r}" for s in range(N_SUBJECTS) for r in range(3)]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for i in range(n_total):
            row = [i, int(coco_ids[i]), coco_splits[i], "(0, 0, 0, 0)", 0.0, i, False, False, bool(shared[i])]
            row += [int(v) for v in seen[:, i]]
            row += [int(v) for v in reps[:, i].ravel()]
            writer.writerow(row)


def write_coco_captions(path: Path, split: str, coco_ids: Iterable[int], captions: Iterable[list[str]],
                        image_size: int, first_annotation_id: int = 1) -> int:
    """A COCO ``captions_<split>.json`` with ``images`` and ``annotations``; returns the next free id."""
    images, annotations = [], []
    ann_id = first_annotation_id
    for coco_id, texts in zip(coco_ids, captions, strict=True):
        images.append({"id": int(coco_id), "file_name": f"{int(coco_id):012d}.jpg", "height": image_size,
                       "width": image_size, "license": 0})
        for text in texts:
            annotations.append({"id": ann_id, "image_id": int(coco_id), "caption": text})
            ann_id += 1
    doc = {
        "info": {"description": f"brainmclip simulated NSD captions ({split})", "version": "1.0"},
        "licenses": [{"id": 0, "name": "CC0 (procedurally generated)", "url": ""}],
        "images": images,
        "annotations": annotations,
    }
    write_bytes_atomic(path, json.dumps(doc, separators=(",", ":")).encode())
    return ann_id


def _nifti_header(shape, dtype, affine) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    return header


class NiftiStreamWriter:
    """Write a gzipped NIfTI-1 volume by volume, without holding the 4-D array in memory.

    NIfTI stores data in Fortran order, so each 3-D volume (the 4th axis is slowest) is one
    contiguous block: ``write_volume`` appends the next one. The file appears under its
    final name only after the last volume.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype, affine: np.ndarray, compress_level: int = 1):
        self.path = Path(path)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.n_volumes = shape[3] if len(shape) == 4 else 1
        self._written = 0
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._raw = open(tmp, "wb")  # noqa: SIM115 - closed in close()/abort(), as the stream outlives __init__
        # mtime=0 and no file name keep the gzip header identical from run to run.
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=compress_level, mtime=0)
        header = _nifti_header(self.shape, self.dtype, affine)
        header.write_to(self._gz)  # 348 bytes + 4-byte "no extensions" flag = vox_offset 352

    def write_volume(self, volume: np.ndarray) -> None:
        if volume.shape != self.shape[:3]:
            raise InvalidInputError(f"{self.path.name}: volume of shape {volume.shape}, expected {self.shape[:3]}")
        self._gz.write(np.asarray(volume, self.dtype).tobytes(order="F"))
        self._written += 1

    def close(self) -> None:
        if self._written != self.n_volumes:
            self.abort()
            raise RuntimeError(f"{self.path.name}: {self._written} volumes written, expected {self.n_volumes}")
        self._gz.close()
        self._raw.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._gz.close()
        self._raw.close()
        with contextlib.suppress(RuntimeError):  # atomic_path re-raises after removing the temporary
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray, compress_level: int = 1) -> None:
    """Write one 3-D volume as ``.nii.gz``."""
    with NiftiStreamWriter(path, volume.shape, volume.dtype, affine, compress_level) as writer:
        writer.write_volume(volume)


def write_ctab(path: Path, roi: str) -> None:
    """Freesurfer colour table naming the labels of ``roi`` (as NSD's ``label/*.mgz.ctab``)."""
    rng = np.random.default_rng(len(roi))
    lines = ["0 Unknown 0 0 0 0"]
    for label, name in ROI_LABELS[roi].items():
        r, g, b = rng.integers(40, 256, 3)
        lines.append(f"{label} {name} {r} {g} {b} 0")
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())


class StimulusWriter:
    """``nsd_stimuli.hdf5`` with dataset ``imgBrick`` of shape (n_images, S, S, 3), uint8.

    One gzip-compressed chunk per image: images never written cost no space and read as
    zeros (a run that simulates two subjects renders only their images).
    """

    def __init__(self, path: Path, n_images: int, image_size: int):
        self._ctx = atomic_path(path)
        tmp = self._ctx.__enter__()
        self._file = h5py.File(tmp, "w", libver="earliest", track_order=False)
        self.images = self._file.create_dataset(
            "imgBrick", shape=(n_images, image_size, image_size, 3), dtype=np.uint8,
            chunks=(1, image_size, image_size, 3), compression="gzip", compression_opts=1,
            fillvalue=0, track_times=False)

    def write(self, index: int, image: np.ndarray) -> None:
        self.images[index] = image

    def close(self) -> None:
        self._file.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._file.close()
        with contextlib.suppress(RuntimeError):  # atomic_path re-raises after removing the temporary
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
