"""MindDiffuser's decoders: ridge regression per target dimension on the voxels most correlated with it.

For every target column ``j`` (a dimension of SD's text embedding, of the VAE latent, of a CLIP
layer) the model keeps the ``n_voxels`` voxels whose Pearson correlation with ``y_j`` on the
training rows is largest in absolute value, and fits ``y_j ~ X[:, S_j]`` by ridge regression with
an unpenalised intercept (centring). Alpha comes from contiguous K-fold cross-validation on the
training rows: the lowest summed validation squared error, either per target or over the whole
target block.

Tens of thousands of targets each need their own small regression, so nothing here loops over
targets in Python. Targets are processed in batches of ``B`` and every step is one batched tensor
operation:

* Selection: with ``X`` and a target block centred once, ``C = X_c^T Y_c`` (voxels x B) is one matrix
  product; ``r = C / (|x_c| |y_c|)``; ``torch.topk`` on ``|r|`` plus an exact tie rule (below) gives
  the sets ``S`` (B, k). ``C`` also holds every cross product ``X_S^T y`` the solver needs.
* Primal form (``k < n_samples``): the selected, centred voxels are gathered as one (B, k, n)
  tensor. Their Gram matrices come per fold, ``G_f = X_{S,f}^T X_{S,f}`` for the rows of fold ``f``
  (one batched product each), and the full Gram matrix is their sum. The Gram matrix of a fold's
  training rows, centred on their own mean, is then ``G - G_f - s_f s_f^T / n_T`` (``s_f`` the
  held-out rows' column sums), so no fold touches the training rows again. Each (fold, alpha)
  costs one batched ``torch.linalg.cholesky_ex`` + ``cholesky_solve`` of (B, k, k) systems and
  one batched product for the validation predictions.
* Primal form from the voxels' Gram matrix (CPU, float64, when the (p, p) matrices fit in memory and
  there are enough targets to pay for them): ``G = X_c^T X_c`` and each fold's ``G_f`` are computed once
  for all targets (BLAS's ``syrk``), and a target's systems are gathered from them, ``G[S, S]``, instead
  of multiplying its gathered voxels again. The correlation product is computed fold by fold,
  ``C = sum_f X_f^T Y_f``, so each fold's cross products ``X_f[:, S]^T y_f`` come with it. The validation
  error of fold ``f`` then comes from the same sums, ``|u|^2 - 2 w.(X_f^T u) + w^T G_f w`` plus the
  intercept's terms (``u`` the held-out targets centred on the training mean), so no voxel column is
  gathered at all. Passes run fold by fold, so only two (p, p) matrices are held at once. Because a
  validation error is a difference of sums, its round-off is relative to ``|u|^2`` (1e-16 in float64,
  6e-8 in float32), which is why this route is float64-only.
* Dual form (``k >= n_samples``): the (B, n, n) kernels of the selected voxels; a fold's
  train/validation blocks are re-centred on the fold's training mean, and each (fold, alpha)
  costs a batched Cholesky of (B, n_T, n_T) systems.

Cost per target, primal: ``n k^2`` (Gram matrices) + ``n_folds * n_alphas * k^3 / 3`` (Cholesky)
multiply-adds, plus ``n p`` for its share of the correlation product; from the voxels' Gram matrix:
``n p^2`` once for all targets (half in each of two syrk passes), then the Cholesky factorisations and
``2 k^2`` gathered entries per fold, ``n p`` for the correlations; dual: ``n^2 k`` +
``n_folds * n_alphas * n_T^3 / 3``. A per-target loop over a library solver (scikit-learn's
``Ridge``) recomputes the Gram matrix of the selected columns in every fit, ``n_T k^2`` per fold
and alpha. Memory is bounded by the batch size (chosen from ``memory_mb`` unless given), plus, on the
Gram route, the two (p, p) matrices (at most ``_GRAM_ROUTE_MAX_BYTES``) and each fold's cross products for
a group of targets (at most ``_GRAM_ROUTE_STASH_BYTES``).

Selection tie rule: voxels are ranked by ``|r|`` descending and equal ``|r|`` are broken by the
lower voxel index. A constant voxel or a constant target has ``r = 0`` with everything (detected
exactly, not through a centred norm that round-off can leave non-zero). Selected indices are
stored sorted ascending.

Precision: float64 by default (decompositions, correlations, sums), which matches a float64
per-target reference to ~1e-12. ``dtype=float32`` is meant for GPUs; the solutions of
``(G + alpha I) w = b`` then carry a relative error of about ``cond(G + alpha I) * 6e-8`` (the tests
hold float32 predictions within 1e-3 relative of float64 on a small CPU problem), and near-ties in the voxel
ranking or the CV errors may resolve differently. float64 on an H200 gave the CPU's selections, alphas and predictions
(within 4e-15 relative) at NSD-like sizes in 0.7 ms per target.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from brainmclip.errors import InvalidInputError
from brainmclip.models.ridge import (
    DEFAULT_ALPHAS,
    _as_tensor,
    _check_alphas,
    _check_X,
    _check_Y,
    _dtypes,
    _target_block,
    _target_slices,
    kfold_indices,
    load_model_npz,
    save_model_npz,
)

__all__ = ["DEFAULT_ALPHAS", "VOXEL_RIDGE_FORMAT", "VoxelSelectedRidge", "select_voxels"]

VOXEL_RIDGE_FORMAT = "brainmclip-voxel-ridge/1"
_ALPHA_MODES = ("target", "block")
# The Gram route holds two (p, p) float64 matrices (the full data's and one fold's); above this it is not used.
_GRAM_ROUTE_MAX_BYTES = 4 * 2**30
# The Gram route pays n p^2 multiply-adds once (two syrk passes of n p^2 / 2); the per-target route pays
# n k^2 per target (its fold Gram matrices) in small batched products that ran about this many times slower per
# multiply-add than syrk on one CPU thread (9,000 rows, k 250: ~5 against ~28 GMAC/s).
_GRAM_ROUTE_RATE = 4.0
# The Gram route keeps each fold's cross products X_f[:, S]^T y_f for a group of targets between its passes; more
# targets than fit here are fitted in several groups (each computing the folds' Gram matrices again).
_GRAM_ROUTE_STASH_BYTES = 2**30


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"device={device!r}; expected None, 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device={str(device)!r} but torch sees no CUDA device; expected 'cpu' or None")
    return device


def _centre(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns minus their mean; constant columns become exactly zero (round-off would leave ~1e-16 noise)."""
    mean = A.mean(0)
    Ac = A - mean
    Ac[:, (A[:1] == A).all(0)] = 0
    return Ac, mean


