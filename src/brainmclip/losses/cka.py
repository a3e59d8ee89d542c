"""Centred kernel alignment (CKA): a batch-level similarity of representational geometry.

Linear CKA (Kornblith et al., 2019) compares two sets of embeddings through their sample-by-sample
Gram matrices, so it asks "do the two representations arrange the samples the same way?" rather
than "are the vectors equal?". It is invariant to isotropic scaling and to orthogonal transforms of
either feature space, which is why BrainMCLIP uses ``1 - CKA`` next to an element-wise MSE.

Everything here works on ``n x n`` Gram matrices, never on ``d x d`` feature covariances: CLIP
token stacks have ``m * d = 257 * 768`` features per sample but batches of only tens of samples.

For the linear kernel, centring the Gram matrix equals centring the features first
(``H X Xᵀ H = (HX)(HX)ᵀ``). The losses centre first, in float32 with autocast off: CLIP stacks
share a component across samples that is far larger than what tells them apart, and a Gram
matrix formed before centring (in bf16 under autocast, or even float32 for near-identical
samples) has lost that difference to rounding by the time the mean is subtracted.
"""

from __future__ import annotations

import torch

from brainmclip.errors import InvalidInputError
from brainmclip.losses.precision import full_precision

__all__ = ["center_gram", "hsic", "linear_cka", "token_cka", "cka_loss"]

# Floor for each self-HSIC before the square root; keeps the gradient finite when one batch is
# degenerate (all samples identical, so its centred Gram matrix is zero). The CKA is then 0.
_EPS = 1e-12


def center_gram(K: torch.Tensor) -> torch.Tensor:
    """Double-centre Gram matrices: ``H K H`` with ``H = I - 11ᵀ/n``, without forming ``H``.

    Parameters
    ----------
    K : torch.Tensor, shape (..., n, n)
        Gram matrices; leading dimensions are batch dimensions.

    Returns
    -------
    torch.Tensor, shape (..., n, n)
        ``K`` with row means, column means removed and the grand mean added back.
    """
    row_mean = K.mean(dim=-1, keepdim=True)
    col_mean = K.mean(dim=-2, keepdim=True)
    grand_mean = K.mean(dim=(-2, -1), keepdim=True)
    return K - row_mean - col_mean + grand_mean


def hsic(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Biased empirical HSIC: ``tr(K H L H) / (n - 1)^2``.

    Because ``H`` is idempotent, ``tr(K H L H) = tr((H K H)(H L H))``, and the trace of a product
    is the element-wise sum ``sum_ij Kc_ij Lc_ji``; so the cost is ``O(n^2)`` after centring.

    Parameters
    ----------
    K, L : torch.Tensor, shape (..., n, n)
        Gram (kernel) matrices over the same ``n`` samples, ``n >= 2``.

    Returns
    -------
    torch.Tensor, shape (...)
        HSIC per leading batch index (a 0-d tensor for plain ``(n, n)`` inputs).
    """
    if K.shape != L.shape or K.ndim < 2 or K.shape[-1] != K.shape[-2]:
        raise InvalidInputError(f"hsic needs two square Gram matrices of one shape, got {tuple(K.shape)} and "
                                f"{tuple(L.shape)}")
    n = K.shape[-1]
    if n < 2:
        raise InvalidInputError(f"hsic needs at least 2 samples, got n={n}")
    Kc, Lc = center_gram(K), center_gram(L)
    # Transpose L so the element-wise sum is the trace of the product even for non-symmetric kernels.
    return (Kc * Lc.transpose(-1, -2)).sum(dim=(-2, -1)) / (n - 1) ** 2


@full_precision
def _cka_from_features(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of feature matrices ``X: (..., n, p)`` and ``Y: (..., n, q)`` -> shape (...)."""
    X = X - X.mean(dim=-2, keepdim=True)
    Y = Y - Y.mean(dim=-2, keepdim=True)
    K = X @ X.transpose(-1, -2)
    L = Y @ Y.transpose(-1, -2)
    cross = hsic(K, L)
    # Clamp before the square root: sqrt has an infinite slope at 0, and the clamp's zero
    # gradient would otherwise meet it as 0 * inf = nan.
    norm_k = hsic(K, K).clamp_min(_EPS).sqrt()
    norm_l = hsic(L, L).clamp_min(_EPS).sqrt()
    return cross / (norm_k * norm_l)


def linear_cka(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Linear CKA between two batches of embeddings, each sample flattened to one vector.

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = A Aᵀ`` and ``L = B Bᵀ`` the
    ``n x n`` Gram matrices of the flattened samples.

    Parameters
    ----------
    A, B : torch.Tensor, shape (n, m, d) or (n, d)
        Two embeddings of the same ``n >= 2`` samples; feature sizes may differ.

    Returns
    -------
    torch.Tensor, shape ()
        CKA in ``[0, 1]`` (up to rounding); 1 means identical geometry up to rotation and scale.
    """
    _check_batches(A, B)
    return _cka_from_features(A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1))


def token_cka(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Per-sample linear CKA across tokens: the ``m`` tokens of a sample are the CKA's samples.

    Parameters
    ----------
    A, B : torch.Tensor, shape (n, m, d)
        Token embeddings, ``m >= 2``.

    Returns
    -------
    torch.Tensor, shape (n,)
        CKA of each sample's ``(m, d)`` token matrices.
    """
    if A.ndim != 3 or B.ndim != 3 or A.shape[:2] != B.shape[:2]:
        raise InvalidInputError(f"token-level CKA needs (n, m, d) inputs with equal n, m; got "
                                f"{tuple(A.shape)}, {tuple(B.shape)}")
    return _cka_from_features(A, B)


def cka_loss(A: torch.Tensor, B: torch.Tensor, token_level: bool = False) -> torch.Tensor:
    """``1 - CKA``: batch-level by default, or the mean of per-sample token-level CKAs.

    Parameters
    ----------
    A, B : torch.Tensor, shape (n, m, d) or (n, d)
        Embeddings of the same samples; ``token_level=True`` needs ``(n, m, d)`` with ``m >= 2``.
    token_level : bool
        If False, CKA over the ``n`` flattened samples (needs ``n >= 2``). If True, CKA over each
        sample's ``m`` tokens, averaged over samples.

    Returns
    -------
    torch.Tensor, shape ()
        The loss, 0 for representations with identical geometry.
    """
    if token_level:
        return 1.0 - token_cka(A, B).mean()
    return 1.0 - linear_cka(A, B)


def _check_batches(A: torch.Tensor, B: torch.Tensor) -> None:
    if A.ndim < 2 or B.ndim < 2 or A.shape[0] != B.shape[0]:
        raise InvalidInputError(f"CKA needs two batches of the same samples, got {tuple(A.shape)} and {tuple(B.shape)}")
    if A.shape[0] < 2:
        raise InvalidInputError(f"batch-level CKA needs at least 2 samples, got n={A.shape[0]}")
