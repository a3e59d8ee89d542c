"""Readers for the official NSD release files (and the simulated tree, which shares them).

Every reader checks what it reads and raises a one-line ``ValueError`` or
``FileNotFoundError`` naming the file and what was expected.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.io

from brainmclip.data import nsd_paths
from brainmclip.data.nsd_paths import BETA_SCALE, N_SUBJECTS, ROI_LABELS, check_subject
from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = [
    "NSD_PLANNED_SESSIONS",
    "ExpDesign",
    "read_expdesign",
    "read_stim_info",
    "read_coco_captions",
    "read_curated_captions",
    "read_roi_volume",
    "available_sessions",
    "BetasSession",
    "open_betas_session",
]

# The design covers 40 sessions for every subject; trials_per_session = len(masterordering) / 40.
NSD_PLANNED_SESSIONS = 40
# Bytes decompressed per read when running a .nii.gz to its end (memory stays at this).
_DRAIN_BLOCK = 2**20


def _require(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise MissingInputError(f"{path}: missing ({what})")
    return Path(path)


@dataclass(frozen=True)
class ExpDesign:
    """NSD's design, 0-based.

    Attributes
    ----------
    masterordering : int array (n_trials,)
        0-based subject-image index of each trial (shared by all subjects).
    subjectim : int array (8, n_images)
        0-based NSD image index of each subject image.
    sharedix : int array (n_shared,)
        0-based NSD indices of the shared images.
    """

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray

    @property
    def n_shared(self) -> int:
        return len(self.sharedix)

    @property
    def trials_per_session(self) -> int:
        return len(self.masterordering) // NSD_PLANNED_SESSIONS

    def trial_images(self, subject: int) -> np.ndarray:
        """0-based NSD image index shown to ``subject`` at every trial of the design."""
        return self.subjectim[check_subject(subject) - 1, self.masterordering]

    def is_test_trial(self) -> np.ndarray:
        """A trial is test iff its 1-based masterordering is <= n_shared: the images all subjects saw (NSD's
        shared 1000) form the test set."""
        return self.masterordering < self.n_shared


def read_expdesign(root: Path) -> ExpDesign:
    path = _require(nsd_paths.expdesign_path(root), "NSD experimental design")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises several unrelated types for a bad file
        raise InvalidInputError(f"{path}: not a readable MAT-file ({exc})") from None
    for key in ("masterordering", "subjectim", "sharedix"):
        if key not in mat:
            raise InvalidInputError(f"{path}: no variable {key!r}; expected masterordering, subjectim and sharedix")
    mo = np.asarray(mat["masterordering"]).ravel().astype(np.int64) - 1
    subjectim = np.asarray(mat["subjectim"]).astype(np.int64) - 1
    sharedix = np.asarray(mat["sharedix"]).ravel().astype(np.int64) - 1
    if subjectim.ndim != 2 or subjectim.shape[0] != N_SUBJECTS:
        raise InvalidInputError(f"{path}: subjectim has shape {subjectim.shape}; expected ({N_SUBJECTS}, n_images)")
    if len(mo) % NSD_PLANNED_SESSIONS or mo.min() < 0 or mo.max() >= subjectim.shape[1]:
        raise InvalidInputError(f"{path}: masterordering must index subjectim columns and split into "
                         f"{NSD_PLANNED_SESSIONS} sessions; got {len(mo)} trials, values {mo.min() + 1}..{mo.max() + 1}")
    if not np.array_equal(subjectim[0, : len(sharedix)], sharedix):
        raise InvalidInputError(f"{path}: subjectim does not start with the sharedix images; not an NSD design")
    return ExpDesign(mo, subjectim, sharedix)


def read_stim_info(root: Path) -> dict[str, np.ndarray]:
    """Columns ``cocoId``, ``cocoSplit`` and ``shared1000`` of ``nsd_stim_info_merged.csv``, by NSD index."""
    path = _require(nsd_paths.stim_info_path(root), "NSD stimulus information")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"cocoId", "cocoSplit", "nsdId"} - set(reader.fieldnames or ())
            if missing:
                raise InvalidInputError(f"{path}: columns {sorted(missing)} missing; expected NSD's stim info columns")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"{path}: not a readable CSV file ({exc}); re-download it") from None
    # A cut file ends inside a row (no final newline), leaving a row with too few fields or a partial number.
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 1))
        if f.read(1) != b"\n":
            raise InvalidInputError(f"{path}: truncated (its last line is incomplete); re-download it")
    n_fields = len(reader.fieldnames)
    for line, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):
            raise InvalidInputError(f"{path}: line {line} has {len(row) - (None in row)} of {n_fields} fields; "
                                    "expected NSD's stim info rows (a truncated or damaged file?)")
    try:
        nsd_id = np.array([int(r["nsdId"]) for r in rows])
        coco_id = [int(r["cocoId"]) for r in rows]
    except ValueError as exc:
        raise InvalidInputError(f"{path}: a non-integer nsdId or cocoId ({exc}); re-download it") from None
    order = np.argsort(nsd_id)
    if not np.array_equal(nsd_id[order], np.arange(len(rows))):
        raise InvalidInputError(f"{path}: nsdId is not 0..{len(rows) - 1}")
    return {
        "cocoId": np.array([coco_id[i] for i in order]),
        "cocoSplit": np.array([rows[i]["cocoSplit"] for i in order]),
        "shared1000": np.array([rows[i].get("shared1000", "False") == "True" for i in order]),
    }


def read_coco_captions(root: Path, coco_ids: np.ndarray, coco_splits: np.ndarray) -> list[list[str]]:
    """Captions for each requested image (in the order of ``coco_ids``) from COCO's caption JSON files."""
    by_id: dict[int, list[str]] = {}
    for split in sorted(set(coco_splits.tolist())):
        path = _require(nsd_paths.captions_path(root, split), f"COCO captions for {split}")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        for ann in doc.get("annotations", []):
            by_id.setdefault(int(ann["image_id"]), []).append(ann["caption"].strip())
    missing = [int(c) for c in coco_ids if int(c) not in by_id]
    if missing:
        raise InvalidInputError(f"no COCO caption for {len(missing)} images (first cocoId {missing[0]}) under "
                         f"{nsd_paths.captions_path(root, 'train2017').parent}")
    return [by_id[int(c)] for c in coco_ids]