def _top_k(abs_r: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k), ascending, of the k largest entries of each column of ``abs_r`` (p, B).

    Equal values are taken lowest index first: everything above the k-th largest value is kept,
    and the remaining places go to the entries equal to it in index order (a cumulative count).
    """
    p, B = abs_r.shape
    if k == p:
        return torch.arange(p, device=abs_r.device).expand(B, p).clone()
    thr = torch.topk(abs_r, k, dim=0, sorted=False).values.min(0).values  # (B,) the k-th largest
    above = abs_r > thr
    tied = abs_r == thr
    need = k - above.sum(0)
    keep = above | (tied & (tied.cumsum(0) <= need))
    return keep.T.nonzero()[:, 1].reshape(B, k)  # row-major nonzero: per target, ascending voxel index


def select_voxels(X, Y, n_voxels: int) -> np.ndarray:
    """The ``n_voxels`` voxels most correlated (|Pearson r|) with each target, ties to the lower index.

    Parameters
    ----------
    X : array of shape (n_samples, n_voxels_total)
    Y : array of shape (n_samples, n_targets)
    n_voxels : int

    Returns
    -------
    array of shape (n_targets, n_voxels), int32, each row ascending
    """
    X = _check_X(X)
    Y2, _ = _check_Y(Y, len(X))
    _check_k(n_voxels, X.shape[1])
    Xc, _ = _centre(torch.from_numpy(np.asarray(X, np.float64)))
    Yc, _ = _centre(_target_block(Y2, slice(0, Y2.shape[1]), np.dtype(np.float64), "cpu"))
    return _select(Xc.T.contiguous(), Xc.norm(dim=0), Yc, n_voxels)[0].to(torch.int32).numpy()


def _select(XcT: torch.Tensor, x_norm: torch.Tensor, Yc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected voxels (B, k) and the cross products ``X_c[:, S]^T y_c`` (B, k) of one target block."""
    C = XcT @ Yc  # (p, B)
    S = _top_k(_abs_r(C, x_norm, Yc), k)
    return S, torch.gather(C.T, 1, S)


def _abs_r(C: torch.Tensor, x_norm: torch.Tensor, Yc: torch.Tensor) -> torch.Tensor:
    """|Pearson r| (p, B) from the cross products ``C = X_c^T Y_c``; 0 where a column is constant."""
    den = x_norm[:, None] * Yc.norm(dim=0)[None, :]
    return torch.where(den > 0, C.abs() / torch.where(den > 0, den, 1), 0)


