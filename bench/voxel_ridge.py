"""Benchmark: the batched voxel-selected ridge (MindDiffuser's decoders) against a per-target scikit-learn loop.

    python bench/voxel_ridge.py [--samples 1000] [--voxels 3000] [--n-voxels 250] [--targets 2000]
                                [--sklearn-targets 100] [--threads 1] [--json out.json]
    python bench/voxel_ridge.py --nsd [--targets 10000]   # NSD-like: 9,000 train rows x 15,000 voxels
    python bench/voxel_ridge.py --quick    # a few seconds

Both sides solve the same problem in float64: for each target keep the ``--n-voxels`` voxels with
the largest |Pearson r| on the training rows, choose alpha out of ``--alphas`` log-spaced values
(1e1..1e6) per target by contiguous ``--folds``-fold CV (lowest summed validation squared error),
refit on all rows and predict ``--test`` held-out rows.

(a) The obvious loop: per target, correlate it with every voxel (X standardised once), argsort,
then ``sklearn.linear_model.Ridge(alpha).fit`` on the training folds and ``predict`` on the held-out
fold for every fold and alpha, and the refit. It runs on the first ``--sklearn-targets`` targets
only and its time is extrapolated linearly to all targets (the loop's cost per target does not
depend on the other targets); the output says so. (b) ``VoxelSelectedRidge.fit`` on all targets.

Reported: both times, the ratio (a) / (b), the largest relative difference of the test predictions
on the targets both solved, whether the selections and alphas agree, the load average before and
after (other processes on the machine slow both sides), and the thread count both sides ran with
(``--threads`` sets torch's and the BLAS pools' threads for both).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from _results import report

from brainmclip.models.ridge import kfold_indices
from brainmclip.models.voxel_ridge import VoxelSelectedRidge


def _data(n: int, p: int, t: int, n_test: int, seed: int = 0):
    """Voxels with a sparse signal: each target reads ~1% of the voxels through a shared low-rank map, plus noise."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n + n_test, p))
    rank = 16
    mask = rng.random((p, rank)) < 0.05
    W = (mask * rng.standard_normal((p, rank))) @ rng.standard_normal((rank, t)) / np.sqrt(p * 0.05)
    Y = X[:n] @ W + 2.0 * rng.standard_normal((n, t))
    return X[:n], Y, X[n:]


