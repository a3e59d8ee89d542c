"""Voxel-selected ridge (MindDiffuser's decoders): the batched solver against an independent per-target loop.

The reference selects voxels with ``np.lexsort`` on (-|r|, voxel index) -- the documented tie rule:
larger |Pearson r| first, equal |r| to the lower voxel index, constant columns r = 0 -- and fits
scikit-learn ``Ridge`` on every ``KFold(shuffle=False)`` fold and alpha, choosing the alpha with
the lowest summed validation squared error (the first one on an exact tie, like ``np.argmin``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.models import voxel_ridge
from brainmclip.models.ridge import RidgeDecoder
from brainmclip.models.voxel_ridge import (
    VoxelSelectedRidge,
    _gather_blocks,
    _gram,
    _spd_solve,
    _voxel_gram,
    select_voxels,
)

ALPHAS = np.logspace(-1, 4, 6)


@pytest.fixture(params=["gathered", "gram"])
def route(request, monkeypatch):
    """Force the primal solver's route: per-target gathered voxels, or systems gathered from the voxels' Gram matrix."""
    monkeypatch.setattr(voxel_ridge, "_GRAM_ROUTE_RATE", 0.0 if request.param == "gathered" else float("inf"))
    return request.param


def _primal_form(route):
    return "primal" if route == "gathered" else "gram"


def _sklearn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    model_selection = pytest.importorskip("sklearn.model_selection")
    return linear_model.Ridge, model_selection.KFold


def _problem(n=60, p=40, t=6, n_test=9, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n + n_test, p)) + offset
    W = rng.normal(size=(p, t)) * (rng.random((p, t)) < 0.3)
    Y = X[:n] @ W + 2.0 * rng.normal(size=(n, t)) + offset
    return X[:n], Y, X[n:]


def _ref_abs_r(X, Y):
    """|Pearson r| (voxels x targets) in float64; exactly 0 for constant columns."""
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Xc[:, np.ptp(X, axis=0) == 0] = 0
    Yc[:, np.ptp(Y, axis=0) == 0] = 0
    nx, ny = np.linalg.norm(Xc, axis=0), np.linalg.norm(Yc, axis=0)
    den = np.outer(nx, ny)
    return np.abs(np.divide(Xc.T @ Yc, den, out=np.zeros_like(den), where=den > 0))


def _ref_select(X, Y, k):
    r = _ref_abs_r(X, Y)
    idx = np.arange(X.shape[1])
    return np.stack([np.sort(np.lexsort((idx, -r[:, j]))[:k]) for j in range(Y.shape[1])])


def _reference(X, Y, X_test, k, alphas, n_folds, alpha_per):
    """Per-target loop: selection, sklearn Ridge on every fold and alpha, refit with the chosen alpha."""
    Ridge, KFold = _sklearn()
    S = _ref_select(X, Y, k)
    sse = np.zeros((len(alphas), Y.shape[1]))
    for j in range(Y.shape[1]):
        XS = X[:, S[j]]
        for train, val in KFold(n_folds, shuffle=False).split(XS):
            for a, alpha in enumerate(alphas):
                pred = Ridge(alpha=alpha).fit(XS[train], Y[train, j]).predict(XS[val])
                sse[a, j] += ((Y[val, j] - pred) ** 2).sum()
    best = np.argmin(sse, axis=0) if alpha_per == "target" else np.full(Y.shape[1], np.argmin(sse.sum(1)))
    pred = np.stack([Ridge(alpha=alphas[best[j]]).fit(X[:, S[j]], Y[:, j]).predict(X_test[:, S[j]])
                     for j in range(Y.shape[1])], axis=1)
    return S, alphas[best], sse, pred


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------- against the reference loop


@pytest.mark.parametrize("alpha_per", ["target", "block"])
@pytest.mark.parametrize(("n", "p", "k"), [(60, 40, 10), (30, 50, 40)], ids=["primal", "dual"])
def test_matches_per_target_reference(n, p, k, alpha_per, route):
    X, Y, X_test = _problem(n=n, p=p, offset=3.0)
    model = VoxelSelectedRidge(n_voxels=k, alphas=ALPHAS, n_folds=4, alpha_per=alpha_per, batch_size=4,
                               device="cpu").fit(X, Y)
    S, alpha, sse, pred = _reference(X, Y, X_test, k, ALPHAS, 4, alpha_per)
    assert model.form_ == (_primal_form(route) if k < n else "dual")
    assert model.selected_.dtype == np.int32 and model.selected_.shape == (Y.shape[1], k)
    np.testing.assert_array_equal(model.selected_, S)
    if alpha_per == "target":
        np.testing.assert_array_equal(model.alpha_, alpha)
        assert len(set(alpha)) > 1  # the problem really exercises per-target choices
    else:
        assert isinstance(model.alpha_, float) and model.alpha_ == alpha[0]
    np.testing.assert_allclose(model.cv_mse_ * n, sse, rtol=1e-8)
    assert _rel(model.predict(X_test), pred) < 1e-4
    # coef_/intercept_ are the explicit linear model on the selected voxels
    explicit = np.einsum("mtk,tk->mt", X_test[:, model.selected_], model.coef_) + model.intercept_
    assert _rel(explicit, pred) < 1e-4


def test_batch_size_and_memory_do_not_change_the_result(route):
    X, Y, X_test = _problem(t=7)
    a = VoxelSelectedRidge(n_voxels=12, alphas=ALPHAS, n_folds=3, batch_size=1, device="cpu").fit(X, Y)
    assert a.form_ == _primal_form(route)
    b = VoxelSelectedRidge(n_voxels=12, alphas=ALPHAS, n_folds=3, device="cpu").fit(X, Y)
    c = VoxelSelectedRidge(n_voxels=12, alphas=ALPHAS, n_folds=3, memory_mb=0.05, device="cpu").fit(X, Y)
    for other in (b, c):
        np.testing.assert_array_equal(a.selected_, other.selected_)
        np.testing.assert_array_equal(a.alpha_, other.alpha_)
        np.testing.assert_allclose(a.predict(X_test), other.predict(X_test), rtol=1e-10, atol=1e-12)


def test_gram_route_in_several_target_groups(monkeypatch):
    """More targets than the cross-product stash holds: groups of targets, each with the folds' Gram matrices again."""
    X, Y, X_test = _problem(t=7)
    monkeypatch.setattr(voxel_ridge, "_GRAM_ROUTE_RATE", float("inf"))
    one = VoxelSelectedRidge(n_voxels=12, alphas=ALPHAS, n_folds=3, batch_size=2, device="cpu").fit(X, Y)
    monkeypatch.setattr(voxel_ridge, "_GRAM_ROUTE_STASH_BYTES", 8 * 12 * 3 * 3)  # 3 targets: groups of 4, 3
    groups = VoxelSelectedRidge(n_voxels=12, alphas=ALPHAS, n_folds=3, batch_size=2, device="cpu").fit(X, Y)
    assert one.form_ == groups.form_ == "gram"
    np.testing.assert_array_equal(one.selected_, groups.selected_)
    np.testing.assert_array_equal(one.alpha_, groups.alpha_)
    np.testing.assert_array_equal(one.cv_mse_, groups.cv_mse_)
    np.testing.assert_array_equal(one.predict(X_test), groups.predict(X_test))


