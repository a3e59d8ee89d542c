"""brainmclip: decode what a person saw from fMRI, via CLIP embeddings and diffusion models."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("brainmclip")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"

from brainmclip.data.synthetic import make_synthetic_nsd

__all__ = ["__version__", "make_synthetic_nsd"]
