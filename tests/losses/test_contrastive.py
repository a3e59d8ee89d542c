"""InfoNCE and SoftCLIP against numpy references written from the formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from brainmclip.losses import info_nce, soft_clip


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.reshape(x.shape[0], -1)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def info_nce_ref(pred: np.ndarray, target: np.ndarray, tau: float) -> float:
    S = unit_rows(pred) @ unit_rows(target).T / tau
    n = S.shape[0]
    forward = -np.mean([log_softmax_rows(S)[i, i] for i in range(n)])
    backward = -np.mean([log_softmax_rows(S.T)[i, i] for i in range(n)])
    return (forward + backward) / 2


def soft_clip_ref(pred: np.ndarray, target: np.ndarray, tau: float) -> float:
    t = unit_rows(target)
    Y = np.exp(log_softmax_rows(t @ t.T / tau))
    S = unit_rows(pred) @ t.T / tau
    forward = -np.mean(np.sum(Y * log_softmax_rows(S), axis=1))
    # Y comes from a symmetric matrix of logits, so the same labels serve the transposed direction.
    backward = -np.mean(np.sum(Y * log_softmax_rows(S.T), axis=1))
    return (forward + backward) / 2


@pytest.fixture
def pair():
    rng = np.random.default_rng(11)
    target = rng.normal(size=(8, 3, 4))
    pred = target + 0.8 * rng.normal(size=target.shape)
    return pred, target


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_info_nce_matches_reference(pair, tau):
    pred, target = pair
    got = info_nce(torch.from_numpy(pred), torch.from_numpy(target), tau).item()
    assert got == pytest.approx(info_nce_ref(pred, target, tau), rel=1e-10)


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_soft_clip_matches_reference(pair, tau):
    pred, target = pair
    got = soft_clip(torch.from_numpy(pred), torch.from_numpy(target), tau).item()
    assert got == pytest.approx(soft_clip_ref(pred, target, tau), rel=1e-10)


def test_soft_clip_approaches_info_nce_for_orthogonal_targets():
    n, d = 6, 10
    target = ortho_group.rvs(d, random_state=2)[:n] * 3.0  # mutually orthogonal rows
    pred = target + 0.5 * np.random.default_rng(0).normal(size=target.shape)
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    assert soft_clip(p, t, 0.01).item() == pytest.approx(info_nce(p, t, 0.01).item(), rel=1e-6)
    # At a warm temperature the soft labels spread out and the two differ.
    assert abs(soft_clip(p, t, 1.0).item() - info_nce(p, t, 1.0).item()) > 1e-3


def test_info_nce_lower_for_matched_pairs(pair):
    pred, target = pair
    t = torch.from_numpy(target)
    shuffled = torch.from_numpy(pred[::-1].copy())
    assert info_nce(torch.from_numpy(pred), t).item() < info_nce(shuffled, t).item()


def test_gradients_finite(pair):
    pred, target = pair
    p = torch.from_numpy(pred).requires_grad_(True)
    (info_nce(p, torch.from_numpy(target)) + soft_clip(p, torch.from_numpy(target))).backward()
    assert torch.isfinite(p.grad).all()


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        info_nce(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError):
        soft_clip(torch.randn(3, 4), torch.randn(3, 4), temperature=0.0)
