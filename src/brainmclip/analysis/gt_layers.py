"""Reconstructions from the true CLIP image condition of single layers, layer ranges and the fused embedding.

The paper motivates BrainMCLIP with a preliminary experiment (its Fig. 1 and first appendix): feed Versatile
Diffusion the ground-truth CLIP image condition built from one vision layer instead of the last one, and look at
what comes out. Intermediate layers keep layout and fine detail but drift off the scene's meaning; the last layer
keeps the meaning and loses the detail; the average of the detail layers and the last layer ("fused", what
BrainMCLIP is trained to predict) keeps both. No fMRI is involved: this is the ceiling of each choice of target.

Every condition is built exactly like the feature store's targets
(:class:`~brainmclip.features.clip_extractor.ClipFeatureExtractor`): each layer's tokens go through
``post_layernorm`` and ``visual_projection`` and are divided by the norm of the projected CLS token; a range
averages its projected layers (or, with ``--merge average-then-project``, projects their averaged hidden states);
fused = (detail range + last layer) / 2. Only VD's image condition is used (text share 0), so the rows differ in
nothing but the CLIP layers; every image keeps the same starting noise in every row.

Outputs: ``images/<condition>/nsd<id>.png`` (a rerun makes only missing PNGs), ``metrics.csv`` and
``per_image.npz`` (PixCorr, SSIM and CLIP 2-way identification from :mod:`brainmclip.evaluation.image_metrics`),
``figure.png`` (first row the true images) and ``manifest.json``.

The helpers :func:`parse_layer_ranges`, :func:`load_generator`, :func:`render_images` and :func:`score_images` are
shared with the layer-sweep analysis.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainmclip.errors import InvalidInputError

__all__ = ["NAME", "HELP", "Condition", "add_arguments", "run", "parse_layer_ranges", "range_label",
           "build_conditions", "condition_embeddings", "load_generator", "grey_condition", "render_images",
           "load_pngs", "score_images", "first_test_images"]

NAME = "gt_layers"
HELP = ("reconstruct test images from the ground-truth CLIP condition of single layers, layer ranges and the fused "
        "embedding (the paper's Fig. 1): image grid and PixCorr/SSIM/CLIP 2-way per condition")

DEFAULT_LAYERS = "1,6,12,16,20,24"
DEFAULT_RANGES = "11-20,21-24"
DEFAULT_FUSED = "11-20"
SCORED = ("PixCorr", "SSIM", "CLIP")
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


# -- layer ranges ----------------------------------------------------------------------------------
def parse_layer_ranges(text: str, option: str = "--ranges", n_layers: int | None = None,
                       single: bool = False) -> list[tuple[int, ...]]:
    """Comma-separated ``START-END`` ranges (or single layers ``K``) as tuples of 1-based layer numbers.

    Parameters
    ----------
    text : str
        E.g. ``"11-20,21-24"`` or ``"1,6,12"``.
    option : str
        The option's name, for the error message.
    n_layers : int, optional
        Vision blocks of the model; layers above it are refused.
    single : bool
        Accept only single layers (``--layers``).

    Returns
    -------
    list of tuple of int
        One tuple per item, in the given order, duplicates dropped.
    """
    items = [part for part in str(text).split(",") if part.strip()]
    if not items:
        raise InvalidInputError(f"{option} {text!r}: no layers given (expected e.g. 11-20,21-24)")
    out: list[tuple[int, ...]] = []
    for part in items:
        match = _RANGE.match(part)
        start, end = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, -1)
        if not match or start < 1 or end < start or (single and end != start):
            want = "layer numbers, e.g. 1,6,12" if single else "START-END ranges with 1 <= START <= END, e.g. 11-20"
            raise InvalidInputError(f"{option}: {part.strip()!r} is not valid (expected {want})")
        if n_layers is not None and end > n_layers:
            raise InvalidInputError(f"{option}: {part.strip()!r} goes past layer {n_layers}, the model's last vision block")
        layers = tuple(range(start, end + 1))
        if layers not in out:
            out.append(layers)
    return out


def range_label(layers: Sequence[int]) -> str:
    """``(11, ..., 20)`` -> ``"11-20"``; a single layer -> ``"12"``."""
    return f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


@dataclass(frozen=True)
class Condition:
    """One row of the grid: which layers make the image condition.

    ``fused`` adds the last layer (the semantic target) to the ``layers`` average, half and half.
    """

    key: str
    label: str
    layers: tuple[int, ...]
    fused: bool = False


def build_conditions(layers: Sequence[tuple[int, ...]], ranges: Sequence[tuple[int, ...]],
                     fused: tuple[int, ...] | None, last: int) -> list[Condition]:
    """The grid's rows: single layers, then ranges, then the fused embedding."""
    out = [Condition(f"layer{k[0]:02d}", f"layer {k[0]}", k) for k in layers]
    out += [Condition(f"layers{r[0]:02d}-{r[-1]:02d}", f"layers {range_label(r)}", r) for r in ranges]
    if fused is not None:
        out.append(Condition(f"fused{fused[0]:02d}-{fused[-1]:02d}+{last:02d}",
                             f"fused ({range_label(fused)} + {last})", fused, fused=True))
    return out


