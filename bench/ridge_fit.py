"""Benchmark: RidgeDecoder's K-fold alpha search + refit against scikit-learn Ridge and himalaya, in the same run.

    python bench/ridge_fit.py [--shape default|nsd|tall] [--busy] [--json out.json]
    python bench/ridge_fit.py --samples 2000 --features 3000 --targets 20000 --alphas 8 --folds 5
    python bench/ridge_fit.py --quick

Shapes: ``default`` 2,000 samples x 3,000 voxels -> 20,000 targets; ``nsd`` NSD's own training set, 8,859 x
15,724 (fewer samples than voxels, subject 1's nsdgeneral mask) -> 20,000 targets; ``tall`` 6,000 x 1,500 (more
samples than voxels) -> 20,000 targets. ``--busy`` runs everything beside one competing busy process.

Every side does the same job on the same float32 data: choose an alpha out of ``--alphas`` log-spaced values
(1e1..1e6) by contiguous ``--folds``-fold CV, then refit on all samples. scikit-learn does it the straightforward
way, ``Ridge(alpha).fit`` on the training folds and ``predict`` on the validation fold for every fold and alpha,
plus the final refit (one alpha for all targets); each of those fits does the same work, so with
``--sklearn-fits N`` (the ``nsd`` shape's default: 1, since the whole loop would take over half an hour) only the
first N are timed and the loop's time is extrapolated from them (marked "estimated"). ``RidgeDecoder.fit`` runs in
both alpha modes: one alpha for all targets (lowest total validation squared error) and one per target.

When himalaya is installed (an optional benchmark dependency: ``pip install -e ".[bench]"``), its RidgeCV (SVD
solver) and KernelRidgeCV (eigenvalue solver), torch backend, run the same folds and alphas in both alpha modes
(``local_alpha`` False and True; RidgeCV is left out on the ``nsd`` shape, where it would decompose 7,087 x 15,724
fold matrices), and the ratio himalaya's fastest / ours is reported per mode. himalaya scores folds by R^2, not
squared error, so its alphas may differ; its predictions' distance from ours is printed.

Each figure comes with the 1-minute load average before and after it, and the process's peak resident memory
(cumulative: a stage that needs less than an earlier one leaves it unchanged).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import warnings

import numpy as np
import torch
from _results import busy_process, load_average, save_json

from brainmclip.models.ridge import RidgeDecoder, kfold_indices


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _data(n: int, p: int, t: int, n_test: int, seed: int = 0):
    """Voxels with a low-rank signal shared by all targets, plus noise (float32, like real betas)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n + n_test, p), dtype=np.float32)
    rank = 32
    # Factored, so no dense (p, t) weight matrix inflates the peak memory before the fits start.
    Y = (X[:n] @ (rng.standard_normal((p, rank), dtype=np.float32) / np.float32(np.sqrt(p)))) @ rng.standard_normal(
        (rank, t), dtype=np.float32)
    for rows in np.array_split(np.arange(n), 8):
        Y[rows] += 2.0 * rng.standard_normal((len(rows), t), dtype=np.float32)
    return X[:n], Y, X[n:]


def _sklearn_cv_refit(X, Y, alphas, n_folds, max_fits: int | None = None):
    """scikit-learn's loop; with ``max_fits`` only that many fits run, and the model and alpha are None."""
    from sklearn.linear_model import Ridge

    sse = np.zeros(len(alphas))
    fits = 0
    for train, val in kfold_indices(len(X), n_folds):
        for a, alpha in enumerate(alphas):
            if max_fits is not None and fits >= max_fits:
                return None, None, fits
            pred = Ridge(alpha=alpha).fit(X[train], Y[train]).predict(X[val])
            sse[a] += float(((Y[val] - pred) ** 2).sum(dtype=np.float64))
            fits += 1
    best = float(alphas[int(np.argmin(sse))])
    return Ridge(alpha=best).fit(X, Y), best, fits + 1


