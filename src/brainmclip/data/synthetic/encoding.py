"""The voxel encoding model of the simulator: how each nsdgeneral voxel responds to an image.

The model is hierarchical and owes nothing to CLIP, so decoding it is a real test:

- early visual voxels (prf-visualrois) are population receptive fields: a Gaussian window
  over one low-level map (contrast energy, red-green or blue-yellow), passed through a
  compressive exponent (the "CSS" pRF model); windows tile the visual field, grow with
  eccentricity and from V1 to hV4;
- category-selective voxels (floc-*) read the scene's semantic attributes: mostly their
  preferred domain (faces, bodies, places, words), a little of everything else and of a
  broad low-level window;
- other nsdgeneral voxels mix both weakly.

Each voxel's noiseless response is standardised over the subject's images, then trial
noise with a per-voxel noise ceiling (ncsnr = signal sd / noise sd) is added, part of it
shared across voxels, plus per-session offsets and linear drifts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .anatomy import Anatomy
from .render import LOW_LEVEL_CHANNELS
from .scenes import ATTRIBUTE_NAMES, DOMAINS

__all__ = ["GROUPS", "SignalModel", "VoxelTuning", "make_tuning"]

GROUPS = ("early", "category", "other")
_AREA_OF_LABEL = {1: "V1", 2: "V1", 3: "V2", 4: "V2", 5: "V3", 6: "V3", 7: "hV4"}
_AREA_SIZE = {"V1": 1.0, "V2": 1.4, "V3": 1.9, "hV4": 2.6}
_AREA_EXPONENT = {"V1": 0.9, "V2": 0.7, "V3": 0.55, "hV4": 0.45}
_AREA_P_CONTRAST = {"V1": 0.75, "V2": 0.75, "V3": 0.65, "hV4": 0.35}
_FLOC_DOMAIN = {"floc-faces": "face", "floc-bodies": "body", "floc-places": "place", "floc-words": "word"}
N_NOISE_FACTORS = 8
SHARED_NOISE_FRACTION = 0.3


@dataclass
class VoxelTuning:
    """Ground-truth parameters of one subject's nsdgeneral voxels (C order on the grid).

    Arrays have ``n_voxels`` rows. pRF centres ``prf_x``, ``prf_y`` and sizes ``prf_sigma``
    are in image coordinates scaled to [-1, 1] (x right, y down); ``prf_channel`` indexes
    :data:`LOW_LEVEL_CHANNELS`. Responses in percent signal change are
    ``baseline + amplitude * (signal + noise / ncsnr) + session offset + drift``.
    """

    voxel_ijk: np.ndarray
    group: np.ndarray
    ncsnr: np.ndarray
    amplitude: np.ndarray
    baseline: np.ndarray
    offset_sd: np.ndarray
    drift_sd: np.ndarray
    prf_x: np.ndarray
    prf_y: np.ndarray
    prf_sigma: np.ndarray
    prf_exponent: np.ndarray
    prf_channel: np.ndarray
    low_weight: np.ndarray
    high_weight: np.ndarray
    attribute_weights: np.ndarray
    noise_loadings: np.ndarray

    @property
    def n_voxels(self) -> int:
        return len(self.ncsnr)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        arrays["attribute_names"] = np.asarray(ATTRIBUTE_NAMES)
        arrays["channel_names"] = np.asarray(LOW_LEVEL_CHANNELS)
        arrays["group_names"] = np.asarray(GROUPS)
        arrays["shared_noise_fraction"] = np.float32(SHARED_NOISE_FRACTION)
        return arrays

    @classmethod
    def from_arrays(cls, arrays) -> VoxelTuning:
        return cls(**{f.name: np.asarray(arrays[f.name]) for f in fields(cls)})


def _quantile_rank(values: np.ndarray) -> np.ndarray:
    if len(values) < 2:
        return np.full(len(values), 0.5)
    return np.argsort(np.argsort(values, kind="stable"), kind="stable") / (len(values) - 1)


def make_tuning(anatomy: Anatomy, rng: np.random.Generator) -> VoxelTuning:
    """Draw the tuning of every nsdgeneral voxel of ``anatomy``."""
    ng = anatomy.nsdgeneral
    n = int(ng.sum())
    coords = anatomy.coords()
    prf_labels = anatomy.voxel_labels("prf-visualrois")
    floc_domains = np.zeros((n, len(DOMAINS)), bool)
    for roi, domain in _FLOC_DOMAIN.items():
        floc_domains[:, DOMAINS.index(domain)] = anatomy.voxel_labels(roi) > 0

    group = np.full(n, 2, np.int8)
    group[floc_domains.any(1)] = 1
    group[prf_labels > 0] = 0

    prf_x, prf_y = rng.uniform(-0.3, 0.3, n), rng.uniform(-0.3, 0.3, n)
    prf_sigma = rng.uniform(0.4, 0.8, n)
    prf_exponent = np.full(n, 0.5)
    prf_channel = np.zeros(n, np.int8)
    for area in ("V1", "V2", "V3", "hV4"):
        sel = np.flatnonzero(np.isin(prf_labels, [k for k, a in _AREA_OF_LABEL.items() if a == area]))
        if not len(sel):
            continue
        x, z = coords[sel, 0], coords[sel, 2]
        # Eccentricity grows with distance from the midline, polar angle follows z (dorsal
        # voxels see the lower field); each hemisphere sees the opposite hemifield.
        ecc = 0.05 + 1.25 * _quantile_rank(np.abs(x)) ** 1.3
        theta = (_quantile_rank(z) - 0.5) * np.pi
        hemifield = np.where(x < 0, 1.0, -1.0)
        prf_x[sel] = hemifield * ecc * np.cos(theta) + rng.normal(0, 0.04, len(sel))
        prf_y[sel] = ecc * np.sin(theta) + rng.normal(0, 0.04, len(sel))
        prf_sigma[sel] = (0.06 + 0.12 * ecc) * _AREA_SIZE[area] * rng.uniform(0.85, 1.15, len(sel))
        prf_exponent[sel] = _AREA_EXPONENT[area]
        p_contrast = _AREA_P_CONTRAST[area]
        prf_channel[sel] = rng.choice(3, len(sel), p=[p_contrast, (1 - p_contrast) / 2, (1 - p_contrast) / 2])

    n_attr = len(ATTRIBUTE_NAMES)
    domain_cols = [ATTRIBUTE_NAMES.index(f"domain:{d}") for d in DOMAINS]
    attribute_weights = rng.normal(0, 0.15, (n, n_attr))
    cat = group == 1
    # Preferred domain(s) dominate; a voxel inside two floc ROIs prefers both.
    pref = floc_domains[cat] / np.maximum(floc_domains[cat].sum(1, keepdims=True), 1)
    attribute_weights[np.ix_(cat, domain_cols)] += 1.5 * pref
    other = group == 2
    attribute_weights[other] = rng.normal(0, 0.4, (other.sum(), n_attr))

    low_weight = np.where(group == 0, 1.0, np.where(cat, 0.25, rng.uniform(0.0, 0.7, n)))
    high_weight = np.where(group == 0, 0.15, np.where(cat, 1.0, rng.uniform(0.0, 0.7, n)))

    ncsnr_mean = np.array([0.45, 0.38, 0.25])[group]
    ncsnr = np.clip(rng.normal(ncsnr_mean, 0.1), 0.08, 0.85)
    amplitude = rng.uniform(0.8, 2.5, n)
    loadings = rng.normal(0, 1, (n, N_NOISE_FACTORS))
    loadings /= np.linalg.norm(loadings, axis=1, keepdims=True)

    f32 = np.float32
    return VoxelTuning(
        voxel_ijk=np.argwhere(ng).astype(np.int16),
        group=group,
        ncsnr=ncsnr.astype(f32),
        amplitude=amplitude.astype(f32),
        baseline=rng.normal(0.5, 0.5, n).astype(f32),
        offset_sd=(0.5 * amplitude).astype(f32),
        drift_sd=(0.3 * amplitude).astype(f32),
        prf_x=prf_x.astype(f32),
        prf_y=prf_y.astype(f32),
        prf_sigma=prf_sigma.astype(f32),
        prf_exponent=prf_exponent.astype(f32),
        prf_channel=prf_channel,
        low_weight=low_weight.astype(f32),
        high_weight=high_weight.astype(f32),
        attribute_weights=attribute_weights.astype(f32),
        noise_loadings=loadings.astype(f32),
    )


def prf_weights(tuning: VoxelTuning, grid: int) -> np.ndarray:
    """Gaussian pRF windows as a ``(3 * grid * grid, n_voxels)`` matrix over the flattened maps.

    Each column is non-zero only in its voxel's channel block and sums to one there.
    """
    centres = (np.arange(grid) + 0.5) / grid * 2 - 1
    gy, gx = np.meshgrid(centres, centres, indexing="ij")
    d2 = (gx.ravel()[:, None] - tuning.prf_x[None]) ** 2 + (gy.ravel()[:, None] - tuning.prf_y[None]) ** 2
    window = np.exp(-0.5 * d2 / tuning.prf_sigma[None] ** 2)
    window /= np.maximum(window.sum(0, keepdims=True), 1e-12)
    weights = np.zeros((3 * grid * grid, tuning.n_voxels), np.float32)
    for c in range(3):
        sel = tuning.prf_channel == c
        weights[c * grid * grid:(c + 1) * grid * grid, sel] = window[:, sel]
    return weights


class SignalModel:
    """Noiseless, standardised responses of one subject's voxels to images.

    Built once from the image features of all the subject's images (to fix each voxel's
    mean and sd), then evaluated on any subset, e.g. one session's trials.
    """

    def __init__(self, tuning: VoxelTuning, grid: int, low_maps: np.ndarray, attributes: np.ndarray,
                 chunk: int = 512):
        self.tuning = tuning
        self.weights = prf_weights(tuning, grid)
        # Two passes over chunks: first the low/high component statistics, then the mix.
        low_stats, high_stats = _RunningStats(), _RunningStats()
        for start in range(0, len(low_maps), chunk):
            low, high = self._components(low_maps[start:start + chunk], attributes[start:start + chunk])
            low_stats.add(low)
            high_stats.add(high)
        self.low_mean, self.low_sd = low_stats.result()
        self.high_mean, self.high_sd = high_stats.result()
        mix_stats = _RunningStats()
        for start in range(0, len(low_maps), chunk):
            mix_stats.add(self._mix(low_maps[start:start + chunk], attributes[start:start + chunk]))
        self.mix_mean, self.mix_sd = mix_stats.result()

    def _components(self, low_maps, attributes):
        drive = low_maps.reshape(len(low_maps), -1) @ self.weights
        low = np.abs(drive) ** self.tuning.prf_exponent
        high = attributes @ self.tuning.attribute_weights.T
        return low, high

    def _mix(self, low_maps, attributes):
        low, high = self._components(low_maps, attributes)
        return (self.tuning.low_weight * (low - self.low_mean) / self.low_sd
                + self.tuning.high_weight * (high - self.high_mean) / self.high_sd)

    def __call__(self, low_maps: np.ndarray, attributes: np.ndarray) -> np.ndarray:
        """Responses of shape ``(n_images, n_voxels)``, mean 0 and sd 1 over the subject's images."""
        return ((self._mix(low_maps, attributes) - self.mix_mean) / self.mix_sd).astype(np.float32)

    def stats(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).astype(np.float32) for k in
                ("low_mean", "low_sd", "high_mean", "high_sd", "mix_mean", "mix_sd")}


class _RunningStats:
    def __init__(self):
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, x):
        x = np.asarray(x, np.float64)
        self.n += len(x)
        self.s = self.s + x.sum(0)
        self.ss = self.ss + (x**2).sum(0)

    def result(self):
        mean = self.s / self.n
        sd = np.sqrt(np.maximum(self.ss / self.n - mean**2, 0))
        return mean, np.where(sd > 1e-8, sd, 1.0)
