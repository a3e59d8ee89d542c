"""Benchmark: a BrainCLIP training step against a bare forward + backward of the same network.

    python bench/brainclip_step.py [--voxels 15724] [--embed-dim 768] [--batch-size 640] [--micro-batch 0]

Both sides run the same mapping network on the same batch with the same AdamW step. The trainer's step
(``brainmclip.training.brainclip_fit._step``: row gathering from the preloaded fMRI and targets, symmetric
InfoNCE against image and caption embeddings at full precision, the VAE's KL, the gradient cache when
``--micro-batch`` splits the batch) is timed interleaved with the bare step (forward, ``out.square().mean()``,
backward, AdamW), so both see the same machine load; the ratio trainer / bare is what to read (goal <= 2).
Sizes default to NSD subject 1 (15,724 nsdgeneral voxels, CLIP ViT-L/14's 768-d space, the paper's batch 640).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _results import report

from brainmclip.models.brainclip import BrainCLIPConfig, build_mapping
from brainmclip.training.brainclip_fit import DEFAULT_BRAINCLIP_CONFIG, _step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=15724)
    parser.add_argument("--embed-dim", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=640)
    parser.add_argument("--train-rows", type=int, default=8859)
    parser.add_argument("--micro-batch", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = {"threads": torch.get_num_threads(), "load_average_start": os.getloadavg()[0]}
    rng = np.random.default_rng(0)
    fmri = torch.from_numpy(rng.standard_normal((args.train_rows, args.voxels), dtype=np.float32))
    images = torch.nn.functional.normalize(torch.randn(args.train_rows, args.embed_dim), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(args.train_rows, args.embed_dim), dim=-1)
    for mapping in ("linear", "vae"):
        cfg = {**DEFAULT_BRAINCLIP_CONFIG, "model": {**DEFAULT_BRAINCLIP_CONFIG["model"], "mapping": mapping},
               "loss": {**DEFAULT_BRAINCLIP_CONFIG["loss"], "alpha": 0.5, "beta": 0.5},
               "train": {**DEFAULT_BRAINCLIP_CONFIG["train"], "micro_batch": args.micro_batch}}
        model_cfg = BrainCLIPConfig.from_dict({**cfg["model"], "n_voxels": args.voxels, "embed_dim": args.embed_dim})
        model = build_mapping(model_cfg).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        generator = torch.Generator().manual_seed(0)

        def trainer_step(model=model, opt=opt, cfg=cfg, generator=generator):
            rows = torch.from_numpy(rng.choice(args.train_rows, args.batch_size, replace=False))
            _step(model, opt, fmri[rows], images[rows], texts[rows], cfg, generator)

        batch = fmri[: args.batch_size].clone()

        def bare_step(model=model, opt=opt, batch=batch):
            opt.zero_grad(set_to_none=True)
            model(batch).embedding.square().mean().backward()
            opt.step()

        trainer_step(), bare_step()  # warm-up: allocations, AdamW state
        times = {"trainer": [], "bare": []}
        for _ in range(args.repeats):  # interleaved, so both see the same load
            for name, step in (("trainer", trainer_step), ("bare", bare_step)):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        trainer, bare = np.median(times["trainer"]), np.median(times["bare"])
        results[f"{mapping}_trainable_parameters"] = sum(p.numel() for p in params)
        results[f"{mapping}_trainer_step_s"] = round(float(trainer), 4)
        results[f"{mapping}_bare_step_s"] = round(float(bare), 4)
        results[f"{mapping}_ratio_trainer_over_bare"] = round(float(trainer / bare), 3)
        results[f"{mapping}_samples_per_s"] = round(args.batch_size / float(trainer), 1)
    results["load_average_end"] = os.getloadavg()[0]
    report(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
