"""Decoding quality for different choices of the detail layers (the paper's layer-range experiments).

BrainMCLIP's detail target averages CLIP vision layers 11-20; the paper chose that range after finding that
layers 21-23 hurt reconstructions. This analysis repeats the comparison: for each detail range it

1. extracts a feature store with that range as e_I,D (semantic layer and text unchanged), kept under
   ``OUT/features/<range>`` and reused on a rerun;
2. fits a decoder from fMRI to the targets (default: the fast ridge baseline, alpha by CV on train; or
   BrainMCLIP with a given config) under ``OUT/runs/<range>`` and predicts the test set;
3. scores the predicted fused embedding Ê_I = (ê_I,S + ê_I,D) / 2 against its own targets: top-1 n-way
   retrieval (MindEye's protocol, both directions) and 2-way identification (Pearson, as the image metrics);
4. optionally reconstructs the first ``--n-recon`` test images with Versatile Diffusion from the predicted
   Ê_I (image condition only) and, for reference, from the true fused embedding of that range, scoring
   both against the true images (PixCorr, SSIM, CLIP 2-way).

Retrieval compares each range's predictions with that range's targets, and targets of different ranges are not
equally easy to tell apart, so only the reconstruction scores compare ranges on one footing (the true images).
Each range's scores are kept in ``OUT/ranges/<range>/scores.json``; a rerun scores only what is missing, and
more ranges can be added to a finished sweep.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from brainmclip.errors import InvalidInputError

__all__ = ["NAME", "HELP", "DEFAULT_RANGES", "add_arguments", "run", "score_embeddings"]

NAME = "layer_sweep"
HELP = ("decode with different CLIP detail-layer ranges (feature store + fast decoder per range) and compare "
        "retrieval and reconstruction quality")

DEFAULT_RANGES = "1-10,6-15,11-20,21-24,11-24"
DECODERS = ("ridge", "brain_mclip")


def score_embeddings(pred_image, pred_detail, targets: dict, n_way: int = 300, seed: int = 0) -> dict:
    """Retrieval and 2-way identification of predicted embeddings against their targets.

    Parameters
    ----------
    pred_image : array (n, tokens, dim)
        Predicted fused Ê_I.
    pred_detail : array (n, tokens, dim) or None
        Predicted ê_I,D (its own retrieval shows how decodable the detail range is on its own).
    targets : dict
        ``image_semantic`` and ``image_detail`` of the same images, in the same order.

    Returns
    -------
    dict
        ``top1_image`` / ``top1_brain`` (mean top-1 accuracy, image and brain retrieval), ``two_way``
        (Pearson-based 2-way identification of Ê_I among the fused targets), ``top1_detail``.
    """
    from brainmclip.evaluation.image_metrics import two_way_identification
    from brainmclip.evaluation.retrieval import similarity_matrix, top1_n_way

    fused = (np.asarray(targets["image_semantic"], np.float32) + np.asarray(targets["image_detail"], np.float32)) / 2
    pred_image = np.asarray(pred_image, np.float32)
    top1 = top1_n_way(similarity_matrix(pred_image, fused), n_way=n_way, n_repeats=30, seed=seed)
    out = {"top1_image": top1["image_retrieval"]["mean"], "top1_brain": top1["brain_retrieval"]["mean"],
           "two_way": two_way_identification(fused.reshape(len(fused), -1), pred_image.reshape(len(pred_image), -1))[0],
           "n_way": min(n_way, len(fused)), "n_images": len(fused)}
    if pred_detail is not None:
        detail = top1_n_way(similarity_matrix(np.asarray(pred_detail, np.float32), targets["image_detail"]),
                            n_way=n_way, n_repeats=30, seed=seed)
        out["top1_detail"] = detail["image_retrieval"]["mean"]
    return out


def _fit(decoder: str, config: list[str], data: Path, store: Path, run_dir: Path, progress: bool) -> Path:
    """Train (or resume, or reuse) the decoder of one range and predict the test set."""
    from brainmclip.training.predict import predict

    pred_dir = run_dir / "predictions_test"
    if (pred_dir / "manifest.json").exists():
        return pred_dir
    if decoder == "ridge":
        from brainmclip.training.ridge_fit import train_ridge

        if not (run_dir / "run.json").exists():
            if run_dir.exists():  # a fit interrupted before run.json: its files are incomplete
                import shutil

                shutil.rmtree(run_dir)
            train_ridge(data, store, run_dir, progress=progress)
    else:
        from brainmclip.training.checkpoint import load_checkpoint
        from brainmclip.training.loop import train_brain_mclip

        last = run_dir / "checkpoint_last.pt"
        if not last.exists() or not load_checkpoint(last)["progress"]["finished"]:
            train_brain_mclip(data, store, config, run_dir, resume=last.exists(), progress=progress)
    return predict(run_dir, "test", pred_dir)


def _check_settings(out: Path, settings: dict) -> None:
    from brainmclip.atomic import write_json_atomic

    path = out / "sweep_settings.json"
    settings = json.loads(json.dumps(settings))
    made = any((out / sub).is_dir() and any((out / sub).iterdir()) for sub in ("features", "runs", "ranges"))
    if path.is_file() and made:  # settings of a run that made nothing yet bind nothing
        previous = json.loads(path.read_text())
        differ = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if differ:
            raise InvalidInputError(f"{out} holds a sweep made with other settings ({', '.join(differ)}); choose another "
                             "--out (its feature stores and runs would not match)")
    write_json_atomic(path, settings)


# -- command ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="prepared subject dataset")
    parser.add_argument("--out", required=True, type=Path, help="output folder (feature stores and runs go inside)")
    parser.add_argument("--clip", default="openai/clip-vit-large-patch14",
                        help="CLIP model of the targets ('mini' in the miniature world, 'tiny' for tests)")
    parser.add_argument("--ranges", default=DEFAULT_RANGES, help=f"detail-layer ranges (default {DEFAULT_RANGES})")
    parser.add_argument("--decoder", default="ridge", choices=DECODERS,
                        help="ridge: the fast baseline (default); brain_mclip: trains BrainMCLIP per range")
    parser.add_argument("--config", action="append", default=None,
                        help="BrainMCLIP config name or JSON (default brain_mclip; brain_mclip_tiny in the demo)")
    parser.add_argument("--n-way", type=int, default=300, help="top-1 retrieval among this many (default 300)")
    parser.add_argument("--n-recon", type=int, default=48,
                        help="first N test images reconstructed per range (default 48; 0: no reconstructions)")
    parser.add_argument("--generator", default="shi-labs/versatile-diffusion",
                        help="Versatile Diffusion folder or cached id, 'mini' or 'tiny'")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=42, help="noise seed of the reconstructions (default 42)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per CLIP batch when extracting")


def run(args) -> str:
    import time

    from brainmclip.analysis.common import write_analysis
    from brainmclip.analysis.gt_layers import _name, parse_layer_ranges, range_label
    from brainmclip.atomic import write_bytes_atomic, write_json_atomic
    from brainmclip.data.prepared import load_prepared
    from brainmclip.features.clip_models import load_clip

    start = time.perf_counter()
    progress = not getattr(args, "quiet", False)
    ranges = parse_layer_ranges(args.ranges, "--ranges")
    if args.n_way < 2 or args.n_recon < 0 or args.n_recon == 1 or args.steps < 1:
        raise InvalidInputError("--n-way must be >= 2, --n-recon 0 or >= 2 (2-way identification), --steps positive")
    if args.config and args.decoder != "brain_mclip":
        raise InvalidInputError("--config applies to --decoder brain_mclip only")
    config = args.config or ["brain_mclip"]
    prepared = load_prepared(args.data)
    towers = load_clip(args.clip)
    parse_layer_ranges(args.ranges, "--ranges", n_layers=towers.n_vision_layers)
    last = towers.n_vision_layers
    out = Path(args.out)
    settings = {"data": str(Path(args.data).resolve()), "subject": prepared.subject, "clip": args.clip,
                "decoder": args.decoder, "config": config if args.decoder == "brain_mclip" else None,
                "semantic_layer": last, "generator": args.generator, "steps": args.steps,
                "guidance_scale": args.guidance_scale, "seed": args.seed}
    _check_settings(out, settings)

    recon = _Reconstructor(args, prepared, towers) if args.n_recon else None
    scores = {}
    for layers in ranges:
        key = range_label(layers)
        scores[key] = _range_scores(args, key, layers, last, out, config, recon, progress)
    del recon

    rows = []
    for layers in ranges:
        key, s = range_label(layers), scores[range_label(layers)]
        row = {"detail layers": key, "n layers": len(layers),
               f"top-1 {s['n_way']}-way image retrieval (%)": round(100 * s["top1_image"], 1),
               f"top-1 {s['n_way']}-way brain retrieval (%)": round(100 * s["top1_brain"], 1),
               "2-way Ê_I (%)": round(100 * s["two_way"], 1),
               "top-1 ê_I,D (%)": round(100 * s["top1_detail"], 1) if "top1_detail" in s else None}
        if "recon" in s:
            row.update({"recon CLIP 2-way (%)": round(100 * s["recon"]["CLIP"], 1),
                        "recon PixCorr": round(s["recon"]["PixCorr"], 4), "recon SSIM": round(s["recon"]["SSIM"], 4),
                        "true-emb. recon CLIP 2-way (%)": round(100 * s["recon_true"]["CLIP"], 1)})
        rows.append(row)
    header = list(dict.fromkeys(k for row in rows for k in row))
    lines = [",".join(header)] + [",".join("" if row.get(h) is None else str(row.get(h)) for h in header)
                                  for row in rows]
    write_bytes_atomic(out / "scores.csv", ("\n".join(lines) + "\n").encode())
    write_json_atomic(out / "scores.json", scores)
    _figure(out / "figure.png", [range_label(r) for r in ranges], scores, prepared.subject, args.decoder)

    uncalibrated = sorted({m for s in scores.values() for m in s.get("uncalibrated", [])})
    n_way, n_test = scores[range_label(ranges[0])]["n_way"], scores[range_label(ranges[0])]["n_images"]
    caption = (f"Subject {prepared.subject}: for each detail-layer range, a {_name(args.clip, 'CLIP')} feature "
               f"store with that range as e_I,D (semantic = layer {last}), a {args.decoder} decoder fitted on the "
               f"training images, and its predicted fused embedding Ê_I on the {n_test} test "
               f"images: top-1 {n_way}-way retrieval and 2-way identification against that range's own targets "
               "(not comparable across ranges: targets of some ranges are easier to tell apart)"
               + (f"; and reconstructions of the first {args.n_recon} test images by {_name(args.generator, 'VD')} "
                  f"from the predicted Ê_I and from the true fused embedding (image condition only, {args.steps} steps), "
                  "scored against the true images (CLIP 2-way, PixCorr, SSIM), which compare ranges on one footing"
                  if args.n_recon else "") + "."
               + (" Miniature world: mini-CLIP and mini-VD are small models trained on the simulated scenes."
                  if "mini" in (args.clip, args.generator) else "")
               + (f" Uncalibrated (random network): {', '.join(uncalibrated)}." if uncalibrated else ""))
    write_analysis(out, NAME, "Decoding quality by detail-layer range", caption, rows,
                   {**settings, "ranges": [range_label(r) for r in ranges], "n_way": args.n_way,
                    "n_recon": args.n_recon, "uncalibrated": uncalibrated,
                    "seconds": round(time.perf_counter() - start, 1)})
    text = [f"layer-sweep: subject {prepared.subject}, {args.decoder}, {len(ranges)} detail ranges -> {out}"]
    for row in rows:
        s = scores[row["detail layers"]]
        line = (f"  {row['detail layers']:<6} top-1 image {100 * s['top1_image']:5.1f}%  brain "
                f"{100 * s['top1_brain']:5.1f}%  2-way {100 * s['two_way']:5.1f}%")
        if "recon" in s:
            line += (f"  recon CLIP {100 * s['recon']['CLIP']:5.1f}% (true emb. {100 * s['recon_true']['CLIP']:5.1f}%)"
                     f"  PixCorr {s['recon']['PixCorr']:.3f}")
        text.append(line)
    return "\n".join(text)


def _range_scores(args, key: str, layers: tuple[int, ...], last: int, out: Path, config: list[str], recon,
                  progress: bool) -> dict:
    """Everything of one range, reusing what an earlier run finished."""
    from brainmclip.atomic import write_json_atomic
    from brainmclip.features.extract import extract_features
    from brainmclip.features.feature_store import open_feature_store
    from brainmclip.models.predictions import load_predictions

    folder = out / "ranges" / key
    score_file = folder / "scores.json"
    wanted = {"n_way": args.n_way, "n_recon": args.n_recon}
    if score_file.is_file():
        previous = json.loads(score_file.read_text())
        if previous.get("request") == wanted:
            return previous
    store_dir = out / "features" / key
    extract_features([args.data], store_dir, model=args.clip, detail_layers=layers,
                     semantic_layer=last,
                     batch_size=args.batch_size, progress=progress)
    pred_dir = _fit(args.decoder, config, Path(args.data), store_dir, out / "runs" / key, progress)
    pred = load_predictions(pred_dir)
    store = open_feature_store(store_dir)
    targets = store.get(pred.stimulus_ids, ("image_semantic", "image_detail"))
    scores = score_embeddings(pred.image, pred.image_detail, targets, n_way=args.n_way)
    scores["request"] = wanted
    if recon is not None:
        scores.update(recon.score(key, pred, store, folder))
    write_json_atomic(score_file, scores)
    return scores


class _Reconstructor:
    """Reconstructs and scores the first test images of every range with one generator and metric network."""

    def __init__(self, args, prepared, towers):
        from brainmclip.analysis.gt_layers import first_test_images, grey_condition

        self.args = args
        self.towers = towers
        self.last = towers.n_vision_layers
        self.ids, self.truths = first_test_images(prepared, args.n_recon)
        if len(self.ids) < 2:
            raise InvalidInputError(f"{args.data}: {len(self.ids)} test images; reconstructions need at least 2")
        self.uncond = grey_condition(towers)
        self._generator = self._networks = None
        self.truth_cache: dict = {}

    def _images(self, conditions: np.ndarray, folder: Path) -> np.ndarray:
        from brainmclip.analysis.gt_layers import load_generator, load_pngs, render_images

        if self._generator is None and not all((folder / f"nsd{int(i):05d}.png").exists() for i in self.ids):
            self._generator = load_generator(self.args.generator, self.towers.embed_dim)
        paths = render_images(self._generator, conditions, self.ids, folder, steps=self.args.steps,
                              guidance_scale=self.args.guidance_scale, seed=self.args.seed, uncond_image=self.uncond)
        return load_pngs(paths)

    def score(self, key: str, pred, store, folder: Path) -> dict:
        from brainmclip.analysis.gt_layers import score_images
        from brainmclip.evaluation.image_metrics import load_metric_networks

        row = {int(i): r for r, i in enumerate(pred.stimulus_ids)}
        missing = [int(i) for i in self.ids if int(i) not in row]
        if missing:
            raise InvalidInputError(f"range {key}: predictions lack test image {missing[0]}")
        rows = [row[int(i)] for i in self.ids]
        decoded = np.asarray(pred.image[rows], np.float32)
        targets = store.get(self.ids, ("image_semantic", "image_detail"))
        true = (targets["image_semantic"] + targets["image_detail"]) / 2
        if self._networks is None:
            self._networks = load_metric_networks(("CLIP",), clip_model=self.args.clip)
        out = {}
        for name, conditions in (("recon", decoded), ("recon_true", true)):
            result = score_images(self._images(conditions, folder / name), self.truths, self._networks,
                                  self.truth_cache)
            out[name] = {m: result.values[m] for m in ("PixCorr", "SSIM", "CLIP")}
            out["uncalibrated"] = list(result.uncalibrated)
        out["recon_ids"] = [int(i) for i in self.ids]
        return out


def _figure(path: Path, keys: list[str], scores: dict, subject: int, decoder: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainmclip.analysis.common import save_figure

    with_recon = all("recon" in scores[k] for k in keys)
    fig, axes = plt.subplots(1, 2 if with_recon else 1, figsize=(11 if with_recon else 6, 4), squeeze=False)
    x = np.arange(len(keys))
    n_way = scores[keys[0]]["n_way"]
    series = [("two_way", "2-way Ê_I", "tab:blue"), ("top1_image", f"top-1 {n_way}-way image retrieval", "tab:orange"),
              ("top1_brain", f"top-1 {n_way}-way brain retrieval", "tab:green")]
    if all("top1_detail" in scores[k] for k in keys):
        series.append(("top1_detail", f"top-1 {n_way}-way image retrieval, ê_I,D alone", "tab:grey"))
    width = 0.8 / len(series)
    ax = axes[0, 0]
    for i, (field, label, colour) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [100 * scores[k][field] for k in keys], width, color=colour,
               label=label)
    ax.set_title("decoded embedding vs its own targets", fontsize=10)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)
    if with_recon:
        ax = axes[0, 1]
        for field, label, colour, style in (("recon", "from decoded Ê_I", "tab:red", "-o"),
                                            ("recon_true", "from true fused embedding", "black", "--s")):
            ax.plot(x, [100 * scores[k][field]["CLIP"] for k in keys], style, color=colour, label=label)
        ax.axhline(50, color="grey", linestyle=":", linewidth=1)
        ax.text(x[-1], 50.5, "chance", color="grey", fontsize=7, ha="right", va="bottom")
        ax.set_title(f"reconstructions of {len(scores[keys[0]]['recon_ids'])} test images", fontsize=10)
        ax.set_ylabel("CLIP 2-way identification (%)")
        ax.set_ylim(min(40, ax.get_ylim()[0]), 100)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)
    for a in axes[0]:
        a.set_xticks(x)
        a.set_xticklabels(keys)
        a.set_xlabel("detail layers", labelpad=1)
    fig.suptitle(f"Subject {subject}, {decoder}: decoding with different CLIP detail-layer ranges", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
