"""The CLIP feature store: BrainMCLIP's targets computed once per NSD image, read fast.

Layout::

    STORE/manifest.json                    settings (model, layers, merge, preprocessing, dims), code version
    STORE/shards/shard_<first id>/ids.npy  int64 (n,), NSD image ids of the shard's rows
    STORE/shards/shard_<first id>/<target>.npy   float16 (n, tokens, embed_dim), memory-mapped on read

Targets: ``image_detail`` (e_I,D, 257 tokens), ``image_semantic`` (e_I,S, 257 tokens), ``text``
(E_T, 77 tokens). Subjects share test images, so rows are keyed by NSD id and each image is
stored once. A shard is written into a hidden temporary folder and renamed when complete, so
an interrupted extraction never leaves a shard that reads as finished. A store refuses to
take features computed with other settings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from brainmclip.atomic import TEMP_MARKER, read_manifest, stage_arrays, write_json_atomic
from brainmclip.errors import InvalidInputError, OutputInTheWayError

__all__ = ["FeatureStore", "STORE_FORMAT", "TARGETS", "open_feature_store"]

STORE_FORMAT = "brainmclip-clip-features/1"
TARGETS = ("image_detail", "image_semantic", "text")


class FeatureStore:
    """Read and append shards of per-image CLIP features. Create with :meth:`create` or :func:`open_feature_store`."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self._index: dict[int, tuple[str, int]] | None = None
        self._maps: dict[tuple[str, str], np.ndarray] = {}

    # -- creation -------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, settings: dict) -> FeatureStore:
        """Open the store at ``root`` for writing features made with ``settings``, creating it if new."""
        root = Path(root)
        manifest_file = root / "manifest.json"
        settings = json.loads(json.dumps(settings))  # as JSON will give it back
        if manifest_file.is_file():
            manifest = json.loads(manifest_file.read_text())
            if manifest.get("settings") != settings:
                diff = sorted(k for k in set(settings) | set(manifest.get("settings", {}))
                              if settings.get(k) != manifest.get("settings", {}).get(k))
                raise InvalidInputError(f"{root} holds features made with other settings (differing: {', '.join(diff)}); "
                                 "use another --out (features from different settings are never mixed)")
            return cls(root, manifest)
        if root.exists() and any(root.iterdir()):
            raise OutputInTheWayError(f"{root} is not empty and is not a feature store; choose another --out")
        from brainmclip import __version__

        manifest = {"format": STORE_FORMAT, "settings": settings, "code_version": __version__, "n_images": 0}
        (root / "shards").mkdir(parents=True, exist_ok=True)
        write_json_atomic(manifest_file, manifest)
        return cls(root, manifest)

    # -- index ----------------------------------------------------------------------
    def _shard_dirs(self) -> list[Path]:
        folder = self.root / "shards"
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("shard_")
                      and TEMP_MARKER not in p.name)

    def _build_index(self) -> dict[int, tuple[str, int]]:
        if self._index is None:
            index: dict[int, tuple[str, int]] = {}
            for shard in self._shard_dirs():
                for row, nsd_id in enumerate(np.load(shard / "ids.npy").tolist()):
                    index[nsd_id] = (shard.name, row)
            self._index = index
        return self._index

    def stored_ids(self) -> np.ndarray:
        return np.array(sorted(self._build_index()), np.int64)

    def __len__(self) -> int:
        return len(self._build_index())

    def __contains__(self, nsd_id) -> bool:
        return int(nsd_id) in self._build_index()

    def missing(self, ids) -> np.ndarray:
        index = self._build_index()
        return np.array(sorted({int(i) for i in ids} - set(index)), np.int64)

    # -- writing --------------------------------------------------------------------
    def write_shard(self, ids: np.ndarray, arrays: dict[str, np.ndarray]) -> Path:
        """Store one shard: ``arrays[target]`` has one row per id (stored as float16)."""
        ids = np.asarray(ids, np.int64)
        if set(arrays) != set(TARGETS):
            raise InvalidInputError(f"shard targets {sorted(arrays)}; expected {list(TARGETS)}")
        for name, array in arrays.items():
            if len(array) != len(ids):
                raise InvalidInputError(f"{name}: {len(array)} rows for {len(ids)} ids")
            if not np.isfinite(array).all():
                raise InvalidInputError(f"{name}: non-finite features for ids starting {ids[0]}; refusing to store them")
        final = self.root / "shards" / f"shard_{ids.min():06d}"
        os.replace(stage_arrays(final, ids, arrays, "ids"), final)
        self._index = None
        return final

    def finish(self) -> None:
        """Record the number of stored images in the manifest (after all writers are done)."""
        self._index = None
        self.manifest["n_images"] = len(self)
        write_json_atomic(self.root / "manifest.json", self.manifest)

    def remove_stale_shards(self) -> int:
        """Delete temporaries of interrupted shard writes; returns how many."""
        folder = self.root / "shards"
        stale = [p for p in folder.iterdir() if TEMP_MARKER in p.name] if folder.is_dir() else []
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return len(stale)

    # -- reading --------------------------------------------------------------------
    def _array(self, shard: str, target: str) -> np.ndarray:
        key = (shard, target)
        if key not in self._maps:
            self._maps[key] = np.load(self.root / "shards" / shard / f"{target}.npy", mmap_mode="r")
        return self._maps[key]

    def get(self, ids, targets=TARGETS, dtype=np.float32) -> dict[str, np.ndarray]:
        """Features of ``ids`` (in that order): ``{target: (n, tokens, embed_dim)}``."""
        index = self._build_index()
        ids = np.asarray(ids, np.int64).ravel()
        missing = [int(i) for i in ids if int(i) not in index]
        if missing:
            raise InvalidInputError(f"{len(missing)} images not in the feature store {self.root} (first NSD "
                                    f"id {missing[0]}); "
                           "run brainmclip extract on the prepared dataset first")
        out = {}
        for target in targets:
            if target not in TARGETS:
                raise InvalidInputError(f"Unknown target={target!r}; choose from {list(TARGETS)}")
            first = self._array(index[int(ids[0])][0], target) if len(ids) else None
            shape = first.shape[1:] if first is not None else (0,)
            result = np.empty((len(ids), *shape), dtype)
            by_shard: dict[str, list[tuple[int, int]]] = {}
            for pos, nsd_id in enumerate(ids.tolist()):
                shard, row = index[nsd_id]
                by_shard.setdefault(shard, []).append((pos, row))
            for shard, pairs in by_shard.items():
                pos, rows = map(np.array, zip(*pairs, strict=True))
                result[pos] = self._array(shard, target)[rows]
            out[target] = result
        return out


def open_feature_store(root: str | os.PathLike) -> FeatureStore:
    """Open an existing store for reading."""
    root = Path(root)
    # A store is usable while it grows: shards are complete on their own, so no "complete" flag.
    manifest = read_manifest(root, STORE_FORMAT, "a feature store", "extract", complete=False)
    return FeatureStore(root, manifest)