def _check_k(k, n_features: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n_features:
        raise InvalidInputError(f"n_voxels={k!r}; expected an integer between 1 and the number of voxels ({n_features})")
    return int(k)


def _add_diag(A: torch.Tensor, alpha) -> torch.Tensor:
    """``A + alpha I`` for a batch (B, m, m); ``alpha`` a number or a (B,) tensor. A new tensor."""
    out = A.clone()
    alpha = torch.as_tensor(alpha, dtype=A.dtype, device=A.device)
    out.diagonal(dim1=-2, dim2=-1).add_(alpha[..., None] if alpha.ndim else alpha)
    return out


def _spd_solve(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve the batch of symmetric positive definite systems ``A x = rhs`` (rhs (B, m, r)).

    Batched Cholesky and two triangular solves (on CPU faster than ``cholesky_solve``, which
    loops over the batch). A system whose factorisation fails (alpha at round-off level relative
    to the Gram matrix's largest eigenvalue) is solved through its eigendecomposition instead,
    eigenvalues below round-off level dropped, as a pseudo-inverse would.
    """
    try:
        # On CPU NumPy's batched Cholesky (OpenBLAS's LAPACK) factored 250-square float64 systems 1.5x faster than
        # torch's on one thread. On other devices: A is symmetric, so A.mT is A itself laid out column-major, which
        # LAPACK factors without the copy torch makes of a row-major input, and plain cholesky skips cholesky_ex's
        # per-matrix status. A failure anywhere in the batch falls back to the per-matrix path below.
        L = torch.from_numpy(np.linalg.cholesky(A.numpy())) if A.device.type == "cpu" else torch.linalg.cholesky(A.mT)
        info = None
    except (torch.linalg.LinAlgError, np.linalg.LinAlgError):
        L, info = torch.linalg.cholesky_ex(A)
    x = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, rhs, upper=False), upper=True)
    bad = torch.nonzero(info).flatten() if info is not None else torch.empty(0, dtype=torch.long)
    if bad.numel():
        lam, Q = torch.linalg.eigh(A[bad])
        floor = lam[:, -1:].clamp_min(0) * A.shape[-1] * torch.finfo(A.dtype).eps
        inv = torch.where(lam > floor, 1 / torch.where(lam > floor, lam, 1), 0)
        x[bad] = Q @ (inv[..., None] * (Q.mT @ rhs[bad]))
    return x


def _gram(A: torch.Tensor, depth: int = 2) -> torch.Tensor:
    """``A A^T`` for a batch (B, m, n), computing each off-diagonal block once: the rows are split in two, the two
    diagonal blocks recurse and the lower block is mirrored, so ``depth`` levels cost (1 + 2^-depth) / 2 of the full
    product's multiply-adds (a batched stand-in for BLAS's syrk, which torch does not expose)."""
    m = A.shape[-2]
    if depth == 0 or m < 64:
        return A @ A.mT
    h = m // 2
    top, bottom = A[..., :h, :], A[..., h:, :]
    G = A.new_empty(A.shape[:-2] + (m, m))
    G[..., :h, :h] = _gram(top, depth - 1)
    G[..., h:, h:] = _gram(bottom, depth - 1)
    G[..., h:, :h] = bottom @ top.mT
    G[..., :h, h:] = G[..., h:, :h].mT
    return G


def _voxel_gram(rows: np.ndarray) -> np.ndarray:
    """``rows^T rows`` (p, p) of a C-ordered float64 (m, p) array, both triangles filled, C-ordered.

    BLAS's ``syrk`` computes one triangle (half the multiply-adds of a general product; ~2.3x torch's
    ``X.T @ X`` on one thread at 2,000 x 15,000).
    """
    from scipy.linalg.blas import dsyrk

    # rows.T is the Fortran-ordered (p, m) view of the same memory: syrk reads it without a copy.
    upper = dsyrk(1.0, rows.T, trans=0, lower=0)  # Fortran-ordered; its transpose is C-ordered
    G = upper.T  # C-ordered, lower triangle filled
    p = len(G)
    step = 1024
    for a in range(0, p, step):  # mirror in blocks: no (p, p) index arrays
        e = min(a + step, p)
        D = G[a:e, a:e]
        D[:] = np.tril(D) + np.tril(D, -1).T
        G[a:e, e:] = G[e:, a:e].T
    return G


def _gather_blocks(S: np.ndarray, *mats: np.ndarray, chunk: int = 64) -> list[torch.Tensor]:
    """``M[S_j][:, S_j]`` of each (p, p) matrix ``M`` for every row ``S_j`` of ``S`` (B, k): (B, k, k) float64 tensors.

    One ``np.take`` on flat indices per chunk of targets and matrix (about 2x torch's advanced indexing here),
    the indices shared by the matrices; the chunk bounds the index array.
    """
    B, k = S.shape
    p = mats[0].shape[1]
    outs = [np.empty((B, k, k)) for _ in mats]
    for a in range(0, B, chunk):
        idx = S[a:a + chunk].astype(np.int64)
        flat_idx = idx[:, :, None] * p + idx[:, None, :]
        for M, out in zip(mats, outs, strict=True):
            np.take(M.reshape(-1), flat_idx, out=out[a:a + chunk])
    return [torch.from_numpy(out) for out in outs]


def _solve_alphas(M: torch.Tensor, rhs: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """``(M + alpha I)^{-1} rhs`` for every alpha, stacked on the last axis: (B, m, n_alphas).

    One work matrix whose diagonal is overwritten per alpha (no copy of M per alpha).
    """
    A = M.clone()
    diag = M.diagonal(dim1=-2, dim2=-1)
    out = []
    for a in alphas:
        A.diagonal(dim1=-2, dim2=-1).copy_(diag + a)
        out.append(_spd_solve(A, rhs))
    return torch.cat(out, dim=2)


class VoxelSelectedRidge:
    """Ridge regression per target on its ``n_voxels`` most correlated voxels (MindDiffuser's decoders).

    Parameters
    ----------
    n_voxels : int
        Voxels kept per target (MindDiffuser: 250 semantic, 350 structural, 4000 VAE latent).
    alphas : sequence of float
        Candidate regularisation strengths; default :data:`DEFAULT_ALPHAS` (1e1..1e6, 8 values,
        as :class:`~brainmclip.models.ridge.RidgeDecoder`). With one alpha no CV runs.
    n_folds : int
        Contiguous K-fold CV on the training rows (:func:`~brainmclip.models.ridge.kfold_indices`).
    alpha_per : {"target", "block"}
        The alpha with the lowest summed validation squared error of each target, or one alpha
        for all targets (lowest error summed over them).
    batch_size : int or None
        Targets solved together; None picks it from ``memory_mb``.
    memory_mb : float
        Working memory the automatic batch size aims at (the batch's gathered voxels, Gram
        matrices or kernels, correlations); at least one target per batch.
    dtype : float64 or float32
        Working precision; float32 is for GPUs (see the module docstring for its accuracy).
    device : str, torch.device or None
        None: CUDA when available, else CPU. Inputs and outputs are numpy arrays on the host.
    progress : bool
        Show a progress bar over target batches.

    Attributes
    ----------
    selected_ : array (n_targets, n_voxels) int32
        Selected voxel indices per target, ascending.
    coef_ : array (n_targets, n_voxels)
        Weights of the selected voxels, in the order of ``selected_``.
    intercept_ : array (n_targets,)
        ``y_mean_ - x_mean_[selected_] . coef_``, so ``X[:, S_j] . coef_j + intercept_j`` predicts.
    x_mean_ : array (n_voxels_total,)
    y_mean_ : array (n_targets,)
    alpha_ : float (``"block"``) or array (n_targets,) (``"target"``)
    cv_mse_ : array (n_alphas, n_targets) or None
        Validation squared error summed over folds / n_samples, per alpha and target.
    form_ : {"primal", "gram", "dual", "shared"}
        The solver used: primal (k x k systems) when n_voxels < n_samples, "gram" when those systems were gathered
        from the voxels' Gram matrices (CPU, float64, enough targets), else dual (n x n); "shared" when every voxel
        is selected (one decomposition of X for all targets).
    n_features_in_ : int
    target_shape_ : tuple of int
    """

    _FITTED = ("selected_", "coef_", "intercept_", "x_mean_", "y_mean_", "alpha_", "cv_mse_")

    def __init__(self, n_voxels: int = 250, alphas=DEFAULT_ALPHAS, n_folds: int = 5, alpha_per: str = "target",
                 batch_size: int | None = None, memory_mb: float = 512, dtype=np.float64, device=None,
                 progress: bool = False):
        self.n_voxels = n_voxels
        self.alphas = alphas
        self.n_folds = n_folds
        self.alpha_per = alpha_per
        self.batch_size = batch_size
        self.memory_mb = memory_mb
        self.dtype = dtype
        self.device = device
        self.progress = progress

    def get_params(self) -> dict:
        """The constructor's parameters, by name."""
        return {name: getattr(self, name) for name in ("n_voxels", "alphas", "n_folds", "alpha_per", "batch_size",
                                                       "memory_mb", "dtype", "device", "progress")}

    # -- fitting

    def _batch(self, n: int, p: int, k: int, dual: bool, gram: bool = False) -> int:
        if self.batch_size is not None:
            if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
                raise InvalidInputError(f"batch_size={self.batch_size!r}; expected a positive integer or None")
            return int(self.batch_size)
        if not (isinstance(self.memory_mb, (int, float)) and self.memory_mb > 0):
            raise InvalidInputError(f"memory_mb={self.memory_mb!r}; expected a positive number")
        item = np.dtype(self.dtype).itemsize
        if gram:  # correlations and each fold's cross products (p each), gathered systems and their work copies
            per_target = (self.n_folds + 2) * p + n + 6 * k * k
        else:
            per_target = k * n + 3 * p + n + (4 * n * n if dual else (self.n_folds + 3) * k * k)
        return max(1, int(self.memory_mb * 2**20 // (item * per_target)))

    def fit(self, X, Y) -> VoxelSelectedRidge:
        """Select voxels, choose alpha by K-fold CV, refit on all rows.

        Parameters
        ----------
        X : array of shape (n_samples, n_voxels_total)
        Y : array of shape (n_samples, ...)
            Trailing dimensions are flattened into target columns (e.g. (n, 77, 768)); may be a
            float16 memory map (read one batch of columns at a time).

        Returns
        -------
        self
        """
        np_dtype, t_dtype = _dtypes(self.dtype)
        alphas = _check_alphas(self.alphas)
        if self.alpha_per not in _ALPHA_MODES:
            raise InvalidInputError(f"alpha_per={self.alpha_per!r}; expected one of {_ALPHA_MODES}")
        device = _resolve_device(self.device)
        X = _check_X(X)
        Y2, target_shape = _check_Y(Y, len(X))
        n, p = X.shape
        k = _check_k(self.n_voxels, p)
        run_cv = alphas.size > 1
        if k == p:
            return self._fit_all_voxels(X, Y2, target_shape, alphas, np_dtype)
        folds = kfold_indices(n, self.n_folds) if run_cv else []
        dual = k >= n
        # NumPy / SciPy BLAS calls (Cholesky, syrk) run with torch's thread count, so the thread policy holds for them.
        with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
            return self._fit_routes(X, Y2, target_shape, k, folds, dual, alphas, np_dtype, t_dtype, device)

    def _fit_routes(self, X, Y2, target_shape, k, folds, dual, alphas, np_dtype, t_dtype, device):
        n, p = X.shape
        t = Y2.shape[1]
        if not dual and self._gram_route(n, p, k, t, device, np_dtype):
            Xc, x_mean = _centre(_as_tensor(X, np.float64, device))
            selected, coef, y_mean, sse, best_target = _fit_from_voxel_gram(
                Xc, Y2, _target_slices(t, self._batch(n, p, k, dual, gram=True)), k,
                [slice(int(va[0]), int(va[-1]) + 1) for _, va in folds], alphas, self.alpha_per, self.progress)
            form = "gram"
        else:
            selected, coef, y_mean, sse, best_target, x_mean = self._fit_gathered(
                X, Y2, _target_slices(t, self._batch(n, p, k, dual)), k, folds, dual, alphas, np_dtype, t_dtype,
                device)
            form = "dual" if dual else "primal"

        x_mean_np = x_mean.cpu().numpy().astype(np_dtype)
        self.selected_ = selected
        self.coef_ = coef
        self.x_mean_ = x_mean_np
        self.y_mean_ = y_mean
        self.intercept_ = (y_mean - np.einsum("tk,tk->t", x_mean_np[selected], coef)).astype(np_dtype)
        self.alpha_ = float(alphas[best_target[0]]) if self.alpha_per == "block" else alphas[best_target]
        self.cv_mse_ = None if sse is None else sse / n
        self.form_ = form
        self.n_features_in_ = p
        self.target_shape_ = target_shape
        return self

    def _gram_route(self, n: int, p: int, k: int, t: int, device: torch.device, np_dtype: np.dtype) -> bool:
        """Whether the primal systems come from the voxels' (p, p) Gram matrices (module docstring): CPU and float64
        only (its validation errors are differences of sums, and syrk is a CPU BLAS call), when both matrices fit in
        ``_GRAM_ROUTE_MAX_BYTES`` and their one-off cost is below the per-target route's Gram products."""
        return (device.type == "cpu" and np_dtype == np.float64 and 2 * p * p * 8 <= _GRAM_ROUTE_MAX_BYTES
                and p * p <= _GRAM_ROUTE_RATE * t * k * k)

    def _fit_gathered(self, X, Y2, slices, k, folds, dual, alphas, np_dtype, t_dtype, device):
        """The per-target route: each batch gathers its selected voxels and forms their Gram matrices or kernels."""
        n, p = X.shape
        t = Y2.shape[1]
        run_cv = alphas.size > 1
        Xc, x_mean = _centre(_as_tensor(X, np.float64, device))  # centred in float64: voxels can have large means
        Xc = Xc.to(t_dtype)
        XcT = Xc.T.contiguous()  # (p, n): a gather of rows of X^T gives the selected voxels contiguously
        x_norm = Xc.norm(dim=0)
        del Xc
        # Dual: index tensors of each fold's rows. Primal: the held-out rows as a slice (the folds are contiguous).
        folds_t = [(torch.as_tensor(tr, device=device), torch.as_tensor(va, device=device)) for tr, va in folds]
        fold_slices = [slice(int(va[0]), int(va[-1]) + 1) for _, va in folds]
        alphas_t = torch.as_tensor(alphas, dtype=t_dtype, device=device)

        selected = np.empty((t, k), np.int32)
        coef = np.empty((t, k), np_dtype)
        y_mean = np.empty(t, np_dtype)
        sse = np.zeros((alphas.size, t)) if run_cv else None
        two_pass = run_cv and self.alpha_per == "block"
        best_target = np.zeros(t, np.int64)

        def prepare(sl):
            Yc, mean = _centre(_target_block(Y2, sl, np_dtype, device))
            S, b = _select(XcT, x_norm, Yc, k)
            return Yc, mean, S, b, XcT[S]  # XS: (B, k, n), centred on the training mean

        bar = tqdm(total=t * (2 if two_pass else 1), desc="voxel-selected ridge", unit="target",
                   disable=not self.progress)
        for sl in slices:
            Yc, mean, S, b, XS = prepare(sl)
            selected[sl] = S.to(torch.int32).cpu().numpy()
            y_mean[sl] = mean.cpu().numpy()
            system = _DualSystem(XS, Yc) if dual else _PrimalSystem(XS, b, fold_slices)
            if run_cv:
                sse[:, sl] = system.cv_sse(Yc, folds_t if dual else fold_slices, alphas_t).cpu().numpy()
            if not two_pass:
                if run_cv:
                    best_target[sl] = np.argmin(sse[:, sl], axis=0)
                coef[sl] = system.refit(Yc, alphas_t[torch.as_tensor(best_target[sl], device=device)]).cpu().numpy()
            bar.update(sl.stop - sl.start)
            del system, XS
        if two_pass:  # one alpha for the block: known only once every target's CV error is in
            best_target[:] = int(np.argmin(sse.sum(1)))
            for sl in slices:
                Yc, _ = _centre(_target_block(Y2, sl, np_dtype, device))
                S = torch.as_tensor(selected[sl], dtype=torch.int64, device=device)
                XS = XcT[S]
                b = (XS @ Yc.T[..., None]).squeeze(-1)
                system = _DualSystem(XS, Yc) if dual else _PrimalSystem(XS, b, [])
                coef[sl] = system.refit(Yc, alphas_t[torch.as_tensor(best_target[sl], device=device)]).cpu().numpy()
                bar.update(sl.stop - sl.start)
        bar.close()
        return selected, coef, y_mean, sse, best_target, x_mean

    def _fit_all_voxels(self, X, Y2, target_shape, alphas, np_dtype) -> VoxelSelectedRidge:
        """Every voxel selected for every target: one shared decomposition of X serves all targets, alphas and folds
        (:class:`~brainmclip.models.ridge.RidgeDecoder`, same folds and the same lowest-squared-error rule)."""
        from brainmclip.models.ridge import RidgeDecoder

        n, p = X.shape
        plain = RidgeDecoder(alphas=list(alphas), n_folds=self.n_folds if alphas.size > 1 else None,
                             alpha_per=self.alpha_per, dtype=np.float64).fit(X, Y2)
        t = Y2.shape[1]
        self.selected_ = np.tile(np.arange(p, dtype=np.int32), (t, 1))
        self.coef_ = np.ascontiguousarray(plain.coef_.T).astype(np_dtype)
        self.x_mean_ = plain.x_mean_.astype(np_dtype)
        self.y_mean_ = np.asarray(plain.y_mean_, np_dtype)
        self.intercept_ = np.asarray(plain.intercept_, np_dtype).ravel()
        self.alpha_ = float(plain.alpha_) if self.alpha_per == "block" else np.broadcast_to(plain.alpha_, (t,)).copy()
        scores = plain.cv_target_scores_ if plain.cv_target_scores_ is not None else None
        self.cv_mse_ = None if scores is None else np.asarray(scores)
        self.form_ = "shared"
        self.n_features_in_ = p
        self.target_shape_ = target_shape
        return self

    # -- prediction

    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise RuntimeError("VoxelSelectedRidge is not fitted; call fit(X, Y) or VoxelSelectedRidge.load(path) first")

    def predict(self, X) -> np.ndarray:
        """Predicted targets ``(x[S_j] - x_mean[S_j]) . coef_j + y_mean_j``.

        Parameters
        ----------
        X : array of shape (n_samples, n_voxels_total)

        Returns
        -------
        array of shape (n_samples, *target_shape_)
        """
        self._check_fitted()
        X = _check_X(X)
        if X.shape[1] != self.n_features_in_:
            raise InvalidInputError(f"X has {X.shape[1]} voxels; expected {self.n_features_in_}, as in fit")
        np_dtype, _ = _dtypes(self.dtype)
        device = _resolve_device(self.device)
        t, k = self.coef_.shape
        # Centred before gathering: keeps float32 accurate when voxels have large means.
        XcT = (_as_tensor(X, np_dtype, device) - _as_tensor(self.x_mean_, np_dtype, device)).T.contiguous()
        step = self.batch_size or max(1, int(self.memory_mb * 2**20 // (np_dtype.itemsize * k * max(len(X), 1))))
        out = np.empty((len(X), t), np_dtype)
        for sl in _target_slices(t, step):
            S = torch.as_tensor(self.selected_[sl], dtype=torch.int64, device=device)
            w = _as_tensor(self.coef_[sl], np_dtype, device)
            pred = (w[:, None, :] @ XcT[S]).squeeze(1) + _as_tensor(self.y_mean_[sl], np_dtype, device)[:, None]
            out[:, sl] = pred.T.cpu().numpy()
        return out.reshape((len(X), *self.target_shape_))

    # -- persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write the settings and (if fitted) the model to one ``.npz`` file, atomically.

        Parameters
        ----------
        path : str or path-like
            Written exactly as given (no suffix is added).

        Returns
        -------
        Path
        """
        params_ok = hasattr(self, "coef_")
        return save_model_npz(self, path, VOXEL_RIDGE_FORMAT, params_ok, **({"form": self.form_} if params_ok else {}))

    @classmethod
    def load(cls, path: str | os.PathLike, *, device=None) -> VoxelSelectedRidge:
        """Read a model written by :meth:`save` (no pickle involved).

        Parameters
        ----------
        path : str or path-like
        device : str or torch.device, optional
            Override the saved device.

        Returns
        -------
        VoxelSelectedRidge
        """
        model = load_model_npz(cls, path, VOXEL_RIDGE_FORMAT,
                               f"a voxel-selected ridge model ({VOXEL_RIDGE_FORMAT} .npz written by "
                               "VoxelSelectedRidge.save)", "fit and save the model again", device)
        if model._meta["fitted"]:
            model.form_ = model._meta["form"]
        return model

    def __repr__(self) -> str:
        alphas = np.atleast_1d(np.asarray(self.alphas, dtype=np.float64))
        return (f"VoxelSelectedRidge(n_voxels={self.n_voxels}, alphas=[{alphas.min():.3g}..{alphas.max():.3g}] "
                f"x{alphas.size}, n_folds={self.n_folds}, alpha_per={self.alpha_per!r}, "
                f"dtype={np.dtype(self.dtype).name}, device={self.device!r})")


# ----------------------------------------------------------------------------- batched solvers


class _PrimalSystem:
    """k x k normal equations of a batch of targets, from their selected, globally centred voxels.

    ``XS`` (B, k, n) and ``b = XS y_c`` (B, k). With folds, the Gram matrix is the sum of the
    folds' held-out blocks ``G_f`` (kept for the CV), so every row enters one product only.
    """

    def __init__(self, XS: torch.Tensor, b: torch.Tensor, folds):
        self.XS, self.b = XS, b
        self.fold_grams = []
        if folds:
            for va in folds:
                Xv = XS[:, :, va]  # a strided view: BLAS reads it in place
                self.fold_grams.append(_gram(Xv))
            self.G = self.fold_grams[0].clone()
            for G_f in self.fold_grams[1:]:
                self.G += G_f
        else:
            self.G = _gram(XS)

    def cv_sse(self, Yc: torch.Tensor, folds, alphas: torch.Tensor) -> torch.Tensor:
        """Validation squared error summed over folds, (n_alphas, B).

        Fold f's training system comes from the full and held-out sums (:func:`_centred_fold_system`), so no fold
        touches the training rows again.
        """
        n = Yc.shape[0]
        sse = Yc.new_zeros((len(alphas), Yc.shape[1]), dtype=torch.float64)
        for va, G_f in zip(folds, self.fold_grams, strict=True):
            Xv = self.XS[:, :, va]  # (B, k, n_v)
            yv = Yc[va].T  # (B, n_v)
            n_T = n - yv.shape[1]
            s = Xv.sum(2)
            ys = yv.sum(1)
            G_T, b_T = _centred_fold_system(self.G - G_f, self.b - (Xv @ yv[..., None]).squeeze(-1), s, ys, n_T)
            W = _solve_alphas(G_T, b_T[..., None], alphas)  # (B, k, A)
            # residual = (y_v - m_y) - (X_v - m_x) w, with m_x = -s / n_T and m_y = -sum(y_v) / n_T
            pred = Xv.mT @ W + ((s[:, :, None] * W).sum(1) / n_T)[:, None, :]  # (B, n_v, A)
            resid = (yv + (ys / n_T)[:, None])[:, :, None] - pred
            sse += resid.square().sum(1, dtype=torch.float64).T
        return sse

    def refit(self, Yc: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Weights (B, k) for one alpha per target (B,)."""
        return _spd_solve(_add_diag(self.G, alpha), self.b[..., None]).squeeze(-1)


def _centred_fold_system(G_rest: torch.Tensor, b_rest: torch.Tensor, s: torch.Tensor, ys: torch.Tensor,
                         n_T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fold's training system, its rows centred on their own mean, from sums over the full-mean-centred data.

    The training rows' mean is ``-s / n_T`` (``s`` (B, k) the held-out rows' column sums, ``ys`` (B,) their
    targets' sum), so with ``G_rest = G - G_f`` and ``b_rest = b - X_f^T y_f`` (the training rows' uncentred
    sums) the Gram matrix is ``G_rest - s s^T / n_T`` and the cross products ``b_rest - s sum(y_f) / n_T``.
    ``G_rest`` is updated in place.
    """
    return G_rest.baddbmm_(s[:, :, None], s[:, None, :], alpha=-1 / n_T), b_rest - s * (ys / n_T)[:, None]


def _fit_from_voxel_gram(Xc: torch.Tensor, Y2: np.ndarray, slices, k: int, fold_slices, alphas: np.ndarray,
                         alpha_per: str, progress: bool):
    """The primal systems of every target gathered from the voxels' Gram matrices (CPU, float64).

    Targets go in groups whose per-fold cross products ``X_f[:, S]^T y_f`` fit in ``_GRAM_ROUTE_STASH_BYTES``
    (one group unless there are very many targets). Per group: selection, with the cross products of each fold
    taken from the same products that sum to the correlations; then per fold its (p, p) Gram matrix and every
    batch's validation errors. The refit with the chosen alphas comes once every group's errors are in.
    Returns ``selected, coef, y_mean, sse, best_target`` as the per-target route does.
    """
    n, p = Xc.shape
    t = Y2.shape[1]
    X = Xc.numpy()
    G = _voxel_gram(X)
    x_norm = Xc.norm(dim=0)
    alphas_t = torch.as_tensor(alphas, dtype=torch.float64)
    selected = np.empty((t, k), np.int32)
    b_all = np.empty((t, k))
    y_mean = np.empty(t)
    sse = np.zeros((alphas.size, t)) if fold_slices else None
    # The bar counts the fold passes and the refit, which take nearly all the time (the selection pass is a few
    # matrix products), so its rate and ETA hold from the start.
    bar = tqdm(total=t * (len(fold_slices) + 1), desc="voxel-selected ridge", unit="target", disable=not progress)
    group_size = max(1, _GRAM_ROUTE_STASH_BYTES // (8 * k * max(1, len(fold_slices))))
    groups, group = [], []
    for sl in slices:
        group.append(sl)
        if sl.stop - group[0].start >= group_size:
            groups.append(group)
            group = []
    groups += [group] if group else []

    for group in groups:
        first = group[0].start
        # Per fold and target: X_f[:, S]^T y_f, and the sum and sum of squares of y_f (the folds' passes need no Y).
        cross = np.empty((len(fold_slices), group[-1].stop - first, k))
        y_sums = np.empty((len(fold_slices), 2, group[-1].stop - first))
        for sl in group:
            Yc, mean = _centre(_target_block(Y2, sl, np.dtype(np.float64), "cpu"))
            Y_np = Yc.numpy()
            # (B, p) products through NumPy's BLAS: 2x torch's (p, n) x (n, B) product on one thread here.
            parts = [Y_np[va].T @ X[va] for va in fold_slices] or [Y_np.T @ X]
            CT = parts[0].copy() if len(parts) > 1 else parts[0]  # X_c^T Y_c, transposed
            for part in parts[1:]:
                CT += part
            S = _top_k(_abs_r(torch.from_numpy(CT).T, x_norm, Yc), k).numpy()
            selected[sl], b_all[sl], y_mean[sl] = S, np.take_along_axis(CT, S, 1), mean.numpy()
            for f, va in enumerate(fold_slices):
                rows = slice(sl.start - first, sl.stop - first)
                cross[f, rows] = np.take_along_axis(parts[f], S, 1)
                y_sums[f, 0, rows], y_sums[f, 1, rows] = Y_np[va].sum(0), np.square(Y_np[va]).sum(0)
        for f, va in enumerate(fold_slices):
            Xv = X[va]
            G_f = _voxel_gram(Xv)
            s_all = Xv.sum(0)
            for sl in group:
                rows = slice(sl.start - first, sl.stop - first)
                sse[:, sl] += _fold_errors(G, G_f, s_all, selected[sl], b_all[sl], cross[f, rows],
                                           y_sums[f, :, rows], va.stop - va.start, n, alphas_t).T.numpy()
                bar.update(sl.stop - sl.start)
            del G_f

    if sse is None:
        best_target = np.zeros(t, np.int64)
    elif alpha_per == "block":
        best_target = np.full(t, int(np.argmin(sse.sum(1))), np.int64)
    else:
        best_target = np.argmin(sse, axis=0)
    coef = np.empty((t, k))
    for sl in slices:
        alpha = alphas_t[torch.from_numpy(best_target[sl])]
        coef[sl] = _spd_solve(_add_diag(_gather_blocks(selected[sl], G)[0], alpha),
                              torch.from_numpy(b_all[sl])[..., None]).squeeze(-1).numpy()
        bar.update(sl.stop - sl.start)
    bar.close()
    return selected, coef, y_mean, sse, best_target


def _fold_errors(G: np.ndarray, G_f: np.ndarray, s_all: np.ndarray, S: np.ndarray, b: np.ndarray, cross: np.ndarray,
                 y_sums: np.ndarray, n_v: int, n: int, alphas: torch.Tensor) -> torch.Tensor:
    """Validation squared errors (B, n_alphas) of one fold for a batch of targets, from Gram matrices only.

    ``G``, ``G_f``: the (p, p) Gram matrices of all rows and of the fold's ``n_v`` held-out rows (X centred on the
    full mean); ``s_all``: the held-out rows' column sums; ``S`` (B, k) the selections; ``b`` (B, k) ``X_S^T y_c``;
    ``cross`` (B, k) ``X_f[:, S]^T y_f``; ``y_sums`` (2, B) the sum and the sum of squares of the held-out targets
    (centred on the full mean).
    """
    n_T = n - n_v
    G_S, G_fS = _gather_blocks(S, G, G_f)
    s = torch.from_numpy(s_all[S])  # (B, k)
    cross = torch.from_numpy(cross)
    ys, yy = torch.from_numpy(y_sums[0]), torch.from_numpy(y_sums[1])
    m = ys / n_T  # minus the training rows' mean of y (the full mean is zero)
    G_T, b_T = _centred_fold_system(G_S.sub_(G_fS), torch.from_numpy(b) - cross, s, ys, n_T)
    W = _solve_alphas(G_T, b_T[..., None], alphas)  # (B, k, A)
    # Held-out residual r = u - X_f w - c 1, u = y_f + m, c = s.w / n_T (the training mean's offset):
    # |r|^2 = u.u - 2 w.(X_f^T u) - 2 c sum(u) + w^T G_f w + 2 c (s.w) + n_v c^2, with s.w = c n_T.
    c = (s[:, :, None] * W).sum(1) / n_T  # (B, A)
    uu = yy + 2 * m * ys + n_v * m * m
    su = ys + n_v * m
    wXu = (W * (cross + s * m[:, None])[:, :, None]).sum(1)
    wGw = (W * (G_fS @ W)).sum(1)
    return uu[:, None] - 2 * wXu - 2 * c * su[:, None] + wGw + 2 * c * c * n_T + n_v * c * c


class _DualSystem:
    """n x n kernels ``K = X_S X_S^T`` of a batch of targets (selected voxels, globally centred)."""

    def __init__(self, XS: torch.Tensor, Yc: torch.Tensor):
        self.XS = XS
        self.K = XS.mT @ XS  # (B, n, n)

    def cv_sse(self, Yc: torch.Tensor, folds, alphas: torch.Tensor) -> torch.Tensor:
        """Validation squared error summed over folds, (n_alphas, B); kernels re-centred on each fold's training mean."""
        sse = Yc.new_zeros((len(alphas), Yc.shape[1]), dtype=torch.float64)
        for tr, va in folds:
            K_tr = self.K.index_select(1, tr)  # (B, n_T, n)
            k_mean = K_tr.mean(1)  # (B, n): K w with w the training rows' averaging vector
            m = k_mean.index_select(1, tr).mean(1)[:, None, None]
            km_tr, km_va = k_mean.index_select(1, tr), k_mean.index_select(1, va)
            Ktt = K_tr.index_select(2, tr) - km_tr[:, :, None] - km_tr[:, None, :] + m
            Ktv = K_tr.index_select(2, va) - km_tr[:, :, None] - km_va[:, None, :] + m
            y_tr, y_va = Yc.index_select(0, tr).T, Yc.index_select(0, va).T  # (B, n_T), (B, n_v)
            my = y_tr.mean(1, keepdim=True)
            C = _solve_alphas(Ktt, (y_tr - my)[..., None], alphas)
            resid = (y_va - my)[:, :, None] - Ktv.mT @ C  # (B, n_v, A)
            sse += resid.square().sum(1, dtype=torch.float64).T
        return sse

    def refit(self, Yc: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Weights (B, k) for one alpha per target: ``X_S^T (K + alpha I)^{-1} y_c``."""
        c = _spd_solve(_add_diag(self.K, alpha), Yc.T[..., None])
        return (self.XS @ c).squeeze(-1)
