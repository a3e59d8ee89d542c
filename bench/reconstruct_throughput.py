"""Benchmark: reconstruction images/s at batch 1 vs batch 8, in the same run.

    python bench/reconstruct_throughput.py [--images 16] [--steps 20] [--generator tiny]

Generates from random predicted embeddings (257 + 77 tokens) with the tiny random Versatile
Diffusion on CPU by default; on a GPU machine pass --generator with real VD weights (or a
full-size random one) to time 512 px generation. Reports images/s for both batch sizes and
their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import report

from brainmclip.generation.reconstruct import ReconstructOptions, reconstruct
from brainmclip.models.predictions import write_predictions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--generator", default="tiny")
    parser.add_argument("--clip", default="tiny")
    parser.add_argument("--embed-dim", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    results = {"images": args.images, "steps": args.steps, "generator": args.generator}
    with tempfile.TemporaryDirectory() as tmp:
        pred = write_predictions(Path(tmp) / "pred", np.arange(args.images),
                                 {"image": rng.normal(size=(args.images, 257, args.embed_dim)).astype(np.float32),
                                  "text": rng.normal(size=(args.images, 77, args.embed_dim)).astype(np.float32)},
                                 {"method": "bench", "subject": 1, "split": "test"})
        for batch in (1, 8):
            options = ReconstructOptions(generator=args.generator, clip=args.clip, steps=args.steps, batch_size=batch)
            start = time.perf_counter()
            reconstruct(pred, Path(tmp) / f"b{batch}", options, progress=False)
            results[f"batch{batch}_images_per_s"] = round(args.images / (time.perf_counter() - start), 2)
    results["ratio_batch8_over_batch1"] = round(results["batch8_images_per_s"] / results["batch1_images_per_s"], 2)
    report(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