def condition_embeddings(towers, images: np.ndarray, condition: Condition, merge: str = "project-then-average",
                         batch_size: int = 32) -> np.ndarray:
    """Ground-truth image condition of ``images`` (uint8) for one grid row, float32 (n, tokens, embed_dim)."""
    from brainmclip.features.clip_extractor import ClipFeatureExtractor

    last = towers.n_vision_layers
    extractor = ClipFeatureExtractor(towers, detail_layers=condition.layers, semantic_layer=last, merge=merge)
    parts = []
    for start in range(0, len(images), batch_size):
        feats = extractor.encode_images(np.asarray(images[start:start + batch_size]))
        value = (feats["image_detail"] + feats["image_semantic"]) / 2 if condition.fused else feats["image_detail"]
        parts.append(value.numpy())
    return np.concatenate(parts).astype(np.float32)


# -- generation ------------------------------------------------------------------------------------
def _device():
    import torch

    # bf16 on GPU only: on the CPUs here bf16 matmuls are far slower than fp32.
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def load_generator(name: str, embed_dim: int):
    """Versatile Diffusion ('tiny' random, 'mini', a folder or cached id) on the best device, checked against CLIP."""
    from brainmclip.generation.versatile_diffusion import load_versatile_diffusion, tiny_versatile_diffusion

    device, dtype = _device()
    generator = (tiny_versatile_diffusion(embed_dim=embed_dim) if name == "tiny"
                 else load_versatile_diffusion(name, device=device, dtype=dtype))
    generator.to(device=device, dtype=dtype)
    if generator.embed_dim != embed_dim:
        raise InvalidInputError(f"generator {name!r} takes conditions of width {generator.embed_dim} but the CLIP embeds in "
                         f"{embed_dim} (use the CLIP the generator was made for: 'mini' with 'mini', 'tiny' with 'tiny')")
    return generator


def grey_condition(towers) -> np.ndarray:
    """VD's unconditional image condition: the last layer's tokens of a mid-grey image."""
    from brainmclip.features.clip_extractor import ClipFeatureExtractor

    last = towers.n_vision_layers
    extractor = ClipFeatureExtractor(towers, detail_layers=(last,), semantic_layer=last)
    size = extractor.image_size
    return extractor.encode_images(np.full((1, size, size, 3), 128, np.uint8))["image_semantic"][0].numpy()


def _png(folder: Path, nsd_id: int) -> Path:
    return Path(folder) / f"nsd{int(nsd_id):05d}.png"


