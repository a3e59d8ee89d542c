"""The miniature world: small CLIP, Versatile Diffusion and Stable Diffusion trained by brainmclip on its scene world.

Random models make every reconstruction the same noise. These models are trained on the simulated scene distribution
(never on a simulated NSD stimulus, :mod:`brainmclip.miniature.world`), ship with the package as float16
safetensors, and load like real weights from ordinary model folders: ``--model mini`` (mini-CLIP),
``--generator mini`` (mini-VD), mini-SD by :func:`model_folder` ('sd'). Each folder has a model card with the
command that made it, its seed, code version, checksums and measured quality.

    brainmclip miniature train clip --out runs/miniature/clip
    brainmclip miniature train vd --clip runs/miniature/clip/model --out runs/miniature/vd
    brainmclip miniature train sd --clip runs/miniature/clip/model --vae runs/miniature/vd/model --out runs/miniature/sd
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = ["MINIATURE_MODELS", "MINIATURE_NAME", "is_miniature", "model_folder"]

#: Model kinds shipped in ``weights/<kind>``.
MINIATURE_MODELS = ("clip", "vd", "sd")
#: The name that selects a shipped miniature model wherever a model folder or hub id is accepted.
MINIATURE_NAME = "mini"


def is_miniature(name) -> bool:
    return str(name) == MINIATURE_NAME


def model_folder(kind: str) -> Path:
    """The folder of the shipped miniature model ``kind`` ('clip', 'vd' or 'sd')."""
    if kind not in MINIATURE_MODELS:
        raise InvalidInputError(f"Unknown miniature model={kind!r}; choose from {list(MINIATURE_MODELS)}")
    folder = Path(str(resources.files(__package__).joinpath("weights").joinpath(kind)))
    if not (folder / "model_card.json").is_file():
        raise MissingInputError(f"miniature {kind} weights missing at {folder} (a broken install; reinstall brainmclip, "
                                f"or train them with `brainmclip miniature train {kind}`)")
    return folder
