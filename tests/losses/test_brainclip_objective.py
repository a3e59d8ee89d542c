"""BrainCLIP's objective against a float64 numpy implementation, and under bf16 autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp

from brainmclip.losses.brainclip_objective import brainclip_loss

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _info_nce_np(f: np.ndarray, t: np.ndarray, temperature: float) -> float:
    """Symmetric InfoNCE: mean over rows and over columns of -log softmax at the diagonal, averaged."""
    s = _unit(np.asarray(f, np.float64)) @ _unit(np.asarray(t, np.float64)).T / temperature
    rows = np.mean(logsumexp(s, axis=1) - np.diag(s))
    cols = np.mean(logsumexp(s, axis=0) - np.diag(s))
    return float((rows + cols) / 2)


def _kl_np(mu: np.ndarray, logvar: np.ndarray) -> float:
    mu, logvar = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
    return float(np.mean(0.5 * np.sum(mu**2 + np.exp(logvar) - 1 - logvar, axis=1)))


def _inputs(n: int = 16, d: int = 12, latent: int = 5, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f, v, t = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3))
    mu = torch.randn(n, latent, generator=g, dtype=torch.float64)
    logvar = 0.5 * torch.randn(n, latent, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (f, v, t, mu, logvar)]


@pytest.mark.parametrize(("alpha", "beta", "kl_weight"), [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.7, 0.3, 0.05),
                                                          (0.5, 0.5, 2.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_loss_equals_numpy_reference(alpha, beta, kl_weight, dtype):
    f, v, t, mu, logvar = _inputs(dtype=dtype)
    tau = 0.1
    got = brainclip_loss(f, v, t, alpha, beta, tau, mu, logvar, kl_weight)
    image, text, kl = _info_nce_np(f, v, tau), _info_nce_np(f, t, tau), _kl_np(mu, logvar)
    want = alpha * image + beta * text + kl_weight * kl
    # The KL term is computed in float32 whatever the input precision, hence 1e-6 for the total.
    assert float(got.total) == pytest.approx(want, rel=1e-6, abs=1e-9)
    tol = 1e-9 if dtype == torch.float64 else 1e-6
    assert (got.image is None) == (alpha == 0) and (got.text is None) == (beta == 0)
    assert (got.kl is None) == (kl_weight == 0)
    if got.image is not None:
        assert float(got.image) == pytest.approx(image, rel=tol)
    if got.text is not None:
        assert float(got.text) == pytest.approx(text, rel=tol)
    if got.kl is not None:
        assert float(got.kl) == pytest.approx(kl, rel=1e-6)


def test_loss_is_symmetric_infonce_not_one_direction():
    """The reference's two directions differ on these inputs, so matching it checks both are there."""
    f, v, *_ = _inputs(seed=3)
    s = _unit(f.numpy()) @ _unit(v.numpy()).T / 0.1
    rows = np.mean(logsumexp(s, axis=1) - np.diag(s))
    cols = np.mean(logsumexp(s, axis=0) - np.diag(s))
    assert abs(rows - cols) > 1e-2
    assert float(brainclip_loss(f, v, None, 1.0, 0.0, 0.1).total) == pytest.approx((rows + cols) / 2, rel=1e-9)


def test_terms_of_weight_zero_are_not_computed():
    f, v, t, mu, logvar = _inputs(seed=1)
    only_image = brainclip_loss(f, v, None, 1.0, 0.0, 0.07)  # no text target needed
    assert only_image.text is None and only_image.kl is None
    assert float(only_image.total) == pytest.approx(_info_nce_np(f, v, 0.07), rel=1e-9)
    only_text = brainclip_loss(f, None, t, 0.0, 2.0, 0.07, mu, logvar, kl_weight=0.0)  # no image target needed
    assert only_text.image is None and only_text.kl is None
    assert float(only_text.total) == pytest.approx(2 * _info_nce_np(f, t, 0.07), rel=1e-9)
    no_posterior = brainclip_loss(f, v, None, 1.0, 0.0, 0.07, kl_weight=0.5)  # the linear mapping: no mu
    assert no_posterior.kl is None
    assert float(no_posterior.total) == float(only_image.total)


def test_gradient_flows_to_embedding_and_posterior():
    f, v, t, mu, logvar = (x.clone().requires_grad_() for x in _inputs(seed=2))
    brainclip_loss(f, v, t, 0.5, 0.5, 0.07, mu, logvar, 0.1).total.backward()
    assert all(x.grad is not None and float(x.grad.abs().sum()) > 0 for x in (f, mu, logvar))
    # The KL gradient alone is known in closed form: w * mu / n and w * (exp(logvar) - 1) / (2 n).
    mu2, lv2 = mu.detach().clone().requires_grad_(), logvar.detach().clone().requires_grad_()
    brainclip_loss(f.detach(), v, None, 1.0, 0.0, 0.07, mu2, lv2, 0.1).total.backward()
    n = len(mu2)
    np.testing.assert_allclose(mu2.grad.numpy(), 0.1 * mu.detach().numpy() / n, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(lv2.grad.numpy(), 0.1 * (np.exp(logvar.detach().numpy()) - 1) / (2 * n), rtol=1e-6, atol=1e-9)


def _clip_like(n: int = 32, d: int = 64, seed: int = 0):
    """CLIP-like batch: a large component shared by every row plus small per-row parts; the fMRI embeddings
    are the image targets plus error, so all cosines are near 1 and differ in the third decimal."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g)
    image = mean + 0.1 * torch.randn(n, d, generator=g)
    text = image + 0.05 * torch.randn(n, d, generator=g)
    fmri = image + 0.05 * torch.randn(n, d, generator=g)
    mu, logvar = torch.randn(n, 8, generator=g), 0.3 * torch.randn(n, 8, generator=g)
    return fmri, image, text, mu, logvar


def test_loss_under_bf16_autocast_matches_float64():
    fmri, image, text, mu, logvar = _clip_like()
    # What a bf16 network hands the loss: bf16 embedding and posterior (the reference uses these same values).
    fmri, mu, logvar = fmri.bfloat16(), mu.bfloat16(), logvar.bfloat16()
    tau, w = 0.07, 0.01
    want = 0.5 * _info_nce_np(fmri.float(), image, tau) + 0.5 * _info_nce_np(fmri.float(), text, tau) \
        + w * _kl_np(mu.float(), logvar.float())
    with torch.autocast(**BF16):
        got = brainclip_loss(fmri, image, text, 0.5, 0.5, tau, mu, logvar, w)
        # The same InfoNCE with autocast left on: similarities rounded to bf16 before the softmax.
        logits = F.normalize(fmri.float(), dim=-1) @ F.normalize(image, dim=-1).T / tau
        labels = torch.arange(len(fmri))
        bare = float((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    assert logits.dtype == torch.bfloat16  # the bare computation did run in bf16
    assert got.total.dtype == torch.float32
    assert float(got.total) == pytest.approx(want, rel=1e-5)
    image_ref = _info_nce_np(fmri.float(), image, tau)
    assert float(got.image) == pytest.approx(image_ref, rel=1e-5)
    # Tolerance check: bf16 similarities would be off by far more than the tolerance asserted above.
    assert abs(bare - image_ref) > 1e-3 * image_ref
    assert abs(bare - image_ref) > 100 * abs(float(got.image) - image_ref)
