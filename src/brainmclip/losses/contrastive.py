"""Contrastive losses between predicted and target embeddings: CLIP's InfoNCE and MindEye's SoftCLIP.

Both flatten each sample to one vector and L2-normalise it, so only directions matter, and both
are symmetric over the two retrieval directions (prediction -> target and target -> prediction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brainmclip.errors import InvalidInputError
from brainmclip.losses.precision import full_precision

__all__ = ["info_nce", "soft_clip"]


def _flat_unit(x: torch.Tensor) -> torch.Tensor:
    """Flatten ``(n, ...)`` to ``(n, D)`` and scale each row to unit length."""
    return F.normalize(x.reshape(x.shape[0], -1), dim=-1)


def _check_pair(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> None:
    if pred.shape != target.shape or pred.ndim < 2:
        raise InvalidInputError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must be "
                                f"equal (n, ...) batches")
    if not temperature > 0:
        raise InvalidInputError(f"temperature must be positive, got {temperature}")


@full_precision
def info_nce(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric CLIP-style InfoNCE: sample ``i``'s positive is ``i``, the rest of the batch negatives.

    With unit vectors ``p_i``, ``t_j`` and ``S = P Tᵀ / temperature``::

        L = ( CE(S, arange(n)) + CE(Sᵀ, arange(n)) ) / 2

    where ``CE`` is the row-wise cross-entropy averaged over rows.

    Parameters
    ----------
    pred, target : torch.Tensor, shape (n, m, d) or (n, d)
        Predicted and target embeddings of the same ``n`` samples.
    temperature : float
        Softmax temperature (CLIP's learned value is about 0.01; 0.07 is the usual starting one).

    Returns
    -------
    torch.Tensor, shape ()
        The loss.
    """
    _check_pair(pred, target, temperature)
    logits = _flat_unit(pred) @ _flat_unit(target).T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@full_precision
def soft_clip(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """MindEye's SoftCLIP: InfoNCE with soft labels taken from the targets' own similarities.

    With unit vectors ``p_i``, ``t_j``::

        Y = softmax_rows(T Tᵀ / temperature)          # soft labels, symmetric logits
        S = P Tᵀ / temperature
        L = ( -mean_i sum_j Y_ij log softmax_rows(S)_ij
              -mean_i sum_j Y_ij log softmax_rows(Sᵀ)_ij ) / 2

    Targets that resemble each other share label mass, so near-duplicate images in a batch are not
    pushed apart as hard negatives. When the targets are mutually orthogonal and the temperature is
    low, ``Y`` tends to the identity and the loss to :func:`info_nce`.

    Parameters
    ----------
    pred, target : torch.Tensor, shape (n, m, d) or (n, d)
        Predicted and target embeddings of the same ``n`` samples.
    temperature : float
        Temperature of both the labels and the logits.

    Returns
    -------
    torch.Tensor, shape ()
        The loss (not zero at optimum: it is a cross-entropy against soft labels).
    """
    _check_pair(pred, target, temperature)
    t = _flat_unit(target)
    labels = (t @ t.T / temperature).softmax(dim=-1)
    logits = _flat_unit(pred) @ t.T / temperature
    forward = -(labels * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
    # T Tᵀ is symmetric, so the labels of the transposed direction are the same matrix.
    backward = -(labels * logits.T.log_softmax(dim=-1)).sum(dim=-1).mean()
    return (forward + backward) / 2
