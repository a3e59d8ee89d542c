"""Benchmark: BrainCLIP's CLIP-guided generation on mini-SD + mini-CLIP (the miniature world), guided vs unguided.

    OMP_NUM_THREADS=1 python bench/clip_guided_mini.py [--n 24] [--steps 50] [--scales 0,100,300] [--samplers ddim]
                                                         [--prior-bank 500] [--strength 0.7] [--no-noise]

Targets are mini-CLIP image embeddings of held-out miniature-world scenes (the stand-in for perfect fMRI
embeddings). For every sampler and guidance scale the same per-image seeds are used, so scale 0 is the unguided
baseline. Reported per setting: mean mini-CLIP cosine between generated image and target, zero-shot category
agreement of the generated images with their scenes (mini-CLIP prompt ensembles; chance about 1/10), and wall
seconds per image. With --prior-bank N, also the image-prior start: the nearest (cosine) of N train-stream scenes,
noised to --strength.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _results import report

from brainmclip.features.clip_models import load_clip
from brainmclip.generation.clip_guided import _prior_latents, guided_sample
from brainmclip.generation.stable_diffusion import load_stable_diffusion
from brainmclip.miniature.quality import ZeroShotClassifier, _correct, heldout_bank
from brainmclip.miniature.world import build_bank


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scales", default="0,100,300")
    parser.add_argument("--samplers", default="ddim")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prior-bank", type=int, default=0, help="also start from the nearest of N train scenes")
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--no-noise", action="store_true", help="only the image-prior start (with --prior-bank)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    pipe, towers = load_stable_diffusion("mini"), load_clip("mini")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, towers.vision, towers.text):
        module.requires_grad_(False)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    scenes = heldout_bank(args.n, size, seed=0, start=10_000)
    classifier = ZeroShotClassifier(towers)
    targets = classifier.extractor.image_embeds(scenes.images)
    targets = targets / targets.norm(dim=-1, keepdim=True)
    inits = {} if args.no_noise and args.prior_bank else {"noise": None}
    if args.prior_bank:
        bank = build_bank(args.prior_bank, seed=0, stream="train", size=size)
        embeds = classifier.extractor.image_embeds(bank.images)
        nearest = (targets @ (embeds / embeds.norm(dim=-1, keepdim=True)).T).argmax(1).numpy()
        inits["image-prior"] = _prior_latents(pipe.vae, list(bank.images[nearest]), size, "cpu")
        prior_agree = _correct(classifier.predict(bank.images[nearest]), scenes).mean()
        prior_cos = (classifier.extractor.image_embeds(bank.images[nearest]) * targets).sum(-1)
        prior_cos = prior_cos / classifier.extractor.image_embeds(bank.images[nearest]).norm(dim=-1)
    results = {"n": args.n, "steps": args.steps, "size": size, "threads": torch.get_num_threads()}
    if args.prior_bank:
        results["prior images themselves"] = (f"cos {prior_cos.mean():.3f}, category agreement {prior_agree:.3f} "
                                              f"(bank of {args.prior_bank} train-stream scenes)")
    for init_name, init in inits.items():
        for sampler in args.samplers.split(","):
            for scale in (float(s) for s in args.scales.split(",")):
                images, cosines, start = [], [], time.perf_counter()
                for b in range(0, args.n, args.batch_size):
                    rows = range(b, min(b + args.batch_size, args.n))
                    gens = [torch.Generator().manual_seed(1000 + r) for r in rows]
                    out, cos = guided_sample(pipe, towers, targets[b:b + len(rows)], gens, steps=args.steps,
                                             guidance_scale=scale, sampler=sampler,
                                             init_latents=None if init is None else init[b:b + len(rows)],
                                             strength=args.strength)
                    images.append(out)
                    cosines.append(cos)
                seconds = (time.perf_counter() - start) / args.n
                agree = _correct(classifier.predict(np.concatenate(images)), scenes).mean()
                name = f"{init_name}{f' strength {args.strength:g}' if init is not None else ''}"
                results[f"{name} {sampler} s={scale:g}"] = (
                    f"cos {np.concatenate(cosines).mean():.3f}, category agreement {agree:.3f}, {seconds:.2f} s/img")
                print(list(results.items())[-1], flush=True)
    report(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
