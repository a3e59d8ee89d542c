"""The named hand-off types between stages of the data flow.

``data`` -> :class:`FmriSamples` -> ``features`` -> ``models`` -> ``generation`` -> ``evaluation``.
Later stages add their types here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FmriSamples"]


@dataclass(frozen=True)
class FmriSamples:
    """fMRI samples of one subject and split, paired with what was seen.

    Attributes
    ----------
    betas : float32 array of shape (n_samples, n_voxels)
        Usually memory-mapped. One row per unique image (repeats averaged) or, for
        single-trial datasets, one row per trial.
    stimulus_ids : int64 array of shape (n_samples,)
        0-based NSD image index (the "73k" id); -1 where the source did not record it.
    trial_ids : int64 array of shape (n_samples, max_repeats)
        0-based global trial numbers ((session - 1) * trials_per_session + trial) that each
        row came from, padded with -1.
    images : uint8 array of shape (n_samples, height, width, 3) or None
        The stimuli, memory-mapped; None when the dataset was prepared without images.
    captions : list of list of str
        The image's captions (COCO: usually 5).
    subject : int
    split : str
        'train', 'val' or 'test'.
    """

    betas: np.ndarray
    stimulus_ids: np.ndarray
    trial_ids: np.ndarray
    images: np.ndarray | None
    captions: list[list[str]]
    subject: int
    split: str

    def __len__(self) -> int:
        return len(self.betas)

    @property
    def n_voxels(self) -> int:
        return self.betas.shape[1]

    @property
    def n_repeats(self) -> np.ndarray:
        return (self.trial_ids >= 0).sum(1)
