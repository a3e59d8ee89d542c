"""Benchmark: CLIP feature extraction, batched vs one image at a time, in the same run.

    python bench/extract_throughput.py [--models tiny,vit_large_patch14] [--images 32] [--batch-size 16]

For each random-initialised model (configs in brainmclip/features/configs) it times
``ClipFeatureExtractor.encode`` (images + 5 captions each) at the given batch size and as a
naive loop over single images, and reports images/s and the ratio batched / naive. Peak
resident memory is read after each model. Weights are random: the timing is what matters.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _results import save_json

from brainmclip.features import ClipFeatureExtractor, random_clip


def _inputs(n: int, size: int = 425):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    captions = [[f"a photo number {i} of a dog", "a red car on a street", "two birds", "a house", "a sign"]
                for i in range(n)]
    return images, captions


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(name: str, n_images: int, batch_size: int, repeats: int) -> dict:
    towers = random_clip(name)
    extractor = ClipFeatureExtractor(towers)
    images, captions = _inputs(n_images)

    def batched():
        for b in range(0, n_images, batch_size):
            extractor.encode(images[b:b + batch_size], captions[b:b + batch_size])

    def naive():
        for i in range(n_images):
            extractor.encode(images[i:i + 1], captions[i:i + 1])

    extractor.encode(images[:2], captions[:2])  # warm-up
    t_batched = min(_time(batched) for _ in range(repeats))
    t_naive = min(_time(naive) for _ in range(repeats))
    return {
        "model": name,
        "images": n_images,
        "batch_size": batch_size,
        "batched_images_per_s": round(n_images / t_batched, 2),
        "naive_images_per_s": round(n_images / t_naive, 2),
        "ratio_batched_over_naive": round(t_naive / t_batched, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params_vision_m": round(sum(p.numel() for p in towers.vision.parameters()) / 1e6, 1),
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,vit_large_patch14")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = []
    for name in args.models.split(","):
        n = args.images if name == "tiny" else max(args.batch_size, args.images // 4)
        result = bench_model(name, n, args.batch_size, args.repeats)
        results.append(result)
        print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    save_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
