"""The shared training loop: a run killed part-way and started again ends with the weights of an unbroken run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmclip.miniature.training import Phase, cosine_with_warmup, run_phase


def _phase(total: int, fail_at: int | None = None) -> Phase:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, 2))

    def step_fn(step: int, rng: np.random.Generator) -> dict[str, float]:
        if fail_at is not None and step == fail_at:
            raise KeyboardInterrupt
        x = torch.from_numpy(rng.standard_normal((16, 4)).astype(np.float32))
        noise = torch.randn(16, 1)  # torch randomness is reseeded per step too
        loss = ((model(x) - x.sum(1, keepdim=True) - 0.1 * noise) ** 2).mean()
        loss.backward()
        return {"loss": loss.item()}

    return Phase("toy", {"model": model}, optimizer, schedule, total, step_fn, settings={"total": total})


def test_resume_reaches_the_uninterrupted_weights(tmp_path):
    whole = _phase(20)
    run_phase(tmp_path / "a", whole, seed=5, progress=False)
    broken = _phase(20, fail_at=13)
    with pytest.raises(KeyboardInterrupt):
        run_phase(tmp_path / "b", broken, seed=5, checkpoint_seconds=0.0, progress=False)
    resumed = _phase(20)
    stats = run_phase(tmp_path / "b", resumed, seed=5, progress=False)
    assert stats["steps"] == 20
    for a, b in zip(whole.modules["model"].parameters(), resumed.modules["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    # a finished phase is not run again, and its weights are loaded
    again = _phase(20)
    assert run_phase(tmp_path / "b", again, seed=5, progress=False)["last"] == {}
    for a, b in zip(whole.modules["model"].parameters(), again.modules["model"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_other_settings_are_refused(tmp_path):
    run_phase(tmp_path, _phase(4), seed=0, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        run_phase(tmp_path, _phase(5), seed=0, progress=False)


def test_divergence_is_reported(tmp_path):
    phase = _phase(3)
    phase.step_fn = lambda step, rng: {"loss": float("nan")}
    with pytest.raises(FloatingPointError, match="diverged"):
        run_phase(tmp_path, phase, seed=0, progress=False)


def test_cosine_with_warmup():
    f = cosine_with_warmup(10, 2, final_fraction=0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0) and f(2) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.1) and f(6) == pytest.approx(0.55)
