"""The named hand-off types between stages of the data flow.

``data`` -> :class:`FmriSamples` -> ``features`` -> ``models`` -> :class:`DecodedEmbeddings` ->
``generation`` -> :class:`GeneratedImages` -> ``evaluation`` -> :class:`MetricReport` (one image set) and
:class:`RunEvaluation` (one subject and method, what ``metrics.json`` holds and the report shows).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

__all__ = ["DecodedEmbeddings", "FmriSamples", "GeneratedImages", "MetricReport", "RunEvaluation"]


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
    targets : dict of str to float arrays (n_images, a, b)
        Decoded targets of other spaces, by name (MindDiffuser: ``sd_text``, ``sd_latent``, ``struct_NN``);
        empty for the CLIP-space methods.
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
    targets: dict = field(default_factory=dict)

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


@dataclass(frozen=True)
class MetricReport:
    """The image metrics of ``n`` reconstructions against their ground truths (recon i pairs with truth i).

    Attributes
    ----------
    values : dict of str to float
        Mean of each computed metric, in the metric table's order (identification as fractions).
    per_image : dict of str to float64 array of shape (n,)
        PixCorr r_i, SSIM_i, the identification accuracy of recon i, the distance of pair i.
    uncalibrated : tuple of str
        Metrics computed with randomly initialised networks (only good for comparing our own rows).
    protocol : dict
        The resize/SSIM protocol, as :class:`~brainmclip.evaluation.image_metrics.MetricProtocol` fields.
    networks : dict of str to str
        Where each network's weights came from.
    n : int
    seconds : float
    """

    values: dict
    per_image: dict
    uncalibrated: tuple
    protocol: dict
    networks: dict
    n: int
    seconds: float


@dataclass
class RunEvaluation:
    """The evaluation of one subject's reconstructions by one method.

    Attributes
    ----------
    subject : int
    method : str
    metrics : dict of str to float
        Mean of each image metric.
    ci95 : dict of str to (float, float)
        Bootstrap 95% interval of each mean, resampling test images.
    uncalibrated : list of str
        Metrics computed with randomly initialised networks.
    retrieval : dict
        Per decoded embedding (``image``, ``text``): :func:`~brainmclip.evaluation.retrieval.retrieval_report`.
    scene_checks : dict
        Simulated data only: category agreement of reconstructions and true images with the scenes.
    parameters : int
        Trainable parameters of the mapping model.
    n_images : int
    test_set : str or None
    reconstructions, data, run : str
        The reconstruction folder, the prepared dataset and the training run, as recorded in
        ``metrics.json`` (relative to the evaluation folder when written by :func:`evaluate_reconstructions`).
    """

    subject: int
    method: str
    metrics: dict
    ci95: dict = field(default_factory=dict)
    uncalibrated: list = field(default_factory=list)
    retrieval: dict = field(default_factory=dict)
    scene_checks: dict = field(default_factory=dict)
    parameters: int = 0
    n_images: int = 0
    test_set: str | None = None
    reconstructions: str = ""
    data: str = ""
    run: str | None = None

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, values: dict) -> RunEvaluation:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