def test_tie_rule_constant_voxels_and_constant_target(route):
    X, Y, X_test = _problem(n=40, p=20, t=4)
    X[:, [2, 5, 11, 17]] = 7.25  # constant voxels: r = 0, tied; 16 varying voxels, k = 18 needs two of them
    Y[:, 3] = -1.5  # a constant target: every r = 0, so the first k voxels
    S_ref = _ref_select(X, Y, 18)
    np.testing.assert_array_equal(select_voxels(X, Y, 18), S_ref)
    assert {2, 5}.issubset(S_ref[0]) and not {11, 17} & set(S_ref[0])
    np.testing.assert_array_equal(S_ref[3], np.arange(18))
    model = VoxelSelectedRidge(n_voxels=18, alphas=ALPHAS, n_folds=4, device="cpu").fit(X, Y)
    assert model.form_ == _primal_form(route)
    np.testing.assert_array_equal(model.selected_, S_ref)
    np.testing.assert_allclose(model.predict(X_test)[:, 3], -1.5, atol=1e-12)
    _, _, _, pred = _reference(X, Y, X_test, 18, ALPHAS, 4, "target")
    assert _rel(model.predict(X_test), pred) < 1e-4


def test_all_voxels_selected_equals_plain_ridge():
    X, Y, X_test = _problem(n=50, p=12, t=5)
    model = VoxelSelectedRidge(n_voxels=12, alphas=ALPHAS, n_folds=5, alpha_per="block", device="cpu").fit(X, Y)
    plain = RidgeDecoder(alphas=ALPHAS, n_folds=5, alpha_per="block", dtype=np.float64).fit(X, Y)
    np.testing.assert_array_equal(model.selected_, np.tile(np.arange(12), (5, 1)))
    assert model.alpha_ == plain.alpha_
    assert _rel(model.predict(X_test), plain.predict(X_test)) < 1e-8