def read_curated_captions(path: Path, nsd_ids: np.ndarray) -> list[list[str]]:
    """Captions from the community file ``COCO_73k_annots_curated.npy`` (73000 x 5 strings)."""
    annots = np.load(_require(path, "curated COCO captions"), allow_pickle=False)
    if annots.ndim != 2 or len(annots) <= int(np.max(nsd_ids)):
        raise InvalidInputError(f"{path}: shape {annots.shape}; expected (73000, n_captions) strings")
    return [[str(c).strip() for c in annots[i] if str(c).strip()] for i in nsd_ids]


def read_roi_volume(root: Path, subject: int, roi: str) -> tuple[np.ndarray, np.ndarray]:
    """An ROI label volume (int) and its affine; checks NSD's label convention."""
    path = _require(nsd_paths.roi_path(root, subject, roi), f"ROI {roi} of subject {subject}")
    if path.name.endswith(".gz"):
        _verify_gzip(path)
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except Exception as exc:
        raise InvalidInputError(f"{path}: not a readable NIfTI volume ({exc})") from None
    if data.ndim != 3:
        raise InvalidInputError(f"{path}: shape {data.shape}; expected a 3-D label volume")
    labels = np.rint(data).astype(np.int16)
    allowed = {-1, 0, *ROI_LABELS[roi]}
    extra = set(np.unique(labels).tolist()) - allowed
    if extra:
        raise InvalidInputError(f"{path}: labels {sorted(extra)[:5]} outside {sorted(allowed)}")
    return labels, img.affine


@contextmanager
def _gzip_errors(path: Path, expected: str = ""):
    """Turn what gzip and zlib raise for a damaged file into one error naming it (and what was expected)."""
    tail = f"; {expected}" if expected else ""
    try:
        yield
    except gzip.BadGzipFile as exc:
        raise InvalidInputError(f"{path}: corrupt gzip ({exc}){tail}; re-download it") from None
    except EOFError:
        raise InvalidInputError(f"{path}: truncated gzip (the compressed data ends before its end marker){tail}; "
                                "re-download it") from None
    except (OSError, zlib.error) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # permission denied and the like: the operating system's message names the file
        raise InvalidInputError(f"{path}: corrupt gzip data ({exc}){tail}; re-download it") from None


def _drain(f) -> None:
    """Read a gzip stream to its end in bounded blocks: gzip checks a member's CRC-32 and length only there."""
    while f.read(_DRAIN_BLOCK):
        pass


def _verify_gzip(path: Path) -> None:
    """Decompress ``path`` to its end so that every member's CRC-32 and length are checked.

    nibabel reads only the bytes of the volume and stops before the trailer, where the check happens.
    """
    with _gzip_errors(path), gzip.open(path, "rb") as f:
        _drain(f)


def available_sessions(root: Path, subject: int, version: str) -> list[int]:
    folder = nsd_paths.betas_dir(root, subject, version)
    found = []
    for path in folder.glob("betas_session*.*"):
        stem = path.name.split(".")[0]
        if path.name.endswith((".nii.gz", ".hdf5")) and stem[len("betas_session"):].isdigit():
            found.append(int(stem[len("betas_session"):]))
    return sorted(set(found))


