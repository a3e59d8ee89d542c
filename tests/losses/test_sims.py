"""Sims: class-token-to-token cosine profiles and their MSE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmclip.losses import sims_loss, token_similarity


def token_similarity_loop(A: np.ndarray) -> np.ndarray:
    n, m, _ = A.shape
    out = np.zeros((n, m - 1))
    for i in range(n):
        for j in range(1, m):
            a, b = A[i, 0], A[i, j]
            out[i, j - 1] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return out


@pytest.fixture
def A():
    return np.random.default_rng(3).normal(size=(4, 6, 5))


def test_token_similarity_matches_loop(A):
    got = token_similarity(torch.from_numpy(A)).numpy()
    assert got.shape == (4, 5)
    np.testing.assert_allclose(got, token_similarity_loop(A), atol=1e-12)


def test_sims_loss_matches_numpy(A):
    B = np.random.default_rng(4).normal(size=A.shape)
    want = np.mean((token_similarity_loop(A) - token_similarity_loop(B)) ** 2)
    assert sims_loss(torch.from_numpy(A), torch.from_numpy(B)).item() == pytest.approx(want, rel=1e-10)


def test_sims_loss_zero_for_identical_and_per_token_scaling(A):
    At = torch.from_numpy(A)
    assert sims_loss(At, At).item() == 0.0
    scales = torch.from_numpy(np.random.default_rng(5).uniform(0.1, 10.0, size=(4, 6, 1)))
    assert sims_loss(At, At * scales).item() == pytest.approx(0.0, abs=1e-20)


def test_sims_loss_positive_otherwise(A):
    At = torch.from_numpy(A)
    assert sims_loss(At, At + 0.3 * torch.randn_like(At)).item() > 1e-6
    # Flipping a token's sign changes its cosine with the class token.
    flipped = At.clone()
    flipped[:, 2] *= -1
    assert sims_loss(At, flipped).item() > 1e-3


def test_sims_gradient_finite(A):
    B = torch.from_numpy(A).clone().requires_grad_(True)
    sims_loss(torch.from_numpy(A) + 0.1, B).backward()
    assert torch.isfinite(B.grad).all()


def test_needs_tokens():
    with pytest.raises(ValueError):
        token_similarity(torch.randn(3, 4))
    with pytest.raises(ValueError):
        token_similarity(torch.randn(3, 1, 4))
