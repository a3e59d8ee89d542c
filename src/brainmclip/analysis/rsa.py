"""Representational similarity between the fMRI of visual areas and each CLIP vision layer.

BrainMCLIP motivates its layer choice with this analysis: for one subject it compares, image pair by
image pair, how differently a brain region responds with how differently a CLIP layer represents the
two images. Here:

- the fMRI of an ROI is each image's voxel pattern (repeats averaged, as for evaluation);
- a CLIP layer is :func:`brainmclip.analysis.clip_layers.layer_representations` of the same images;
- an RDM is ``1 - Pearson correlation`` between the images' patterns, after centring every voxel and
  every CLIP unit over the images, so that a pattern shared by all images (CLIP's position embeddings,
  a voxel's baseline) does not count as similarity between them; the prepared betas are already
  z-scored per voxel, so for them this changes next to nothing;
- RSA is the Spearman correlation of two RDMs' upper triangles (the distances are compared by rank
  only, since fMRI and CLIP distances live on unrelated scales).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from brainmclip.analysis.common import first_rows
from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = ["NAME", "HELP", "ROIS", "add_arguments", "run", "roi_masks", "split_patterns", "rdm", "rdm_upper",
           "rsa_matrix"]

NAME = "rsa"
HELP = "RSA between each ROI's fMRI and each CLIP vision layer (the paper's Fig. 2): ROI x layer heatmap"

# Early areas are labels of the pRF ROI file (NSD's 1..7 = V1v, V1d, V2v, V2d, V3v, V3d, hV4), ventral and
# dorsal halves merged as in the paper; each category-selective ROI is a file of its own (any label > 0).
_PRF = "prf-visualrois"
_AREAS = {"V1": (1, 2), "V2": (3, 4), "V3": (5, 6), "hV4": (7,)}
_FLOC = {"faces": "floc-faces", "bodies": "floc-bodies", "places": "floc-places", "words": "floc-words"}
#: Every ROI the analysis knows, in the order rows are shown: early areas, their union, floc areas, their union.
ROIS = (*_AREAS, "early", *_FLOC, "higher")
EARLY = tuple(_AREAS)
#: Layers whose RSA the table lists beside each ROI's best one.
TABLE_LAYERS = (1, 6, 12, 18, 24)


def roi_masks(voxels, names=ROIS) -> dict[str, np.ndarray]:
    """Boolean column masks of the named ROIs over a prepared dataset's voxels.

    ``early`` is the union of V1-hV4 (all pRF-mapped voxels) and ``higher`` the union of the four
    category-selective (floc) ROIs; a voxel in two floc ROIs counts in both.
    """
    labels = voxels.roi_labels
    needed = {_PRF} if any(n in (*_AREAS, "early") for n in names) else set()
    needed |= {_FLOC[n] for n in names if n in _FLOC} | (set(_FLOC.values()) if "higher" in names else set())
    missing = sorted(needed - set(labels))
    if missing:
        raise InvalidInputError(f"the prepared dataset has no per-voxel labels of {missing[0]} "
                         "(prepare it from an NSD tree with ROI files)")
    masks = {}
    for name in names:
        if name in _AREAS:
            masks[name] = np.isin(labels[_PRF], _AREAS[name])
        elif name == "early":
            masks[name] = labels[_PRF] > 0
        elif name in _FLOC:
            masks[name] = labels[_FLOC[name]] > 0
        elif name == "higher":
            masks[name] = np.any([labels[f] > 0 for f in _FLOC.values()], axis=0)
        else:
            raise InvalidInputError(f"Unknown ROI {name!r}; choose from {list(ROIS)}")
    return masks


def split_patterns(prepared, split: str = "test", n_images: int | None = None):
    """One fMRI pattern and one stimulus per image of a prepared split.

    Repeats of an image (single-trial datasets) are averaged, as predictions are before evaluation;
    images keep the order of their first row.

    Returns
    -------
    stimulus_ids : int64 (n,)
    betas : float32 (n, n_voxels)
    images : uint8 (n, H, W, 3), read from the memory map
    """
    from brainmclip.training.predict import average_by_stimulus

    samples, ids, rows = first_rows(prepared, split)  # one row per image, in order of first appearance
    if n_images is not None:
        if n_images < 3:
            raise InvalidInputError(f"--n-images {n_images}: RSA needs at least 3 images")
        rows = rows[:n_images]
    if len(np.unique(ids)) == len(ids):  # one row per image already (repeats averaged when prepared)
        betas = np.asarray(samples.betas[rows], np.float32)
    else:
        keep = np.flatnonzero(np.isin(ids, ids[rows]))
        _, averaged = average_by_stimulus(ids[keep], {"betas": np.asarray(samples.betas[keep])})
        betas = averaged["betas"]  # the same first-appearance order as ids[rows]
    if len(rows) < 3:
        raise InvalidInputError(f"{prepared.root}: the {split} split has {len(rows)} images; RSA needs at least 3")
    return ids[rows], betas, np.asarray(samples.images[rows])


def rdm(patterns) -> np.ndarray:
    """``1 - Pearson correlation`` between the rows of ``patterns`` (n, p), features centred over rows first.

    Computed in float64; an image whose centred pattern is constant has no defined correlation and
    makes its row and column NaN.
    """
    x = np.asarray(patterns, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise InvalidInputError(f"an RDM needs patterns of shape (n >= 2, p), got {x.shape}")
    x = x - x.mean(0)
    x = x - x.mean(1, keepdims=True)
    norm = np.linalg.norm(x, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = x / norm[:, None]
    d = 1.0 - x @ x.T
    np.fill_diagonal(d, 0.0)
    return d


def rdm_upper(d: np.ndarray) -> np.ndarray:
    """The strictly upper triangle of an RDM, row by row (each image pair once)."""
    return d[np.triu_indices(len(d), 1)]


def _ranked(vectors: np.ndarray) -> np.ndarray:
    """Rows replaced by their standardised ranks, so that a dot product / m is Spearman's rho."""
    from scipy.stats import rankdata

    r = rankdata(vectors, axis=1)
    r -= r.mean(1, keepdims=True)
    sd = np.sqrt((r**2).mean(1, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        return r / sd


def rsa_matrix(brain: np.ndarray, model: np.ndarray) -> np.ndarray:
    """Spearman correlations between every brain RDM and every model RDM.

    Parameters
    ----------
    brain : float array (n_rois, m)
        Upper triangles of the ROIs' RDMs.
    model : float array (n_layers, m)
        Upper triangles of the layers' RDMs over the same image pairs.

    Returns
    -------
    float64 (n_rois, n_layers)
        Spearman's rho (average ranks for ties, as :func:`scipy.stats.spearmanr`).
    """
    brain, model = np.atleast_2d(brain), np.atleast_2d(model)
    if brain.shape[1] != model.shape[1]:
        raise InvalidInputError(f"RDMs over different image pairs: {brain.shape[1]} and {model.shape[1]}")
    return _ranked(brain) @ _ranked(model).T / brain.shape[1]


# -- command ------------------------------------------------------------------------------
# brainmclip.features.clip_models.DEFAULT_CLIP, spelled out: importing that module pulls in torch and
# transformers, and the CLI builds every analysis's arguments just to show its help.
_DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from brainmclip.analysis.clip_layers import DEFAULT_GRID

    parser.add_argument("--data", required=True, type=Path, help="prepared dataset folder (one subject)")
    parser.add_argument("--clip", default=_DEFAULT_CLIP,
                        help="CLIP model: a local folder or cached hub id (never downloaded), 'mini' for the "
                             "miniature world's mini-CLIP, 'tiny' for the random test model")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--split", default="test", help="split whose images are compared (default: test, "
                                                        "repeats averaged)")
    parser.add_argument("--n-images", type=int, default=None, help="use the first N images of the split")
    parser.add_argument("--rois", nargs="+", default=None, metavar="ROI",
                        help=f"ROIs to compare (default: all of {' '.join(ROIS)})")
    parser.add_argument("--grid", type=int, default=DEFAULT_GRID,
                        help=f"patch tokens are average-pooled to a GRID x GRID lattice (default {DEFAULT_GRID})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")


def _device(cpu: bool) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not cpu else "cpu"


def run(args) -> str:
    from brainmclip.analysis.clip_layers import layer_representations
    from brainmclip.analysis.common import ANALYSIS_FILE, write_analysis
    from brainmclip.data.prepared import load_prepared
    from brainmclip.features.clip_models import load_clip

    rois = list(dict.fromkeys(args.rois)) if args.rois else list(ROIS)
    unknown = [r for r in rois if r not in ROIS]
    if unknown:
        raise InvalidInputError(f"Unknown ROI {unknown[0]!r}; choose from {list(ROIS)}")
    if not Path(args.data).is_dir():
        raise MissingInputError(f"{args.data}: no such prepared dataset folder")
    prepared = load_prepared(args.data)
    masks = roi_masks(prepared.voxels, rois)
    sizes = {r: int(m.sum()) for r, m in masks.items()}
    empty = [r for r in rois if sizes[r] < 2]
    if args.rois and empty:
        raise InvalidInputError(f"ROI {empty[0]!r} has {sizes[empty[0]]} voxels in {args.data}; RSA needs at least 2")
    rois = [r for r in rois if r not in empty]  # the default list skips ROIs a (small) dataset lacks
    if not rois:
        raise InvalidInputError(f"{args.data}: none of the ROIs {list(ROIS)} has 2 or more voxels")
    ids, betas, images = split_patterns(prepared, args.split, args.n_images)

    towers = load_clip(args.clip, device=_device(args.cpu))
    feats = layer_representations(towers, images, grid=args.grid, batch_size=args.batch_size)
    layers = np.arange(1, len(feats) + 1)
    model_rdms = np.stack([rdm_upper(rdm(f)) for f in feats])
    del feats
    brain_rdms = np.stack([rdm_upper(rdm(betas[:, masks[r]])) for r in rois])
    scores = rsa_matrix(brain_rdms, model_rdms)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ANALYSIS_FILE).unlink(missing_ok=True)  # until the new summary is written the folder reads as unfinished
    _save_numbers(out, rois, sizes, layers, scores, ids)
    model_name = towers.identity.get("model", args.clip)
    title = f"RSA between fMRI ROIs and CLIP vision layers (subject {prepared.subject}, {model_name})"
    _figure(out / "figure.png", rois, layers, scores, title)
    table = _table(rois, sizes, layers, scores)
    caption = _caption(rois, layers, scores, len(ids), args.split, prepared.subject, towers.identity)
    settings = {"data": str(Path(args.data).resolve()), "subject": prepared.subject, "split": args.split,
                "n_images": len(ids), "clip": towers.identity, "grid": args.grid,
                "representation": "hidden_states[k]: CLS + patch tokens average-pooled to the grid, flattened",
                "rdm": "1 - Pearson correlation between images (voxels / units centred over images)",
                "rsa": "Spearman correlation of RDM upper triangles",
                "rois": {r: sizes[r] for r in rois}, "skipped_rois": empty}
    write_analysis(out, NAME, title, caption, table, settings)
    return _summary(out, rois, layers, scores)


def _best(scores_row: np.ndarray) -> int:
    """Index of the largest finite value (NaN rows give 0)."""
    return int(np.nanargmax(scores_row)) if np.isfinite(scores_row).any() else 0


def _save_numbers(out: Path, rois, sizes, layers, scores, ids) -> None:
    from brainmclip.atomic import atomic_path

    with atomic_path(out / "rsa.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, rsa=scores, rois=np.asarray(rois), layers=layers,
                 n_voxels=np.asarray([sizes[r] for r in rois]), stimulus_ids=ids)
    lines = ["roi,n_voxels," + ",".join(f"layer_{k}" for k in layers)]
    lines += [f"{r},{sizes[r]}," + ",".join(f"{v:.6f}" for v in row) for r, row in zip(rois, scores, strict=True)]
    with atomic_path(out / "rsa.csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _table(rois, sizes, layers, scores) -> list[dict]:
    # Layer columns are zero-padded so that they stay in order where a table's keys get sorted.
    shown = [k for k in TABLE_LAYERS if k <= len(layers)]
    rows = []
    for r, row in zip(rois, scores, strict=True):
        best = _best(row)
        rows.append({"ROI": r, "voxels": sizes[r], "best layer": int(layers[best]), "best RSA": round(float(row[best]), 3),
                     **{f"layer {k:02d}": round(float(row[k - 1]), 3) for k in shown}})
    return rows


def _caption(rois, layers, scores, n, split, subject, identity) -> str:
    idx = {r: i for i, r in enumerate(rois)}
    found = []
    for group in ("early", "higher"):
        if group in idx:
            row = scores[idx[group]]
            b = _best(row)
            found.append(f"{group} ROIs peak at layer {layers[b]} (RSA {row[b]:.3f}; final layer {row[-1]:.3f})")
    text = (f"Spearman correlation between the representational dissimilarity matrices (1 - Pearson r over "
            f"{n} {split} images of subject {subject}) of each ROI's fMRI and of each CLIP vision layer "
            f"(CLS and pooled patch tokens of the block output). Dots mark each ROI's best layer; the right "
            f"panel follows the early (V1-hV4) and higher (floc union) ROIs across layers. ")
    if found:
        text += "Here " + "; ".join(found) + ". "
    text += ("The paper (subject 1, CLIP ViT-L/14) found intermediate layers most similar to both low- and "
             "high-level areas, and the final layer closer to high-level areas than to low-level ones.")
    if identity.get("model") == "mini":
        text += (" These are miniature-world numbers (simulated brain, mini-CLIP), not ViT-L/14 ones; mini-CLIP "
                 "was trained with 6 vision blocks and grown to 24, so its blocks come in groups of four that "
                 "compute nearly the same representation and the RSA rises in steps.")
    return text


def _figure(path: Path, rois, layers, scores, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainmclip.analysis.common import save_figure

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 0.42 * len(rois) + 2.4),
                                  gridspec_kw={"width_ratios": [2.3, 1]}, layout="constrained")
    im = ax.imshow(scores, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(layers)), [str(k) for k in layers], fontsize=8)
    ax.set_yticks(range(len(rois)), rois)
    ax.set_xlabel("CLIP vision layer (transformer block)")
    ax.set_ylabel("ROI")
    for i, row in enumerate(scores):
        ax.plot(_best(row), i, "o", color="white", markeredgecolor="black", markersize=6)
    split_at = [i for i in range(1, len(rois)) if (rois[i - 1] in (*EARLY, "early")) != (rois[i] in (*EARLY, "early"))]
    for i in split_at:  # a rule between the early (pRF) and the category-selective ROIs
        ax.axhline(i - 0.5, color="white", lw=1.5)
    fig.colorbar(im, ax=ax, label="RSA (Spearman ρ between RDMs)", shrink=0.95)
    ax.set_title("RSA: ROI x layer (dot = best layer)")
    groups = [r for r in ("early", "higher") if r in rois] or list(rois)
    for r in groups:
        ax2.plot(layers, scores[rois.index(r)], marker=".", label=r)
    ax2.set_xlabel("CLIP vision layer")
    ax2.set_ylabel("RSA (Spearman ρ)")
    ax2.set_xticks([k for k in layers if k == 1 or k % 4 == 0])
    ax2.grid(alpha=0.3)
    ax2.legend(loc="best", fontsize=8)
    ax2.set_title("Low- vs high-level ROIs")
    fig.suptitle(title)
    save_figure(fig, path)


def _summary(out: Path, rois, layers, scores) -> str:
    lines = [f"RSA written to {out} (rsa.csv, rsa.npz, figure.png, manifest.json)"]
    for r, row in zip(rois, scores, strict=True):
        b = _best(row)
        lines.append(f"  {r:7s} best layer {layers[b]:2d}  RSA {row[b]:.3f}  (final layer {row[-1]:.3f})")
    return "\n".join(lines)
