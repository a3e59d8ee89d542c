"""The CLIP feature store: BrainMCLIP's targets computed once per NSD image, read fast.

Layout::

    STORE/manifest.json                    settings (model, layers, merge, preprocessing, dims), code version,
                                           checksums of every shard file (recorded by :meth:`FeatureStore.finish`)
    STORE/shards/shard_<first id>/ids.npy  int64 (n,), NSD image ids of the shard's rows
    STORE/shards/shard_<first id>/<target>.npy   float16 (n, tokens, embed_dim), memory-mapped on read

Targets: ``image_detail`` (e_I,D, 257 tokens), ``image_semantic`` (e_I,S, 257 tokens), ``text``
(E_T, 77 tokens). A store made for other targets names them in its settings (``settings["targets"]``,
e.g. MindDiffuser's ``sd_text``, ``sd_latent``, ``struct_02`` ... in
:mod:`brainmclip.features.minddiffuser_targets`), and the command that makes it
(``settings["command"]``, default ``extract``); settings without these keys mean BrainMCLIP's three
targets, so stores written before the keys existed read unchanged. Every target is a 3-D float16
array per shard, one row per image. Subjects share test images, so rows are keyed by NSD id and each image is
stored once. A shard is written into a hidden temporary folder and renamed when complete, so
an interrupted extraction never leaves a shard that reads as finished. A store refuses to
take features computed with other settings.

Every shard file read is checked: its size against its ``.npy`` header, and against the checksum
the manifest records for it (:mod:`brainmclip.integrity`). ``extract`` removes shards that fail
these checks before it looks for missing images, so rerunning it repairs a damaged store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from brainmclip.atomic import TEMP_MARKER, output_entries, read_manifest, stage_arrays, write_json_atomic
from brainmclip.errors import InvalidInputError, OutputInTheWayError
from brainmclip.integrity import folder_checksums, load_npy, read_json

__all__ = ["FeatureStore", "STORE_FORMAT", "TARGETS", "open_feature_store"]

log = logging.getLogger("brainmclip.extract")

STORE_FORMAT = "brainmclip-clip-features/1"
TARGETS = ("image_detail", "image_semantic", "text")
DEFAULT_COMMAND = "extract"
# What to do about a damaged shard: extract finds it and computes it again.
REPAIR_HINT = f"rerun brainmclip {DEFAULT_COMMAND} to compute it again"
SHARD_FILES = ("ids.npy", *(f"{t}.npy" for t in TARGETS))


def _store_targets(settings: dict) -> tuple[str, ...]:
    """The targets a store with ``settings`` holds (BrainMCLIP's three unless the settings name others)."""
    targets = settings.get("targets", TARGETS) if isinstance(settings, dict) else TARGETS
    if (not isinstance(targets, (list, tuple)) or not targets or len(set(targets)) != len(targets)
            or not all(isinstance(t, str) and t.isidentifier() for t in targets) or "ids" in targets):
        raise InvalidInputError(f"feature store targets {targets!r}; expected distinct names like {list(TARGETS)}")
    return tuple(targets)


class FeatureStore:
    """Read and append shards of per-image CLIP features. Create with :meth:`create` or :func:`open_feature_store`."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self._index: dict[int, tuple[str, int]] | None = None
        self._maps: dict[tuple[str, str], np.ndarray] = {}
        settings = manifest.get("settings", {})
        self.targets: tuple[str, ...] = _store_targets(settings)
        self.command: str = str(settings.get("command", DEFAULT_COMMAND)) if isinstance(settings, dict) \
            else DEFAULT_COMMAND
        self._shard_files = ("ids.npy", *(f"{t}.npy" for t in self.targets))
        self._repair_hint = f"rerun brainmclip {self.command} to compute it again"

    # -- creation -------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, settings: dict) -> FeatureStore:
        """Open the store at ``root`` for writing features made with ``settings``, creating it if new.

        ``settings["targets"]`` (optional) names the targets every shard holds; ``settings["command"]``
        (optional) the brainmclip command that makes the store, named in repair hints."""
        root = Path(root)
        manifest_file = root / "manifest.json"
        settings = json.loads(json.dumps(settings))  # as JSON will give it back
        _store_targets(settings)
        command = settings.get("command", DEFAULT_COMMAND)
        if manifest_file.is_file():
            manifest = read_json(manifest_file, f"remove {root} and run brainmclip {command} again")
            if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
                raise InvalidInputError(f"{manifest_file}: not a feature store manifest (format "
                                        f"{STORE_FORMAT!r}); choose another --out")
            if manifest.get("settings") != settings:
                diff = sorted(k for k in set(settings) | set(manifest.get("settings", {}))
                              if settings.get(k) != manifest.get("settings", {}).get(k))
                raise InvalidInputError(f"{root} holds features made with other settings (differing: {', '.join(diff)}); "
                                 "use another --out (features from different settings are never mixed)")
            return cls(root, manifest)
        if output_entries(root):
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
                for row, nsd_id in enumerate(self._load(shard.name, "ids.npy", mmap=False).tolist()):
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
        if set(arrays) != set(self.targets):
            raise InvalidInputError(f"shard targets {sorted(arrays)}; expected {list(self.targets)}")
        for name, array in arrays.items():
            if len(array) != len(ids):
                raise InvalidInputError(f"{name}: {len(array)} rows for {len(ids)} ids")
            if not np.isfinite(array).all():
                raise InvalidInputError(f"{name}: non-finite features for ids starting {ids[0]}; refusing to store them")
            if np.ndim(array) != 3:
                raise InvalidInputError(f"{name}: array of shape {np.shape(array)}; expected (rows, tokens, dim)")
            if len(ids) and np.abs(array).max() > np.finfo(np.float16).max:
                raise InvalidInputError(f"{name}: values beyond float16's range for ids starting {ids[0]}; refusing "
                                        "to store them")
        final = self.root / "shards" / f"shard_{ids.min():06d}"
        os.replace(stage_arrays(final, ids, arrays, "ids"), final)
        self._index = None
        return final

    def finish(self) -> None:
        """Record the number of stored images and the new shards' checksums in the manifest (after all writers
        are done).

        Entries already recorded stay: :meth:`remove_damaged_shards` has verified them, and a shard is never
        rewritten under the same name without being removed first.
        """
        self._index = None
        self.manifest["n_images"] = len(self)
        recorded = self.manifest.get("checksums", {})
        for shard in self._shard_dirs():
            names = [f"shards/{shard.name}/{f}" for f in self._shard_files]
            new = [n for n in names if n not in recorded]
            if new:
                recorded.update(folder_checksums(self.root, new))
        self.manifest["checksums"] = dict(sorted(recorded.items()))
        write_json_atomic(self.root / "manifest.json", self.manifest)

    def remove_damaged_shards(self) -> int:
        """Delete shards whose files fail their checks (and forget checksums of shards that are gone).

        Their images then count as missing, so the extraction that follows computes them again. Returns
        how many shards were removed. Only one process may call this, before the others open the store.
        """
        recorded = self.manifest.get("checksums", {})
        removed = 0
        for shard in self._shard_dirs():
            try:
                n_rows = {self._load(shard.name, f, mmap=True).shape[:1] for f in self._shard_files}
                if len(n_rows) != 1:
                    raise InvalidInputError(f"{shard}: files of different row counts {sorted(n_rows)}; expected "
                                            "one row per id in each")
            except (InvalidInputError, FileNotFoundError) as exc:
                log.warning("%s; removing the shard, its images are extracted again", str(exc).splitlines()[0])
                self._maps = {k: v for k, v in self._maps.items() if k[0] != shard.name}
                shutil.rmtree(shard)
                removed += 1
        present = {f"shards/{p.name}/" for p in self._shard_dirs()}
        kept = {k: v for k, v in recorded.items() if k[: k.rfind("/") + 1] in present}
        if "checksums" in self.manifest and kept != recorded:
            self.manifest["checksums"] = kept
            write_json_atomic(self.root / "manifest.json", self.manifest)
        self._index = None
        return removed

    def remove_stale_shards(self) -> int:
        """Delete temporaries of interrupted shard writes; returns how many."""
        folder = self.root / "shards"
        stale = [p for p in folder.iterdir() if TEMP_MARKER in p.name] if folder.is_dir() else []
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return len(stale)

    # -- reading --------------------------------------------------------------------
    def _load(self, shard: str, name: str, mmap: bool) -> np.ndarray:
        """One shard file, checked against its recorded checksum and its own header."""
        rel = f"shards/{shard}/{name}"
        return load_npy(self.root / rel, self._repair_hint, mmap, self.manifest.get("checksums", {}).get(rel))

    def _array(self, shard: str, target: str) -> np.ndarray:
        key = (shard, target)
        if key not in self._maps:
            self._maps[key] = self._load(shard, f"{target}.npy", mmap=True)
        return self._maps[key]

    def get(self, ids, targets=None, dtype=np.float32, token: int | None = None) -> dict[str, np.ndarray]:
        """Features of ``ids`` (in that order): ``{target: (n, tokens, embed_dim)}``; with ``token``, only that
        token of each row, ``(n, embed_dim)`` (reads a fraction of the bytes). ``targets`` defaults to all
        the store holds (BrainMCLIP's three for a store made by ``extract``)."""
        targets = self.targets if targets is None else targets
        index = self._build_index()
        ids = np.asarray(ids, np.int64).ravel()
        missing = [int(i) for i in ids if int(i) not in index]
        if missing:
            raise InvalidInputError(f"{len(missing)} images not in the feature store {self.root} (first NSD "
                                    f"id {missing[0]}); "
                                    f"run brainmclip {self.command} on the prepared dataset first")
        out = {}
        for target in targets:
            if target not in self.targets:
                raise InvalidInputError(f"Unknown target={target!r}; choose from {list(self.targets)} (the targets "
                                        f"of {self.root})")
            first = self._array(index[int(ids[0])][0], target) if len(ids) else None
            shape = first.shape[1:] if first is not None else (0,)
            if token is not None:
                shape = shape[1:]
            result = np.empty((len(ids), *shape), dtype)
            by_shard: dict[str, list[tuple[int, int]]] = {}
            for pos, nsd_id in enumerate(ids.tolist()):
                shard, row = index[nsd_id]
                by_shard.setdefault(shard, []).append((pos, row))
            for shard, pairs in by_shard.items():
                pos, rows = map(np.array, zip(*pairs, strict=True))
                block = self._array(shard, target)
                result[pos] = block[rows] if token is None else block[rows, token]
            out[target] = result
        return out


def open_feature_store(root: str | os.PathLike) -> FeatureStore:
    """Open an existing store for reading."""
    root = Path(root)
    # A store is usable while it grows: shards are complete on their own, so no "complete" flag.
    manifest = read_manifest(root, STORE_FORMAT, "a feature store", "extract", complete=False)
    return FeatureStore(root, manifest)