def test_single_alpha_skips_cv_and_keeps_target_shape(route):
    Ridge, _ = _sklearn()
    X, Y, X_test = _problem(t=6)
    model = VoxelSelectedRidge(n_voxels=9, alphas=[3.0], n_folds=5, device="cpu").fit(X, Y.reshape(-1, 2, 3))
    assert model.form_ == _primal_form(route)
    assert model.cv_mse_ is None and np.all(model.alpha_ == 3.0)
    pred = model.predict(X_test)
    assert pred.shape == (len(X_test), 2, 3)
    S = _ref_select(X, Y, 9)
    ref = np.stack([Ridge(alpha=3.0).fit(X[:, S[j]], Y[:, j]).predict(X_test[:, S[j]]) for j in range(6)], 1)
    assert _rel(pred.reshape(len(X_test), 6), ref) < 1e-8


def test_float32_close_to_float64():
    X, Y, X_test = _problem(offset=50.0)
    ref = VoxelSelectedRidge(n_voxels=10, alphas=ALPHAS, n_folds=4, device="cpu").fit(X, Y)
    low = VoxelSelectedRidge(n_voxels=10, alphas=ALPHAS, n_folds=4, dtype=np.float32, device="cpu").fit(X, Y)
    assert low.coef_.dtype == np.float32 and low.form_ == "primal"  # the Gram route is float64-only
    np.testing.assert_array_equal(low.selected_, ref.selected_)
    assert _rel(low.predict(X_test), ref.predict(X_test)) < 1e-3


def test_spd_solve_falls_back_for_singular_systems():
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(3, 6, 4))
    A = Z @ Z.transpose(0, 2, 1)  # rank 4 of 6: Cholesky fails, the pseudo-inverse answers
    A[1] += np.eye(6)  # ... except for this one
    b = rng.normal(size=(3, 6, 1))
    x = _spd_solve(torch.from_numpy(A), torch.from_numpy(b)).numpy()
    for i in range(3):
        np.testing.assert_allclose(x[i], np.linalg.pinv(A[i]) @ b[i], rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path):
    X, Y, X_test = _problem()
    for alpha_per in ("target", "block"):
        model = VoxelSelectedRidge(n_voxels=10, alphas=ALPHAS, n_folds=4, alpha_per=alpha_per, batch_size=5,
                                   device="cpu").fit(X, Y.reshape(-1, 3, 2))
        path = model.save(tmp_path / f"{alpha_per}.model")
        assert path.name == f"{alpha_per}.model" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
        back = VoxelSelectedRidge.load(path)
        assert back.get_params() == {**model.get_params(), "alphas": list(ALPHAS), "dtype": np.float64}
        for name in VoxelSelectedRidge._FITTED:
            np.testing.assert_array_equal(getattr(back, name), getattr(model, name))
        assert type(back.alpha_) is type(model.alpha_) and back.form_ == model.form_
        np.testing.assert_array_equal(back.predict(X_test), model.predict(X_test))
    unfitted = VoxelSelectedRidge.load(VoxelSelectedRidge(n_voxels=7).save(tmp_path / "unfitted.npz"))
    assert unfitted.n_voxels == 7 and not hasattr(unfitted, "coef_")


def test_load_refuses_other_files(tmp_path):
    X, Y, _ = _problem()
    ridge = RidgeDecoder(alphas=[1.0], n_folds=None).fit(X, Y).save(tmp_path / "ridge.npz")
    with pytest.raises(InvalidInputError, match="format 'brainmclip-ridge/1'; expected"):
        VoxelSelectedRidge.load(ridge)
    (tmp_path / "text.npz").write_text("not a model")
    with pytest.raises(InvalidInputError, match="not an .npz file"):
        VoxelSelectedRidge.load(tmp_path / "text.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(InvalidInputError, match="not an .npz file"):
        VoxelSelectedRidge.load(tmp_path / "array.npy")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(InvalidInputError, match="format None; expected"):
        VoxelSelectedRidge.load(tmp_path / "other.npz")
    with pytest.raises(MissingInputError, match="missing"):
        VoxelSelectedRidge.load(tmp_path / "absent.npz")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_voxels": 41}, "n_voxels=41; expected an integer between 1 and the number of voxels"),
    ({"n_voxels": 0}, "n_voxels=0"),
    ({"n_voxels": 2.5}, "n_voxels=2.5"),
    ({"alpha_per": "voxel"}, "alpha_per='voxel'"),
    ({"alphas": [1.0, -2.0]}, "alphas"),
    ({"n_folds": 61}, "n_folds=61"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"dtype": np.int32}, "dtype int32"),
    ({"device": "nonsense"}, "device='nonsense'"),
])
def test_invalid_settings(kwargs, match):
    X, Y, _ = _problem()
    with pytest.raises(InvalidInputError, match=match):
        VoxelSelectedRidge(**{"n_voxels": 5, **kwargs}).fit(X, Y)


