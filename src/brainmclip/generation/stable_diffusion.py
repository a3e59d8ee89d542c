"""Stable Diffusion (v1 layout) from a local folder, the Hugging Face cache, or the shipped mini-SD; never downloads.

MindDiffuser reconstructs with Stable Diffusion v1.4 and BrainCLIP samples with it; both take the diffusers
``StableDiffusionPipeline`` this returns (its ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from brainmclip.errors import MissingInputError
from brainmclip.quiet import quiet_hf_loading

__all__ = ["SD_COMPONENTS", "DEFAULT_SD", "load_stable_diffusion", "stable_diffusion_folder", "stable_diffusion_identity"]

DEFAULT_SD = "CompVis/stable-diffusion-v1-4"
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def stable_diffusion_folder(path_or_id: str | os.PathLike) -> Path:
    """The local folder of a Stable Diffusion name: 'mini', a folder, or a hub id already in the cache."""
    from brainmclip.miniature import is_miniature, model_folder

    if is_miniature(path_or_id):
        return model_folder("sd")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise MissingInputError(f"{path_or_id}: not a folder of Stable Diffusion components")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except Exception as err:  # never download: a missing cache entry is the user's to fill
        raise MissingInputError(f"{path_or_id}: no local folder and not in the Hugging Face cache "
                                f"({type(err).__name__}); download it first or pass a local path") from None


def load_stable_diffusion(path_or_id: str | os.PathLike = DEFAULT_SD, device="cpu",
                          dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionPipeline`` (no safety checker) from a folder with SD's layout; 'mini' for mini-SD."""
    from diffusers import StableDiffusionPipeline

    root = stable_diffusion_folder(path_or_id)
    missing = [c for c in SD_COMPONENTS if not (root / c).is_dir()]
    if missing or not (root / "model_index.json").is_file():
        raise MissingInputError(f"{root}: not a Stable Diffusion folder (missing "
                                f"{', '.join(missing) or 'model_index.json'}; need {', '.join(SD_COMPONENTS)})")
    # The pipeline rewrites a scheduler's steps_offset to 1 with a deprecation warning on every load (mini-SD's
    # configuration says 0); setting it beforehand gives the same scheduler without the noise in the logs.
    import diffusers

    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    scheduler_class = getattr(diffusers, scheduler_config["_class_name"])
    extra = {"steps_offset": 1} if scheduler_config.get("steps_offset", 1) != 1 else {}
    scheduler = scheduler_class.from_pretrained(root / "scheduler", **extra)
    with quiet_hf_loading():
        pipe = StableDiffusionPipeline.from_pretrained(root, local_files_only=True, dtype=dtype,
                                                       safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def stable_diffusion_identity(path_or_id: str | os.PathLike) -> str:
    """sha256 over the SD components' configuration and weight files (names and paths left out): what decides the
    pixels a Stable Diffusion folder makes, wherever it lies."""
    import hashlib

    from brainmclip.generation.reconstruct import model_folder_identity

    root = stable_diffusion_folder(path_or_id)
    digest = hashlib.sha256()
    for component in SD_COMPONENTS:
        if (root / component).is_dir():
            digest.update(f"{component}\0{model_folder_identity(root / component)}\n".encode())
    return digest.hexdigest()
