"""BrainMCLIP's multi-granularity loss and its ablations, as one weighted sum.

The paper's ``L_MG(A, B) = MSE(A, B) + (1 - CKA(A, B)) + L_Sims(A, B)``: MSE pins individual
values, CKA the geometry of the batch, Sims the within-sample token structure. The ablation rows
(MSE+InfoNCE, MSE+SoftCLIP, MSE+Sims, MSE+CKA, MSE+CKA+Sims) are other :class:`LossWeights`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from brainmclip.errors import InvalidInputError
from brainmclip.losses.cka import cka_loss
from brainmclip.losses.contrastive import info_nce, soft_clip
from brainmclip.losses.reconstruction import mse
from brainmclip.losses.sims import sims_loss

__all__ = ["LossWeights", "LOSS_TERMS", "multi_granularity_terms", "multi_granularity_loss"]

# Names of the terms, in the order they are added; also the keys of the parts dictionary.
LOSS_TERMS = ("mse", "cka", "sims", "infonce", "softclip")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; a term with weight 0 is not computed at all.

    Attributes
    ----------
    mse, cka, sims, infonce, softclip : float
        Non-negative weights. The default is the paper's ``L_MG`` (MSE + (1 - CKA) + Sims).
    token_level_cka : bool
        Compute CKA across each sample's tokens (mean over samples) instead of across the batch.
    temperature : float
        Temperature of InfoNCE and SoftCLIP.
    """

    mse: float = 1.0
    cka: float = 1.0
    sims: float = 1.0
    infonce: float = 0.0
    softclip: float = 0.0
    token_level_cka: bool = False
    temperature: float = 0.07

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in LOSS_TERMS:
                w = getattr(self, f.name)
                if not (math.isfinite(w) and w >= 0):
                    raise InvalidInputError(f"loss weight {f.name}={w!r} must be finite and >= 0")
        if not self.temperature > 0:
            raise InvalidInputError(f"temperature must be positive, got {self.temperature!r}")

    def active(self) -> tuple[str, ...]:
        """Names of the terms with a positive weight, in :data:`LOSS_TERMS` order."""
        return tuple(name for name in LOSS_TERMS if getattr(self, name) > 0)


def multi_granularity_terms(target: torch.Tensor, pred: torch.Tensor,
                            weights: LossWeights | None = None) -> dict[str, torch.Tensor]:
    """The unweighted, differentiable value of every term with a positive weight (keys from :data:`LOSS_TERMS`).

    ``terms["cka"]`` is the loss ``1 - CKA``. Shapes as in :func:`multi_granularity_loss`.
    """
    if target.shape != pred.shape:
        raise InvalidInputError(f"target {tuple(target.shape)} and prediction {tuple(pred.shape)} differ in shape")
    weights = LossWeights() if weights is None else weights
    active = weights.active()
    if not active:
        raise InvalidInputError("every loss weight is 0; nothing to optimise")
    terms = {
        "mse": lambda: mse(pred, target),
        "cka": lambda: cka_loss(target, pred, token_level=weights.token_level_cka),
        "sims": lambda: sims_loss(target, pred),
        "infonce": lambda: info_nce(pred, target, weights.temperature),
        "softclip": lambda: soft_clip(pred, target, weights.temperature),
    }
    return {name: terms[name]() for name in active}


def multi_granularity_loss(target: torch.Tensor, pred: torch.Tensor,
                           weights: LossWeights | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum ``mse*MSE + cka*(1 - CKA) + sims*L_Sims + infonce*InfoNCE + softclip*SoftCLIP``.

    Parameters
    ----------
    target : torch.Tensor, shape (n, m, d) or (n, d)
        CLIP target embeddings (Sims needs the ``(n, m, d)`` form).
    pred : torch.Tensor, same shape as ``target``
        Predicted embeddings.
    weights : LossWeights, optional
        Which terms to use and how much; default ``LossWeights()``, the paper's ``L_MG``.

    Returns
    -------
    total : torch.Tensor, shape ()
        The differentiable weighted sum.
    parts : dict[str, torch.Tensor]
        For each computed term (key from :data:`LOSS_TERMS`), its unweighted value as a detached
        0-d float tensor; ``parts["cka"]`` is the loss ``1 - CKA``.
    """
    weights = LossWeights() if weights is None else weights
    terms = multi_granularity_terms(target, pred, weights)
    total = pred.new_zeros(())
    for name, value in terms.items():
        total = total + getattr(weights, name) * value
    return total, {name: value.detach().float() for name, value in terms.items()}
