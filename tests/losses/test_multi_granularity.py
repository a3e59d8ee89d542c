"""The weighted multi-granularity loss: term switching, parts, and that training lowers every term."""

from __future__ import annotations

import pytest
import torch

from brainmclip.losses import (
    LOSS_TERMS,
    LossWeights,
    cka_loss,
    info_nce,
    mse,
    multi_granularity_loss,
    sims_loss,
    soft_clip,
)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(8, 5, 6, generator=g, dtype=torch.float64)
    pred = target + 0.7 * torch.randn(8, 5, 6, generator=g, dtype=torch.float64)
    return target, pred


def reference_terms(target, pred, w: LossWeights) -> dict[str, torch.Tensor]:
    return {
        "mse": mse(pred, target),
        "cka": cka_loss(target, pred, token_level=w.token_level_cka),
        "sims": sims_loss(target, pred),
        "infonce": info_nce(pred, target, w.temperature),
        "softclip": soft_clip(pred, target, w.temperature),
    }


def test_default_is_paper_l_mg(pair):
    target, pred = pair
    total, parts = multi_granularity_loss(target, pred)
    assert set(parts) == {"mse", "cka", "sims"}
    want = mse(pred, target) + cka_loss(target, pred) + sims_loss(target, pred)
    assert total.item() == pytest.approx(want.item(), rel=1e-12)


def test_mse_only_equals_mse(pair):
    target, pred = pair
    total, parts = multi_granularity_loss(target, pred, LossWeights(mse=1.0, cka=0.0, sims=0.0))
    assert list(parts) == ["mse"]
    assert total.item() == mse(pred, target).item()


@pytest.mark.parametrize("active", [
    ("mse", "infonce"), ("mse", "softclip"), ("mse", "sims"), ("mse", "cka"), ("mse", "cka", "sims"),
    LOSS_TERMS,
])
@pytest.mark.parametrize("token_level", [False, True])
def test_ablation_rows(pair, active, token_level):
    target, pred = pair
    scale = {name: 0.5 + i for i, name in enumerate(LOSS_TERMS)}
    w = LossWeights(**{name: (scale[name] if name in active else 0.0) for name in LOSS_TERMS},
                    token_level_cka=token_level, temperature=0.2)
    total, parts = multi_granularity_loss(target, pred, w)
    ref = reference_terms(target, pred, w)
    assert tuple(parts) == tuple(name for name in LOSS_TERMS if name in active)
    for name, value in parts.items():
        assert not value.requires_grad and value.dtype == torch.float32 and value.ndim == 0
        assert value.item() == pytest.approx(ref[name].item(), rel=1e-6)
    want = sum(scale[name] * ref[name] for name in active)
    assert total.item() == pytest.approx(want.item(), rel=1e-12)


def test_invalid_weights():
    with pytest.raises(ValueError):
        LossWeights(mse=-1.0)
    with pytest.raises(ValueError):
        LossWeights(temperature=0.0)
    with pytest.raises(ValueError):
        multi_granularity_loss(torch.randn(4, 3, 2), torch.randn(4, 3, 2),
                               LossWeights(mse=0.0, cka=0.0, sims=0.0))


@pytest.mark.parametrize("token_level", [False, True])
def test_each_term_goes_down_on_a_tiny_run(token_level):
    torch.manual_seed(0)
    n, p, m, d = 24, 10, 5, 6
    x = torch.randn(n, p)
    # A learnable (linear) target plus a little noise, so every term can improve.
    target = (x @ torch.randn(p, m * d)).reshape(n, m, d) + 0.05 * torch.randn(n, m, d)
    model = torch.nn.Linear(p, m * d)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.03)
    w = LossWeights(mse=1.0, cka=1.0, sims=1.0, infonce=0.2, softclip=0.2,
                    token_level_cka=token_level, temperature=0.5)
    history = []
    for _ in range(60):
        optimiser.zero_grad()
        total, parts = multi_granularity_loss(target, model(x).reshape(n, m, d), w)
        total.backward()
        assert all(torch.isfinite(q.grad).all() for q in model.parameters())
        optimiser.step()
        history.append((total.item(), {k: v.item() for k, v in parts.items()}))
    (first_total, first), (last_total, last) = history[0], history[-1]
    assert last_total < 0.5 * first_total
    for name in LOSS_TERMS:
        assert last[name] < first[name], f"{name} did not decrease: {first[name]} -> {last[name]}"
