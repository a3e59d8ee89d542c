"""Linear CKA between every pair of CLIP vision layers over the stimulus images (the paper's Fig. 4).

BrainMCLIP picks layers 11-20 for its detail embedding partly from this map: layers inside 11-20
represent the images alike, while layers 21-24 have shifted away from them. Each layer's per-image
representation is :func:`brainmclip.analysis.clip_layers.layer_representations`; the CKA of two
layers compares their ``n x n`` image Gram matrices (:func:`brainmclip.losses.cka.hsic`, the HSIC
behind :func:`brainmclip.losses.cka.linear_cka`), computed once per layer in float64 so that CKAs
close to 1 stay distinguishable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from brainmclip.analysis.common import first_rows
from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = ["NAME", "HELP", "add_arguments", "run", "stimulus_images", "cka_map", "check_window", "summarise"]

NAME = "layer_cka"
HELP = "linear CKA between every pair of CLIP vision layers over the stimulus images (the paper's Fig. 4)"


def stimulus_images(prepared_list, split: str = "test", n_images: int | None = None):
    """Distinct stimulus images of one split over several prepared datasets (shared images once).

    Returns
    -------
    stimulus_ids : int64 (n,)
        NSD ids in order of first appearance, dataset by dataset.
    images : uint8 (n, H, W, 3)
    """
    ids, images, seen = [], [], set()
    for prepared in prepared_list:
        samples, stim, first = first_rows(prepared, split)
        rows = [r for r in first if int(stim[r]) not in seen]
        if n_images is not None:
            rows = rows[:max(n_images - len(ids), 0)]
        seen.update(int(stim[r]) for r in rows)
        ids.extend(int(stim[r]) for r in rows)
        if rows:
            images.append(np.asarray(samples.images[np.asarray(rows)]))
    shapes = {im.shape[1:] for im in images}
    if len(shapes) > 1:
        raise InvalidInputError(f"the datasets' images differ in size ({sorted(shapes)}); compare datasets of one preset")
    if len(ids) < 3:
        raise InvalidInputError(f"{len(ids)} distinct {split} images; CKA needs at least 3")
    return np.asarray(ids, np.int64), np.concatenate(images)


def cka_map(features) -> np.ndarray:
    """Linear CKA between all pairs of layers.

    Parameters
    ----------
    features : float array (n_layers, n, p)
        Per-image representation of each layer.

    Returns
    -------
    float64 (n_layers, n_layers)
        Symmetric, 1 on the diagonal (0 where a layer's Gram matrix has no centred variance).
    """
    import torch

    from brainmclip.losses.cka import center_gram, hsic

    n_layers = len(features)
    grams = []
    for f in features:
        x = torch.as_tensor(np.asarray(f), dtype=torch.float64)
        x = x - x.mean(0)  # centring the features first keeps the Gram entries small; CKA is unchanged
        grams.append(center_gram(x @ x.T))
    grams = torch.stack(grams)
    self_hsic = torch.stack([hsic(g, g) for g in grams])
    norms = self_hsic.clamp_min(0).sqrt()
    out = np.eye(n_layers)
    for i in range(n_layers):
        cross = hsic(grams[i].expand_as(grams[i:]), grams[i:])
        with np.errstate(invalid="ignore", divide="ignore"):
            row = (cross / (norms[i] * norms[i:])).numpy()
        row = np.where(np.isfinite(row), row, 0.0)
        out[i, i:] = row
        out[i:, i] = row
    np.fill_diagonal(out, np.where(self_hsic.numpy() > 0, 1.0, 0.0))
    return out


def check_window(window, n_layers: int) -> tuple[int, int]:
    """``window`` as (first, last) if it lies inside layers 1..n_layers and leaves later layers to compare."""
    lo, hi = (int(v) for v in window)
    if not 1 <= lo < hi < n_layers:
        raise InvalidInputError(f"window {lo}-{hi} must lie inside layers 1..{n_layers} and leave later layers to compare")
    return lo, hi


def summarise(cka: np.ndarray, window=(11, 20)) -> dict:
    """The numbers the layer choice rests on, for a map over layers 1..L.

    ``window`` is the detail range (inclusive, 1-based); ``late`` is every layer after it. The
    *shift* is the layer ``k`` whose representation differs most from layer ``k - 1`` (lowest CKA
    between neighbours), the first layer of a new representation.
    """
    n = len(cka)
    lo, hi = check_window(window, n)
    win = np.arange(lo - 1, hi)
    late = np.arange(hi, n)
    within = cka[np.ix_(win, win)][~np.eye(len(win), dtype=bool)].mean()
    within_late = cka[np.ix_(late, late)][~np.eye(len(late), dtype=bool)].mean() if len(late) > 1 else np.nan
    neighbours = np.diag(cka, 1)  # CKA(k, k+1), k = 1..L-1
    shift = int(np.argmin(neighbours)) + 2
    later = np.arange(hi + 1, n + 1)
    shift_late = int(later[np.argmin(neighbours[later - 2])])  # the largest step after the window
    return {
        "window": f"{lo}-{hi}", "late": f"{hi + 1}-{n}",
        "within_window": float(within),
        "window_vs_late": float(cka[np.ix_(win, late)].mean()),
        "within_late": float(within_late),
        "window_vs_last": float(cka[win, n - 1].mean()),
        "shift_layer": shift, "shift_cka": float(neighbours[shift - 2]),
        "late_shift_layer": shift_late, "late_shift_cka": float(neighbours[shift_late - 2]),
        "neighbour_cka": neighbours.tolist(),
    }


# -- command ------------------------------------------------------------------------------
# brainmclip.features.clip_models.DEFAULT_CLIP, spelled out: importing that module pulls in torch and
# transformers, and the CLI builds every analysis's arguments just to show its help.
_DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def _window(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIRST-LAST, e.g. 11-20") from None
    return lo, hi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from brainmclip.analysis.clip_layers import DEFAULT_GRID

    parser.add_argument("--data", required=True, type=Path, action="append",
                        help="prepared dataset folder; repeat to pool the images of several subjects")
    parser.add_argument("--clip", default=_DEFAULT_CLIP,
                        help="CLIP model: a local folder or cached hub id (never downloaded), 'mini' for the "
                             "miniature world's mini-CLIP, 'tiny' for the random test model")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--split", default="test", help="split whose images are used (default: test)")
    parser.add_argument("--n-images", type=int, default=None, help="use at most N distinct images")
    parser.add_argument("--window", type=_window, default=(11, 20),
                        help="detail layer range summarised against the later layers (default 11-20)")
    parser.add_argument("--grid", type=int, default=DEFAULT_GRID,
                        help=f"patch tokens are average-pooled to a GRID x GRID lattice (default {DEFAULT_GRID})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")


def run(args) -> str:
    import torch

    from brainmclip.analysis.clip_layers import layer_representations
    from brainmclip.analysis.common import ANALYSIS_FILE, write_analysis
    from brainmclip.atomic import atomic_path
    from brainmclip.data.prepared import load_prepared
    from brainmclip.features.clip_models import load_clip

    missing = [d for d in args.data if not Path(d).is_dir()]
    if missing:
        raise MissingInputError(f"{missing[0]}: no such prepared dataset folder")
    if args.n_images is not None and args.n_images < 3:
        raise InvalidInputError(f"--n-images {args.n_images}: CKA needs at least 3 images")
    prepared = [load_prepared(d) for d in args.data]
    ids, images = stimulus_images(prepared, args.split, args.n_images)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    towers = load_clip(args.clip, device=device)
    check_window(args.window, towers.n_vision_layers)  # fail before the model runs
    cka = cka_map(layer_representations(towers, images, grid=args.grid, batch_size=args.batch_size))
    summary = summarise(cka, args.window)
    layers = np.arange(1, len(cka) + 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ANALYSIS_FILE).unlink(missing_ok=True)  # until the new summary is written the folder reads as unfinished
    with atomic_path(out / "layer_cka.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, cka=cka, layers=layers, stimulus_ids=ids)
    with atomic_path(out / "layer_cka.csv") as tmp:
        tmp.write_text("layer," + ",".join(f"layer_{k}" for k in layers) + "\n" + "".join(
            f"{k}," + ",".join(f"{v:.6f}" for v in row) + "\n" for k, row in zip(layers, cka, strict=True)))
    model_name = towers.identity.get("model", args.clip)
    subjects = ", ".join(str(p.subject) for p in prepared)
    title = f"Linear CKA between CLIP vision layers ({model_name}, {len(ids)} images)"
    _figure(out / "figure.png", cka, summary, args.window, title)
    table = _table(summary)
    caption = _caption(summary, len(ids), args.split, subjects, towers.identity)
    settings = {"data": [str(Path(d).resolve()) for d in args.data], "subjects": [p.subject for p in prepared],
                "split": args.split, "n_images": len(ids), "clip": towers.identity, "grid": args.grid,
                "window": list(args.window),
                "representation": "hidden_states[k]: CLS + patch tokens average-pooled to the grid, flattened",
                "cka": "linear CKA of the n x n image Gram matrices (biased HSIC), float64"}
    write_analysis(out, NAME, title, caption, table, settings)
    return (f"layer CKA written to {out} (layer_cka.npz, layer_cka.csv, figure.png, manifest.json)\n"
            + "\n".join(f"  {row['quantity']}: {row['value']}" for row in table))


def _table(s: dict) -> list[dict]:
    return [
        {"quantity": f"mean CKA within layers {s['window']}", "value": round(s["within_window"], 3)},
        {"quantity": f"mean CKA between {s['window']} and {s['late']}", "value": round(s["window_vs_late"], 3)},
        {"quantity": f"mean CKA within {s['late']}", "value": round(s["within_late"], 3)},
        {"quantity": f"mean CKA of {s['window']} with the last layer", "value": round(s["window_vs_last"], 3)},
        {"quantity": "largest change between neighbouring layers (first layer of the new representation)",
         "value": f"layer {s['shift_layer']} (CKA with layer {s['shift_layer'] - 1}: {s['shift_cka']:.3f})"},
        {"quantity": f"largest change after layer {s['window'].split('-')[1]}",
         "value": f"layer {s['late_shift_layer']} (CKA with layer {s['late_shift_layer'] - 1}: "
                  f"{s['late_shift_cka']:.3f})"},
    ]


def _caption(s: dict, n: int, split: str, subjects: str, identity: dict) -> str:
    text = (f"Linear CKA between the per-image representations (CLS and pooled patch tokens of each block's "
            f"output) of every pair of CLIP vision layers, over {n} distinct {split} images of subject(s) "
            f"{subjects}; the right panel shows CKA between neighbouring layers. Here layers {s['window']} have a "
            f"mean CKA of {s['within_window']:.3f} among themselves and {s['window_vs_late']:.3f} with layers "
            f"{s['late']}; the largest step between neighbouring layers is into layer {s['shift_layer']}, and "
            f"after the window into layer {s['late_shift_layer']}. The paper "
            f"(CLIP ViT-L/14) saw the representation shift from about layer 21, layers 21-24 being much less "
            f"similar to the earlier intermediate layers than layers 11-20 are to each other.")
    if identity.get("model") == "mini":
        text += (" These are miniature-world numbers (mini-CLIP), not ViT-L/14 ones; mini-CLIP was trained with 6 "
                 "vision blocks and grown to 24, so blocks come in groups of four that compute nearly the same "
                 "representation, and the map is made of 4 x 4 tiles.")
    return text


def _figure(path: Path, cka: np.ndarray, s: dict, window, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from brainmclip.analysis.common import save_figure

    n = len(cka)
    layers = np.arange(1, n + 1)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.8), gridspec_kw={"width_ratios": [1.25, 1]},
                                  layout="constrained")
    # The colour scale starts at the map's minimum (rounded down): CKAs between layers of one network
    # are rarely far below 1, and a 0..1 scale would leave the structure in a sliver of the colour map.
    vmin = min(np.floor(float(np.nanmin(cka)) * 20) / 20, 0.95)
    im = ax.imshow(cka, cmap="magma", vmin=vmin, vmax=1.0, origin="upper",
                   extent=(0.5, n + 0.5, n + 0.5, 0.5), interpolation="nearest")
    ax.set_xticks(layers, [str(k) for k in layers], fontsize=7)
    ax.set_yticks(layers, [str(k) for k in layers], fontsize=7)
    ax.set_xlabel("CLIP vision layer")
    ax.set_ylabel("CLIP vision layer")
    lo, hi = window
    ax.add_patch(Rectangle((lo - 0.5, lo - 0.5), hi - lo + 1, hi - lo + 1, fill=False, edgecolor="cyan", lw=1.5,
                           label=f"layers {lo}-{hi}"))
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    fig.colorbar(im, ax=ax, label="linear CKA", shrink=0.9)
    ax.set_title("Layer x layer CKA")
    ax2.plot(layers[1:], s["neighbour_cka"], marker=".", color="C0")
    ax2.axvspan(lo - 0.5, hi + 0.5, color="cyan", alpha=0.15, label=f"layers {lo}-{hi}")
    ax2.set_xlabel("layer k")
    ax2.set_ylabel("CKA(layer k - 1, layer k)")
    ax2.set_xticks([k for k in layers if k == 2 or k % 4 == 0])
    ax2.set_title("Change between neighbouring layers")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)
