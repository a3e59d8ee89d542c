"""The named hand-off types between stages of the data flow.

``data`` -> :class:`FmriSamples` -> ``features`` -> ``models`` -> ``generation`` -> ``evaluation``.
Later stages add their types here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DecodedEmbeddings", "FmriSamples", "GeneratedImages"]


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


@dataclass(frozen=True)
class DecodedEmbeddings:
    """Predicted CLIP embeddings of one subject's test (or val) images, from any method.

    Attributes
    ----------
    stimulus_ids : int64 array of shape (n_images,)
        0-based NSD index of each row.
    image : float array of shape (n_images, 257, embed_dim) or None
        Ê_I, the fused image embedding Versatile Diffusion is conditioned on (None only for
        text-only models).
    text : float array of shape (n_images, 77, embed_dim) or None
        Ê_T, the text embedding.
    image_semantic, image_detail : float arrays like ``image`` or None
        The image branch's two parts (ê_I,S and ê_I,D) when the method has them.
    subject : int
    split : str
    method : str
    manifest : dict
        Where the predictions came from (run, data and feature identities, settings).
    """

    stimulus_ids: np.ndarray
    image: np.ndarray | None
    text: np.ndarray | None
    image_semantic: np.ndarray | None
    image_detail: np.ndarray | None
    subject: int
    split: str
    method: str
    manifest: dict

    def __len__(self) -> int:
        return len(self.stimulus_ids)


@dataclass(frozen=True)
class GeneratedImages:
    """Reconstructions on disk: one PNG per predicted image.

    Attributes
    ----------
    root : path
        The reconstruction folder (``manifest.json`` beside the PNGs).
    stimulus_ids : int64 array of shape (n_images,)
    paths : list of path
        ``paths[i]`` is the reconstruction of NSD image ``stimulus_ids[i]``.
    manifest : dict
        Generator, settings, seeds and the predictions they came from.
    """

    root: object
    stimulus_ids: np.ndarray
    paths: list
    manifest: dict

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        """uint8 (H, W, 3) pixels of one reconstruction."""
        from PIL import Image

        with Image.open(self.paths[index]) as img:
            return np.asarray(img.convert("RGB"))
