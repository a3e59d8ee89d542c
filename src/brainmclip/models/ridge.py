"""Ridge regression from voxels to CLIP embeddings: the field's linear baseline.

The targets are very wide (a flattened 257 x 768 image-token embedding is 197,376 columns per
image) while there are only ~9,000 training images and ~15,000 voxels. Everything here is
therefore built on one thin SVD of the centred design matrix, ``X_c = U diag(s) V^T`` (rank
``k <= min(n_samples, n_features)``), which every alpha and every target column share:

    W(alpha) = V diag(s / (s^2 + alpha)) U^T Y_c

so a new alpha costs a rescaling of ``k`` numbers, never a new solve, and no code here loops
over target columns. Targets are streamed in blocks of ``target_chunk`` columns so memory stays
bounded however wide ``Y`` is; ``Y`` may be a (read-only, float16) memory map.

The SVD comes by default (``svd_solver="eigh"``) from the eigendecomposition of the smaller
Gram matrix in float64; ``"svd"`` calls ``torch.linalg.svd`` directly. With n_samples <=
n_features the CV folds never touch the voxel dimension: their held-out residuals follow from the
full-data decomposition by block inversion (one small solve per fold and alpha), or, where that is
estimated to cost more, each fold is factored from blocks of one n x n Gram matrix of X.

Alpha is chosen by contiguous K-fold cross-validation on the training rows (no shuffling by
default: neighbouring fMRI trials share slow drifts, so shuffled folds would leak). Two
selection modes:

* ``alpha_per="block"``: one alpha for all targets, the one with the lowest total validation
  squared error. Its CV never forms validation predictions: the summed squared error of fold
  ``f`` is a quadratic form in ``s / (s^2 + alpha)`` whose coefficients need only the target Gram
  matrix ``Y Y^T`` (n_samples x n_samples), accumulated in the same pass over ``Y`` that
  computes the refit's ``U^T Y_c``. The whole fit reads ``Y`` once and multiplies it twice,
  instead of once per fold and alpha.
* ``alpha_per="target"``: the best alpha for each target column (as himalaya does). This needs
  per-target validation errors, so each fold forms its validation predictions for every alpha,
  ``(X_val V) diag(s / (s^2 + alpha)) (U^T Y_train)``, block by block over targets.

The fitted model is kept in a compact form: ``V_`` (n_features, k) and ``B_`` (k, n_targets),
``B_[:, j] = diag(s / (s^2 + alpha_j)) U^T y_c[:, j]``, so that ``coef_ = V_ @ B_``. A dense
``coef_`` of 15,000 x 197,376 float32 would be 12 GB; the compact form is (15,000 + 197,376) x k
numbers and needs no grouping of targets by alpha at predict time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from brainmclip.atomic import atomic_path
from brainmclip.cpu_memory import keep_freed_memory
from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = [
    "DEFAULT_ALPHAS",
    "RIDGE_FORMAT",
    "RidgeCVScores",
    "RidgeDecoder",
    "RidgeDesign",
    "iter_ridge_svd",
    "kfold_indices",
    "ridge_cv_scores",
    "load_model_npz",
    "save_model_npz",
    "shrinkage",
    "solve_ridge_svd",
]

# Eight log-spaced values from 1e1 to 1e6. The best alpha grows with the number of samples and
# voxels; for z-scored NSD betas (~9k images x ~15k voxels) it typically lands around 1e4-1e5,
# well inside the grid, and the wide ends catch smaller or differently scaled inputs.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(1, 6, 8))
RIDGE_FORMAT = "brainmclip-ridge/1"

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
_ALPHA_MODES = ("block", "target")
_SVD_SOLVERS = ("eigh", "svd")
# Rows of the stacked (alphas x validation samples) products of the per-target CV: large enough
# for the matrix product to run near its peak rate, small enough that the (rows x target block)
# temporary stays a few hundred MB.
_STACKED_ROWS = 4096
# Target columns per validation product on CPU: on a 2-core x86 CPU a 3,200 x 1,600 float32 product ran
# at 88 GMAC/s on 2,048-4,096 columns and 62-74 on 16,384, whose output no longer stays in cache. A GPU
# takes the whole target block in one product.
_PRODUCT_COLUMNS = 4096
# Smallest alpha / (largest eigenvalue of X's Gram matrix) at which the CV may decompose its
# folds in float32 (see _fold_eigh_dtype).
_LOW_PRECISION_EIGH_MIN_ALPHA = 1e-4
# Matrices from this size on are decomposed by SciPy's LAPACK on CPU (see _eigh).
_SCIPY_EIGH_MIN_SIZE = 3000


# ----------------------------------------------------------------------------- validation


def _dtypes(dtype) -> tuple[np.dtype, torch.dtype]:
    np_dtype = np.dtype(dtype)
    if np_dtype not in _TORCH_DTYPES:
        raise InvalidInputError(f"dtype {np_dtype}; expected float32 or float64")
    return np_dtype, _TORCH_DTYPES[np_dtype]


def _check_X(X, name: str = "X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise InvalidInputError(f"{name} has shape {X.shape}; expected a 2-D (n_samples, n_features) array")
    if 0 in X.shape:
        raise InvalidInputError(f"{name} has shape {X.shape}; expected at least one sample and one feature")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise InvalidInputError(f"{name} has dtype {X.dtype}; expected real numbers")
    if not np.isfinite(X).all():
        raise InvalidInputError(f"{name} holds NaN or inf; expected finite values")
    return X


def _check_Y(Y, n_samples: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Return ``Y`` as a 2-D (n_samples, n_targets) view and its trailing shape.

    Finiteness is checked block by block as the targets are read (:func:`_target_block`): a
    single ``np.isfinite(Y)`` would allocate a boolean array as large as the (multi-GB) ``Y``.
    """
    Y = np.asarray(Y)
    if Y.ndim == 0:
        raise InvalidInputError("Y is a scalar; expected an (n_samples, ...) array")
    if len(Y) != n_samples:
        raise InvalidInputError(f"Y has {len(Y)} rows but X has {n_samples}; expected one row of Y per row of X")
    if not (np.issubdtype(Y.dtype, np.floating) or np.issubdtype(Y.dtype, np.integer)):
        raise InvalidInputError(f"Y has dtype {Y.dtype}; expected real numbers")
    if Y.size == 0:
        raise InvalidInputError(f"Y has shape {Y.shape}; expected at least one target")
    return Y.reshape(n_samples, -1), tuple(Y.shape[1:])


def _check_alphas(alphas) -> np.ndarray:
    alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if alphas.ndim != 1 or alphas.size == 0 or not (np.isfinite(alphas) & (alphas > 0)).all():
        raise InvalidInputError(f"alphas {alphas.tolist()}; expected a non-empty 1-D sequence of positive finite numbers")
    return alphas


def _target_slices(n_targets: int, target_chunk: int | None) -> list[slice]:
    if target_chunk is None:
        return [slice(0, n_targets)]
    if int(target_chunk) < 1:
        raise InvalidInputError(f"target_chunk={target_chunk}; expected a positive integer or None")
    step = int(target_chunk)
    return [slice(a, min(a + step, n_targets)) for a in range(0, n_targets, step)]


def _target_block(Y2: np.ndarray, sl: slice, np_dtype: np.dtype, device, check: bool = True) -> torch.Tensor:
    """Columns ``sl`` of ``Y2`` as a fresh tensor (own copy: Y may be a read-only float16 memmap).

    ``check=False`` skips the finiteness check, for a pass over columns an earlier pass checked.
    """
    block = torch.from_numpy(np.array(Y2[:, sl], dtype=np_dtype, order="C")).to(device)
    # A sum is finite unless a value is NaN or inf (or the sum overflows, which the full check
    # then clears); it reads the block without allocating a boolean copy of it.
    if check and not torch.isfinite(block.sum()) and not torch.isfinite(block).all():
        raise InvalidInputError(f"Y holds NaN or inf in target columns {sl.start}:{sl.stop}; expected finite values")
    return block