def test_invalid_data():
    X, Y, X_test = _problem()
    model = VoxelSelectedRidge(n_voxels=5, alphas=ALPHAS, n_folds=3, device="cpu")
    bad = X.copy()
    bad[3, 4] = np.nan
    with pytest.raises(InvalidInputError, match="X holds NaN"):
        model.fit(bad, Y)
    bad = Y.copy()
    bad[0, 2] = np.inf
    with pytest.raises(InvalidInputError, match="Y holds NaN or inf"):
        model.fit(X, bad)
    with pytest.raises(InvalidInputError, match="Y has 59 rows but X has 60"):
        model.fit(X, Y[:-1])
    with pytest.raises(InvalidInputError, match="expected a 2-D"):
        model.fit(X[0], Y)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict(X_test)
    model.fit(X, Y)
    with pytest.raises(InvalidInputError, match="X has 39 voxels; expected 40"):
        model.predict(X_test[:, :-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda():
    X, Y, _ = _problem()
    with pytest.raises(InvalidInputError, match="torch sees no CUDA device"):
        VoxelSelectedRidge(n_voxels=5, device="cuda").fit(X, Y)


@pytest.mark.parametrize("mode", ["target", "block"])
def test_all_voxels_shortcut_equals_the_per_target_reference(mode):
    """k = every voxel takes one shared decomposition; it must still match the independent per-target loop."""
    X, Y, X_test = _problem(n=60, p=14, t=4)
    model = VoxelSelectedRidge(n_voxels=14, alphas=ALPHAS, n_folds=5, alpha_per=mode, device="cpu").fit(X, Y)
    assert model.form_ == "shared"
    _, _, _, pred = _reference(X, Y, X_test, 14, ALPHAS, 5, mode)
    assert _rel(model.predict(X_test), pred) < 1e-4


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_blocked_gram_equals_numpy(depth):
    rng = np.random.default_rng(depth)
    A = rng.standard_normal((3, 131, 40))  # odd size: unequal halves at every level
    got = _gram(torch.from_numpy(A)[:, :, 5:35], depth).numpy()  # a strided view, as the folds pass it
    want = np.einsum("bin,bjn->bij", A[:, :, 5:35], A[:, :, 5:35])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_voxel_gram_equals_numpy():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((70, 1500))  # 1,500 columns: the mirroring runs over two unequal blocks
    got = _voxel_gram(X[20:45])  # a row slice, as the folds pass it
    assert got.flags.c_contiguous
    np.testing.assert_allclose(got, X[20:45].T @ X[20:45], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got, got.T)


def test_gather_blocks_equals_fancy_indexing():
    rng = np.random.default_rng(4)
    G = rng.standard_normal((50, 50))
    S = np.sort(rng.permutation(50)[:7]).astype(np.int32)[None].repeat(5, 0)
    S[2] = np.arange(7)
    H = rng.standard_normal((50, 50))
    got_G, got_H = _gather_blocks(S, G, H, chunk=2)  # uneven chunks
    for j in range(5):
        np.testing.assert_array_equal(got_G[j].numpy(), G[np.ix_(S[j], S[j])])
        np.testing.assert_array_equal(got_H[j].numpy(), H[np.ix_(S[j], S[j])])


def test_gram_route_choice():
    model = VoxelSelectedRidge()
    cpu = torch.device("cpu")
    f64 = np.dtype(np.float64)
    assert model._gram_route(1000, 3000, 250, 2000, cpu, f64)
    assert not model._gram_route(1000, 3000, 250, 30, cpu, f64)  # too few targets to pay for the Gram matrix
    assert not model._gram_route(1000, 3000, 250, 2000, cpu, np.dtype(np.float32))
    assert not model._gram_route(1000, 3000, 250, 2000, torch.device("cuda"), f64)
    assert not model._gram_route(9000, 20000, 250, 10**6, cpu, f64)  # two 20,000-square matrices: 6.4 GB


def test_gram_route_unchanged_under_bf16_autocast(monkeypatch):
    """The Gram route's validation errors are differences of large sums; autocast leaves its float64 work alone."""
    X, Y, X_test = _problem(t=5)
    monkeypatch.setattr(voxel_ridge, "_GRAM_ROUTE_RATE", float("inf"))
    plain = VoxelSelectedRidge(n_voxels=12, alphas=ALPHAS, n_folds=4, device="cpu").fit(X, Y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = VoxelSelectedRidge(n_voxels=12, alphas=ALPHAS, n_folds=4, device="cpu").fit(X, Y)
    _, _, sse, pred = _reference(X, Y, X_test, 12, ALPHAS, 4, "target")
    assert auto.form_ == "gram"
    np.testing.assert_array_equal(auto.cv_mse_, plain.cv_mse_)
    np.testing.assert_allclose(auto.cv_mse_ * len(X), sse, rtol=1e-8)
    assert _rel(auto.predict(X_test), pred) < 1e-4
