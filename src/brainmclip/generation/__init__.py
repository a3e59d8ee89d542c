"""Image generation from predicted CLIP embeddings (Versatile Diffusion dual guidance)."""

from brainmclip.generation.versatile_diffusion import (
    IMAGE_TOKENS,
    TEXT_TOKENS,
    VersatileDiffusionGenerator,
    best_of_n,
    cosine_scorer,
    load_versatile_diffusion,
    tiny_versatile_diffusion,
)

__all__ = [
    "IMAGE_TOKENS",
    "TEXT_TOKENS",
    "VersatileDiffusionGenerator",
    "best_of_n",
    "cosine_scorer",
    "load_versatile_diffusion",
    "tiny_versatile_diffusion",
]