def _as_tensor(a: np.ndarray, np_dtype: np.dtype, device) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np_dtype, order="C")).to(device)


# ----------------------------------------------------------------------------- solver


class _Factors(NamedTuple):
    x_mean: torch.Tensor  # (n_features,), zeros without an intercept
    U: torch.Tensor  # (n_samples, k)
    s: torch.Tensor  # (k,)
    V: torch.Tensor  # (n_features, k)


def _check_solver(svd_solver: str) -> None:
    if svd_solver not in _SVD_SOLVERS:
        raise InvalidInputError(f"svd_solver={svd_solver!r}; expected one of {_SVD_SOLVERS}")


def _svd_factors(X: torch.Tensor, fit_intercept: bool, svd_solver: str = "eigh",
                 x_gram: torch.Tensor | None = None, eigh_dtype: torch.dtype = torch.float64) -> _Factors:
    """Thin SVD ``X - x_mean = U diag(s) V^T``.

    ``"svd"``: ``torch.linalg.svd(full_matrices=False)`` in X's precision; it keeps every
    direction, those with s ~ 0 (the centring null space, duplicated voxels) included: their
    weight s / (s^2 + alpha) is ~0 for any alpha > 0.

    ``"eigh"``: eigendecomposition of the smaller Gram matrix (n x n or p x p), formed and
    decomposed in float64, the other factor recovered as ``X^T U / s`` (or ``X V / s``). On
    a 2-core x86 CPU it factored a 1600 x 3000 float32 matrix 2-3x faster than LAPACK's
    divide-and-conquer SVD (which also slowed down most when the cores were shared), and
    float64 keeps the squared singular values accurate to ~1e-16 of the largest. Directions
    whose eigenvalue is at round-off level are dropped, so k can be below min(n, p); their
    weight would be below sqrt(round-off) / alpha. ``x_gram``, from :func:`_x_gram` on the same
    X, saves recomputing the n x n Gram matrix. ``eigh_dtype`` float32 halves the
    eigendecomposition's time where float32 accuracy is enough (the CV folds, :func:`_fold_eigh_dtype`).
    """
    if svd_solver == "svd":
        x_mean = X.mean(0) if fit_intercept else X.new_zeros(X.shape[1])
        U, s, Vh = torch.linalg.svd(X - x_mean, full_matrices=False)
        return _Factors(x_mean, U, s, Vh.mT)
    Xd, x_mean = _centred_float64(X, fit_intercept)
    wide = Xd.shape[0] <= Xd.shape[1]
    if x_gram is None or not wide:
        x_gram = Xd @ Xd.mT if wide else Xd.mT @ Xd
    s, Q = _gram_eigh(x_gram, max(Xd.shape), eigh_dtype)
    s, Q = s.double(), Q.double()
    other = (Xd.mT @ Q if wide else Xd @ Q) / s
    U, V = (Q, other) if wide else (other, Q)
    return _Factors(x_mean.to(X.dtype), U.to(X.dtype), s.to(X.dtype), V.to(X.dtype))


def _centred_float64(X: torch.Tensor, fit_intercept: bool) -> tuple[torch.Tensor, torch.Tensor]:
    Xd = X.to(torch.float64, copy=True)  # never centre the caller's tensor in place
    x_mean = Xd.mean(0) if fit_intercept else Xd.new_zeros(Xd.shape[1])
    Xd -= x_mean  # centred in float64 too: voxels can have large means
    return Xd, x_mean


def _gram_eigh(gram: torch.Tensor, max_dim: int,
               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and vectors from a Gram matrix, round-off directions dropped.

    ``dtype`` is the precision of the eigendecomposition (the Gram matrix itself is float64). The
    cut-off is float64's round-off level whatever ``dtype``: a float32 eigenvalue far below float32's
    resolution is inaccurate, but its direction's share of a ridge prediction, ``1 / (lambda +
    alpha)`` times a projection that is itself of order sqrt(lambda), stays as small as the exact
    one, while dropping every direction below float32's rank tolerance (~1e-4 of the largest
    eigenvalue) would discard directions that carry real weight at small alphas.
    """
    lam, Q = _eigh(gram.to(dtype))
    lam, Q = lam.flip(0), Q.flip(1)  # descending, as an SVD returns them
    keep = lam > lam[:1].clamp_min(0) * max_dim * torch.finfo(torch.float64).eps
    return lam[keep].sqrt(), Q[:, keep]


def _eigh(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix, LAPACK's divide and conquer.

    Large matrices on CPU go through SciPy's LAPACK (OpenBLAS) rather than torch's (MKL): on a
    2-core AMD EPYC it decomposed an 8,859-square float64 Gram matrix in 78 s against 100 s, a
    7,087-square float32 one in 24 s against 36 s, a 4,000-square float64 one in 7.5 s against
    11 s. Below a few thousand rows it is no faster, and OpenBLAS's threads keep spinning for a
    moment after each call, which slowed the next torch product by ~50 ms. Its BLAS threads are
    held to torch's thread count, so the thread policy (fewer threads beside busy processes)
    holds for it too.
    """
    if sym.device.type != "cpu" or sym.shape[0] < _SCIPY_EIGH_MIN_SIZE:
        return torch.linalg.eigh(sym)
    from scipy.linalg import eigh
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        lam, Q = eigh(sym.numpy(), driver="evd", check_finite=False)
    return torch.from_numpy(lam), torch.from_numpy(Q)