def render_images(generator, conditions: np.ndarray, ids: Sequence[int], folder: str | Path, *, steps: int,
                  guidance_scale: float, seed: int, uncond_image: np.ndarray | None, text: np.ndarray | None = None,
                  text_weight: float = 0.0, uncond_text: np.ndarray | None = None, batch_size: int = 16) -> list[Path]:
    """One PNG per id from its image condition (and optional text); PNGs already there are kept.

    Each image's noise comes from :func:`brainmclip.generation.reconstruct.image_seed` of (seed, NSD id), so an
    image starts from the same noise whatever its condition, batch or resumption.

    Returns
    -------
    list of Path
        The PNG of each id, in order.
    """
    import torch
    from PIL import Image

    from brainmclip.atomic import atomic_path
    from brainmclip.generation.reconstruct import image_seed

    folder = Path(folder)
    ids = [int(i) for i in ids]
    paths = [_png(folder, i) for i in ids]
    todo = [r for r, p in enumerate(paths) if not p.exists()]
    for b in range(0, len(todo), batch_size):
        rows = todo[b:b + batch_size]
        image = torch.as_tensor(np.asarray(conditions[rows], np.float32), dtype=generator.dtype, device=generator.device)
        txt = None if text is None or text_weight == 0 else torch.as_tensor(
            np.asarray(text[rows], np.float32), dtype=generator.dtype, device=generator.device)
        gens = [torch.Generator(generator.device).manual_seed(image_seed(seed, ids[r], 0)) for r in rows]
        pixels = generator.generate(image, txt, num_inference_steps=steps, guidance_scale=guidance_scale,
                                    text_weight=text_weight if txt is not None else 0.0, uncond_image=uncond_image,
                                    uncond_text=uncond_text if txt is not None else None, generator=gens)
        for j, r in enumerate(rows):
            with atomic_path(paths[r]) as tmp:
                Image.fromarray(pixels[j]).save(tmp, format="PNG")
    return paths


def load_pngs(paths: Sequence[Path]) -> np.ndarray:
    """uint8 (n, H, W, 3) pixels of PNG files."""
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("RGB")))
    return np.stack(images)


def score_images(recons: np.ndarray, truths: np.ndarray, networks: dict, truth_cache: dict | None = None):
    """PixCorr, SSIM and CLIP 2-way identification (the project's metric code, MindEye1 protocol)."""
    from brainmclip.evaluation.image_metrics import evaluate_images

    return evaluate_images(recons, truths, metrics=SCORED, networks=networks, truth_cache=truth_cache)


def first_test_images(prepared, n: int) -> tuple[np.ndarray, np.ndarray]:
    """NSD ids and pixels of the first ``n`` distinct test images (repeated rows count once)."""
    test = prepared.test
    if test.images is None:
        raise InvalidInputError(f"{prepared.root}: prepared without images; this analysis needs the stimuli")
    _, first = np.unique(test.stimulus_ids, return_index=True)
    rows = np.sort(first)[:n]
    return test.stimulus_ids[rows].astype(np.int64), np.stack([np.asarray(test.images[r]) for r in rows])


def _check_settings(folder: Path, settings: dict, force: bool) -> None:
    """Images already in ``folder`` must come from the same settings, or the grid would mix runs."""
    from brainmclip.atomic import write_json_atomic

    path = folder / "settings.json"
    settings = json.loads(json.dumps(settings))
    if path.is_file() and not force and any(folder.glob("*/*.png")):  # settings without images bind nothing
        previous = json.loads(path.read_text())
        differ = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if differ:
            raise InvalidInputError(f"{folder} holds images made with other settings ({', '.join(differ)}); choose another "
                             "--out or pass --force")
    elif force and folder.is_dir():
        import shutil

        shutil.rmtree(folder)
    write_json_atomic(path, settings)


