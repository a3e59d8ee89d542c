"""Linear CKA and HSIC against independent numpy references (Kornblith et al., 2019)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from brainmclip.losses import cka_loss, hsic, linear_cka, token_cka


def cka_feature_space(X: np.ndarray, Y: np.ndarray) -> float:
    """Feature-space linear CKA: ||YᵀX||_F² / (||XᵀX||_F ||YᵀY||_F) on column-centred X, Y."""
    X = X - X.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    return float(np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)))


def hsic_explicit(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H) / (n - 1) ** 2)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_hsic_matches_explicit_centering_matrix(rng):
    X, Y = rng.normal(size=(9, 4)), rng.normal(size=(9, 6))
    K, L = X @ X.T, Y @ Y.T
    got = hsic(torch.from_numpy(K), torch.from_numpy(L)).item()
    assert got == pytest.approx(hsic_explicit(K, L), rel=1e-10, abs=1e-12)
    # Non-symmetric kernels too: the trace identity must not assume symmetry.
    K2, L2 = rng.normal(size=(7, 7)), rng.normal(size=(7, 7))
    got2 = hsic(torch.from_numpy(K2), torch.from_numpy(L2)).item()
    assert got2 == pytest.approx(hsic_explicit(K2, L2), rel=1e-10, abs=1e-12)


def test_hsic_batched_leading_dims(rng):
    K = rng.normal(size=(3, 5, 5))
    L = rng.normal(size=(3, 5, 5))
    got = hsic(torch.from_numpy(K), torch.from_numpy(L)).numpy()
    np.testing.assert_allclose(got, [hsic_explicit(k, g) for k, g in zip(K, L, strict=True)], rtol=1e-10)


@pytest.mark.parametrize("shape", [(12, 5, 3), (12, 7), (2, 4, 3)])
def test_linear_cka_matches_feature_space_formula(rng, shape):
    A = rng.normal(size=shape)
    B = A @ rng.normal(size=(shape[-1], shape[-1])) + 0.5 * rng.normal(size=shape)
    got = linear_cka(torch.from_numpy(A), torch.from_numpy(B)).item()
    want = cka_feature_space(A.reshape(shape[0], -1), B.reshape(shape[0], -1))
    assert got == pytest.approx(want, abs=1e-5)
    assert 0.0 <= got <= 1.0 + 1e-9


def test_cka_of_different_feature_sizes(rng):
    A, B = rng.normal(size=(10, 3, 4)), rng.normal(size=(10, 6))
    got = linear_cka(torch.from_numpy(A), torch.from_numpy(B)).item()
    assert got == pytest.approx(cka_feature_space(A.reshape(10, -1), B), abs=1e-5)


def test_cka_self_is_one_and_loss_zero(rng):
    A = torch.from_numpy(rng.normal(size=(8, 4, 5)))
    assert linear_cka(A, A).item() == pytest.approx(1.0, abs=1e-12)
    assert cka_loss(A, A).item() == pytest.approx(0.0, abs=1e-12)
    assert cka_loss(A, A, token_level=True).item() == pytest.approx(0.0, abs=1e-12)


def test_cka_invariances(rng):
    n, m, d = 10, 3, 6
    A = torch.from_numpy(rng.normal(size=(n, m, d)))
    B = torch.from_numpy(rng.normal(size=(n, m, d)))
    base = linear_cka(A, B).item()
    assert linear_cka(A, 3.7 * B).item() == pytest.approx(base, abs=1e-10)
    assert linear_cka(A, 1e-3 * B).item() == pytest.approx(base, abs=1e-10)
    # Rotation of each token's d-dim space (block-diagonal in the flattened space) ...
    Q = torch.from_numpy(ortho_group.rvs(d, random_state=5))
    assert linear_cka(A, B @ Q).item() == pytest.approx(base, abs=1e-10)
    # ... and a full rotation of the flattened m*d feature space.
    Qfull = torch.from_numpy(ortho_group.rvs(m * d, random_state=6))
    rotated = (B.reshape(n, -1) @ Qfull).reshape(n, m, d)
    assert linear_cka(A, rotated).item() == pytest.approx(base, abs=1e-10)
    # Not invariant to a generic (non-orthogonal) linear map: the test above is not vacuous.
    M = torch.from_numpy(rng.normal(size=(d, d)))
    assert abs(linear_cka(A, B @ M).item() - base) > 1e-4


def test_float32_agrees_with_reference(rng):
    A, B = rng.normal(size=(16, 9, 8)), rng.normal(size=(16, 9, 8))
    A[:, 0] += 3.0  # an offset the centring must remove
    got = linear_cka(torch.from_numpy(A).float(), torch.from_numpy(B).float()).item()
    assert got == pytest.approx(cka_feature_space(A.reshape(16, -1), B.reshape(16, -1)), abs=1e-4)


def test_token_level_matches_per_sample_loop(rng):
    A, B = rng.normal(size=(5, 7, 4)), rng.normal(size=(5, 7, 4))
    B[2] = A[2] * 2.0  # one sample with identical geometry
    per_sample = [cka_feature_space(a, b) for a, b in zip(A, B, strict=True)]
    At, Bt = torch.from_numpy(A), torch.from_numpy(B)
    np.testing.assert_allclose(token_cka(At, Bt).numpy(), per_sample, atol=1e-5)
    assert cka_loss(At, Bt, token_level=True).item() == pytest.approx(1.0 - np.mean(per_sample), abs=1e-5)


@pytest.mark.parametrize("n", [2, 3, 16])
@pytest.mark.parametrize("token_level", [False, True])
def test_gradients_finite(rng, n, token_level):
    A = torch.tensor(rng.normal(size=(n, 4, 3)), requires_grad=True)
    B = torch.tensor(rng.normal(size=(n, 4, 3)), requires_grad=True)
    cka_loss(A, B, token_level=token_level).backward()
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all()
    assert A.grad.abs().sum() > 0


def test_gradients_finite_when_degenerate():
    # All samples identical: the centred Gram matrix is zero, CKA is defined as 0 here.
    A = torch.ones(4, 3, 2, requires_grad=True)
    B = torch.randn(4, 3, 2, dtype=torch.float32, requires_grad=True)
    loss = cka_loss(A, B)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all()


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        linear_cka(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError):
        linear_cka(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError):
        cka_loss(torch.randn(4, 3), torch.randn(4, 3), token_level=True)