def sklearn_loop(X, Y, X_test, k: int, alphas, n_folds: int):
    """Per-target selection + sklearn Ridge over every fold and alpha + refit. Returns (selected, alphas, pred)."""
    from sklearn.linear_model import Ridge

    n, t = Y.shape
    Xz = (X - X.mean(0)) / X.std(0)
    folds = kfold_indices(n, n_folds)
    idx = np.arange(X.shape[1])
    selected, chosen, pred = np.empty((t, k), np.int64), np.empty(t), np.empty((len(X_test), t))
    for j in range(t):
        y = Y[:, j]
        r = Xz.T @ ((y - y.mean()) / y.std()) / n
        S = np.sort(np.lexsort((idx, -np.abs(r)))[:k])
        XS = X[:, S]
        sse = np.zeros(len(alphas))
        for train, val in folds:
            for a, alpha in enumerate(alphas):
                sse[a] += ((y[val] - Ridge(alpha=alpha).fit(XS[train], y[train]).predict(XS[val])) ** 2).sum()
        best = alphas[int(np.argmin(sse))]
        selected[j], chosen[j] = S, best
        pred[:, j] = Ridge(alpha=best).fit(XS, y).predict(X_test[:, S])
    return selected, chosen, pred


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000, help="training rows")
    parser.add_argument("--voxels", type=int, default=3000)
    parser.add_argument("--n-voxels", type=int, default=250, help="voxels selected per target (k)")
    parser.add_argument("--targets", type=int, default=None, help="targets fitted (default 2000; --quick 300)")
    parser.add_argument("--alphas", type=int, default=8)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--test", type=int, default=200, help="held-out rows for the prediction check")
    parser.add_argument("--sklearn-targets", type=int, default=100,
                        help="targets the sklearn loop solves; its time is extrapolated to --targets")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads, both sides")
    parser.add_argument("--batch-size", type=int, default=None, help="VoxelSelectedRidge batch_size (default: auto)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nsd", action="store_true", help="NSD-like sizes: 9000 rows x 15000 voxels")
    parser.add_argument("--quick", action="store_true", help="a small problem (400 x 1000, k 100, 300 targets)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.nsd:
        args.samples, args.voxels, args.sklearn_targets = 9000, 15000, min(args.sklearn_targets, 20)
    if args.quick:
        args.samples, args.voxels, args.n_voxels, args.sklearn_targets = 400, 1000, 100, 30
    if args.targets is None:
        args.targets = 300 if args.quick else 2000

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    n, p, k, t = args.samples, args.voxels, args.n_voxels, args.targets
    m = min(args.sklearn_targets, t)
    alphas = np.logspace(1, 6, args.alphas)
    X, Y, X_test = _data(n, p, t, args.test)
    load_before = os.getloadavg()
    print(f"problem: {n} rows x {p} voxels, k={k}, {t} targets, {args.alphas} alphas x {args.folds} folds; "
          f"threads {args.threads} (cpus {os.cpu_count()}); load average {load_before[0]:.2f}", flush=True)

    def ours_fit(X_, Y_):
        return VoxelSelectedRidge(n_voxels=k, alphas=alphas, n_folds=args.folds, alpha_per="target",
                                  batch_size=args.batch_size, device=args.device).fit(X_, Y_)

    # Warm-up on a small slice: the first LAPACK call of each kind loads kernels, not the fit's cost.
    ours_fit(X[: n // 4], Y[: n // 4, :8])
    sklearn_loop(X[: n // 4], Y[: n // 4, :2], X_test, min(k, p), alphas[:2], args.folds)

    t_ours, model = _timed(lambda: ours_fit(X, Y))
    pred = model.predict(X_test)
    print(f"VoxelSelectedRidge: {t_ours:.2f} s for {t} targets ({1e3 * t_ours / t:.2f} ms/target)", flush=True)

    t_sk, (S_ref, alpha_ref, pred_ref) = _timed(lambda: sklearn_loop(X, Y[:, :m], X_test, k, alphas, args.folds))
    t_sk_all = t_sk * t / m
    print(f"sklearn loop: {t_sk:.2f} s for {m} targets ({1e3 * t_sk / m:.1f} ms/target)"
          + (f", extrapolated linearly to {t} targets: {t_sk_all:.1f} s" if m < t else ""), flush=True)

    load_after = os.getloadavg()
    results = {
        "samples": n, "voxels": p, "n_voxels": k, "targets": t, "alphas": args.alphas, "folds": args.folds,
        "form": model.form_, "threads": args.threads, "cpu_count": os.cpu_count(),
        "load_avg_before": [round(v, 2) for v in load_before], "load_avg_after": [round(v, 2) for v in load_after],
        "ours_s": round(t_ours, 2), "ours_ms_per_target": round(1e3 * t_ours / t, 2),
        "sklearn_targets_run": m, "sklearn_s_measured": round(t_sk, 2),
        "sklearn_ms_per_target": round(1e3 * t_sk / m, 1),
        "sklearn_s_all_targets": round(t_sk_all, 1), "sklearn_extrapolated": m < t,
        "speedup": round(t_sk_all / t_ours, 1),
        "same_selection": bool((model.selected_[:m] == S_ref).all()),
        "same_alpha_share": float(np.mean(model.alpha_[:m] == alpha_ref)),
        "max_rel_pred_diff": float(np.abs(pred[:, :m] - pred_ref).max() / np.abs(pred_ref).max()),
    }
    report(results, args.json)
    return results


if __name__ == "__main__":
    main()
