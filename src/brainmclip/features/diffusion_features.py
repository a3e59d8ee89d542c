"""Stable Diffusion's own targets for MindDiffuser: the caption text embedding c and the VAE latent z.

Both take ready-built diffusers / transformers components (real ones loaded by the generation
stage, tiny random ones in tests), so this module only fixes the conventions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from brainmclip.errors import InvalidInputError
from brainmclip.features.tokenizer import tokenize

__all__ = ["encode_sd_text", "encode_vae_latents"]


@torch.no_grad()
def encode_sd_text(text_encoder, tokenizer, captions: Sequence[Sequence[str]]) -> torch.Tensor:
    """c: SD's text conditioning (``last_hidden_state``, 77 tokens for SD v1) averaged over each image's captions.

    Returns float32 of shape (n_images, context_length, hidden_size).
    """
    flat = [text for caps in captions for text in caps]
    if any(not caps for caps in captions):
        raise InvalidInputError("every image needs at least one caption for the SD text embedding")
    device = next(text_encoder.parameters()).device
    ids, _ = tokenize(tokenizer, flat, int(text_encoder.config.max_position_embeddings))
    hidden = text_encoder(input_ids=ids.to(device)).last_hidden_state.float().cpu()
    owner = torch.repeat_interleave(torch.tensor([len(c) for c in captions]))
    sums = torch.zeros(len(captions), *hidden.shape[1:])
    sums.index_add_(0, owner, hidden)
    return sums / torch.bincount(owner, minlength=len(captions))[:, None, None]


@torch.no_grad()
def encode_vae_latents(vae, images, size: int = 512, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """z: the VAE latent of each image resized to ``size`` (float32, (n, C, size/8, size/8)).

    Images are uint8 (n, H, W, 3); pixels go to [-1, 1] as SD expects, and the latent is the
    posterior mean (or a sample) times the VAE's scaling factor.
    """
    images = torch.as_tensor(np.asarray(images))
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidInputError(f"images of dtype {images.dtype} and shape {tuple(images.shape)}; expected "
                                f"uint8 (n, H, W, 3)")
    x = TF.resize(images.permute(0, 3, 1, 2), [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    x = x.float() / 127.5 - 1.0
    device = next(vae.parameters()).device
    posterior = vae.encode(x.to(device)).latent_dist
    z = posterior.sample(generator) if sample else posterior.mean
    return (z * vae.config.scaling_factor).float().cpu()
