"""Every loss under bf16 autocast (how GPU training runs) against a float64 reference.

The inputs mimic CLIP targets and start-at-mean predictions: a large component shared by all
samples and small sample-to-sample differences, the regime where rounding before a subtraction
destroys the signal.
"""

from __future__ import annotations

import pytest
import torch

from brainmclip.losses import cka_loss, info_nce, mse, multi_granularity_loss, sims_loss, soft_clip
from brainmclip.losses.multi_granularity import LossWeights
from brainmclip.models.layers import TokenHead

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def _batch(spread: float, n: int = 24, m: int = 17, d: int = 32, seed: int = 0):
    """Targets = shared mean + spread * per-sample part; predictions = targets + a fifth of that spread in error."""
    g = torch.Generator().manual_seed(seed)
    mean = 1.0 + torch.rand(m, d, generator=g, dtype=torch.float64)
    target = mean + spread * torch.randn(n, m, d, generator=g, dtype=torch.float64)
    pred = target + 0.2 * spread * torch.randn(n, m, d, generator=g, dtype=torch.float64)
    return target, pred


def _gram_first_cka_loss(A, B):
    """The textbook order (Gram matrix, then centring), as a bf16 matmul rounds it: what went wrong before."""
    def centred_gram(X):
        K = (X.reshape(len(X), -1) @ X.reshape(len(X), -1).T).double()
        return K - K.mean(0) - K.mean(1, keepdim=True) + K.mean()
    K, L = centred_gram(A), centred_gram(B)
    return 1 - float((K * L).sum() / (K.norm() * L.norm()))


@pytest.mark.parametrize("spread", [0.3, 0.1, 0.03])
def test_cka_under_bf16_matches_float64(spread):
    target, pred = _batch(spread)
    want = float(cka_loss(target, pred))
    with torch.autocast(**BF16):
        got = cka_loss(target.float(), pred.float())
        token = cka_loss(target.float(), pred.float(), token_level=True)
        naive = _gram_first_cka_loss(target.float(), pred.float())
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(want, abs=2e-3 * max(want, 1e-2) + 1e-4)
    assert float(token) == pytest.approx(float(cka_loss(target, pred, token_level=True)), rel=1e-3, abs=1e-5)
    if spread <= 0.1:  # the case is hard: forming the Gram matrix first in bf16 is far off
        assert abs(naive - want) > 10 * abs(float(got) - want) + 0.01


@pytest.mark.parametrize("loss", [mse, sims_loss, info_nce, soft_clip], ids=lambda f: f.__name__)
def test_other_terms_under_bf16_match_float64(loss):
    target, pred = _batch(0.03)
    want = float(loss(pred, target))
    with torch.autocast(**BF16):
        got = loss(pred.float(), target.float())
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(want, rel=1e-3, abs=1e-7)


def test_multi_granularity_gradient_under_bf16():
    target, pred = _batch(0.03)
    weights = LossWeights(mse=1.0, cka=1.0, sims=1.0, infonce=0.1)
    ref = pred.clone().requires_grad_()
    want, _ = multi_granularity_loss(target, ref, weights)
    want.backward()
    p32 = pred.float().requires_grad_()
    with torch.autocast(**BF16):
        got, _ = multi_granularity_loss(target.float(), p32, weights)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-3)
    cos = torch.nn.functional.cosine_similarity(p32.grad.double().flatten(), ref.grad.flatten(), dim=0)
    assert float(cos) > 0.999


def test_token_head_keeps_image_differences_under_bf16():
    head = TokenHead(16, 5, 8)
    mean = 10.0 + torch.rand(5, 8)
    head.start_at(mean)
    with torch.no_grad():
        head.proj.weight.normal_(std=1e-3)  # image-specific part ~1e-3 of a mean ~10: below bf16's step there
    x = torch.randn(4, 16)
    with torch.no_grad():
        want = head(x) - mean
    with torch.autocast(**BF16), torch.no_grad():
        out = head(x)
    assert out.dtype == torch.float32
    diff = out - mean
    rel = float((diff - want).norm() / want.norm())
    assert rel < 0.02  # bf16's product keeps ~3 significant digits of the differences themselves
