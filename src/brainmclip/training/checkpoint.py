"""Checkpoints: written atomically, read with torch's safe (weights-only) loader.

A damaged file (cut short, bytes overwritten) fails with one error naming it. ``torch.save``
writes a zip archive with a CRC-32 per record, which :func:`load_checkpoint` verifies before
unpickling; torch's own loader does not check them, and its messages suggest ``weights_only=False``,
which must never be followed for a file of unknown origin.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path

import torch

from brainmclip.atomic import atomic_path
from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = ["save_checkpoint", "load_checkpoint", "load_safetensors", "identity_of", "same_identities"]

CHECKPOINT_HINT = "the run cannot continue from it; start it again with brainmclip train --force (or a new --out)"
WEIGHTS_HINT = "train the run again with brainmclip train --force (or into a new --out)"


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    if not Path(path).is_file():
        raise MissingInputError(f"{path}: no checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and compares its CRC-32
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise InvalidInputError(f"{path}: truncated or corrupt checkpoint (not a complete zip archive: {exc}); "
                                f"{CHECKPOINT_HINT}") from None
    if bad is not None:
        raise InvalidInputError(f"{path}: corrupt checkpoint (CRC-32 check failed for record {bad}); "
                                f"{CHECKPOINT_HINT}")
    # weights_only: tensors, dicts, lists, numbers and strings only; no arbitrary code on load.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError) as exc:
        # torch's text is not shown: it recommends weights_only=False, which would run code from the file.
        raise InvalidInputError(f"{path}: corrupt checkpoint (torch cannot read it: {type(exc).__name__}); "
                                f"{CHECKPOINT_HINT}") from None


def load_safetensors(path: Path, json_metadata: tuple[str, ...] = ()) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors of a ``.safetensors`` file; the metadata keys in ``json_metadata`` are parsed.

    Any damage safetensors notices (a cut file, a broken header) and a missing or unparsable metadata
    entry is one error naming the file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, EOFError, ValueError, RuntimeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInputError(f"{path}: truncated or corrupt safetensors file ({first}); {WEIGHTS_HINT}") from None
    for key in json_metadata:
        try:
            metadata[key] = json.loads(metadata[key])
        except (KeyError, ValueError, TypeError):
            raise InvalidInputError(f"{path}: metadata {key!r} missing or not JSON; {WEIGHTS_HINT}") from None
    return metadata, state


def identity_of(manifest_file: Path) -> dict:
    """What a checkpoint remembers of its data: the manifest's path and a hash of its content."""
    text = Path(manifest_file).read_text()
    return {"path": str(Path(manifest_file).parent.resolve()), "manifest_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "format": json.loads(text).get("format")}


def same_identities(a: dict, b: dict) -> bool:
    """Whether two ``{name: identity_of(...)}`` maps name the same data, wherever it lies now.

    The manifests' hashes and formats decide; the recorded folder does not, so a run whose data
    and run folders were moved together still resumes.
    """
    def content(identities: dict) -> dict:
        return {name: {k: v for k, v in identity.items() if k != "path"} for name, identity in identities.items()}

    return content(a) == content(b)