def _centred_blocks(K: torch.Tensor, tr: torch.Tensor, va: torch.Tensor,
                    fit_intercept: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks of a Gram matrix ``K = Z Z^T`` after centring the rows of Z on the training mean.

    ``K_c = (I - 1 w^T) K (I - w 1^T)`` with ``w = 1_T / n_T``. Returns the train-train block
    (n_T, n_T), the train-validation block (n_T, n_v) and the validation diagonal (n_v,).
    """
    K_tr = K[tr]
    Ktt, Ktv, diag_v = K_tr[:, tr], K_tr[:, va], K.diagonal()[va]
    if not fit_intercept:
        return Ktt, Ktv, diag_v
    k_mean = K_tr.mean(0)  # (n,) = K w, by symmetry
    m = k_mean[tr].mean()
    return (Ktt - k_mean[tr].unsqueeze(1) - k_mean[tr].unsqueeze(0) + m,
            Ktv - k_mean[tr].unsqueeze(1) - k_mean[va].unsqueeze(0) + m,
            diag_v - 2 * k_mean[va] + m)


def shrinkage(s, alphas):
    """Ridge filter factors ``s / (s^2 + alpha)``.

    Parameters
    ----------
    s : array or tensor of shape (k,)
        Singular values of the centred design matrix.
    alphas : array or tensor of shape (n_alphas,)
        Regularisation strengths, all > 0.

    Returns
    -------
    array or tensor of shape (n_alphas, k)
    """
    if isinstance(s, torch.Tensor):
        alphas = torch.as_tensor(alphas, dtype=s.dtype, device=s.device)
    else:
        s, alphas = np.asarray(s), np.asarray(alphas)
    return s[None, :] / (s[None, :] * s[None, :] + alphas.reshape(-1, 1))


def iter_ridge_svd(X, Y, alphas, *, fit_intercept: bool = True, target_chunk: int | None = None,
                   dtype=np.float64, device="cpu",
                   svd_solver: str = "eigh") -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Ridge coefficients for several alphas, one block of target columns at a time.

    One thin SVD of the centred ``X`` serves all alphas and all targets; only ``target_chunk``
    columns of ``Y`` are in memory at once.

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
    Y : array of shape (n_samples, ...)
        Trailing dimensions are flattened into n_targets columns.
    alphas : float or sequence of shape (n_alphas,)
        Positive regularisation strengths.
    fit_intercept : bool
        Centre X and Y on their column means (the intercept is not penalised).
    target_chunk : int or None
        Target columns per block; None for one block.
    dtype : float32 or float64
        Working precision.
    device : str or torch.device
    svd_solver : {"eigh", "svd"}
        How the thin SVD is computed (see :class:`RidgeDecoder`).

    Yields
    ------
    sl : slice
        The block's target columns.
    coefs : array of shape (n_alphas, n_features, block_size)
    intercepts : array of shape (n_alphas, block_size)
    """
    np_dtype, _ = _dtypes(dtype)
    _check_solver(svd_solver)
    X = _check_X(X)
    Y2, _ = _check_Y(Y, len(X))
    alphas = _check_alphas(alphas)
    Xt = _as_tensor(X, np_dtype, device)
    fac = _svd_factors(Xt, fit_intercept, svd_solver)
    F = shrinkage(fac.s, alphas)
    for sl in _target_slices(Y2.shape[1], target_chunk):
        Yb = _target_block(Y2, sl, np_dtype, device)
        y_mean = Yb.mean(0) if fit_intercept else Yb.new_zeros(Yb.shape[1])
        UtY = fac.U.mT @ (Yb - y_mean)
        coefs = torch.stack([(fac.V * f) @ UtY for f in F])  # a loop over alphas, never targets
        intercepts = y_mean - fac.x_mean @ coefs
        yield sl, coefs.cpu().numpy(), intercepts.cpu().numpy()


def solve_ridge_svd(X, Y, alphas, *, fit_intercept: bool = True, target_chunk: int | None = None,
                    dtype=np.float64, device="cpu", svd_solver: str = "eigh") -> tuple[np.ndarray, np.ndarray]:
    """Ridge coefficients for every alpha from one thin SVD: ``W(a) = V diag(s/(s^2+a)) U^T Y_c``.

    Materialises all coefficients; for very wide ``Y`` use :func:`iter_ridge_svd` (or
    :class:`RidgeDecoder`, which keeps a compact form) instead.

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
    Y : array of shape (n_samples, ...)
        Trailing dimensions are flattened into n_targets columns.
    alphas : float or sequence of shape (n_alphas,)
    fit_intercept, target_chunk, dtype, device, svd_solver
        As in :func:`iter_ridge_svd`; ``target_chunk`` bounds the temporaries only.

    Returns
    -------
    coefs : array of shape (n_alphas, n_features, n_targets)
        ``X @ coefs[i] + intercepts[i]`` predicts Y for ``alphas[i]`` (same convention as
        ``sklearn.linear_model.Ridge(alphas[i]).coef_.T``).
    intercepts : array of shape (n_alphas, n_targets)
    """
    np_dtype, _ = _dtypes(dtype)
    X = np.asarray(X)
    n_targets = int(np.prod(np.shape(Y)[1:], dtype=np.int64))
    n_alphas = _check_alphas(alphas).size
    coefs = intercepts = None
    for sl, c, b in iter_ridge_svd(X, Y, alphas, fit_intercept=fit_intercept, target_chunk=target_chunk,
                                   dtype=dtype, device=device, svd_solver=svd_solver):
        if coefs is None:
            coefs = np.empty((n_alphas, X.shape[1], n_targets), np_dtype)
            intercepts = np.empty((n_alphas, n_targets), np_dtype)
        coefs[:, :, sl], intercepts[:, sl] = c, b
    return coefs, intercepts


# ----------------------------------------------------------------------------- cross-validation


def kfold_indices(n_samples: int, n_folds: int, *, shuffle: bool = False,
                  seed: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """K-fold splits of ``range(n_samples)``, contiguous unless ``shuffle``.

    Fold sizes follow ``sklearn.model_selection.KFold``: the first ``n_samples % n_folds`` folds
    hold one extra sample.

    Parameters
    ----------
    n_samples : int
    n_folds : int
        Between 2 and n_samples.
    shuffle : bool
        Permute the samples (with ``seed``) before cutting the folds. Off by default: fMRI
        trials close in time share drifts, and contiguous folds keep them on one side.
    seed : int or None

    Returns
    -------
    list of (train, val)
        int64 index arrays; ``train`` is sorted.
    """
    if not isinstance(n_folds, (int, np.integer)) or not 2 <= n_folds <= n_samples:
        raise InvalidInputError(f"n_folds={n_folds!r}; expected an integer with 2 <= n_folds <= n_samples ({n_samples})")
    order = np.random.default_rng(seed).permutation(n_samples) if shuffle else np.arange(n_samples)
    sizes = np.full(n_folds, n_samples // n_folds)
    sizes[: n_samples % n_folds] += 1
    folds, start = [], 0
    for size in sizes:
        val = order[start:start + size]
        mask = np.ones(n_samples, bool)
        mask[val] = False
        folds.append((np.flatnonzero(mask).astype(np.int64), val.astype(np.int64)))
        start += size
    return folds


class RidgeCVScores(NamedTuple):
    """Validation errors of :func:`ridge_cv_scores`.

    Attributes
    ----------
    mse : array of shape (n_alphas,)
        Squared error summed over all validation predictions (every sample is validated once)
        and divided by n_samples * n_targets.
    target_mse : array of shape (n_alphas, n_targets) or None
        Per target: summed validation squared error / n_samples; None unless ``per_target``.
    """

    mse: np.ndarray
    target_mse: np.ndarray | None


def _x_gram(Xt: torch.Tensor, fit_intercept: bool, svd_solver: str) -> torch.Tensor | None:
    """The n x n float64 Gram matrix of X that every fold can be factored from, or None.

    Only for ``"eigh"`` with n_samples <= n_features, where a fold's Gram matrix is a (re-centred)
    block of it: the folds then cost an n_T x n_T eigendecomposition each and never touch the
    voxel dimension again.
    """
    if svd_solver != "eigh" or Xt.shape[0] > Xt.shape[1]:
        return None
    Xd, _ = _centred_float64(Xt, fit_intercept)  # global centring; folds re-centre exactly
    return Xd @ Xd.mT


class RidgeDesign:
    """Everything ridge computes from the voxel matrix alone, shared by every target fitted on it.

    The full-data thin SVD (``factors``), the n x n Gram matrix the folds are cut from (``x_gram``;
    ``"eigh"`` with n_samples <= n_features only) and, with ``cache=True``, each CV fold's factors,
    computed on first use per precision. Without ``cache`` the fold factors are made one fold at a
    time and dropped, as one fit needs.

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
    fit_intercept, svd_solver, dtype, device
        As in :class:`RidgeDecoder`; a decoder can only use a design made with its own values.
    cache : bool
        Keep the fold factors (and U) for later fits.
    """

    def __init__(self, X, *, fit_intercept: bool = True, svd_solver: str = "eigh", dtype=np.float32, device="cpu",
                 cache: bool = False):
        _check_solver(svd_solver)
        self.np_dtype, _ = _dtypes(dtype)
        self.X = _check_X(X)
        self.fit_intercept, self.svd_solver, self.device, self.cache = fit_intercept, svd_solver, device, cache
        self.Xt = _as_tensor(self.X, self.np_dtype, device)
        self.x_gram = _x_gram(self.Xt, fit_intercept, svd_solver)
        self.factors = _svd_factors(self.Xt, fit_intercept, svd_solver, self.x_gram)
        self._folds: dict = {}

    def check_matches(self, decoder: RidgeDecoder, X) -> None:
        """One error unless ``decoder`` may use this design for ``X``."""
        mine = (self.fit_intercept, self.svd_solver, self.np_dtype, str(self.device))
        theirs = (decoder.fit_intercept, decoder.svd_solver, np.dtype(decoder.dtype), str(decoder.device))
        if mine != theirs:
            raise InvalidInputError(f"a RidgeDesign made with (fit_intercept, svd_solver, dtype, device) = {mine} "
                                    f"cannot serve a decoder with {theirs}; make it with decoder.design_for(X)")
        if X is not self.X and (np.shape(X) != self.X.shape or not np.array_equal(np.asarray(X), self.X)):
            raise InvalidInputError(f"X (shape {np.shape(X)}) is not the matrix this RidgeDesign was made from "
                                    f"(shape {self.X.shape}); expected the same X")

    def release_u(self) -> None:
        self.factors = self.factors._replace(U=None)

    def fold_factors(self, folds, eigh_dtype: torch.dtype):
        """Per fold ``(train, val, U, s, A)`` (see :func:`_fold_factors`), cached when ``cache``."""
        if not self.cache:
            return _fold_factors(self.Xt, folds, self.fit_intercept, self.svd_solver, self.x_gram, eigh_dtype)
        key = (tuple(tuple(v.tolist()) for _, v in folds), eigh_dtype)
        if key not in self._folds:
            self._folds[key] = list(_fold_factors(self.Xt, folds, self.fit_intercept, self.svd_solver, self.x_gram,
                                                  eigh_dtype))
        return self._folds[key]


def _fold_factors(Xt: torch.Tensor, folds, fit_intercept: bool, svd_solver: str, x_gram: torch.Tensor | None,
                  eigh_dtype: torch.dtype = torch.float64):
    """Per fold: training and validation row indices, U (n_T, k), s (k,) and ``A = X_v V`` (n_v, k).

    These are all the CV needs (never V itself). From ``x_gram`` when given (``A = K_vT U / s``
    since ``V = X_T^T U / s``), else from a thin SVD of the fold's training rows.
    """
    for train, val in folds:
        tr = torch.as_tensor(train, device=Xt.device)
        va = torch.as_tensor(val, device=Xt.device)
        if x_gram is None:
            fac = _svd_factors(Xt[tr], fit_intercept, svd_solver, eigh_dtype=eigh_dtype)
            yield tr, va, fac.U, fac.s, (Xt[va] - fac.x_mean) @ fac.V
        else:
            Gtt, Gtv, _ = _centred_blocks(x_gram, tr, va, fit_intercept)
            s, U = _gram_eigh(Gtt, max(len(train), Xt.shape[1]), eigh_dtype)
            s, U = s.double(), U.double()
            yield tr, va, U.to(Xt.dtype), s.to(Xt.dtype), ((Gtv.mT @ U) / s).to(Xt.dtype)


def _target_pass(Y2: np.ndarray, slices: list[slice], U: torch.Tensor | None, fit_intercept: bool, gram: str | None,
                 np_dtype: np.dtype, device) -> tuple[np.ndarray, np.ndarray | None, torch.Tensor | None]:
    """One pass over Y: column means, ``U^T Y_c`` (when U is given) and a Gram matrix of the targets.

    ``gram="samples"``: ``Y_c Y_c^T`` (n x n); ``gram="factors"``: ``(U^T Y_c)(U^T Y_c)^T`` (k x k,
    needs U); None: neither. Centring on the full-data mean does not change what the CV needs (each
    fold re-centres on its training mean, which is invariant to a constant shift) and keeps the Gram
    matrix well conditioned: CLIP embeddings share a large common component.
    """
    n, t = Y2.shape
    y_mean = np.zeros(t, np_dtype)
    UtY = None if U is None else np.empty((U.shape[1], t), np_dtype)
    K = None
    if gram:
        size = n if gram == "samples" else U.shape[1]
        K = torch.zeros((size, size), dtype=torch.float64, device=device)
    for sl in slices:
        Yb = _target_block(Y2, sl, np_dtype, device)
        if fit_intercept:
            mean = Yb.mean(0)
            Yb -= mean
            y_mean[sl] = mean.cpu().numpy()
        if U is not None:
            Bb = U.mT @ Yb
            UtY[:, sl] = Bb.cpu().numpy()
        if gram:
            Zb = Yb if gram == "samples" else Bb
            K += (Zb @ Zb.mT).double()  # each block in working precision, accumulated in float64
    return y_mean, UtY, K


def _fold_eigh_dtype(design: RidgeDesign, alphas: np.ndarray) -> torch.dtype:
    """The precision of the CV folds' eigendecompositions.

    The folds' factors only choose alpha, so they are decomposed in the working precision (float32
    halves the time; the refit stays float64) when every alpha is at least 1e-4 of the largest
    eigenvalue of X's Gram matrix. On voxels whose spectrum spans eight decades the float32
    validation errors were then within 5e-4 of float64's (at 1e-3 of it: 5e-5), while at alpha ~1e-8
    of it they were off by 26%; below the bound the folds are decomposed in float64.
    """
    if design.svd_solver != "eigh":
        return torch.float64
    lam_max = float(design.factors.s[0]) ** 2 if len(design.factors.s) else 0.0
    return design.Xt.dtype if alphas.min() >= _LOW_PRECISION_EIGH_MIN_ALPHA * lam_max else torch.float64


def _gram_cv_sse(design: RidgeDesign, K: torch.Tensor, alphas: np.ndarray, folds) -> np.ndarray:
    """Summed validation squared error per alpha, from the target Gram matrix alone.

    For a fold with train rows T and validation rows v, write ``B = U^T Y_T`` (train-centred),
    ``A = X_v V`` and ``f = s / (s^2 + alpha)``. The residual is ``R = Y_v - A diag(f) B`` so

        ||R||^2 = tr(Y_v Y_v^T) - 2 f . diag(B Y_v^T A) + f^T ((A^T A) * (B B^T)) f

    where ``B B^T = U^T (Y_T Y_T^T) U`` and ``B Y_v^T = U^T (Y_T Y_v^T)``: only blocks of the
    n x n Gram matrix appear, so no fold or alpha touches the (wide) targets again. The small
    algebra runs in float64 because the first two terms nearly cancel for good fits. The formula
    is exact for the predictor the fold's factors define, whatever their precision
    (:func:`_fold_eigh_dtype`).
    """
    alphas_t = torch.as_tensor(alphas, dtype=torch.float64, device=K.device)
    sse = torch.zeros(len(alphas), dtype=torch.float64, device=K.device)
    for tr, va, U, s, A in design.fold_factors(folds, _fold_eigh_dtype(design, alphas)):
        U, s, A = U.double(), s.double(), A.double()
        Ktt, Ktv, diag_v = _centred_blocks(K, tr, va, design.fit_intercept)
        tr_vv = diag_v.sum()
        H = U.mT @ Ktt @ U
        G = A.mT @ A
        c = ((U.mT @ Ktv) * A.mT).sum(1)
        F = shrinkage(s, alphas_t)
        sse += tr_vv - 2 * F @ c + ((F @ (G * H)) * F).sum(1)
    return sse.clamp_min(0).cpu().numpy()


def _alpha_groups(n_alphas: int, n_val: int) -> list[range]:
    """Alphas whose validation rows go through one matrix product: at most ``_STACKED_ROWS`` rows (at least one alpha)."""
    per_group = max(1, _STACKED_ROWS // n_val)
    return [range(a, min(a + per_group, n_alphas)) for a in range(0, n_alphas, per_group)]


def _prediction_costs(n_alphas: int, n_val: int, n_train: int, k: int, n_targets: int) -> dict[str, int]:
    """Multiply-adds of a fold's validation predictions in the hat and the factor order (see :func:`_direct_cv_sse`)."""
    return {"hat": n_alphas * n_val * n_train * (n_targets + k),
            "factor": (n_train * k + n_alphas * n_val * k) * n_targets}


def _prediction_form(n_alphas: int, n_val: int, n_train: int, k: int, n_targets: int) -> str:
    """``"hat"`` or ``"factor"``: the order of a fold's validation products with fewer multiply-adds."""
    costs = _prediction_costs(n_alphas, n_val, n_train, k, n_targets)
    return "hat" if costs["hat"] < costs["factor"] else "factor"


def _direct_cv_sse(design: RidgeDesign, Y2: np.ndarray, alphas: np.ndarray, folds, slices: list[slice],
                   np_dtype: np.dtype) -> np.ndarray:
    """Summed validation squared error per alpha and target, from explicit validation predictions.

    A fold's validation predictions for alpha ``a`` are ``A diag(f_a) U^T Y_T`` with ``A = X_v V``
    (n_v x k) and ``U`` (n_T x k). Two orders of the same product, chosen per fold by their
    multiply-adds per target column:

    * factor form: ``B = U^T Y_T`` once (n_T k), then ``(A * f_a) B`` per alpha (n_v k each);
    * hat form: the smoother rows ``H_a = (A * f_a) U^T`` (n_v x n_T, independent of the targets)
      once per fold, then ``H_a Y_T`` per alpha (n_v n_T each).

    With fewer samples than features (k = n_T, the fMRI case) the hat form skips the n_T x k x
    n_targets product ``B`` altogether, a third of the work at 8 alphas and 5 folds; with many
    more samples than features (k << n_T) the factor form is the cheaper one. Several alphas'
    rows go through one matrix product (larger products run closer to the peak rate).

    The folds are decomposed as :func:`_fold_eigh_dtype` says.
    """
    sse = np.zeros((len(alphas), Y2.shape[1]))
    n_alphas, t = len(alphas), Y2.shape[1]
    Xt, fit_intercept = design.Xt, design.fit_intercept
    eigh_dtype = _fold_eigh_dtype(design, alphas)
    for fold, (tr, va, U, s, A) in enumerate(design.fold_factors(folds, eigh_dtype)):
        F = shrinkage(s, alphas)  # (n_alphas, k)
        (n_t, k), n_v = U.shape, len(va)
        hat = _prediction_form(n_alphas, n_v, n_t, k, t) == "hat"
        groups = _alpha_groups(n_alphas, n_v)
        # (n_alphas, n_v, n_T) smoother rows, or (n_alphas, n_v, k) scaled validation factors
        left = (A[None] * F[:, None, :]) @ U.mT if hat else A[None] * F[:, None, :]
        for sl in slices:
            Yb = _target_block(Y2, sl, np_dtype, Xt.device, check=fold == 0)  # checked once, on the first read
            Y_tr, Y_va = Yb[tr], Yb[va]
            if fit_intercept:
                y_mean = Y_tr.mean(0)
                Y_tr -= y_mean
                Y_va -= y_mean
            right = Y_tr if hat else U.mT @ Y_tr
            for g in groups:
                left_g = left[g.start:g.stop].reshape(-1, left.shape[2])
                for c in _product_columns(right.shape[1], right.device):
                    P = (left_g @ right[:, c]).view(len(g), n_v, -1)
                    P -= Y_va[:, c]  # the residual, up to its sign
                    # Summed in the working precision (pairwise, over n_v terms), accumulated over folds in float64.
                    sse[g.start:g.stop, _offset(sl, c)] += P.square_().sum(1).cpu().numpy()
    return sse


def _product_columns(n_columns: int, device: torch.device) -> list[slice]:
    """Column slices of one validation product (see ``_PRODUCT_COLUMNS``)."""
    return _target_slices(n_columns, _PRODUCT_COLUMNS if device.type == "cpu" else None)


def _offset(sl: slice, c: slice) -> slice:
    """Columns ``c`` of target block ``sl`` as columns of all targets."""
    return slice(sl.start + c.start, sl.start + c.stop)


# -- K-fold CV from the full-data decomposition
#
# For the dual problem (fewer samples than voxels) every fold's held-out residuals follow from the
# fit on all samples, without decomposing the fold. Ridge with an unpenalised intercept solves
# M [c; b] = [y; 0] with M = [[G + alpha I, 1], [1^T, 0]] (G the centred Gram matrix of X), and
# the fit without rows v predicts them as M_vR M_RR^{-1} y_R (R = the other rows and the
# intercept). Block inversion of M gives, with W = M^{-1},
#
#     y_v - yhat_v = (W_vv)^{-1} (W [y; 0])_v.
#
# With G = U diag(lambda) U^T over the n - 1 directions orthogonal to the constant (U from the
# eigendecomposition the refit needs anyway), the top-left block of W is U diag(1/(lambda + alpha)) U^T,
# so the residuals of fold v are Z_v (U^T Y_c) with
#
#     Z_v = (U_v D U_v^T)^{-1} U_v D,   D = diag(1 / (lambda + alpha)):
#
# an n_v x n_v solve per fold and alpha, then products with the refit's own U^T Y_c (k x targets).
# Without an intercept the same holds with W = (G + alpha I)^{-1} over all n directions.


def _full_route_applies(design: RidgeDesign, alphas: np.ndarray) -> bool:
    """Whether the CV may take its folds' residuals from the full-data decomposition.

    It needs the dual eigendecomposition (n_samples <= n_features, ``"eigh"``) of full rank
    (directions dropped at round-off would need their own 1 / alpha term), and alphas for which
    the working precision suffices (the bound of :func:`_fold_eigh_dtype`; float64 X always).
    """
    if design.x_gram is None or design.factors.U is None:
        return False
    n, k = design.X.shape[0], len(design.factors.s)
    return k == n - int(design.fit_intercept) and _fold_eigh_dtype(design, alphas) == design.Xt.dtype


def _cv_route(design: RidgeDesign, alphas: np.ndarray, folds, n_targets: int, per_target: bool) -> str:
    """``"full"`` or ``"folds"``: the full-data route where it applies and is the cheaper one."""
    if not _full_route_applies(design, alphas):
        return "folds"
    sizes = [(len(tr), len(va)) for tr, va in folds]
    cheaper = _full_route_cheaper(design.X.shape[0], len(design.factors.s), len(alphas), sizes, n_targets,
                                  per_target)
    return "full" if cheaper else "folds"


def _full_route_cheaper(n: int, k: int, n_alphas: int, sizes: list[tuple[int, int]], n_targets: int,
                        per_target: bool) -> bool:
    """Whether the full-data route costs fewer estimated multiply-adds than decomposing every fold.

    ``sizes``: (training rows, validation rows) per fold. An eigendecomposition of an m x m matrix
    counts as 6 m^3 multiply-adds (LAPACK's tridiagonalisation is memory-bound: a 7,087-square
    float32 one took as long as 6 m^3 multiply-adds of matrix products on a 2-core x86 CPU);
    float64 products count twice.
    """
    a = n_alphas
    solve = sum(2 * 2 * n_v * n_v * k for _, n_v in sizes)  # W_vv and its solve, float64
    if per_target:
        # a dual fold keeps k = n_T directions
        folds_cost = sum(6 * n_t**3 + min(_prediction_costs(a, n_v, n_t, n_t, n_targets).values()) for n_t, n_v in sizes)
        full_cost = a * (solve + n * k * n_targets)
    else:
        folds_cost = sum(6 * n_t**3 + 2 * 2 * n_t**3 for n_t, _ in sizes)  # eigh + U^T K U (float64)
        full_cost = a * (solve + n * k * k)
    return full_cost < folds_cost


def _group_out_left(U: torch.Tensor, lam: torch.Tensor, alpha: float, va: torch.Tensor) -> torch.Tensor:
    """``Z_v = (U_v D U_v^T)^{-1} U_v D`` (n_v, k), float64: fold v's held-out residuals are ``Z_v U^T Y_c``."""
    Uvd = U[va] / (lam + alpha)
    return torch.linalg.solve(Uvd @ U[va].mT, Uvd)


def _full_factors(design: RidgeDesign) -> tuple[torch.Tensor, torch.Tensor]:
    fac = design.factors
    return fac.U.double(), fac.s.double().square()


def _full_gram_cv_sse(design: RidgeDesign, K_f: torch.Tensor, alphas: np.ndarray, folds) -> np.ndarray:
    """Summed validation squared error per alpha from ``K_f = (U^T Y_c)(U^T Y_c)^T`` (k x k).

    Fold v's error is ``||Z_v U^T Y_c||^2 = sum(Z_v * (Z_v K_f))``: a sum of squares, so no
    large terms cancel and the k^2 products may run in the working precision.
    """
    U, lam = _full_factors(design)
    work = design.Xt.dtype
    K_w = K_f.to(work)
    sse = torch.zeros(len(alphas), dtype=torch.float64, device=K_f.device)
    for _, val in folds:
        va = torch.as_tensor(val, device=U.device)
        for a, alpha in enumerate(alphas):
            Z = _group_out_left(U, lam, float(alpha), va).to(work)
            sse[a] += ((Z @ K_w) * Z).sum(1).double().sum()
    return sse.cpu().numpy()


def _full_direct_cv_sse(design: RidgeDesign, UtY: np.ndarray, alphas: np.ndarray, folds,
                        slices: list[slice]) -> np.ndarray:
    """Summed validation squared error per alpha and target from ``UtY = U^T Y_c`` (k, n_targets).

    Several alphas' ``Z_v`` go through one product with each block of ``UtY``, as in
    :func:`_direct_cv_sse`; Y itself is not read again.
    """
    U, lam = _full_factors(design)
    work = design.Xt.dtype
    n_alphas = len(alphas)
    sse = np.zeros((n_alphas, UtY.shape[1]))
    B = torch.from_numpy(UtY)  # column blocks of it are strided views, which BLAS reads in place
    for _, val in folds:
        va = torch.as_tensor(val, device=U.device)
        n_v = len(val)
        for g in _alpha_groups(n_alphas, n_v):
            Z = torch.cat([_group_out_left(U, lam, float(alphas[a]), va) for a in g]).to(work)
            for sl in slices:
                for c in _product_columns(sl.stop - sl.start, U.device):
                    cols = _offset(sl, c)
                    P = (Z @ B[:, cols].to(U.device)).view(len(g), n_v, -1)
                    sse[g.start:g.stop, cols] += P.square_().sum(1).cpu().numpy()
    return sse


def _cv_sse(design: RidgeDesign, Y2: np.ndarray, alphas: np.ndarray, folds, slices: list[slice], full: bool,
            K: torch.Tensor | None, UtY: np.ndarray | None) -> np.ndarray:
    """Validation squared error: per alpha from a target Gram matrix ``K`` (when given), else per alpha and target.

    ``full``: on the full-data route (``K`` the k x k Gram matrix of ``UtY = U^T Y_c``), else fold by fold
    (``K`` the n x n one of Y_c; the per-target errors read Y again).
    """
    if K is not None:
        return _full_gram_cv_sse(design, K, alphas, folds) if full else _gram_cv_sse(design, K, alphas, folds)
    if full:
        return _full_direct_cv_sse(design, UtY, alphas, folds, slices)
    return _direct_cv_sse(design, Y2, alphas, folds, slices, design.np_dtype)


def ridge_cv_scores(X, Y, alphas=DEFAULT_ALPHAS, *, n_folds: int = 5, shuffle: bool = False, seed: int | None = None,
                    fit_intercept: bool = True, per_target: bool = False, method: str = "auto",
                    target_chunk: int | None = 16384, dtype=np.float32, device="cpu",
                    svd_solver: str = "eigh") -> RidgeCVScores:
    """K-fold validation error of ridge regression for every alpha at once.

    Each fold's training rows get one thin SVD, shared by all alphas and all targets, or (fewer
    samples than features) the folds' residuals come from the full-data one (:func:`_cv_route`).

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
    Y : array of shape (n_samples, ...)
        Trailing dimensions are flattened into n_targets columns.
    alphas : sequence of shape (n_alphas,)
    n_folds : int
        Contiguous folds (see :func:`kfold_indices`).
    shuffle : bool
        Shuffle samples before cutting folds.
    seed : int or None
        For ``shuffle``.
    fit_intercept : bool
    per_target : bool
        Also return the error of every target column (needs ``method="direct"``).
    method : {"auto", "gram", "direct"}
        ``"gram"``: totals from a Gram matrix of the targets (n x n, or k x k on the full-data
        route), no validation predictions (one pass over Y); ``"direct"``: explicit validation
        predictions per alpha (one pass over Y per fold, or none beyond the first on the
        full-data route). ``"auto"`` takes ``"direct"`` when ``per_target``, else ``"gram"``.
    target_chunk : int or None
        Target columns in memory at once.
    dtype : float32 or float64
    device : str or torch.device
    svd_solver : {"eigh", "svd"}
        How each fold's thin SVD is computed (see :class:`RidgeDecoder`).

    Returns
    -------
    RidgeCVScores
    """
    np_dtype, _ = _dtypes(dtype)
    _check_solver(svd_solver)
    X = _check_X(X)
    Y2, _ = _check_Y(Y, len(X))
    alphas = _check_alphas(alphas)
    if method == "auto":
        method = "direct" if per_target else "gram"
    if method not in ("gram", "direct") or (per_target and method == "gram"):
        raise InvalidInputError(f"method={method!r} with per_target={per_target}; expected 'auto', 'direct', "
                         "or 'gram' without per_target")
    folds = kfold_indices(len(X), n_folds, shuffle=shuffle, seed=seed)
    slices = _target_slices(Y2.shape[1], target_chunk)
    design = RidgeDesign(X, fit_intercept=fit_intercept, svd_solver=svd_solver, dtype=np_dtype, device=device)
    n, t = Y2.shape
    gram = method == "gram"
    full = _cv_route(design, alphas, folds, t, per_target=not gram) == "full"
    _, UtY, K = _target_pass(Y2, slices, design.factors.U if full else None, fit_intercept,
                             ("factors" if full else "samples") if gram else None, np_dtype, device)
    sse = _cv_sse(design, Y2, alphas, folds, slices, full, K, UtY)
    if gram:
        return RidgeCVScores(sse / (n * t), None)
    return RidgeCVScores(sse.sum(1) / (n * t), sse / n if per_target else None)


# ----------------------------------------------------------------------------- estimator


class RidgeDecoder:
    """Ridge regression from voxels to (flattened) embeddings, alpha chosen by K-fold CV.

    Parameters
    ----------
    alphas : sequence of float
        Candidate regularisation strengths; default :data:`DEFAULT_ALPHAS`, eight log-spaced
        values from 1e1 to 1e6. With a single alpha no CV runs.
    n_folds : int or None
        Folds of the alpha search (contiguous, see :func:`kfold_indices`); None only with a
        single alpha.
    alpha_per : {"block", "target"}
        One alpha for all targets (lowest total validation MSE), or one per target column.
    fit_intercept : bool
        Centre X and Y; the intercept is not penalised.
    target_chunk : int or None
        Target columns held in memory at once, in fit, predict and score.
    dtype : float32 or float64
        Working and storage precision.
    device : str or torch.device
        Where the linear algebra runs; inputs and outputs are numpy arrays on the host.
    shuffle : bool
        Shuffle samples before cutting the folds (off: fMRI trials close in time are correlated).
    seed : int or None
        For ``shuffle``.
    svd_solver : {"eigh", "svd"}
        How each thin SVD is computed. ``"eigh"`` (default): eigendecomposition of the smaller
        Gram matrix in float64, 2-3x faster than a LAPACK SVD on a 2-core x86 CPU (not measured on
        a GPU), with float64 accuracy of s^2; ``"svd"``: ``torch.linalg.svd(full_matrices=False)``
        in ``dtype``.

    Attributes
    ----------
    alpha_ : float or array of shape (n_targets,)
        The chosen alpha (an array when ``alpha_per="target"``).
    cv_scores_ : array of shape (n_alphas,) or None
        Validation MSE of each alpha over all targets; None when no CV ran.
    cv_target_scores_ : array of shape (n_alphas, n_targets) or None
        Per-target validation MSE (``alpha_per="target"`` only).
    x_mean_ : array of shape (n_features,)
    y_mean_ : array of shape (n_targets,)
    V_ : array of shape (n_features, k)
        Right singular vectors of the centred training X, k <= min(n_samples, n_features)
        (``"eigh"`` drops round-off-level directions).
    s_ : array of shape (k,)
        Its singular values.
    B_ : array of shape (k, n_targets)
        ``diag(s / (s^2 + alpha_j)) U^T y_c[:, j]`` column by column, so ``coef_ = V_ @ B_``.
    intercept_ : array of shape (n_targets,)
    n_features_in_ : int
    target_shape_ : tuple of int
        Trailing shape of the Y given to fit; predictions come back in it.

    Notes
    -----
    The compact ``V_``, ``B_`` pair replaces a dense ``coef_`` (see the module docstring);
    :attr:`coef_` materialises it on request.
    """

    _FITTED = ("x_mean_", "y_mean_", "V_", "s_", "B_", "intercept_", "alpha_", "cv_scores_", "cv_target_scores_")

    def __init__(self, alphas=DEFAULT_ALPHAS, n_folds: int | None = 5, alpha_per: str = "block",
                 fit_intercept: bool = True, target_chunk: int | None = 16384, dtype=np.float32, device="cpu",
                 shuffle: bool = False, seed: int | None = None, svd_solver: str = "eigh"):
        self.alphas = alphas
        self.n_folds = n_folds
        self.alpha_per = alpha_per
        self.fit_intercept = fit_intercept
        self.target_chunk = target_chunk
        self.dtype = dtype
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        self.svd_solver = svd_solver

    def get_params(self) -> dict:
        """The constructor's parameters, by name."""
        return {name: getattr(self, name) for name in ("alphas", "n_folds", "alpha_per", "fit_intercept",
                                                       "target_chunk", "dtype", "device", "shuffle", "seed",
                                                       "svd_solver")}

    # -- fitting

    def fit(self, X, Y, design: RidgeDesign | None = None) -> RidgeDecoder:
        """Choose alpha by K-fold CV on (X, Y), then refit on all of it.

        Parameters
        ----------
        X : array of shape (n_samples, n_features)
        Y : array of shape (n_samples, ...)
            E.g. (n_samples, 257, 768) CLIP image tokens; may be a float16 memory map.
        design : RidgeDesign, optional
            Decompositions of this X made for an earlier fit (:meth:`design_for`), so several
            targets fitted on one voxel matrix factor it once.

        Returns
        -------
        self
        """
        # The CV allocates and frees temporaries of hundreds of MB fold after fold; reusing the
        # freed pages instead of page-faulting fresh ones each time saved ~20% of a per-target fit.
        with keep_freed_memory():
            return self._fit(X, Y, design)

    def _fit(self, X, Y, design: RidgeDesign | None) -> RidgeDecoder:
        np_dtype, _ = _dtypes(self.dtype)
        alphas = _check_alphas(self.alphas)
        if self.alpha_per not in _ALPHA_MODES:
            raise InvalidInputError(f"alpha_per={self.alpha_per!r}; expected one of {_ALPHA_MODES}")
        _check_solver(self.svd_solver)
        X = design.X if design is not None and X is design.X else _check_X(X)
        Y2, target_shape = _check_Y(Y, len(X))
        n, t = Y2.shape
        run_cv = alphas.size > 1
        if run_cv:
            if self.n_folds is None:
                raise InvalidInputError(f"n_folds=None with {alphas.size} alphas; expected n_folds >= 2 or a single alpha")
            folds = kfold_indices(n, self.n_folds, shuffle=self.shuffle, seed=self.seed)
        slices = _target_slices(t, self.target_chunk)
        if design is None:
            design = RidgeDesign(X, fit_intercept=self.fit_intercept, svd_solver=self.svd_solver, dtype=np_dtype,
                                 device=self.device)
        else:
            design.check_matches(self, X)

        gram = run_cv and self.alpha_per == "block"
        full = run_cv and _cv_route(design, alphas, folds, t, per_target=not gram) == "full"
        # The refit's U^T Y_c and (block mode) the CV's Gram matrix come from the same pass over Y.
        y_mean, B, K = _target_pass(Y2, slices, design.factors.U, self.fit_intercept,
                                    ("factors" if full else "samples") if gram else None, np_dtype, self.device)
        # U (n_samples, k) is not needed past this pass unless the CV takes its folds from the full-data fit.
        # No local name holds the factors here, so releasing frees it.
        if not design.cache and not full:
            design.release_u()
        s = design.factors.s.double().cpu().numpy()

        cv_scores = cv_target_scores = None
        if run_cv:
            sse = _cv_sse(design, Y2, alphas, folds, slices, full, K, B)
            if gram:
                cv_scores = sse / (n * t)
            else:
                cv_scores, cv_target_scores = sse.sum(1) / (n * t), sse / n
        del K
        if not design.cache:
            design.release_u()
        fac = design.factors

        F = shrinkage(s, alphas).astype(np_dtype)  # (n_alphas, k)
        if self.alpha_per == "block":
            best = int(np.argmin(cv_scores)) if run_cv else 0
            alpha = float(alphas[best])
            B *= F[best][:, None]
        else:
            best = np.argmin(cv_target_scores, axis=0) if run_cv else np.zeros(t, np.int64)
            alpha = alphas[best]
            for sl in slices:  # block-wise so the (k, block) factor matrix stays small
                B[:, sl] *= F[best[sl]].T

        self.x_mean_ = fac.x_mean.cpu().numpy()
        self.y_mean_ = y_mean
        self.V_ = np.ascontiguousarray(fac.V.cpu().numpy())
        self.s_ = fac.s.cpu().numpy()
        self.B_ = B
        self.intercept_ = (y_mean - (self.x_mean_ @ self.V_) @ B).astype(np_dtype)
        self.alpha_ = alpha
        self.cv_scores_ = cv_scores
        self.cv_target_scores_ = cv_target_scores
        self.n_features_in_ = X.shape[1]
        self.target_shape_ = target_shape
        return self

    def design_for(self, X) -> RidgeDesign:
        """The decompositions of ``X`` this decoder's settings need, kept for several :meth:`fit` calls.

        ``RidgeDecoder(...).fit(X, Y1, design=d)`` then ``.fit(X, Y2, design=d)`` factor X (and each
        CV fold) once instead of once per target. The design holds the factors of every fold at once
        (about n_folds x n_samples^2 numbers besides X's own), which a single fit never does.
        """
        np_dtype, _ = _dtypes(self.dtype)
        _check_solver(self.svd_solver)
        return RidgeDesign(X, fit_intercept=self.fit_intercept, svd_solver=self.svd_solver, dtype=np_dtype,
                           device=self.device, cache=True)

    # -- prediction

    def _check_fitted(self):
        if not hasattr(self, "B_"):
            raise RuntimeError("RidgeDecoder is not fitted; call fit(X, Y) or RidgeDecoder.load(path) first")

    def _iter_predictions(self, X: np.ndarray) -> Iterator[tuple[slice, torch.Tensor]]:
        np_dtype, _ = _dtypes(self.dtype)
        if X.shape[1] != self.n_features_in_:
            raise InvalidInputError(f"X has {X.shape[1]} features; expected {self.n_features_in_}, as in fit")
        Xt = _as_tensor(X, np_dtype, self.device)
        # Centring before projecting keeps float32 accurate when voxels have large means.
        A = (Xt - _as_tensor(self.x_mean_, np_dtype, self.device)) @ _as_tensor(self.V_, np_dtype, self.device)
        for sl in _target_slices(self.B_.shape[1], self.target_chunk):
            B = _as_tensor(self.B_[:, sl], np_dtype, self.device)
            yield sl, torch.addmm(_as_tensor(self.y_mean_[sl], np_dtype, self.device), A, B)

    def predict(self, X) -> np.ndarray:
        """Predicted targets.

        Parameters
        ----------
        X : array of shape (n_samples, n_features)

        Returns
        -------
        array of shape (n_samples, *target_shape_)
        """
        self._check_fitted()
        X = _check_X(X)
        out = np.empty((len(X), self.B_.shape[1]), _dtypes(self.dtype)[0])
        for sl, block in self._iter_predictions(X):
            out[:, sl] = block.cpu().numpy()
        return out.reshape((len(X), *self.target_shape_))

    def score(self, X, Y) -> float:
        """Coefficient of determination R^2, averaged uniformly over target columns.

        Follows ``sklearn.metrics.r2_score``: a constant target scores 1 if predicted exactly,
        else 0.

        Parameters
        ----------
        X : array of shape (n_samples, n_features)
        Y : array of shape (n_samples, *target_shape_)

        Returns
        -------
        float
        """
        self._check_fitted()
        X = _check_X(X)
        Y2, shape = _check_Y(Y, len(X))
        if shape != tuple(self.target_shape_):
            raise InvalidInputError(f"Y has trailing shape {shape}; expected {tuple(self.target_shape_)}, as in fit")
        np_dtype, _ = _dtypes(self.dtype)
        r2 = np.empty(Y2.shape[1])
        for sl, pred in self._iter_predictions(X):
            Yb = _target_block(Y2, sl, np_dtype, self.device).double()
            ss_res = (Yb - pred.double()).square().sum(0)
            ss_tot = (Yb - Yb.mean(0)).square().sum(0)
            constant = ss_tot == 0
            r2_block = 1 - ss_res / torch.where(constant, 1.0, ss_tot)
            r2_block = torch.where(constant, (ss_res == 0).double(), r2_block)
            r2[sl] = r2_block.cpu().numpy()
        return float(r2.mean())

    @property
    def coef_(self) -> np.ndarray:
        """Dense coefficients ``V_ @ B_``, shape (n_features, n_targets).

        Computed on each access: for CLIP-token targets this is many GB.
        """
        self._check_fitted()
        return self.V_ @ self.B_

    # -- persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write parameters and (if fitted) the model to one ``.npz`` file, atomically.

        Parameters
        ----------
        path : str or path-like
            Written exactly as given (no suffix is added).

        Returns
        -------
        Path
        """
        return save_model_npz(self, path, RIDGE_FORMAT, hasattr(self, "B_"))

    @classmethod
    def load(cls, path: str | os.PathLike, *, device=None) -> RidgeDecoder:
        """Read a model written by :meth:`save` (no pickle involved).

        Parameters
        ----------
        path : str or path-like
        device : str or torch.device, optional
            Override the saved device (e.g. load a GPU-fitted model on a CPU machine).

        Returns
        -------
        RidgeDecoder
        """
        return load_model_npz(cls, path, RIDGE_FORMAT, "a ridge model written by RidgeDecoder.save",
                              "train the ridge run again", device)

    def __repr__(self) -> str:
        alphas = np.atleast_1d(np.asarray(self.alphas, dtype=np.float64))
        return (f"RidgeDecoder(alphas=[{alphas.min():.3g}..{alphas.max():.3g}] x{alphas.size}, n_folds={self.n_folds}, "
                f"alpha_per={self.alpha_per!r}, fit_intercept={self.fit_intercept}, "
                f"dtype={np.dtype(self.dtype).name}, device={self.device!r})")


def save_model_npz(model, path: str | os.PathLike, fmt: str, fitted: bool, **meta_extra) -> Path:
    """Write a model's ``get_params()`` and (if ``fitted``) its ``_FITTED`` arrays to one ``.npz``, atomically.

    The settings go into a JSON ``meta`` entry (format, params, fitted, features in, target shape and
    ``meta_extra``), so loading never unpickles.
    """
    params = model.get_params()
    params["alphas"] = [float(a) for a in np.atleast_1d(np.asarray(params["alphas"], dtype=np.float64))]
    params["dtype"] = np.dtype(params["dtype"]).name
    params["device"] = None if params["device"] is None else str(params["device"])
    meta = {"format": fmt, "params": params, "fitted": bool(fitted)}
    arrays = {}
    if fitted:
        meta.update(n_features_in=int(model.n_features_in_), target_shape=[int(d) for d in model.target_shape_],
                    **meta_extra)
        arrays = {name: np.asarray(getattr(model, name)) for name in model._FITTED if getattr(model, name) is not None}
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
        np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
    return path


_ZIP_MAGIC = b"PK\x03\x04"


def load_model_npz(cls, path: str | os.PathLike, fmt: str, what: str, hint: str, device=None):
    """Read a model written by :func:`save_model_npz` with format ``fmt``; one clear error for anything else.

    Returns the model and its ``meta`` dict (for fields a class adds, e.g. its solver form).
    """
    from brainmclip.integrity import reading

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: missing ({what})")
    with open(path, "rb") as fh:
        if fh.read(4) != _ZIP_MAGIC:
            raise InvalidInputError(f"{path}: not an .npz file; expected {what}")
    with reading(path, what, hint), np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        if meta.get("format") != fmt:
            raise InvalidInputError(f"{path}: format {meta.get('format')!r}; expected {fmt!r} ({what})")
        params = dict(meta["params"])
        params["dtype"] = np.dtype(params["dtype"]).type
        if device is not None:
            params["device"] = device
        model = cls(**params)
        if meta["fitted"]:
            for name in cls._FITTED:
                setattr(model, name, z[name] if name in z.files else None)
            if model.alpha_per == "block":
                model.alpha_ = float(model.alpha_)
            model.n_features_in_ = meta["n_features_in"]
            model.target_shape_ = tuple(meta["target_shape"])
    model._meta = meta
    return model
