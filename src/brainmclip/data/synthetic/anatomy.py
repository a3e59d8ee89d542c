"""A simulated subject's anatomy: brain mask and ROI label volumes on the func1pt8mm grid.

Geometry is schematic but keeps what loaders and models rely on: ROIs are bilateral blobs in
the posterior (low-y) part of an ellipsoidal brain, early visual areas sit at the occipital
pole, category-selective areas further forward; nsdgeneral has exactly the preset's voxel
count; floc ROIs may overlap one another and reach outside nsdgeneral, as in NSD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brainmclip.data.nsd_paths import HIGH_LEVEL_ROIS, ROI_LABELS
from brainmclip.errors import InvalidInputError

__all__ = ["VOXEL_SIZE_MM", "Anatomy", "make_anatomy"]

VOXEL_SIZE_MM = 1.8

# Shares of nsdgeneral taken by each early visual area (in order from the pole).
_EARLY_AREAS = (("V1", 0.13), ("V2", 0.11), ("V3", 0.08), ("hV4", 0.04))
# Floc ROI -> (centre, share of nsdgeneral, left-lateralised). Centres are in coordinates
# scaled to nsdgeneral's extent: |x| / max|x|, y from its posterior (0) to anterior (1) end,
# z / max|z|; the blobs sit in the anterior, ventral-lateral part, as in ventral temporal cortex.
_FLOC_BLOBS = {
    "floc-faces": ((0.6, 0.8, -0.5), 0.07, False),
    "floc-bodies": ((0.85, 0.75, 0.1), 0.08, False),
    "floc-places": ((0.25, 0.75, -0.45), 0.06, False),
    "floc-words": ((0.5, 0.85, -0.6), 0.04, True),
}


@dataclass(frozen=True)
class Anatomy:
    """Label volumes of one subject, all of shape ``grid_shape`` (X, Y, Z).

    ``rois[name]`` follows NSD's convention: label > 0 inside a sub-region, 0 elsewhere in the
    brain, -1 outside the brain. ``coords`` are the normalised (x, y, z) positions of the
    nsdgeneral voxels in C order, each in [-1, 1].
    """

    grid_shape: tuple[int, int, int]
    brain: np.ndarray
    rois: dict[str, np.ndarray]
    affine: np.ndarray

    @property
    def nsdgeneral(self) -> np.ndarray:
        return self.rois["nsdgeneral"] > 0

    def voxel_labels(self, roi: str) -> np.ndarray:
        """Label of every nsdgeneral voxel (C order) in ``roi``'s volume."""
        return self.rois[roi][self.nsdgeneral]

    def coords(self) -> np.ndarray:
        return _normalised_coords(self.grid_shape)[self.nsdgeneral]


def _normalised_coords(shape) -> np.ndarray:
    axes = [np.linspace(-1, 1, n) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _nearest(score: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` candidates with the lowest score (ties broken by index)."""
    idx = np.flatnonzero(candidates)
    order = idx[np.argsort(score.ravel()[idx], kind="stable")[:k]]
    mask = np.zeros(score.size, bool)
    mask[order] = True
    return mask.reshape(score.shape)


def make_anatomy(grid_shape: tuple[int, int, int], n_nsdgeneral: int, rng: np.random.Generator) -> Anatomy:
    """Build the brain mask and the six NSD ROI volumes for one subject."""
    xyz = _normalised_coords(grid_shape)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    brain = (x / 0.95) ** 2 + (y / 0.97) ** 2 + (z / 0.9) ** 2 <= 1.0
    if n_nsdgeneral > brain.sum() // 2:
        raise InvalidInputError(f"{n_nsdgeneral} nsdgeneral voxels do not fit a brain of {brain.sum()} voxels")

    # Distance from the occipital pole (y = -1), with a little noise so borders are not planes.
    jitter = rng.normal(0, 0.03, grid_shape)
    pole_distance = (y + 1.0) + 0.35 * np.abs(z) + 0.1 * np.abs(x) + jitter
    nsdgeneral = _nearest(pole_distance, brain, n_nsdgeneral)

    rois: dict[str, np.ndarray] = {}
    outside = np.where(brain, 0, -1).astype(np.int16)
    rois["nsdgeneral"] = np.where(nsdgeneral, 1, outside).astype(np.int16)

    # Early visual areas: consecutive shells from the pole; dorsal (z > 0) / ventral split.
    prf = outside.copy()
    order = np.flatnonzero(nsdgeneral.ravel())
    order = order[np.argsort(pole_distance.ravel()[order], kind="stable")]
    start = 0
    for area_index, (area, share) in enumerate(_EARLY_AREAS):
        n = round(share * n_nsdgeneral)
        chosen = np.unravel_index(order[start:start + n], grid_shape)
        start += n
        if area == "hV4":
            prf[chosen] = 7
        else:
            ventral = z[chosen] <= 0
            prf[chosen] = np.where(ventral, 2 * area_index + 1, 2 * area_index + 2)
    rois["prf-visualrois"] = prf

    # Category-selective blobs, measured with |x| so each ROI exists in both hemispheres.
    ax, ay, az = np.abs(x[nsdgeneral]).max(), (y[nsdgeneral].min(), y[nsdgeneral].max()), np.abs(z[nsdgeneral]).max()
    u, v, w = np.abs(x) / ax, (y - ay[0]) / (ay[1] - ay[0]), z / az
    free = brain & (prf <= 0)
    for roi, (centre, share, left_only) in _FLOC_BLOBS.items():
        cu, cv, cw = centre
        d = np.sqrt((u - cu) ** 2 + (v - cv) ** 2 + (w - cw) ** 2) + rng.normal(0, 0.03, grid_shape)
        candidates = free & (x < 0) if left_only else free
        # The share inside nsdgeneral, plus a quarter more just outside it (as in NSD, where
        # floc ROIs are defined independently of nsdgeneral and spill over its border).
        n_inside = round(share * n_nsdgeneral)
        blob = _nearest(d, candidates & nsdgeneral, n_inside) | _nearest(d, candidates & ~nsdgeneral, n_inside // 4)
        blob = np.flatnonzero(blob.ravel())
        labels = outside.copy().ravel()
        n_labels = len(ROI_LABELS[roi])
        # Sub-regions run posterior -> anterior (OFA before FFA-1 before FFA-2 ...), equal in size.
        by_y = blob[np.argsort(y.ravel()[blob], kind="stable")]
        for label, part in enumerate(np.array_split(by_y, n_labels), start=1):
            labels[part] = label
        rois[roi] = labels.reshape(grid_shape)
    assert set(rois) == set(ROI_LABELS) and all(r in rois for r in HIGH_LEVEL_ROIS)

    affine = np.diag([VOXEL_SIZE_MM] * 3 + [1.0])
    affine[:3, 3] = -VOXEL_SIZE_MM * (np.asarray(grid_shape) - 1) / 2
    return Anatomy(tuple(grid_shape), brain, rois, affine)
