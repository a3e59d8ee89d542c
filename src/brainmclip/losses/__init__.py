"""Training losses: reconstruction, CKA, Sims, contrastive, and BrainMCLIP's multi-granularity sum."""

from __future__ import annotations

from brainmclip.losses.cka import center_gram, cka_loss, hsic, linear_cka, token_cka
from brainmclip.losses.contrastive import info_nce, soft_clip
from brainmclip.losses.multi_granularity import LOSS_TERMS, LossWeights, multi_granularity_loss
from brainmclip.losses.reconstruction import cosine_loss, gaussian_kl, mse
from brainmclip.losses.sims import sims_loss, token_similarity

__all__ = [
    "LOSS_TERMS",
    "LossWeights",
    "center_gram",
    "cka_loss",
    "cosine_loss",
    "gaussian_kl",
    "hsic",
    "info_nce",
    "linear_cka",
    "mse",
    "multi_granularity_loss",
    "sims_loss",
    "soft_clip",
    "token_cka",
    "token_similarity",
]