class BetasSession:
    """One session's betas, read volume by volume so memory stays at one volume.

    ``read(voxel_ijk)`` returns ``(n_trials, n_voxels)`` float32 in percent signal change
    (int16 / 300) for the given voxels, in the order given.
    """

    def __init__(self, path: Path, grid_shape: tuple[int, int, int]):
        self.path = Path(path)
        self.grid_shape = tuple(grid_shape)

    @property
    def n_trials(self) -> int:
        raise NotImplementedError

    def read(self, voxel_ijk: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _NiftiGzSession(BetasSession):
    def __init__(self, path: Path, grid_shape):
        super().__init__(path, grid_shape)
        try:
            with gzip.open(self.path, "rb") as f:
                self.header = nib.Nifti1Header.from_fileobj(f)
        except (OSError, EOFError, zlib.error) as exc:
            raise InvalidInputError(f"{self.path}: not a readable .nii.gz ({exc})") from None
        except Exception as exc:  # nibabel's HeaderDataError and friends
            raise InvalidInputError(f"{self.path}: bad NIfTI header ({exc})") from None
        shape = self.header.get_data_shape()
        if len(shape) != 4 or tuple(shape[:3]) != self.grid_shape:
            raise InvalidInputError(f"{self.path}: betas of shape {shape}; expected {self.grid_shape} x trials "
                             "(the grid of the subject's ROI files)")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = self.header.get_data_dtype()
        slope, inter = self.header.get_slope_inter()
        self.slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
        self.inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)

    @property
    def n_trials(self) -> int:
        return self.shape[3]

    def read(self, voxel_ijk: np.ndarray) -> np.ndarray:
        # NIfTI is Fortran-ordered: volume t is one contiguous block; index it by F-order offsets.
        flat = np.ravel_multi_index(tuple(np.asarray(voxel_ijk).T), self.grid_shape, order="F")
        n_vox = int(np.prod(self.grid_shape))
        block = n_vox * self.dtype.itemsize
        out = np.empty((self.n_trials, len(flat)), np.float32)
        expected = f"expected {self.n_trials} volumes of {self.grid_shape} {self.dtype}"
        with _gzip_errors(self.path, expected), gzip.open(self.path, "rb") as f:
            f.seek(int(self.header["vox_offset"]))
            for t in range(self.n_trials):
                raw = f.read(block)
                if len(raw) != block:
                    raise InvalidInputError(f"{self.path}: truncated; it ends in volume {t + 1}; {expected}; "
                                            "re-download it")
                out[t] = np.frombuffer(raw, self.dtype)[flat]
            # What is left is normally only the trailer; reading it makes gzip verify the whole stream.
            _drain(f)
        if self.slope != 1.0 or self.inter != 0.0:
            out = out * self.slope + self.inter
        out /= BETA_SCALE
        return out


class _Hdf5Session(BetasSession):
    """The ``.hdf5`` variant: dataset ``betas`` of shape (trials, Z, Y, X)."""

    def __init__(self, path: Path, grid_shape):
        import h5py

        super().__init__(path, grid_shape)
        try:
            with h5py.File(self.path, "r") as f:
                shape = f["betas"].shape
        except (OSError, KeyError) as exc:
            raise InvalidInputError(f"{self.path}: no readable dataset 'betas' ({exc})") from None
        if len(shape) != 4 or tuple(shape[1:]) != self.grid_shape[::-1]:
            raise InvalidInputError(f"{self.path}: betas of shape {shape}; expected (trials, Z, Y, X) = "
                             f"(trials, {', '.join(map(str, self.grid_shape[::-1]))})")
        self._n = int(shape[0])

    @property
    def n_trials(self) -> int:
        return self._n

    def read(self, voxel_ijk: np.ndarray) -> np.ndarray:
        import h5py

        i, j, k = np.asarray(voxel_ijk).T
        out = np.empty((self._n, len(i)), np.float32)
        try:
            with h5py.File(self.path, "r") as f:
                ds = f["betas"]
                for start in range(0, self._n, 64):
                    block = ds[start:start + 64]
                    out[start:start + len(block)] = block[:, k, j, i]
        except (OSError, KeyError) as exc:  # h5py's errors for damaged chunks carry no file name
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise InvalidInputError(f"{self.path}: truncated or corrupt HDF5 ({str(exc).splitlines()[0]}); "
                                    "re-download it") from None
        out /= BETA_SCALE
        return out


def open_betas_session(root: Path, subject: int, session: int, version: str,
                       grid_shape: tuple[int, int, int]) -> BetasSession:
    """Open session ``session`` (1-based), preferring ``.nii.gz`` over ``.hdf5``."""
    nifti = nsd_paths.betas_path(root, subject, session, version)
    if nifti.is_file():
        return _NiftiGzSession(nifti, grid_shape)
    hdf5 = nsd_paths.betas_path(root, subject, session, version, suffix=".hdf5")
    if hdf5.is_file():
        return _Hdf5Session(hdf5, grid_shape)
    raise MissingInputError(f"{nifti}: missing (betas of session {session}; no .hdf5 variant either)")
