"""Where the official Natural Scenes Dataset keeps each file, and the facts of its design.

The simulator writes these paths and the loaders read them, so a simulated tree and a real
NSD download are interchangeable. Paths are relative to the NSD root (the layout of the
public ``natural-scenes-dataset`` bucket).
"""

from __future__ import annotations

from pathlib import Path

from brainmclip.errors import InvalidInputError

__all__ = [
    "BETA_SCALE",
    "HIGH_LEVEL_ROIS",
    "LOW_LEVEL_ROIS",
    "NSD_GRID_SHAPE",
    "NSD_NSDGENERAL_COUNTS",
    "NSD_SESSIONS_PER_SUBJECT",
    "N_SUBJECTS",
    "ROI_LABELS",
    "ROI_NAMES",
    "betas_dir",
    "betas_path",
    "brainmask_path",
    "captions_path",
    "check_subject",
    "expdesign_path",
    "ncsnr_path",
    "roi_ctab_path",
    "roi_path",
    "stim_info_path",
    "stimuli_path",
    "subject_dir_name",
]

N_SUBJECTS = 8

# Scans completed per subject in the real NSD (subjects 3, 4, 6, 8 stopped early).
NSD_SESSIONS_PER_SUBJECT = (40, 40, 32, 30, 40, 32, 40, 30)

# func1pt8mm volume grid (X, Y, Z) of each subject.
NSD_GRID_SHAPE = (
    (81, 104, 83),
    (82, 106, 84),
    (81, 106, 82),
    (85, 99, 80),
    (79, 97, 78),
    (85, 113, 83),
    (78, 95, 81),
    (80, 103, 78),
)

NSD_NSDGENERAL_COUNTS = (15724, 14278, 15226, 13153, 13039, 17907, 12682, 14386)

# Betas are stored as int16 percent-signal-change times this factor.
BETA_SCALE = 300.0

# Label value -> name, per ROI file, as in NSD's freesurfer ``*.mgz.ctab`` tables.
ROI_LABELS: dict[str, dict[int, str]] = {
    "nsdgeneral": {1: "nsdgeneral"},
    "prf-visualrois": {1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"},
    "floc-bodies": {1: "EBA", 2: "FBA-1", 3: "FBA-2", 4: "mTL-bodies"},
    "floc-faces": {1: "OFA", 2: "FFA-1", 3: "FFA-2", 4: "mTL-faces", 5: "aTL-faces"},
    "floc-places": {1: "OPA", 2: "PPA", 3: "RSC"},
    "floc-words": {1: "OWFA", 2: "VWFA-1", 3: "VWFA-2", 4: "mfs-words", 5: "mTL-words"},
}
ROI_NAMES = tuple(ROI_LABELS)
LOW_LEVEL_ROIS = ("prf-visualrois",)
HIGH_LEVEL_ROIS = ("floc-bodies", "floc-faces", "floc-places", "floc-words")


def check_subject(subject: int) -> int:
    """Return ``subject`` if it is an NSD subject number (1-8), else raise ValueError."""
    if isinstance(subject, bool) or not isinstance(subject, int) or not 1 <= subject <= N_SUBJECTS:
        raise InvalidInputError(f"subject={subject!r} is not an NSD subject; expected an integer 1-{N_SUBJECTS}")
    return subject


def subject_dir_name(subject: int) -> str:
    return f"subj{check_subject(subject):02d}"


def expdesign_path(root: Path) -> Path:
    return Path(root) / "nsddata/experiments/nsd/nsd_expdesign.mat"


def stim_info_path(root: Path) -> Path:
    return Path(root) / "nsddata/experiments/nsd/nsd_stim_info_merged.csv"


def stimuli_path(root: Path) -> Path:
    return Path(root) / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"


def captions_path(root: Path, split: str) -> Path:
    """COCO caption file for ``split`` ('train2017' or 'val2017')."""
    if split not in ("train2017", "val2017"):
        raise InvalidInputError(f"Unknown COCO split={split!r}; expected 'train2017' or 'val2017'")
    return Path(root) / f"nsddata_stimuli/stimuli/nsd/annotations/captions_{split}.json"


def betas_dir(root: Path, subject: int, version: str = "betas_fithrf_GLMdenoise_RR") -> Path:
    return Path(root) / "nsddata_betas/ppdata" / subject_dir_name(subject) / "func1pt8mm" / version


def betas_path(root: Path, subject: int, session: int, version: str = "betas_fithrf_GLMdenoise_RR",
               suffix: str = ".nii.gz") -> Path:
    """Path of one session's betas (``session`` is 1-based, as in the file names)."""
    return betas_dir(root, subject, version) / f"betas_session{session:02d}{suffix}"


def ncsnr_path(root: Path, subject: int, version: str = "betas_fithrf_GLMdenoise_RR") -> Path:
    return betas_dir(root, subject, version) / "ncsnr.nii.gz"


def roi_path(root: Path, subject: int, roi: str) -> Path:
    if roi not in ROI_LABELS:
        raise InvalidInputError(f"Unknown ROI={roi!r}; choose from {sorted(ROI_LABELS)}")
    return Path(root) / "nsddata/ppdata" / subject_dir_name(subject) / "func1pt8mm/roi" / f"{roi}.nii.gz"


def brainmask_path(root: Path, subject: int) -> Path:
    return Path(root) / "nsddata/ppdata" / subject_dir_name(subject) / "func1pt8mm/brainmask.nii.gz"


def roi_ctab_path(root: Path, subject: int, roi: str) -> Path:
    """Label-name table of an ROI file (freesurfer colour-table format)."""
    return Path(root) / "nsddata/freesurfer" / subject_dir_name(subject) / "label" / f"{roi}.mgz.ctab"
