"""Benchmark: MindDiffuser's Stage 1 vs Stage 1 + Stage 2 on mini-SD + mini-CLIP with perfectly decoded targets.

    OMP_NUM_THREADS=1 python bench/minddiffuser_stage2.py [--n 4] [--stage2-steps 60] [--noise fresh] [--keep 25]

The "predictions" are the true targets of held-out miniature-world scenes, computed as ``extract-minddiffuser``
computes them (c: mini-SD's text embedding averaged over the captions; z: the VAE mean of the image; structural
features: mini-CLIP's Linear-2 ... Linear-12), with masks keeping a random ``--keep`` % of each layer's dimensions
(Algorithm 1 keeps the best-decoded quarter; with perfect decoding every dimension decodes equally well). Reported
for both runs (same seeds): the masked structural loss of the final images, PixCorr and SSIM (Gaussian, grey) against
the true scenes at 64 px, and wall seconds per image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _results import report
from PIL import Image

from brainmclip.evaluation.image_metrics import pixcorr, ssim
from brainmclip.features.clip_models import load_clip
from brainmclip.features.diffusion_features import encode_sd_text, encode_vae_latents
from brainmclip.features.minddiffuser_targets import StructuralFeatures
from brainmclip.generation.minddiffuser import MindDiffuserOptions, minddiffuser_reconstruct, refine
from brainmclip.generation.reconstruct import png_name
from brainmclip.generation.stable_diffusion import load_stable_diffusion
from brainmclip.miniature.world import build_bank
from brainmclip.models.predictions import write_predictions


def perfect_predictions(root: Path, images: np.ndarray, captions, ids: np.ndarray, keep: float, seed: int = 0) -> Path:
    """A MindDiffuser run (run.json, store manifest, masks) and predictions holding the true targets."""
    pipe = load_stable_diffusion("mini")
    towers = load_clip("mini")
    structural = StructuralFeatures(towers.vision)
    arrays = {"sd_text": encode_sd_text(pipe.text_encoder, pipe.tokenizer, captions).numpy(),
              "sd_latent": encode_vae_latents(pipe.vae, images, size=64).flatten(2).numpy()}
    rng = np.random.default_rng(seed)
    masks = {}
    for k, value in structural(images).items():
        arrays[f"struct_{k:02d}"] = value.numpy()
        mask = np.zeros(value.shape[1:], bool).ravel()
        mask[rng.permutation(mask.size)[:max(1, int(round(mask.size * keep / 100)))]] = True
        masks[f"struct_{k:02d}"] = mask.reshape(value.shape[1:])
    store, run, pred = root / "store", root / "run", root / "pred"
    store.mkdir(parents=True)
    run.mkdir()
    (store / "manifest.json").write_text(json.dumps({"settings": {
        "command": "extract-minddiffuser", "sd": {"model": "mini"},
        "structural": {"model": towers.identity, **structural.settings()}}}))
    (run / "run.json").write_text(json.dumps({"method": "minddiffuser", "features": "../store"}))
    np.savez(run / "structural_masks.npz", **masks)
    arrays = {k: v.astype(np.float16) for k, v in arrays.items()}
    write_predictions(pred, ids, arrays, {"method": "minddiffuser", "subject": 1, "run": "../run"})
    return pred


def _pixels(folder: Path, ids) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / png_name(i)).convert("RGB")) for i in ids])


def _metrics(recons: np.ndarray, truths: np.ndarray) -> tuple[float, float]:
    def tensor(x):
        return torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255.0

    return float(pixcorr(tensor(recons), tensor(truths)).mean()), float(ssim(tensor(recons), tensor(truths)).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--stage2-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--noise", default="fresh")
    parser.add_argument("--optimize", default="z,c")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--keep", type=float, default=25.0, help="percent of each layer's dimensions in the masks")
    parser.add_argument("--refine-from", default=None, choices=[None, "blur"],
                        help="also refine degraded versions of the true images (blur) as a plug-in check")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    bank = build_bank(args.n, seed=0, stream="heldout", size=64)
    ids = np.arange(args.n) + 70000
    results = {"n_images": args.n, "threads": torch.get_num_threads(), "noise": args.noise, "optimize": args.optimize,
               "mask_keep_percent": args.keep}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pred = perfect_predictions(tmp, bank.images, bank.captions, ids, args.keep)
        base = dict(generator="mini", structural_clip="mini", steps=args.steps, noise=args.noise, lr=args.lr,
                    optimize=tuple(args.optimize.split(",")), batch_size=1)
        runs = {"stage1": MindDiffuserOptions(stage2_steps=0, **base),
                "stage1+2": MindDiffuserOptions(stage2_steps=args.stage2_steps, **base)}
        for name, options in runs.items():
            start = time.perf_counter()
            result = minddiffuser_reconstruct(pred, tmp / name, options, progress=False)
            seconds = time.perf_counter() - start
            records = result.manifest["images"]
            loss = np.mean([records[str(i)]["structural_loss_final"] for i in ids])
            pc, ss = _metrics(_pixels(tmp / name, ids), bank.images)
            results[f"{name} structural loss"] = round(float(loss), 3)
            results[f"{name} PixCorr"] = round(pc, 4)
            results[f"{name} SSIM"] = round(ss, 4)
            results[f"{name} s/image"] = round(seconds / args.n, 2)
        if args.refine_from == "blur":
            from PIL import ImageFilter

            blurred = tmp / "blurred"
            blurred.mkdir()
            for i, image in zip(ids, bank.images, strict=True):
                Image.fromarray(image).filter(ImageFilter.GaussianBlur(3)).save(blurred / png_name(i))
            pc, ss = _metrics(_pixels(blurred, ids), bank.images)
            results["blurred PixCorr"], results["blurred SSIM"] = round(pc, 4), round(ss, 4)
            for steps in (0, args.stage2_steps):
                out = tmp / f"refined{steps}"
                result = refine(blurred, pred, out, MindDiffuserOptions(stage2_steps=steps, **base), progress=False)
                loss = np.mean([result.manifest["images"][str(i)]["structural_loss_final"] for i in ids])
                pc, ss = _metrics(_pixels(out, ids), bank.images)
                results[f"refine({steps}) structural loss"] = round(float(loss), 3)
                results[f"refine({steps}) PixCorr"], results[f"refine({steps}) SSIM"] = round(pc, 4), round(ss, 4)
    report(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
