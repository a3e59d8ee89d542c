"""Benchmark: batched ``evaluate_images`` against a straightforward per-image reference, in the same run.

    python bench/evaluate_metrics.py [--images 982] [--size 425] [--clip tiny|full] [--batch-size N]
                                     [--device cpu] [--protocol mindeye1] [--ssim gaussian] [--weights-dir DIR]

Simulated data: ``--images`` smooth random ground truths (upsampled low-resolution noise plus a
gradient, ``--size`` px) and reconstructions made from them by blurring, shifting colours and adding
noise. Both sides use the same networks (random-initialised, seed 0, unless ``--weights-dir`` or the
torch hub cache has real weights; ``--clip full`` uses CLIP ViT-L/14, which must be on disk).

The reference does everything one image at a time: resize each image alone, ``np.corrcoef`` for
PixCorr, ``skimage`` SSIM, one forward pass per image and network, the 2-way identification as a
Python double loop of ``np.corrcoef`` over all (ground truth, recon) pairs with the strict ``<`` rule,
and ``scipy.spatial.distance.correlation`` per pair. The run prints both timings, their ratio, and
the largest difference per metric (means and per-image values; must be <= 1e-4).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _results import save_json
from scipy.spatial.distance import correlation as scipy_correlation
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from torchvision.transforms.v2 import functional as TF

from brainmclip.evaluation.image_metrics import (
    IDENTIFICATION_METRICS,
    METRICS,
    MetricProtocol,
    evaluate_images,
    load_metric_networks,
)


def simulate(n: int, size: int, seed: int = 0, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(recons, truths), uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    recons, truths = np.empty((2, n, size, size, 3), dtype=np.uint8)
    ramp = torch.linspace(0, 0.25, size)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        low = torch.from_numpy(rng.random((m, 3, 12, 12), dtype=np.float32))
        gt = TF.resize(low, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=False)
        gt = (gt + ramp[None, None, :, None]).clamp(0, 1)
        rec = TF.gaussian_blur(gt, kernel_size=[15, 15], sigma=[4.0, 4.0])
        rec = rec * torch.from_numpy(rng.uniform(0.7, 1.1, (m, 3, 1, 1)).astype(np.float32))
        rec = rec + torch.from_numpy(rng.normal(0, 0.08, rec.shape).astype(np.float32))
        truths[s:s + m] = (gt * 255).round().byte().permute(0, 2, 3, 1).numpy()
        recons[s:s + m] = (rec.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return recons, truths


def _resize_one(image: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    return TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)


def reference(recons, truths, networks, protocol: MetricProtocol) -> dict[str, np.ndarray]:
    """Per-image values of every metric, computed one image (or one pair) at a time."""
    assert protocol.name == "mindeye1" and protocol.ssim == "gaussian", "the reference covers the default protocol"
    n = len(recons)
    per: dict[str, list] = {"PixCorr": [], "SSIM": []}
    feats: dict[str, tuple[list, list]] = {m: ([], []) for m in METRICS[2:]}
    with torch.no_grad():
        for i in range(n):
            rec, gt = _resize_one(recons[i], protocol.first_size), _resize_one(truths[i], protocol.first_size)
            rp = TF.resize(rec, [protocol.pixel_size] * 2, antialias=False)
            gp = TF.resize(gt, [protocol.pixel_size] * 2, antialias=False)
            per["PixCorr"].append(np.corrcoef(gp.numpy().ravel(), rp.numpy().ravel())[0, 1])
            g2 = rgb2gray(gp[0].permute(1, 2, 0).double().numpy())
            r2 = rgb2gray(rp[0].permute(1, 2, 0).double().numpy())
            per["SSIM"].append(structural_similarity(g2, r2, gaussian_weights=True, sigma=1.5,
                                                     use_sample_covariance=False, data_range=1.0))
            for name, net in networks.items():
                size = protocol.network_size(name)
                for k, x in enumerate((gt, rec)):
                    x = TF.normalize(TF.resize(x, [size, size], antialias=False), list(net.mean), list(net.std))
                    for metric, f in net.forward(x.to(net.device)).items():
                        feats[metric][k].append(f.float().reshape(-1).cpu().double().numpy())
    out = {m: np.array(v) for m, v in per.items()}
    for metric, (gt_f, rec_f) in feats.items():
        if metric in IDENTIFICATION_METRICS:
            r = [[np.corrcoef(gt_f[i], rec_f[j])[0, 1] for j in range(n)] for i in range(n)]
            out[metric] = np.array([sum(r[i][j] < r[j][j] for i in range(n) if i != j) / (n - 1) for j in range(n)])
        else:
            out[metric] = np.array([scipy_correlation(g, r) for g, r in zip(gt_f, rec_f, strict=True)])
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=982)
    parser.add_argument("--size", type=int, default=425)
    parser.add_argument("--clip", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward (default: 4 on CPU, 32 on GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--protocol", default="mindeye1")
    parser.add_argument("--ssim", default="gaussian")
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args(argv)

    protocol = MetricProtocol(name=args.protocol, ssim=args.ssim)
    clip_model = "tiny" if args.clip == "tiny" else "openai/clip-vit-large-patch14"
    t = time.perf_counter()
    recons, truths = simulate(args.images, args.size)
    print(f"simulated {args.images} pairs of {args.size} px in {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    networks = load_metric_networks(METRICS, clip_model, args.weights_dir, allow_random=True, device=args.device)
    print(f"networks loaded in {time.perf_counter() - t:.1f} s: {json.dumps({k: v.source for k, v in networks.items()})}")

    t = time.perf_counter()
    ours = evaluate_images(recons, truths, protocol, networks=networks, batch_size=args.batch_size, device=args.device)
    t_ours = time.perf_counter() - t
    print(f"evaluate_images: {t_ours:.2f} s  ({1e3 * t_ours / args.images:.1f} ms per pair)", flush=True)
    summary = {"images": args.images, "size": args.size, "clip": clip_model, "device": args.device,
               "batch_size": args.batch_size, "protocol": protocol.as_dict(), "seconds_batched": t_ours,
               "metrics": dict(ours.values), "uncalibrated": list(ours.uncalibrated)}
    if not args.skip_reference:
        t = time.perf_counter()
        ref = reference(recons, truths, networks, protocol)
        t_ref = time.perf_counter() - t
        diffs = {m: max(abs(float(ref[m].mean()) - ours.values[m]), float(np.abs(ref[m] - ours.per_image[m]).max()))
                 for m in METRICS}
        ok = all(d <= 1e-4 for d in diffs.values())
        summary.update(seconds_reference=t_ref, speedup=t_ref / t_ours, max_abs_diff=diffs, agree_1e4=ok)
        print(f"reference (per image, loops): {t_ref:.2f} s  -> ratio reference / batched = {t_ref / t_ours:.1f}x")
        print(f"{'metric':<12}{'batched':>12}{'reference':>12}{'max |diff|':>12}")
        for m in METRICS:
            print(f"{m:<12}{ours.values[m]:>12.6f}{ref[m].mean():>12.6f}{diffs[m]:>12.2e}")
        print("agree to 1e-4:", ok)
    else:
        for m in METRICS:
            print(f"{m:<12}{ours.values[m]:>12.6f}")
    save_json(summary, args.json)
    return summary


if __name__ == "__main__":
    main()
