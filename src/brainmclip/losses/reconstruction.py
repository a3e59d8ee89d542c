"""Element-wise reconstruction losses and the VAE prior term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brainmclip.errors import InvalidInputError
from brainmclip.losses.precision import full_precision

__all__ = ["mse", "cosine_loss", "gaussian_kl"]


@full_precision
def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements.

    Parameters
    ----------
    a, b : torch.Tensor, same shape (e.g. (n, m, d))

    Returns
    -------
    torch.Tensor, shape ()
    """
    if a.shape != b.shape:
        raise InvalidInputError(f"mse needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return F.mse_loss(a, b)


@full_precision
def cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - mean_i cos(a_i, b_i)`` with each sample flattened to one vector.

    Parameters
    ----------
    a, b : torch.Tensor, shape (n, ...), same shape

    Returns
    -------
    torch.Tensor, shape ()
        In ``[0, 2]``; 0 when every pair points the same way.
    """
    if a.shape != b.shape or a.ndim < 1:
        raise InvalidInputError(f"cosine_loss needs equal (n, ...) shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    cos = F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=-1)
    return 1.0 - cos.mean()


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, diag(exp(logvar))) || N(0, I))``, summed over dimensions, averaged over the batch.

    Per sample: ``-0.5 * sum(1 + logvar - mu^2 - exp(logvar))``.

    Parameters
    ----------
    mu, logvar : torch.Tensor, shape (n, ...), same shape
        Posterior mean and log-variance; all non-batch dimensions are summed.

    Returns
    -------
    torch.Tensor, shape ()
    """
    if mu.shape != logvar.shape or mu.ndim < 1:
        raise InvalidInputError(f"gaussian_kl needs equal (n, ...) shapes, got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    per_element = 1.0 + logvar - mu.pow(2) - logvar.exp()
    return (-0.5 * per_element.reshape(mu.shape[0], -1).sum(dim=-1)).mean()
