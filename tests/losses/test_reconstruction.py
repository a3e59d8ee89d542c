"""MSE, cosine loss and the Gaussian KL against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmclip.losses import cosine_loss, gaussian_kl, mse


def test_mse_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
    assert mse(torch.from_numpy(a), torch.from_numpy(b)).item() == pytest.approx(np.mean((a - b) ** 2))
    with pytest.raises(ValueError):
        mse(torch.zeros(2, 3), torch.zeros(3, 2))


def test_cosine_loss():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 2, 3)), rng.normal(size=(4, 2, 3))
    fa, fb = a.reshape(4, -1), b.reshape(4, -1)
    cos = np.sum(fa * fb, axis=1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))
    assert cosine_loss(torch.from_numpy(a), torch.from_numpy(b)).item() == pytest.approx(1 - cos.mean())
    at = torch.from_numpy(a)
    assert cosine_loss(at, 5 * at).item() == pytest.approx(0.0, abs=1e-12)
    assert cosine_loss(at, -at).item() == pytest.approx(2.0)


def test_gaussian_kl_matches_torch_distributions():
    rng = np.random.default_rng(2)
    mu, logvar = torch.from_numpy(rng.normal(size=(5, 7))), torch.from_numpy(rng.normal(size=(5, 7)))
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    want = torch.distributions.kl_divergence(q, p).sum(dim=1).mean().item()
    assert gaussian_kl(mu, logvar).item() == pytest.approx(want, rel=1e-10)
    assert gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0
