"""Sims loss: match how each token relates to the class token, not the tokens themselves.

For a CLIP token stack the class (first) token summarises the image; the cosine between it and
each patch/word token describes the within-sample structure. ``L_Sims`` is the MSE between these
profiles of prediction and target, and it is blind to per-token rescaling (cosine is scale free).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brainmclip.errors import InvalidInputError
from brainmclip.losses.precision import full_precision

__all__ = ["token_similarity", "sims_loss"]


def token_similarity(A: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of the first token with every other token, per sample.

    Parameters
    ----------
    A : torch.Tensor, shape (n, m, d)
        Token embeddings, ``m >= 2``; token 0 is the class (or end-of-text) token.
    eps : float
        Floor on the norms, as in :func:`torch.nn.functional.cosine_similarity`.

    Returns
    -------
    torch.Tensor, shape (n, m - 1)
        ``s[i, j - 1] = cos(A[i, 0], A[i, j])`` for ``j = 1 .. m - 1``.
    """
    if A.ndim != 3 or A.shape[1] < 2:
        raise InvalidInputError(f"token_similarity needs (n, m, d) with m >= 2 tokens, got {tuple(A.shape)}")
    return F.cosine_similarity(A[:, :1, :], A[:, 1:, :], dim=-1, eps=eps)


@full_precision
def sims_loss(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """MSE between the token-similarity profiles of ``A`` and ``B``.

    Parameters
    ----------
    A, B : torch.Tensor, shape (n, m, d)
        Target and prediction (the loss is symmetric).

    Returns
    -------
    torch.Tensor, shape ()
        ``mean((token_similarity(A) - token_similarity(B)) ** 2)`` over all ``n * (m - 1)`` entries.
    """
    if A.shape[:2] != B.shape[:2]:
        raise InvalidInputError(f"sims_loss needs matching (n, m), got {tuple(A.shape)} and {tuple(B.shape)}")
    return F.mse_loss(token_similarity(A), token_similarity(B))
