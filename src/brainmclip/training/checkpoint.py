"""Checkpoints: written atomically, read with torch's safe (weights-only) loader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from brainmclip.atomic import atomic_path
from brainmclip.errors import MissingInputError

__all__ = ["save_checkpoint", "load_checkpoint", "identity_of", "same_identities"]


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    if not Path(path).is_file():
        raise MissingInputError(f"{path}: no checkpoint")
    # weights_only: tensors, dicts, lists, numbers and strings only; no arbitrary code on load.
    return torch.load(path, map_location="cpu", weights_only=True)


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
