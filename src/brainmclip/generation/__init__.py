"""Image generation from predicted CLIP embeddings (Versatile Diffusion dual guidance)."""

from brainmclip.generation.versatile_diffusion import (
    VersatileDiffusionGenerator,
    best_of_n,
    cosine_scorer,
    load_versatile_diffusion,
    tiny_versatile_diffusion,
)

__all__ = [
    "VersatileDiffusionGenerator",
    "best_of_n",
    "cosine_scorer",
    "load_versatile_diffusion",
    "tiny_versatile_diffusion",
]
