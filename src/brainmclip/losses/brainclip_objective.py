"""BrainCLIP's objective: contrastive alignment of fMRI embeddings with CLIP image and text embeddings.

    L = α · InfoNCE(f, v) + β · InfoNCE(f, t) [+ w_KL · KL(q(z | fMRI) || N(0, I)) for the VAE mapping]

with symmetric InfoNCE at temperature τ over the batch (every other item is a negative). Supervision
modes are weightings: V (α=1, β=0), T (α=0, β=1), V&T (both positive).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brainmclip.losses.contrastive import info_nce
from brainmclip.losses.reconstruction import gaussian_kl

__all__ = ["BrainCLIPLoss", "brainclip_loss"]


@dataclass(frozen=True)
class BrainCLIPLoss:
    total: torch.Tensor
    image: torch.Tensor | None
    text: torch.Tensor | None
    kl: torch.Tensor | None


def brainclip_loss(embedding: torch.Tensor, image: torch.Tensor | None, text: torch.Tensor | None, alpha: float,
                   beta: float, temperature: float, mu: torch.Tensor | None = None,
                   logvar: torch.Tensor | None = None, kl_weight: float = 0.0) -> BrainCLIPLoss:
    """The weighted loss of one batch; a term whose weight is 0 is not computed (its target may be None)."""
    total = embedding.new_zeros((), dtype=torch.float32)
    img = txt = kl = None
    if alpha > 0:
        img = info_nce(embedding, image, temperature)
        total = total + alpha * img
    if beta > 0:
        txt = info_nce(embedding, text, temperature)
        total = total + beta * txt
    if mu is not None and kl_weight > 0:
        kl = gaussian_kl(mu.float(), logvar.float())
        total = total + kl_weight * kl
    return BrainCLIPLoss(total, img, txt, kl)
