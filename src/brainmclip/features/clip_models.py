"""Load CLIP towers: real weights from a local folder or an existing cache, or random ones from a config.

Nothing is downloaded. ``load_clip("openai/clip-vit-large-patch14")`` looks for a local folder
of that name, then the Hugging Face cache; when neither has it, it stops at once and says
where it looked. ``load_clip("mini")`` loads mini-CLIP, the small CLIP trained on the simulated
scene world that ships with the package (:mod:`brainmclip.miniature`), from its folder like any
real model. ``load_clip("tiny")`` (or any name of a JSON file in ``configs/``) builds seeded
random towers with the configured sizes, for fast tests and benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.features.tokenizer import load_clip_tokenizer
from brainmclip.quiet import quiet_hf_loading

__all__ = ["ClipTowers", "load_clip", "random_clip", "list_random_configs", "resolve_model_folder", "DEFAULT_CLIP"]

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


@dataclass
class ClipTowers:
    """CLIP's vision and text towers with projections, the tokenizer, and what they are."""

    vision: CLIPVisionModelWithProjection
    text: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    identity: dict

    @property
    def embed_dim(self) -> int:
        return self.vision.config.projection_dim

    @property
    def n_vision_layers(self) -> int:
        return self.vision.config.num_hidden_layers

    @property
    def n_image_tokens(self) -> int:
        config = self.vision.config
        return (config.image_size // config.patch_size) ** 2 + 1

    @property
    def context_length(self) -> int:
        """Text tokens per caption (77 for OpenAI's CLIP): the text tower's position embeddings."""
        return int(self.text.config.max_position_embeddings)


def list_random_configs() -> list[str]:
    files = resources.files(__package__).joinpath("configs").iterdir()
    return sorted(f.name[: -len(".json")].removeprefix("clip_") for f in files if f.name.startswith("clip_"))


def random_clip(name: str = "tiny") -> ClipTowers:
    """Seeded random CLIP towers from ``configs/clip_<name>.json`` (offline tokenizer)."""
    if name not in list_random_configs():
        raise InvalidInputError(f"Unknown random CLIP config={name!r}; choose from {list_random_configs()}")
    text = resources.files(__package__).joinpath("configs").joinpath(f"clip_{name}.json").read_text()
    config = json.loads(text)
    torch.manual_seed(config["seed"])
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**config["vision"])).eval()
    text_model = CLIPTextModelWithProjection(CLIPTextConfig(**config["text"])).eval()
    identity = {"model": f"random:{name}", "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
                "seed": config["seed"], "weights": "random-initialised (uncalibrated)"}
    return ClipTowers(vision, text_model, load_clip_tokenizer(), identity)


def _hf_cache_dir() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def _resolve_local(model: str) -> tuple[Path, dict]:
    """A folder for ``model``: the path itself, or the cached snapshot of a hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path, {"model": str(path.resolve()), "source": "local folder"}
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise MissingInputError(
            f"CLIP model {model!r} not found: no folder {path.resolve()} and no copy in the Hugging Face cache "
            f"{_hf_cache_dir()} (nothing is downloaded here; copy the weights to a folder and pass its path)"
        ) from None
    return snapshot, {"model": model, "source": "huggingface cache", "revision": snapshot.name}


def _from_folder(cls, folder: Path):
    """One tower from a CLIP folder. A full CLIP checkpoint holds both towers, so the other tower's tensors are
    "unexpected" for each (transformers logs a table of them, silenced here); a *missing* tensor is an error."""
    with quiet_hf_loading(errors_only=True):
        # float32 whatever the files hold: miniature weights ship as float16, and CPU matmuls want float32.
        model, info = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise InvalidInputError(f"{folder}: {cls.__name__} weights incomplete (missing {missing[:3]})")
    return model.eval()


def resolve_model_folder(model: str) -> Path | None:
    """The local folder ``load_clip(model)`` reads ('mini' -> the shipped mini-CLIP), or None for random towers."""
    if model.startswith("random:") or model in ("tiny",):
        return None
    from brainmclip.miniature import is_miniature, model_folder

    if is_miniature(model):
        return model_folder("clip")
    return _resolve_local(model)[0]


def load_clip(model: str = DEFAULT_CLIP, device: str | torch.device = "cpu") -> ClipTowers:
    """CLIP towers from a local folder or cache, 'mini' (the shipped mini-CLIP), or ``random:<config>`` / 'tiny'."""
    from brainmclip.miniature import is_miniature, model_folder

    name = model.removeprefix("random:")
    if model.startswith("random:") or model in ("tiny",):
        towers = random_clip(name)
    else:
        if is_miniature(model):
            folder = model_folder("clip")
            identity = {"model": "mini", "source": "brainmclip miniature world (trained on simulated scenes)",
                        "folder": str(folder)}
        else:
            folder, identity = _resolve_local(model)
        required = ["config.json"]
        if not (folder / "config.json").is_file():
            raise MissingInputError(f"{folder}: no config.json; expected a transformers CLIP model folder")
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise MissingInputError(f"{folder}: no weights (*.safetensors or *.bin) beside {required[0]}")
        vision = _from_folder(CLIPVisionModelWithProjection, folder)
        text = _from_folder(CLIPTextModelWithProjection, folder)
        identity["config_sha256"] = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
        tokenizer = load_clip_tokenizer(folder, model_max_length=text.config.max_position_embeddings)
        towers = ClipTowers(vision, text, tokenizer, identity)
    towers.vision.to(device)
    towers.text.to(device)
    return towers


def environment_note() -> str:  # pragma: no cover - informational
    return f"HF cache: {_hf_cache_dir()}; HF_HOME={os.environ.get('HF_HOME', '(unset)')}"
