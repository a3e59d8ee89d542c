"""Paired batches: fMRI rows of a prepared split with their CLIP targets from the feature store."""

from __future__ import annotations

import numpy as np
import torch

from brainmclip.data.prepared import PreparedSubject
from brainmclip.errors import InvalidInputError
from brainmclip.features.feature_store import TARGETS, FeatureStore

__all__ = ["PairedSplit", "voxel_mismatch"]


def voxel_mismatch(run_dir, run_subject, trained: str, split: PairedSplit, has: str) -> InvalidInputError:
    """The error for fMRI of another width than a run was trained on (usually another subject's data)."""
    return InvalidInputError(f"{run_dir} was trained on {trained} (subject {run_subject}); {split.root} has {has} "
                             f"(subject {split.subject}); predict from a dataset of the run's subject")


class PairedSplit:
    """One split of a prepared dataset, joined to the feature store by NSD id.

    ``fetch(rows)`` returns float32 tensors: ``semantic`` F_S (n, n_semantic_voxels),
    ``detail`` F_D (n, n_detail_voxels) and each target (n, tokens, embed_dim).
    """

    def __init__(self, prepared: PreparedSubject, split: str, store: FeatureStore | None,
                 semantic_group: str = "semantic", detail_group: str = "detail"):
        if split not in prepared.splits:
            raise InvalidInputError(f"Unknown split={split!r}; choose from {sorted(prepared.splits)}")
        self.samples = prepared.splits[split]
        self.root, self.subject = prepared.root, prepared.subject
        self.semantic_idx = prepared.voxels.group(semantic_group)
        self.detail_idx = prepared.voxels.group(detail_group)
        if len(self.semantic_idx) == 0 or len(self.detail_idx) == 0:
            raise InvalidInputError(f"{prepared.root}: voxel group {semantic_group!r} or {detail_group!r} is empty")
        self.store = store
        if store is not None:
            missing = store.missing(np.unique(self.samples.stimulus_ids))
            if len(missing):
                raise InvalidInputError(f"feature store {store.root} lacks {len(missing)} images of {prepared.root} {split} "
                                 f"(first NSD id {missing[0]}); run brainmclip extract on this dataset")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def stimulus_ids(self) -> np.ndarray:
        return self.samples.stimulus_ids

    def fmri(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.argsort(rows)
        betas = np.empty((len(rows), self.samples.n_voxels), np.float32)
        betas[order] = self.samples.betas[rows[order]]  # sorted reads from the memory map
        return torch.from_numpy(betas[:, self.semantic_idx]), torch.from_numpy(betas[:, self.detail_idx])

    def check_finite(self, what: str, all_voxels: bool = False, rows_per_block: int = 1024) -> None:
        """Refuse rows holding NaN or inf in the voxels a model reads (one would turn every weight into NaN).

        Those are the two groups' voxels, or every voxel with ``all_voxels``.
        """
        columns = slice(None) if all_voxels else np.union1d(self.semantic_idx, self.detail_idx)
        for start in range(0, len(self), rows_per_block):
            block = np.asarray(self.samples.betas[start:start + rows_per_block])[:, columns]
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                raise InvalidInputError(f"{what}: fMRI row {start + int(np.argmax(bad))} holds NaN or inf; prepare "
                                        "the dataset again from clean inputs")

    def fetch(self, rows: np.ndarray, targets=TARGETS) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows)
        semantic, detail = self.fmri(rows)
        batch = {"semantic": semantic, "detail": detail}
        if self.store is not None:
            feats = self.store.get(self.samples.stimulus_ids[rows], targets)
            batch.update({k: torch.from_numpy(v) for k, v in feats.items()})
        return batch

    def target_means(self, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Mean of each target over this split's rows (float64 sums, streamed ``batch_size`` images at a time).

        Rows are weighted as training sees them (an image repeated in single-trial data counts
        once per row), so this is the constant prediction with the lowest training MSE.
        """
        if self.store is None:
            raise InvalidInputError("target_means needs a feature store")
        ids, counts = np.unique(self.samples.stimulus_ids, return_counts=True)
        sums: dict[str, np.ndarray] = {}
        for start in range(0, len(ids), batch_size):
            feats = self.store.get(ids[start:start + batch_size])
            w = counts[start:start + batch_size].astype(np.float64)
            for k, v in feats.items():
                part = np.tensordot(w, v, axes=(0, 0))
                sums[k] = sums[k] + part if k in sums else part
        return {k: torch.from_numpy((v / counts.sum()).astype(np.float32)) for k, v in sums.items()}
