"""Back-projection of predicted semantic and detail CLIP embeddings into fMRI space, per visual ROI.

The paper checks that its two image pathways keep their intended roles: the embeddings BrainMCLIP predicts
for the semantic path (ê_I,S, from high-level cortex) should relate more to high-level visual areas and those
of the detail path (ê_I,D, from low- and high-level cortex) more to low-level areas. Here:

1. Two linear encoding models are fitted on the training images, from the *true* CLIP embeddings to every voxel:
   e_I,S -> fMRI and e_I,D -> fMRI (ridge regression, one alpha per voxel chosen by 5-fold contiguous
   cross-validation on train; :class:`~brainmclip.models.ridge.RidgeDecoder`).
2. Each encoder is applied to the *predicted* embedding of its pathway on the test images, giving a
   back-projected fMRI pattern per image.
3. Per voxel, the back-projected activity is correlated (Pearson, across test images) with the measured test
   fMRI, and the correlations are averaged per ROI (V1-hV4 from the pRF ROIs, dorsal and ventral halves merged,
   and the four category-selective floc ROIs; "early" and "higher" are their unions).

The encoders applied to the true test embeddings give the same numbers without decoding error: the most the
predicted embeddings could reach through these linear maps.

Embeddings enter the encoders flattened (every token's values side by side, ``--pooling flat``, default): the
detail layers' information is largely spatial (which patch holds what), which a pooled summary would discard.
``--pooling cls+mean`` (the CLS token next to the mean of the other tokens, 2 x embed_dim values) is cheap
enough for ViT-L/14 at full NSD size. Each input is scaled by one number (its root mean square on train) so
that one alpha grid suits both pathways.

A caveat worth keeping in mind when reading the numbers: the predicted embeddings are themselves computed
from the test fMRI (ê_I,S from the high-level voxels only), so their back-projection partly returns what went in.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from brainmclip.errors import InvalidInputError

__all__ = ["NAME", "HELP", "ROIS", "POOLINGS", "add_arguments", "run", "roi_masks", "pool_embeddings",
           "fit_encoder", "voxel_correlations", "roi_summary", "DEFAULT_ENCODER_ALPHAS"]

NAME = "backproject"
HELP = ("back-project predicted semantic and detail CLIP embeddings into fMRI space with linear encoders and "
        "correlate with the measured test fMRI, per ROI (the paper's back-projection check)")

POOLINGS = ("flat", "cls+mean")
_PRF = "prf-visualrois"
_AREAS = {"V1": (1, 2), "V2": (3, 4), "V3": (5, 6), "hV4": (7,)}
_FLOC = {"bodies": "floc-bodies", "faces": "floc-faces", "places": "floc-places", "words": "floc-words"}
#: ROIs in the order of the table and the figure: early areas, their union, floc areas, their union.
ROIS = (*_AREAS, "early", *_FLOC, "higher")
#: Wide on purpose: inputs are scaled to unit root mean square, and CV picks per voxel.
DEFAULT_ENCODER_ALPHAS = tuple(float(a) for a in np.logspace(-1, 7, 9))


def roi_masks(voxels) -> dict[str, np.ndarray]:
    """Boolean masks over a prepared dataset's voxel columns for each of :data:`ROIS`.

    A voxel labelled in two floc files counts in both ROIs.
    """
    labels = voxels.roi_labels
    missing = sorted({_PRF, *_FLOC.values()} - set(labels))
    if missing:
        raise InvalidInputError(f"the prepared dataset has no per-voxel labels of {missing[0]}; the back-projection needs "
                         "the NSD ROI files (prepare from an NSD tree)")
    masks = {name: np.isin(labels[_PRF], codes) for name, codes in _AREAS.items()}
    masks["early"] = labels[_PRF] > 0
    masks.update({name: labels[file] > 0 for name, file in _FLOC.items()})
    masks["higher"] = np.any([labels[file] > 0 for file in _FLOC.values()], axis=0)
    return {name: masks[name] for name in ROIS}


def pool_embeddings(x: np.ndarray, pooling: str = "flat") -> np.ndarray:
    """Token embeddings (n, tokens, dim) as encoder inputs (n, features), float32.

    ``flat``: all tokens side by side (tokens x dim); ``cls+mean``: the first (CLS) token and the mean of
    the others (2 x dim).
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 3:
        raise InvalidInputError(f"embeddings of shape {x.shape}; expected (n, tokens, dim)")
    if pooling == "flat":
        return x.reshape(len(x), -1)
    if pooling == "cls+mean":
        rest = x[:, 1:].mean(1) if x.shape[1] > 1 else np.zeros_like(x[:, 0])
        return np.concatenate([x[:, 0], rest], axis=1)
    raise InvalidInputError(f"Unknown pooling {pooling!r}; choose from {list(POOLINGS)}")


