"""Ridge decoder: the SVD solver, its K-fold alpha search and the estimator, checked against
scikit-learn's Ridge (brute force over the same folds) and against the normal equations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmclip.models.ridge import (
    DEFAULT_ALPHAS,
    RidgeDecoder,
    iter_ridge_svd,
    kfold_indices,
    ridge_cv_scores,
    solve_ridge_svd,
)

ALPHAS = np.logspace(-1, 4, 8)


def _sklearn_ridge():
    return pytest.importorskip("sklearn.linear_model").Ridge


def _problem(n=103, p=40, t=30, noise=3.0, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) + offset
    Y = X @ rng.normal(size=(p, t)) + noise * rng.normal(size=(n, t)) + offset
    return X, Y


def _brute_force_sse(X, Y, alphas, n_folds):
    """Validation squared error per (alpha, target), fitting sklearn Ridge on every fold and alpha."""
    Ridge = _sklearn_ridge()
    sse = np.zeros((len(alphas), Y.shape[1]))
    for train, val in kfold_indices(len(X), n_folds):
        for a, alpha in enumerate(alphas):
            pred = Ridge(alpha=alpha).fit(X[train], Y[train]).predict(X[val])
            sse[a] += ((Y[val] - pred) ** 2).sum(0)
    return sse


# ----------------------------------------------------------------------------- solver


@pytest.mark.parametrize("shape", [(60, 25), (40, 90)], ids=["tall", "wide"])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("svd_solver", ["eigh", "svd"])
def test_solver_matches_sklearn_ridge(shape, fit_intercept, svd_solver):
    Ridge = _sklearn_ridge()
    X, Y = _problem(*shape, t=7, offset=2.0)
    alphas = [0.1, 1.0, 10.0, 1000.0]
    coefs, intercepts = solve_ridge_svd(X, Y, alphas, fit_intercept=fit_intercept, svd_solver=svd_solver)
    assert coefs.shape == (4, shape[1], 7) and intercepts.shape == (4, 7)
    for i, alpha in enumerate(alphas):
        ref = Ridge(alpha=alpha, fit_intercept=fit_intercept).fit(X, Y)
        np.testing.assert_allclose(coefs[i], ref.coef_.T, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(intercepts[i], np.broadcast_to(ref.intercept_, (7,)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(60, 25), (40, 90)], ids=["tall", "wide"])
def test_solver_matches_normal_equations(shape):
    # Independent of scikit-learn: (Xc^T Xc + alpha I) W = Xc^T Yc.
    X, Y = _problem(*shape, t=7, offset=2.0)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    coefs, intercepts = solve_ridge_svd(X, Y, [0.5, 50.0])
    for i, alpha in enumerate([0.5, 50.0]):
        W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(shape[1]), Xc.T @ Yc)
        np.testing.assert_allclose(coefs[i], W, atol=1e-9)
        np.testing.assert_allclose(intercepts[i], Y.mean(0) - X.mean(0) @ W, atol=1e-9)


@pytest.mark.parametrize("svd_solver", ["eigh", "svd"])
def test_solver_handles_rank_deficient_X(svd_solver):
    # Duplicated and constant voxels: X is rank-deficient, ridge is still well defined.
    X, Y = _problem(n=50, p=12, t=4)
    X = np.hstack([X, X[:, :5], np.full((50, 3), 7.0)])
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    coefs, _ = solve_ridge_svd(X, Y, [0.3, 30.0], svd_solver=svd_solver)
    for i, alpha in enumerate([0.3, 30.0]):
        W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ Yc)
        np.testing.assert_allclose(coefs[i], W, atol=1e-9)


def test_solver_target_chunks_cover_all_columns():
    X, Y = _problem(t=10)
    full, full_b = solve_ridge_svd(X, Y, ALPHAS)
    chunked, chunked_b = solve_ridge_svd(X, Y, ALPHAS, target_chunk=3)
    np.testing.assert_allclose(chunked, full, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(chunked_b, full_b, rtol=1e-12, atol=1e-12)
    slices = [sl for sl, _, _ in iter_ridge_svd(X, Y, ALPHAS, target_chunk=3)]
    assert slices == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]


# ----------------------------------------------------------------------------- cross-validation


def test_kfold_is_contiguous_like_sklearn():
    folds = kfold_indices(11, 3)
    assert [val.tolist() for _, val in folds] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    for train, val in folds:
        assert sorted(np.concatenate([train, val]).tolist()) == list(range(11))
    KFold = pytest.importorskip("sklearn.model_selection").KFold
    for (train, val), (ref_train, ref_val) in zip(folds, KFold(3).split(np.zeros(11)), strict=True):
        assert train.tolist() == ref_train.tolist() and val.tolist() == ref_val.tolist()
    shuffled = kfold_indices(11, 3, shuffle=True, seed=1)
    assert sorted(np.concatenate([val for _, val in shuffled]).tolist()) == list(range(11))
    assert [v.tolist() for _, v in shuffled] == [v.tolist() for _, v in kfold_indices(11, 3, shuffle=True, seed=1)]


@pytest.mark.parametrize("svd_solver", ["eigh", "svd"])
@pytest.mark.parametrize("shape", [(103, 40), (80, 150)], ids=["tall", "wide"])
def test_block_alpha_matches_sklearn_brute_force(svd_solver, shape):
    X, Y = _problem(*shape, noise=3.0 if shape[0] > shape[1] else 20.0)
    model = RidgeDecoder(alphas=ALPHAS, n_folds=5, dtype=np.float64, svd_solver=svd_solver).fit(X, Y)
    sse = _brute_force_sse(X, Y, ALPHAS, 5)
    assert model.alpha_ == ALPHAS[np.argmin(sse.sum(1))]
    assert 0 < np.argmin(sse.sum(1)) < len(ALPHAS) - 1  # an interior optimum: the check has teeth
    np.testing.assert_allclose(model.cv_scores_, sse.sum(1) / Y.size, rtol=1e-9)


@pytest.mark.parametrize(("fit_intercept", "shuffle", "svd_solver"),
                         [(True, False, "eigh"), (False, True, "eigh"), (True, True, "svd")])
def test_gram_and_direct_cv_agree(fit_intercept, shuffle, svd_solver):
    X, Y = _problem(n=57, p=80, t=12, offset=1.5)
    kwargs = dict(n_folds=4, fit_intercept=fit_intercept, shuffle=shuffle, seed=3, dtype=np.float64,
                  svd_solver=svd_solver)
    gram = ridge_cv_scores(X, Y, ALPHAS, method="gram", **kwargs)
    direct = ridge_cv_scores(X, Y, ALPHAS, per_target=True, target_chunk=5, **kwargs)
    np.testing.assert_allclose(gram.mse, direct.mse, rtol=1e-9)
    np.testing.assert_allclose(direct.target_mse.mean(1), direct.mse, rtol=1e-12)
    assert gram.target_mse is None


@pytest.mark.parametrize("svd_solver", ["eigh", "svd"])
def test_gram_cv_in_float32_picks_the_float64_alpha(svd_solver):
    X, Y = _problem(n=120, p=60, t=50, offset=3.0)
    s32 = ridge_cv_scores(X, Y, ALPHAS, dtype=np.float32, svd_solver=svd_solver)
    s64 = ridge_cv_scores(X, Y, ALPHAS, dtype=np.float64, svd_solver=svd_solver)
    np.testing.assert_allclose(s32.mse, s64.mse, rtol=1e-4)
    assert np.argmin(s32.mse) == np.argmin(s64.mse)


def test_per_target_alpha_matches_brute_force():
    rng = np.random.default_rng(1)
    n, p = 90, 30
    X = rng.normal(size=(n, p))
    signal = X @ rng.normal(size=(p, 3))
    # Noise-free, moderately noisy and almost pure noise: the best alphas differ by decades.
    Y = signal + rng.normal(size=(n, 3)) * np.array([0.0, 3.0, 60.0])
    alphas = np.logspace(-3, 5, 9)
    model = RidgeDecoder(alphas=alphas, alpha_per="target", dtype=np.float64).fit(X, Y)
    sse = _brute_force_sse(X, Y, alphas, 5)
    np.testing.assert_array_equal(model.alpha_, alphas[np.argmin(sse, axis=0)])
    np.testing.assert_allclose(model.cv_target_scores_, sse / n, rtol=1e-9)
    assert model.alpha_[0] == alphas[0] and model.alpha_[0] < model.alpha_[1] < model.alpha_[2]

    Ridge = _sklearn_ridge()
    X_new = rng.normal(size=(20, p))
    expected = np.stack([Ridge(alpha=a).fit(X, Y[:, j]).predict(X_new) for j, a in enumerate(model.alpha_)], 1)
    np.testing.assert_allclose(model.predict(X_new), expected, atol=1e-8)


@pytest.mark.parametrize("form", ["hat", "factor"])
@pytest.mark.parametrize(("n", "p"), [(60, 90), (90, 30)])
def test_both_prediction_forms_match_brute_force(monkeypatch, form, n, p):
    import brainmclip.models.ridge as ridge

    monkeypatch.setattr(ridge, "_prediction_form", lambda *args: form)
    X, Y = _problem(n=n, p=p, t=7, offset=2.0)
    scores = ridge_cv_scores(X, Y, ALPHAS, n_folds=4, per_target=True, target_chunk=3, dtype=np.float64)
    np.testing.assert_allclose(scores.target_mse, _brute_force_sse(X, Y, ALPHAS, 4) / n, rtol=1e-9)


@pytest.mark.parametrize(("n", "p"), [(120, 200), (200, 60)])
@pytest.mark.parametrize(("alphas", "rtol", "gram_rtol"),
                         [(np.logspace(-4, 2, 7), 1e-4, 2e-3), (np.logspace(1, 4, 7), 2e-4, 2e-4)])
@pytest.mark.parametrize("full_route", [True, False], ids=["full-route", "fold-route"])
def test_float32_per_target_cv_on_a_wide_spectrum(monkeypatch, n, p, alphas, rtol, gram_rtol, full_route):
    """Voxels whose singular values span four decades, in float32. Alphas far below the largest
    eigenvalue (1e-4 vs 1e4) need float64 fold decompositions (float32 ones were 26% off there);
    larger alphas may use float32 ones, or the full-data route where it applies (wide X)."""
    import brainmclip.models.ridge as ridge

    monkeypatch.setattr(ridge, "_full_route_cheaper", lambda *args: full_route)
    used = []

    def counted(f):
        return lambda *args: used.append(f) or f(*args)

    for name in ("_full_direct_cv_sse", "_full_gram_cv_sse"):
        monkeypatch.setattr(ridge, name, counted(getattr(ridge, name)))
    rng = np.random.default_rng(4)
    basis_l, _ = np.linalg.qr(rng.normal(size=(n, min(n, p))))
    basis_r, _ = np.linalg.qr(rng.normal(size=(p, min(n, p))))
    X = (basis_l * np.logspace(0, -4, min(n, p))) @ basis_r.T * 100 + 5.0
    Y = X @ rng.normal(size=(p, 6)) + 0.05 * rng.normal(size=(n, 6))
    s32 = ridge_cv_scores(X, Y, alphas, n_folds=4, per_target=True, dtype=np.float32)
    sse = _brute_force_sse(X.astype(np.float32).astype(np.float64), Y.astype(np.float32), alphas, 4) / n
    np.testing.assert_allclose(s32.target_mse, sse, rtol=rtol)
    np.testing.assert_array_equal(np.argmin(s32.target_mse, 0), np.argmin(sse, 0))
    gram32 = ridge_cv_scores(X, Y, alphas, n_folds=4, method="gram", dtype=np.float32)  # the shared-alpha CV
    # (float32 factors feed the shared-alpha CV's float64 algebra: up to 1e-3 off at the smallest alphas)
    np.testing.assert_allclose(gram32.mse, sse.mean(1), rtol=gram_rtol)
    # the full-data route serves wide X once every alpha is >= 1e-4 of the largest eigenvalue (1e4 here)
    assert len(used) == (2 if full_route and n < p and alphas.min() >= 1 else 0)


@pytest.mark.parametrize("route", ["full", "folds"])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("product_columns", [2, None], ids=["2-column-products", "default-products"])
def test_both_cv_routes_match_brute_force(monkeypatch, route, fit_intercept, product_columns):
    """Held-out residuals from the full-data decomposition (block inversion) and from each fold's own one.

    With 2-column validation products each 3-target block splits unevenly, so a wrong column offset shows.
    """
    import brainmclip.models.ridge as ridge

    monkeypatch.setattr(ridge, "_full_route_cheaper", lambda *args: route == "full")
    if product_columns:
        monkeypatch.setattr(ridge, "_PRODUCT_COLUMNS", product_columns)
    X, Y = _problem(n=60, p=90, t=7, offset=2.0)
    design = ridge.RidgeDesign(X, fit_intercept=fit_intercept, dtype=np.float64)
    folds = kfold_indices(60, 4)
    assert ridge._cv_route(design, ALPHAS, folds, 7, per_target=True) == route
    Ridge = _sklearn_ridge()
    sse = np.zeros((len(ALPHAS), 7))
    for train, val in folds:
        for a, alpha in enumerate(ALPHAS):
            pred = Ridge(alpha=alpha, fit_intercept=fit_intercept).fit(X[train], Y[train]).predict(X[val])
            sse[a] += ((Y[val] - pred) ** 2).sum(0)
    kwargs = dict(n_folds=4, fit_intercept=fit_intercept, dtype=np.float64)
    direct = ridge_cv_scores(X, Y, ALPHAS, per_target=True, target_chunk=3, **kwargs)
    np.testing.assert_allclose(direct.target_mse, sse / 60, rtol=1e-9)
    gram = ridge_cv_scores(X, Y, ALPHAS, method="gram", **kwargs)
    np.testing.assert_allclose(gram.mse, sse.sum(1) / Y.size, rtol=1e-9)
    for alpha_per in ("block", "target"):
        model = RidgeDecoder(alphas=ALPHAS, alpha_per=alpha_per, **kwargs).fit(X, Y)
        best = np.argmin(sse.sum(1)) if alpha_per == "block" else np.argmin(sse, 0)
        np.testing.assert_array_equal(model.alpha_, ALPHAS[best])


def test_full_route_needs_a_full_rank_dual_design():
    import brainmclip.models.ridge as ridge

    X, Y = _problem(n=60, p=90, t=5)
    folds = kfold_indices(60, 4)
    assert ridge._full_route_applies(ridge.RidgeDesign(X, dtype=np.float64), ALPHAS)
    # Repeated rows: the Gram matrix loses rank, a dropped direction would need its own 1 / alpha term
    repeated = np.concatenate([X[:30], X[:30]])
    design = ridge.RidgeDesign(repeated, dtype=np.float64)
    assert not ridge._full_route_applies(design, ALPHAS)
    assert ridge._cv_route(design, ALPHAS, folds, 5, per_target=False) == "folds"
    scores = ridge_cv_scores(repeated, Y, ALPHAS, n_folds=4, per_target=True, dtype=np.float64)
    np.testing.assert_allclose(scores.target_mse, _brute_force_sse(repeated, Y, ALPHAS, 4) / 60, rtol=1e-8)
    # More samples than voxels: no dual decomposition to take residuals from
    assert not ridge._full_route_applies(ridge.RidgeDesign(X[:, :20], dtype=np.float64), ALPHAS)
    # float32 with alphas far below the largest eigenvalue: the folds (in float64) are used instead
    small = ALPHAS * 1e-6
    assert not ridge._full_route_applies(ridge.RidgeDesign(X, dtype=np.float32), small)
    assert ridge._full_route_applies(ridge.RidgeDesign(X, dtype=np.float32), ALPHAS * 100)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_eigendecompositions_through_scipy_match(monkeypatch, dtype):
    from threadpoolctl import threadpool_info

    import brainmclip.models.ridge as ridge

    monkeypatch.setattr(ridge, "_SCIPY_EIGH_MIN_SIZE", 10)  # every matrix below goes through SciPy
    X, Y = _problem(n=60, p=90, t=6, offset=1.0)
    G = torch.from_numpy((X @ X.T).astype(dtype))
    before = [i["num_threads"] for i in threadpool_info()]
    lam, Q = ridge._eigh(G)
    assert [i["num_threads"] for i in threadpool_info()] == before  # the BLAS thread limit is undone
    ref = np.linalg.eigvalsh(X @ X.T)
    np.testing.assert_allclose(lam.numpy(), ref, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-3 * ref.max())
    np.testing.assert_allclose((Q * lam) @ Q.mT, G, atol=(1e-3 if dtype == np.float32 else 1e-9) * ref.max())
    # A whole fit with every decomposition through SciPy still matches scikit-learn brute force
    scores = ridge_cv_scores(X, Y, ALPHAS, n_folds=4, per_target=True, dtype=np.float64)
    np.testing.assert_allclose(scores.target_mse, _brute_force_sse(X, Y, ALPHAS, 4) / 60, rtol=1e-9)


def test_validation_products_split_columns_on_cpu_only(monkeypatch):
    import brainmclip.models.ridge as ridge

    monkeypatch.setattr(ridge, "_PRODUCT_COLUMNS", 4)
    assert ridge._product_columns(10, torch.device("cpu")) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert ridge._product_columns(10, torch.device("meta")) == [slice(0, 10)]  # any accelerator: one product
    assert ridge._offset(slice(20, 30), slice(4, 8)) == slice(24, 28)


def test_cv_route_follows_the_multiply_adds():
    from brainmclip.models.ridge import _full_route_cheaper

    def folds(n, k=5):
        return [(n - n // k, n // k)] * k

    # NSD's shape: five 7,087-square eigendecompositions cost more than the full-data route, in both modes
    assert _full_route_cheaper(8859, 8858, 8, folds(8859), 20000, per_target=True)
    assert _full_route_cheaper(8859, 8858, 8, folds(8859), 20000, per_target=False)
    # 2,000 samples and 20,000 targets per target: the fold route's hat form is cheaper
    assert not _full_route_cheaper(2000, 1999, 8, folds(2000), 20000, per_target=True)
    assert _full_route_cheaper(2000, 1999, 8, folds(2000), 20000, per_target=False)


def test_prediction_form_follows_the_multiply_adds():
    from brainmclip.models.ridge import _prediction_form

    # fMRI shape (fewer samples than voxels, k = n_train): the hat form saves the U^T Y product.
    assert _prediction_form(8, 1772, 7087, 7087, 20000) == "hat"
    # Many more samples than features (k << n_train): the factor form is cheaper.
    assert _prediction_form(8, 1600, 6400, 500, 20000) == "factor"
    # Few targets: forming the n_val x n_train smoother rows does not pay.
    assert _prediction_form(8, 400, 1600, 1600, 10) == "factor"


# ----------------------------------------------------------------------------- estimator


@pytest.mark.parametrize("alpha_per", ["block", "target"])
def test_shared_design_gives_the_same_fits(alpha_per):
    X, Y = _problem(n=80, p=50, t=9, offset=1.0)
    kwargs = dict(alphas=ALPHAS, n_folds=4, alpha_per=alpha_per, dtype=np.float64)
    design = RidgeDecoder(**kwargs).design_for(X)
    for Yk in (Y[:, :4], Y[:, 4:]):  # two targets on one design: the second reuses the cached folds
        alone = RidgeDecoder(**kwargs).fit(X, Yk)
        shared = RidgeDecoder(**kwargs).fit(X, Yk, design=design)
        np.testing.assert_array_equal(shared.alpha_, alone.alpha_)
        np.testing.assert_allclose(shared.cv_scores_, alone.cv_scores_, rtol=1e-12)
        np.testing.assert_allclose(shared.predict(X[:5]), alone.predict(X[:5]), rtol=1e-12, atol=1e-12)
    assert len(design._folds) == 1  # one set of fold factors served both targets


def test_shared_design_refuses_other_settings_or_data():
    X, Y = _problem(n=40, p=20, t=3)
    design = RidgeDecoder(alphas=ALPHAS, dtype=np.float64).design_for(X)
    with pytest.raises(ValueError, match="cannot serve a decoder"):
        RidgeDecoder(alphas=ALPHAS, dtype=np.float32).fit(X, Y, design=design)
    with pytest.raises(ValueError, match="not the matrix this RidgeDesign was made from"):
        RidgeDecoder(alphas=ALPHAS, dtype=np.float64).fit(X + 1, Y, design=design)


def test_refit_predict_score_match_sklearn():
    Ridge = _sklearn_ridge()
    X, Y = _problem(offset=2.0)
    X_new, Y_new = _problem(n=25, seed=1, offset=2.0)
    model = RidgeDecoder(alphas=ALPHAS, dtype=np.float64).fit(X, Y)
    ref = Ridge(alpha=model.alpha_).fit(X, Y)
    np.testing.assert_allclose(model.coef_, ref.coef_.T, atol=1e-8)
    np.testing.assert_allclose(model.intercept_, ref.intercept_, atol=1e-8)
    np.testing.assert_allclose(model.predict(X_new), ref.predict(X_new), atol=1e-8)
    assert model.score(X_new, Y_new) == pytest.approx(ref.score(X_new, Y_new), abs=1e-10)


def test_float32_default_is_close_to_float64():
    X, Y = _problem(offset=2.0)
    m32 = RidgeDecoder(alphas=ALPHAS).fit(X.astype(np.float16), Y.astype(np.float16))
    m64 = RidgeDecoder(alphas=ALPHAS, dtype=np.float64).fit(X.astype(np.float16), Y.astype(np.float16))
    assert m32.alpha_ == m64.alpha_
    pred32 = m32.predict(X)
    assert pred32.dtype == np.float32
    np.testing.assert_allclose(pred32, m64.predict(X), atol=1e-3 * np.abs(Y).max())


def test_multidimensional_targets_round_trip_shape():
    X, Y = _problem(t=15)
    Y3 = Y.reshape(len(Y), 5, 3)
    model = RidgeDecoder(alphas=ALPHAS, dtype=np.float64).fit(X, Y3)
    flat = RidgeDecoder(alphas=ALPHAS, dtype=np.float64).fit(X, Y)
    assert model.target_shape_ == (5, 3)
    pred = model.predict(X[:7])
    assert pred.shape == (7, 5, 3)
    np.testing.assert_allclose(pred.reshape(7, 15), flat.predict(X[:7]), rtol=1e-12, atol=1e-12)
    assert model.score(X, Y3) == pytest.approx(flat.score(X, Y), abs=1e-12)
    one = RidgeDecoder(alphas=ALPHAS, dtype=np.float64).fit(X, Y[:, 0])
    assert one.predict(X[:4]).shape == (4,)


@pytest.mark.parametrize("alpha_per", ["block", "target"])
def test_target_chunking_changes_nothing(alpha_per):
    X, Y = _problem(t=23)
    whole = RidgeDecoder(alphas=ALPHAS, alpha_per=alpha_per, target_chunk=None, dtype=np.float64).fit(X, Y)
    chunked = RidgeDecoder(alphas=ALPHAS, alpha_per=alpha_per, target_chunk=4, dtype=np.float64).fit(X, Y)
    np.testing.assert_array_equal(chunked.alpha_, whole.alpha_)
    np.testing.assert_allclose(chunked.cv_scores_, whole.cv_scores_, rtol=1e-12)
    np.testing.assert_allclose(chunked.B_, whole.B_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(chunked.predict(X), whole.predict(X), rtol=1e-12, atol=1e-12)
    assert chunked.score(X, Y) == pytest.approx(whole.score(X, Y), abs=1e-12)


def test_single_alpha_skips_cv():
    X, Y = _problem()
    model = RidgeDecoder(alphas=[7.0], n_folds=None, dtype=np.float64).fit(X, Y)
    assert model.alpha_ == 7.0 and model.cv_scores_ is None
    coefs, _ = solve_ridge_svd(X, Y, 7.0)
    np.testing.assert_allclose(model.coef_, coefs[0], atol=1e-10)


def test_default_alphas_are_documented_grid():
    assert RidgeDecoder().alphas == DEFAULT_ALPHAS
    np.testing.assert_allclose(DEFAULT_ALPHAS, np.logspace(1, 6, 8))


@pytest.mark.parametrize("alpha_per", ["block", "target"])
def test_save_load_round_trip(tmp_path, alpha_per):
    X, Y = _problem(t=6)
    model = RidgeDecoder(alphas=ALPHAS, n_folds=4, alpha_per=alpha_per, target_chunk=5, seed=2).fit(X, Y.reshape(-1, 2, 3))
    path = model.save(tmp_path / "ridge.npz")
    loaded = RidgeDecoder.load(path)
    others = [name for name in model.get_params() if name != "alphas"]
    assert {k: loaded.get_params()[k] for k in others} == {k: model.get_params()[k] for k in others}
    np.testing.assert_array_equal(loaded.alphas, ALPHAS)
    np.testing.assert_array_equal(loaded.alpha_, model.alpha_)
    assert isinstance(loaded.alpha_, float) == (alpha_per == "block")
    np.testing.assert_array_equal(loaded.cv_scores_, model.cv_scores_)
    assert loaded.target_shape_ == (2, 3) and loaded.n_features_in_ == X.shape[1]
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert (loaded.cv_target_scores_ is None) == (alpha_per == "block")

    unfitted = RidgeDecoder.load(RidgeDecoder(alphas=[1.0, 2.0], dtype=np.float64).save(tmp_path / "params"))
    assert unfitted.alphas == [1.0, 2.0] and unfitted.dtype is np.float64
    with pytest.raises(RuntimeError, match="not fitted"):
        unfitted.predict(X)


@pytest.mark.parametrize("damage", ["truncate", "empty", "missing"])
def test_a_damaged_model_file_is_named(tmp_path, damage):
    from brainmclip.errors import BrainmclipError

    X, Y = _problem(t=3)
    path = RidgeDecoder(alphas=ALPHAS, n_folds=3).fit(X, Y).save(tmp_path / "ridge.npz")
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"")
    with pytest.raises(BrainmclipError, match=r"ridge\.npz") as info:
        RidgeDecoder.load(path)
    assert "\n" not in str(info.value)


def test_input_errors_are_clear():
    X, Y = _problem(n=30, t=4)
    model = RidgeDecoder(alphas=ALPHAS)
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="X holds NaN or inf"):
        model.fit(bad, Y)
    with pytest.raises(ValueError, match="Y has 29 rows but X has 30"):
        model.fit(X, Y[:-1])
    bad_y = Y.copy()
    bad_y[0, 1] = np.inf
    with pytest.raises(ValueError, match="Y holds NaN or inf"):
        model.fit(X, bad_y)
    with pytest.raises(ValueError, match="expected a 2-D"):
        model.fit(X[:, 0], Y)
    with pytest.raises(ValueError, match="positive finite"):
        RidgeDecoder(alphas=[1.0, -1.0]).fit(X, Y)
    with pytest.raises(ValueError, match="alpha_per"):
        RidgeDecoder(alpha_per="voxel").fit(X, Y)
    with pytest.raises(ValueError, match="svd_solver"):
        RidgeDecoder(svd_solver="qr").fit(X, Y)
    with pytest.raises(ValueError, match="n_folds"):
        RidgeDecoder(n_folds=1).fit(X, Y)
    with pytest.raises(ValueError, match="n_folds=None"):
        RidgeDecoder(n_folds=None).fit(X, Y)
    model.fit(X, Y)
    with pytest.raises(ValueError, match="expected 40, as in fit"):
        model.predict(X[:, :-1])
    with pytest.raises(ValueError, match="trailing shape"):
        model.score(X, Y[:, :2])