def _himalaya(X, Y, X_test, alphas, n_folds, local_alpha: bool, solvers=("RidgeCV", "KernelRidgeCV")) -> dict:
    """Seconds and test predictions of himalaya's two CV solvers, torch backend, on our folds and alphas."""
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV

    backend = set_backend("torch", on_error="raise")
    warnings.filterwarnings("ignore", message="Solving ridge is slower than solving kernel ridge")
    folds = kfold_indices(len(X), n_folds)
    params = {"local_alpha": local_alpha}
    out = {}
    for name, make in (("RidgeCV", lambda: RidgeCV(alphas=alphas, cv=folds, fit_intercept=True, solver_params=params)),
                       ("KernelRidgeCV", lambda: KernelRidgeCV(alphas=alphas, cv=folds, fit_intercept=True,
                                                               solver_params=params))):
        if name not in solvers:
            continue
        seconds, model = _timed(lambda make=make: make().fit(X, Y))
        out[name] = (seconds, np.asarray(backend.to_numpy(model.predict(X_test))))
    return out


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


SHAPES = {"default": (2000, 3000, 20000), "nsd": (8859, 15724, 20000), "tall": (6000, 1500, 20000)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default")
    parser.add_argument("--samples", type=int, help="override the shape's samples")
    parser.add_argument("--features", type=int, help="override the shape's features (voxels)")
    parser.add_argument("--targets", type=int, help="override the shape's targets")
    parser.add_argument("--alphas", type=int, default=8)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--test", type=int, default=200, help="held-out samples for the prediction check")
    parser.add_argument("--quick", action="store_true", help="a small problem (600 x 1000, 4000 targets)")
    parser.add_argument("--busy", action="store_true", help="run beside one competing busy process")
    parser.add_argument("--sklearn-fits", type=int, default=None,
                        help="time only this many of scikit-learn's fits and extrapolate (nsd shape: 1)")
    parser.add_argument("--svd-solver", choices=["eigh", "svd"], default="eigh", help="RidgeDecoder's svd_solver")
    parser.add_argument("--skip-target-mode", action="store_true", help="do not time alpha_per='target'")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    n, p, t = SHAPES[args.shape]
    if args.quick:
        n, p, t = 600, 1000, 4000
    n, p, t = args.samples or n, args.features or p, args.targets or t
    sklearn_fits = args.sklearn_fits if args.sklearn_fits is not None else (1 if args.shape == "nsd" else None)
    solvers = ("KernelRidgeCV",) if args.shape == "nsd" else ("RidgeCV", "KernelRidgeCV")
    with busy_process(args.busy):
        return _run(args, n, p, t, sklearn_fits, solvers)


def _run(args, n, p, t, sklearn_fits, solvers) -> dict:
    alphas = np.logspace(1, 6, args.alphas)
    X, Y, X_test = _data(n, p, t, args.test)
    results = {"shape": args.shape, "samples": n, "features": p, "targets": t, "alphas": args.alphas,
               "folds": args.folds, "svd_solver": args.svd_solver, "busy_process": args.busy,
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "peak_rss_mb_data": round(_peak_rss_mb(), 1)}
    print(f"problem: {n} samples x {p} features -> {t} targets, {args.alphas} alphas x {args.folds} folds "
          f"(svd_solver {args.svd_solver}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}"
          f"{', beside one busy process' if args.busy else ''}); peak RSS with data {results['peak_rss_mb_data']:.0f} MB",
          flush=True)

    def timed(key, fn):
        before = load_average()
        seconds, out = _timed(fn)
        results[f"{key}_s"] = round(seconds, 2)
        results[f"{key}_load"] = [before, load_average()]
        return seconds, out

    # Warm every library up on a smaller problem of the same kind: MKL loads its LAPACK kernels
    # on first use per code path, which took over 10 s once here, and that is not the fit's cost.
    m = max(args.folds, n // 4)
    solver = args.svd_solver
    RidgeDecoder(alphas=alphas[:2], n_folds=args.folds, svd_solver=solver).fit(X[:m], Y[:m, :256])
    RidgeDecoder(alphas=alphas[:2], n_folds=args.folds, alpha_per="target", svd_solver=solver).fit(X[:m], Y[:m, :256])
    _sklearn_cv_refit(X[:m], Y[:m, :256], alphas[:2], 2)

    t_ours, ours = timed("ours", lambda: RidgeDecoder(alphas=alphas, n_folds=args.folds, svd_solver=solver).fit(X, Y))
    results.update(ours_alpha=ours.alpha_, peak_rss_mb_ours=round(_peak_rss_mb(), 1))
    print(f"RidgeDecoder (block alpha):  {t_ours:8.2f} s   alpha {ours.alpha_:.4g}   "
          f"peak RSS {results['peak_rss_mb_ours']:.0f} MB   load {results['ours_load']}", flush=True)

    if not args.skip_target_mode:
        t_target, per_target = timed("ours_target", lambda: RidgeDecoder(
            alphas=alphas, n_folds=args.folds, alpha_per="target", svd_solver=solver).fit(X, Y))
        values, counts = np.unique(per_target.alpha_, return_counts=True)
        results.update(peak_rss_mb_target=round(_peak_rss_mb(), 1),
                       target_alphas={f"{v:.4g}": int(c) for v, c in zip(values, counts, strict=True)})
        print(f"RidgeDecoder (target alpha): {t_target:8.2f} s   alphas {results['target_alphas']}   "
              f"peak RSS {results['peak_rss_mb_target']:.0f} MB   load {results['ours_target_load']}", flush=True)

    total_fits = args.folds * args.alphas + 1
    t_sk, (ref, sk_alpha, fits) = timed("sklearn", lambda: _sklearn_cv_refit(X, Y, alphas, args.folds, sklearn_fits))
    if ref is None:
        t_sk = t_sk / fits * total_fits
        results.update(sklearn_s=round(t_sk, 2), sklearn_estimated_from_fits=fits)
        print(f"sklearn Ridge loop:          {t_sk:8.2f} s   estimated: {fits} of its {total_fits} fits timed   "
              f"load {results['sklearn_load']}", flush=True)
    else:
        results.update(sklearn_alpha=sk_alpha, peak_rss_mb_sklearn=round(_peak_rss_mb(), 1))
        print(f"sklearn Ridge loop:          {t_sk:8.2f} s   alpha {sk_alpha:.4g}   "
              f"peak RSS {results['peak_rss_mb_sklearn']:.0f} MB   load {results['sklearn_load']}", flush=True)

    try:
        import himalaya  # noqa: F401
    except ImportError:
        print("himalaya not installed: no comparison with it (pip install himalaya)")
    else:
        modes = [("block", False, ours)] + ([("target", True, per_target)] if not args.skip_target_mode else [])
        _himalaya(X[:m], Y[:m, :256], X_test, alphas[:2], 2, False, solvers)  # warm-up, as for the others
        for mode, local, model in modes:
            before = load_average()
            timings = _himalaya(X, Y, X_test, alphas, args.folds, local, solvers)
            results[f"himalaya_{mode}_load"] = [before, load_average()]
            ours_s = t_ours if mode == "block" else results["ours_target_s"]
            ours_pred = model.predict(X_test)
            for name, (seconds, pred) in timings.items():
                diff = float(np.abs(pred - ours_pred).max() / np.abs(ours_pred).max())
                results[f"himalaya_{name}_{mode}_s"] = round(seconds, 2)
                results[f"himalaya_{name}_{mode}_rel_pred_diff"] = diff
                print(f"himalaya {name} ({mode} alpha): {seconds:8.2f} s   max rel. prediction diff vs ours {diff:.1e}")
            best = min(seconds for seconds, _ in timings.values())
            results[f"speed_vs_himalaya_best_{mode}"] = round(best / ours_s, 2)
            print(f"himalaya's fastest / ours ({mode} alpha): {best / ours_s:.2f}x   "
                  f"load {results[f'himalaya_{mode}_load']}", flush=True)
        results["peak_rss_mb_himalaya"] = round(_peak_rss_mb(), 1)

    results["speedup"] = round(t_sk / t_ours, 1)
    if "ours_target_s" in results:
        results["speedup_target_mode"] = round(t_sk / results["ours_target_s"], 1)
    print(f"speed-up sklearn / ours: {results['speedup']:.1f}x (block)"
          + (f", {results['speedup_target_mode']:.1f}x (target)" if "speedup_target_mode" in results else "")
          + (" (sklearn estimated)" if ref is None else ""))
    if ref is not None:
        pred, ref_pred = ours.predict(X_test), ref.predict(X_test)
        rel = float(np.abs(pred - ref_pred).max() / np.abs(ref_pred).max())
        results.update(same_alpha=bool(ours.alpha_ == sk_alpha), max_rel_pred_diff=rel)
        print(f"same alpha: {results['same_alpha']}; max |pred - sklearn pred| / max |sklearn pred| = {rel:.2e}")
    save_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