# -- command ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="prepared subject dataset (its test images)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--clip", default="openai/clip-vit-large-patch14",
                        help="CLIP of the conditions and of the CLIP metric ('mini' with --generator mini, 'tiny' "
                             "for tests)")
    parser.add_argument("--generator", default="shi-labs/versatile-diffusion",
                        help="Versatile Diffusion folder or cached id, 'mini' or 'tiny'")
    parser.add_argument("--layers", default=DEFAULT_LAYERS, help=f"single layers (default {DEFAULT_LAYERS})")
    parser.add_argument("--ranges", default=DEFAULT_RANGES,
                        help=f"layer ranges averaged into one condition (default {DEFAULT_RANGES}; '' for none)")
    parser.add_argument("--fused", default=DEFAULT_FUSED,
                        help=f"detail range of the fused row, averaged with the last layer (default {DEFAULT_FUSED}; "
                             "'' for none)")
    parser.add_argument("--merge", default="project-then-average", choices=("project-then-average",
                                                                            "average-then-project"),
                        help="how a range's layers are combined (default: as the feature store)")
    parser.add_argument("--n-images", type=int, default=48,
                        help="first N test images reconstructed and scored (default 48)")
    parser.add_argument("--show", type=int, default=8, help="images shown in the figure (default 8)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=42, help="noise seed (default 42, as reconstruct)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--force", action="store_true", help="discard images made with other settings")


def run(args) -> str:
    import time

    from brainmclip.analysis.common import write_analysis
    from brainmclip.atomic import write_bytes_atomic
    from brainmclip.data.prepared import load_prepared
    from brainmclip.evaluation.image_metrics import load_metric_networks
    from brainmclip.features.clip_models import load_clip

    start = time.perf_counter()
    if args.n_images < 2:
        raise InvalidInputError(f"--n-images {args.n_images}: CLIP 2-way identification needs at least 2 images")
    if args.show < 1 or args.steps < 1 or args.batch_size < 1:
        raise InvalidInputError("--show, --steps and --batch-size must be positive")
    # Parse before loading anything, so a typo fails at once; the layer count is checked once CLIP is loaded.
    layers = parse_layer_ranges(args.layers, "--layers", single=True) if args.layers.strip() else []
    ranges = parse_layer_ranges(args.ranges, "--ranges") if args.ranges.strip() else []
    fused = parse_layer_ranges(args.fused, "--fused")[0] if args.fused.strip() else None
    if not layers and not ranges and fused is None:
        raise InvalidInputError("no condition to reconstruct: --layers, --ranges and --fused are all empty")
    prepared = load_prepared(args.data)
    ids, truths = first_test_images(prepared, args.n_images)
    if len(ids) < 2:
        raise InvalidInputError(f"{args.data}: the test split has {len(ids)} images; at least 2 are needed")

    out = Path(args.out)
    image_root = out / "images"
    settings = {"data": str(Path(args.data).resolve()), "subject": prepared.subject, "clip": args.clip,
                "generator": args.generator, "merge": args.merge, "steps": args.steps,
                "guidance_scale": args.guidance_scale, "seed": args.seed, "condition": "image only (text share 0)",
                "uncond_image": "last layer of a mid-grey image (VD's choice)"}
    _check_settings(image_root, settings, args.force)

    device, _ = _device()
    towers = load_clip(args.clip, device=device)
    last = towers.n_vision_layers
    for option, value in (("--layers", args.layers), ("--ranges", args.ranges), ("--fused", args.fused)):
        if value.strip():
            parse_layer_ranges(value, option, n_layers=last)
    conditions = build_conditions(layers, ranges, fused, last)

    generator, uncond = None, grey_condition(towers)
    paths = {}
    for cond in conditions:
        folder = image_root / cond.key
        if all(_png(folder, i).exists() for i in ids):
            paths[cond.key] = [_png(folder, i) for i in ids]
            continue
        if generator is None:
            generator = load_generator(args.generator, towers.embed_dim)
        embeds = condition_embeddings(towers, truths, cond, args.merge)
        paths[cond.key] = render_images(generator, embeds, ids, folder, steps=args.steps,
                                        guidance_scale=args.guidance_scale, seed=args.seed, uncond_image=uncond,
                                        batch_size=args.batch_size)
    del generator

    networks = load_metric_networks(("CLIP",), clip_model=args.clip, device=device)
    truth_cache: dict = {}
    recons, results = {}, {}
    for cond in conditions:
        recons[cond.key] = load_pngs(paths[cond.key])
        results[cond.key] = score_images(recons[cond.key], truths, networks, truth_cache)
    uncalibrated = sorted({m for r in results.values() for m in r.uncalibrated})

    rows = [{"condition": c.label, "layers": range_label(c.layers) + (f" + {last}" if c.fused else ""),
             "n_images": len(ids), "PixCorr": round(results[c.key].values["PixCorr"], 4),
             "SSIM": round(results[c.key].values["SSIM"], 4),
             "CLIP 2-way (%)": round(100 * results[c.key].values["CLIP"], 1)}
            for c in conditions]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(out / "metrics.csv", buffer.getvalue().encode())
    _save_npz(out / "per_image.npz", stimulus_ids=ids,
              **{f"{c.key}__{m}": results[c.key].per_image[m] for c in conditions for m in SCORED})

    show = min(args.show, len(ids))
    _figure(out / "figure.png", truths[:show], [(c, recons[c.key][:show], results[c.key].values) for c in conditions],
            ids[:show], prepared.subject)
    world = _world_note(args.clip, args.generator)
    caption = (f"Subject {prepared.subject}: the first {len(ids)} test images (first row, {show} shown) reconstructed "
               f"by {_name(args.generator, 'Versatile Diffusion')} from their ground-truth image condition of "
               f"{_name(args.clip, 'CLIP')}, built from one vision layer, a layer range (each layer projected and "
               f"normalised by its CLS token, then averaged) or the fused embedding (mean of layers "
               f"{range_label(fused) if fused else '-'} and layer {last}, BrainMCLIP's target). Image condition only, "
               f"{args.steps} steps, guidance {args.guidance_scale:g}, the same noise for an image in every row. "
               f"PixCorr and SSIM against the true image; CLIP = 2-way identification with the same CLIP."
               + (f" {world}" if world else "")
               + (f" Uncalibrated (random network): {', '.join(uncalibrated)}." if uncalibrated else ""))
    write_analysis(out, NAME, "Reconstructions from single CLIP layers, layer ranges and the fused embedding",
                   caption, rows, {**settings, "layers": [range_label(k) for k in layers],
                                   "ranges": [range_label(r) for r in ranges],
                                   "fused": range_label(fused) if fused else None, "n_images": len(ids),
                                   "stimulus_ids": ids.tolist(), "metric_networks": results[conditions[0].key].networks,
                                   "uncalibrated": uncalibrated,
                                   "seconds": round(time.perf_counter() - start, 1)})
    lines = [f"gt-layers: {len(conditions)} conditions x {len(ids)} test images of subject {prepared.subject} -> {out}"]
    lines += [f"  {r['condition']:<22} PixCorr {r['PixCorr']:.3f}  SSIM {r['SSIM']:.3f}  "
              f"CLIP 2-way {r['CLIP 2-way (%)']:.1f}%" for r in rows]
    return "\n".join(lines)


def _save_npz(path: Path, **arrays) -> None:
    from brainmclip.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
        np.savez(fh, **arrays)


def _name(model: str, kind: str) -> str:
    """How the caption names a model: 'mini' -> mini-CLIP / mini-VD, 'tiny' -> a random test model."""
    short = "CLIP" if kind == "CLIP" else "VD"
    return {"mini": f"mini-{short}", "tiny": f"a random tiny {short} (test model)"}.get(model, model)


def _world_note(clip: str, generator: str) -> str:
    if "mini" in (clip, generator):
        return ("Miniature world: mini-CLIP and mini-VD are small models trained on the simulated scenes, not "
                "ViT-L/14 and Versatile Diffusion; mini-VD was trained on the last layer's condition only, as VD was.")
    return ""


def _figure(path: Path, truths: np.ndarray, rows: list, ids: np.ndarray, subject: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainmclip.analysis.common import save_figure

    n_rows, n_cols = len(rows) + 1, len(truths)
    cell, title = 1.15, 0.45  # inches per image, and room for the title; the row labels extend to the left
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows + title), squeeze=False)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - title / (cell * n_rows + title), wspace=0.04,
                        hspace=0.04 + 0.12 / n_rows)
    grid = [("true image", truths, None)] + [(c.label, images, res) for c, images, res in rows]
    for r, (label, images, res) in enumerate(grid):
        for j in range(n_cols):
            ax = axes[r, j]
            ax.imshow(images[j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"nsd {int(ids[j])}", fontsize=7, pad=2)
        text = label if res is None else f"{label}\nCLIP {100 * res['CLIP']:.0f}%, PixCorr {res['PixCorr']:.2f}"
        axes[r, 0].set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8, labelpad=6)
    fig.suptitle(f"Subject {subject}: reconstructions from ground-truth CLIP layers (image condition only)",
                 fontsize=10, y=1 - 0.1 * title / (cell * n_rows + title), va="top")
    save_figure(fig, path)
