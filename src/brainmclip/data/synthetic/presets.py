"""Simulation presets: JSON files in ``presets/`` read into :class:`SimulationPreset`."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from importlib import resources

from brainmclip.data.nsd_paths import N_SUBJECTS, NSD_SESSIONS_PER_SUBJECT
from brainmclip.errors import InvalidInputError

__all__ = ["PRESETS", "SimulationPreset", "list_presets", "load_preset"]

# Each image is shown this many times over the full design, as in NSD.
REPEATS = 3


@dataclass(frozen=True)
class SimulationPreset:
    """Sizes of one simulated NSD.

    Attributes
    ----------
    name : str
    description : str
    image_size : int
        Side of the square stimuli in pixels (NSD: 425).
    n_images : int
        Distinct images per subject (NSD: 10,000).
    n_shared : int
        Images every subject sees; they form the test set (NSD: 1,000).
    n_sessions : int
        Sessions of the full design (NSD: 40); each image is shown ``REPEATS`` times.
    grid_shapes : tuple of (int, int, int)
        Volume grid (X, Y, Z) of each of the 8 subjects.
    nsdgeneral_counts : tuple of int
        Voxels inside nsdgeneral for each subject.
    feature_grid : int
        Resolution of the low-level feature maps the pRF encoding model reads.
    compress_level : int
        gzip level of the NIfTI files (1 = fast; sizes barely change for noisy betas).
    """

    name: str
    description: str
    image_size: int
    n_images: int
    n_shared: int
    n_sessions: int
    grid_shapes: tuple[tuple[int, int, int], ...]
    nsdgeneral_counts: tuple[int, ...]
    feature_grid: int
    compress_level: int = 1

    def __post_init__(self):
        if not 0 < self.n_shared < self.n_images:
            raise InvalidInputError(f"preset {self.name!r}: need 0 < n_shared < n_images, got "
                                    f"{self.n_shared}, {self.n_images}")
        if (REPEATS * self.n_images) % self.n_sessions:
            raise InvalidInputError(
                f"preset {self.name!r}: {REPEATS} x n_images={self.n_images} trials do not split into "
                f"n_sessions={self.n_sessions} equal sessions"
            )
        if len(self.grid_shapes) != N_SUBJECTS or len(self.nsdgeneral_counts) != N_SUBJECTS:
            raise InvalidInputError(f"preset {self.name!r}: grid_shapes and nsdgeneral_counts need {N_SUBJECTS} entries")
        for shape, count in zip(self.grid_shapes, self.nsdgeneral_counts, strict=True):
            # nsdgeneral must fit in the occipital part of an ellipsoidal brain.
            if count > 0.15 * shape[0] * shape[1] * shape[2]:
                raise InvalidInputError(f"preset {self.name!r}: {count} nsdgeneral voxels do not fit a {shape} grid")

    @property
    def n_trials(self) -> int:
        return REPEATS * self.n_images

    @property
    def trials_per_session(self) -> int:
        return self.n_trials // self.n_sessions

    @property
    def n_total_images(self) -> int:
        """Size of the NSD image index (NSD: 73,000 = 1,000 shared + 8 x 9,000 unique)."""
        return self.n_shared + N_SUBJECTS * (self.n_images - self.n_shared)

    def sessions_for_subject(self, subject: int) -> int:
        """Sessions the subject completed, scaled from NSD's 40/40/32/30/40/32/40/30."""
        return round(self.n_sessions * NSD_SESSIONS_PER_SUBJECT[subject - 1] / 40)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _read_preset(name: str) -> SimulationPreset:
    text = resources.files(__package__).joinpath("presets").joinpath(f"{name}.json").read_text()
    raw = json.loads(text)
    raw["grid_shapes"] = tuple(tuple(s) for s in raw["grid_shapes"])
    raw["nsdgeneral_counts"] = tuple(raw["nsdgeneral_counts"])
    return SimulationPreset(**raw)


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).joinpath("presets").iterdir()
                  if p.name.endswith(".json"))


PRESETS = {name: _read_preset(name) for name in list_presets()}


def load_preset(name: str) -> SimulationPreset:
    if name not in PRESETS:
        raise InvalidInputError(f"Unknown preset={name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