def fit_encoder(X: np.ndarray, Y: np.ndarray, alphas=DEFAULT_ENCODER_ALPHAS, n_folds: int = 5):
    """Ridge from embedding features ``X`` (n, p) to voxels ``Y`` (n, v), one alpha per voxel by K-fold CV.

    ``X`` is divided by its root mean square first (kept as ``scale``), so the alpha grid means the same for
    every input; apply the same factor to new inputs (``predict`` below does).

    Returns
    -------
    model : RidgeDecoder
    scale : float
    """
    from brainmclip.models.ridge import RidgeDecoder

    X = np.asarray(X, np.float32)
    scale = float(np.sqrt(np.mean(np.square(X - X.mean(0)), dtype=np.float64))) or 1.0
    alphas = list(alphas)
    model = RidgeDecoder(alphas=alphas, n_folds=n_folds if len(alphas) > 1 else None, alpha_per="target",
                         target_chunk=None)
    model.fit(X / scale, np.asarray(Y, np.float32))
    return model, scale


def _predict(encoder, X: np.ndarray) -> np.ndarray:
    model, scale = encoder
    return model.predict(np.asarray(X, np.float32) / scale)


def voxel_correlations(pred: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Pearson r per column between ``pred`` and ``measured`` (n, v), over rows; NaN where a column is constant."""
    a = np.asarray(pred, np.float64)
    b = np.asarray(measured, np.float64)
    if a.shape != b.shape or a.ndim != 2 or len(a) < 3:
        raise InvalidInputError(f"need two (n >= 3, voxels) arrays of one shape; got {a.shape} and {b.shape}")
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(0) / denom, np.nan)


def roi_summary(r: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, tuple[float, float, int]]:
    """Per ROI: mean r over its voxels, the standard error of that mean, and the voxel count (NaNs left out)."""
    out = {}
    for name, mask in masks.items():
        values = r[mask]
        values = values[np.isfinite(values)]
        n = len(values)
        mean = float(values.mean()) if n else float("nan")
        sem = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        out[name] = (mean, sem, n)
    return out


def _split_betas(samples, ids: np.ndarray, what: str) -> np.ndarray:
    """fMRI patterns of ``ids`` in that order (rows of a repeated image averaged)."""
    rows_of: dict[int, list[int]] = {}
    for row, nsd_id in enumerate(samples.stimulus_ids.tolist()):
        rows_of.setdefault(int(nsd_id), []).append(row)
    missing = [int(i) for i in ids if int(i) not in rows_of]
    if missing:
        raise InvalidInputError(f"{what}: {len(missing)} predicted images are not in the prepared {samples.split} split "
                         f"(first NSD id {missing[0]}); the predictions come from another dataset")
    return np.stack([np.asarray(samples.betas[rows_of[int(i)]], np.float32).mean(0) for i in ids])


# -- command ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="prepared subject dataset the predictions are of")
    parser.add_argument("--features", required=True, type=Path, help="CLIP feature store (the encoders' inputs)")
    parser.add_argument("--predictions", required=True, type=Path,
                        help="prediction folder with image_semantic.npy and image_detail.npy (BrainMCLIP, ridge)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--pooling", default="flat", choices=POOLINGS,
                        help="how token embeddings enter the encoders (default flat: all tokens)")
    parser.add_argument("--folds", type=int, default=5, help="CV folds of each voxel's alpha (default 5)")


def run(args) -> str:
    import time

    from brainmclip.analysis.common import save_figure, write_analysis
    from brainmclip.atomic import atomic_path, write_bytes_atomic
    from brainmclip.data.prepared import load_prepared
    from brainmclip.features.feature_store import open_feature_store
    from brainmclip.models.predictions import load_predictions

    start = time.perf_counter()
    if args.folds < 2:
        raise InvalidInputError(f"--folds {args.folds}: need at least 2 folds to choose the alphas")
    prepared = load_prepared(args.data, images=False)
    pred = load_predictions(args.predictions)
    if pred.subject != prepared.subject:
        raise InvalidInputError(f"{args.predictions}: predictions of subject {pred.subject}, but {args.data} is subject "
                         f"{prepared.subject}")
    if pred.split not in prepared.splits or pred.split == "train":
        raise InvalidInputError(f"{args.predictions}: predictions of the {pred.split!r} split; expected held-out images "
                         "(test or val)")
    if pred.image_semantic is not None and pred.image_detail is not None:
        semantic_pred, detail_pred, source = pred.image_semantic, pred.image_detail, "ê_I,S and ê_I,D"
        note = ""
    elif pred.image is not None:
        semantic_pred = detail_pred = pred.image
        source = "Ê_I (image.npy) for both paths"
        note = (f"{args.predictions} has no image_semantic.npy / image_detail.npy ({pred.method}); the fused Ê_I "
                "goes through both encoders, so the two bars differ only by the encoder, not by the pathway.")
    else:
        raise InvalidInputError(f"{args.predictions}: no image embeddings (a text-only model); nothing to back-project")
    masks = roi_masks(prepared.voxels)
    store = open_feature_store(args.features)

    train = prepared.train
    train_ids = train.stimulus_ids
    missing = store.missing(np.unique(train_ids))
    if len(missing):
        raise InvalidInputError(f"feature store {args.features} lacks {len(missing)} training images of {args.data} "
                         f"(first NSD id {missing[0]}); run brainmclip extract on this dataset")
    test_ids = np.asarray(pred.stimulus_ids, np.int64)
    targets = store.get(test_ids[:1], ("image_semantic",))["image_semantic"]
    if targets.shape[1:] != tuple(semantic_pred.shape[1:]):
        raise InvalidInputError(f"{args.predictions}: embeddings of shape {tuple(semantic_pred.shape[1:])} but the feature "
                         f"store holds {targets.shape[1:]}; predictions and features come from different CLIPs")
    measured = _split_betas(prepared.splits[pred.split], test_ids, str(args.predictions))
    Y = np.asarray(train.betas, np.float32)

    results, alphas = {}, {}
    for path, target, predicted in (("semantic", "image_semantic", semantic_pred),
                                    ("detail", "image_detail", detail_pred)):
        X = pool_embeddings(store.get(train_ids, (target,))[target], args.pooling)
        encoder = fit_encoder(X, Y, n_folds=args.folds)
        alphas[path] = np.atleast_1d(encoder[0].alpha_)
        del X
        predicted_fmri = _predict(encoder, pool_embeddings(predicted, args.pooling))
        true_fmri = _predict(encoder, pool_embeddings(store.get(test_ids, (target,))[target], args.pooling))
        results[path] = voxel_correlations(predicted_fmri, measured)
        results[f"{path}_true"] = voxel_correlations(true_fmri, measured)

    summary = {k: roi_summary(v, masks) for k, v in results.items()}
    rows = []
    for roi in ROIS:
        s, d = summary["semantic"][roi], summary["detail"][roi]
        rows.append({"ROI": roi, "voxels": s[2], "r semantic (pred)": round(s[0], 4), "r detail (pred)": round(d[0], 4),
                     "semantic - detail": round(s[0] - d[0], 4),
                     "r semantic (true emb.)": round(summary["semantic_true"][roi][0], 4),
                     "r detail (true emb.)": round(summary["detail_true"][roi][0], 4)})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "correlations.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, stimulus_ids=test_ids, **{f"r_{k}": v for k, v in results.items()},
                 **{f"roi_{k}": v for k, v in masks.items()}, **{f"alpha_{k}": v for k, v in alphas.items()})
    header = list(rows[0])
    lines = [",".join(header)] + [",".join(str(row[h]) for h in header) for row in rows]
    write_bytes_atomic(out / "roi_correlations.csv", ("\n".join(lines) + "\n").encode())
    _figure(out / "figure.png", summary, prepared.subject, pred.method, save_figure)

    n_features = pool_embeddings(semantic_pred[:1], args.pooling).shape[1]
    pooling_text = (f"flattened tokens ({semantic_pred.shape[1]} x {semantic_pred.shape[2]} = {n_features} features)"
                    if args.pooling == "flat" else f"CLS token and mean of the other tokens ({n_features} features)")
    early = [r for r in rows if r["ROI"] == "early"][0]
    higher = [r for r in rows if r["ROI"] == "higher"][0]
    caption = (f"Subject {prepared.subject}, {pred.method} predictions ({source}) of {len(test_ids)} {pred.split} "
               f"images. Linear encoders from the true CLIP embeddings ({pooling_text}) to all {Y.shape[1]} voxels, "
               f"fitted on {len(Y)} training images (ridge, per-voxel alpha by {args.folds}-fold CV), were applied "
               "to the predicted semantic and detail embeddings; bars are the mean over an ROI's voxels of the "
               "correlation between back-projected and measured test fMRI (error bars: standard error over voxels); "
               "markers: the same encoders applied to the true test embeddings. Expected (paper): semantic > detail "
               f"in higher areas, detail > semantic in early areas. Here semantic - detail = "
               f"{early['semantic - detail']:+.3f} in early and {higher['semantic - detail']:+.3f} in higher areas. "
               "The predicted embeddings are computed from the same test fMRI, so part of this agreement is by "
               "construction." + (f" Note: {note}" if note else ""))
    settings = {"data": str(Path(args.data).resolve()), "features": str(Path(args.features).resolve()),
                "predictions": str(Path(args.predictions).resolve()), "subject": prepared.subject,
                "method": pred.method, "split": pred.split, "pooling": args.pooling, "folds": args.folds,
                "alphas": list(DEFAULT_ENCODER_ALPHAS), "paths": source, "note": note,
                "median_alpha": {k: float(np.median(v)) for k, v in alphas.items()},
                "n_train": len(Y), "n_test": len(test_ids), "seconds": round(time.perf_counter() - start, 1)}
    write_analysis(out, NAME, "Predicted semantic and detail embeddings back-projected into fMRI space", caption, rows,
                   settings)
    text = [f"backproject: subject {prepared.subject}, {pred.method} ({source}), {len(test_ids)} {pred.split} images "
            f"-> {out}", f"  {'ROI':<8} {'voxels':>6}  {'semantic':>8}  {'detail':>8}  {'S - D':>7}"]
    text += [f"  {r['ROI']:<8} {r['voxels']:>6}  {r['r semantic (pred)']:>8.3f}  {r['r detail (pred)']:>8.3f}  "
             f"{r['semantic - detail']:>+7.3f}" for r in rows]
    if note:
        text.append(f"  note: {note}")
    return "\n".join(text)


def _figure(path: Path, summary: dict, subject: int, method: str, save_figure) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(ROIS), dtype=float)
    x[ROIS.index("early") + 1:] += 0.6  # a gap between early and higher areas
    width = 0.38
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for offset, path_name, colour, label in ((-width / 2, "semantic", "tab:orange", "semantic ê_I,S"),
                                             (width / 2, "detail", "tab:blue", "detail ê_I,D")):
        means = [summary[path_name][roi][0] for roi in ROIS]
        sems = [summary[path_name][roi][1] for roi in ROIS]
        ax.bar(x + offset, means, width, yerr=sems, color=colour, alpha=0.85, capsize=2, label=f"{label} (predicted)")
        ax.scatter(x + offset, [summary[f"{path_name}_true"][roi][0] for roi in ROIS], marker="_", s=160,
                   color="black", linewidths=2, zorder=3,
                   label="same encoder, true embedding" if path_name == "semantic" else None)
    ax.axhline(0, color="grey", linewidth=0.8)
    split = (x[ROIS.index("early")] + x[ROIS.index("early") + 1]) / 2
    ax.axvline(split, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(ROIS)
    ax.set_ylabel("mean voxel correlation r\n(back-projected vs measured test fMRI)")
    ax.set_title(f"Subject {subject}, {method}: predicted embeddings back-projected into fMRI space", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, frameon=False)
    save_figure(fig, path)
