"""Model cards: how a miniature model was made (command, seed, code version, checksums) and how good it is.

Each exported model folder holds ``model_card.json`` (machine-readable) and ``README.md`` (the same, for people).
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch

from brainmclip import __version__
from brainmclip.atomic import write_bytes_atomic, write_json_atomic
from brainmclip.errors import MissingInputError
from brainmclip.integrity import sha256_file

__all__ = ["code_version", "file_checksums", "write_model_card", "read_model_card"]


def code_version() -> dict:
    """The package version and, when run from a git checkout, its commit and whether it had local changes."""
    info = {"brainmclip": __version__}
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "src"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        info.update(git_commit=commit, git_dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every weight and config file under ``folder`` (model cards excluded), by relative path."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name not in ("model_card.json", "README.md"):
            out[path.relative_to(folder).as_posix()] = sha256_file(path)
    return out


def _markdown(card: dict) -> str:
    lines = [f"# {card['name']}", "", card["description"], "",
             "Trained by brainmclip on its simulated scene world (never on a simulated NSD stimulus). Numbers here are "
             "miniature-world numbers: they say nothing about real CLIP / Versatile Diffusion / Stable Diffusion.", "",
             "## How it was made", "", f"    {card['command']}", "",
             f"- seed: {card['seed']}", f"- code: {json.dumps(card['code_version'])}",
             f"- training: {card['training']['seconds'] / 60:.1f} min on {card['training']['machine']}",
             f"- parameters: {card['parameters']:,}", ""]
    if card.get("quality"):
        lines += ["## Quality (measured by the command above on held-out scenes)", ""]
        for key, value in card["quality"].items():
            if isinstance(value, dict | list):
                value = json.dumps(value)
            lines.append(f"- {key}: {value}")
        lines.append("")
    lines += ["## Files (sha256)", ""] + [f"- `{name}`: `{digest}`" for name, digest in card["checksums"].items()]
    return "\n".join(lines) + "\n"


def write_model_card(folder: Path, name: str, description: str, command: str, seed: int, config: dict,
                     seconds: float, parameters: int, quality: dict | None = None) -> dict:
    card = {"name": name, "description": description, "command": command, "seed": int(seed), "config": config,
            "code_version": code_version(),
            "training": {"seconds": round(float(seconds), 1),
                         "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"},
            "parameters": int(parameters), "quality": quality or {}, "checksums": file_checksums(folder)}
    write_json_atomic(Path(folder) / "model_card.json", card)
    write_bytes_atomic(Path(folder) / "README.md", _markdown(card).encode())
    return card


def read_model_card(folder: Path) -> dict:
    path = Path(folder) / "model_card.json"
    if not path.is_file():
        raise MissingInputError(f"{path}: missing; not a miniature model folder")
    return json.loads(path.read_text())
