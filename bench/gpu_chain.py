"""Benchmark: the NSD-size chain on one GPU with full-size random weights, stage by stage.

    python bench/gpu_chain.py [--device cuda] [--json out.json]
    python bench/gpu_chain.py --tiny          # the same code at toy sizes (a CPU check of the script)

Stages, each timed with the device's peak memory (weights are random: only time and memory mean anything):

1. train: BrainMCLIP at subject-1 sizes (default config, about 0.76B parameters; 3,086 + 8,747 voxels, targets
   257 x 768 and 77 x 768), its objective and fused AdamW, bf16 autocast as ``brainmclip train`` runs on a GPU,
   for one epoch of NSD's 8,859 training images at batch 32 (277 steps). The batches are random tensors already
   on the device: data loading is not timed.
2. extract: ``ClipFeatureExtractor`` on random ViT-L/14 towers (``random:vit_large_patch14``), 1,000 random
   425 px images with 5 captions each.
3. reconstruct: ``VersatileDiffusionGenerator`` with randomly initialised UNets and VAE of Versatile
   Diffusion's shapes (SD v1 layout: 320-640-1280-1280 channels, 768-wide cross-attention, 4-channel 64 x 64
   latents decoded to 512 px), 50 images from random 257 + 77 token embeddings, 20 steps (``reconstruct``'s
   default), guidance 5, float16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _results import report, save_json

from brainmclip.config import load_config
from brainmclip.features import ClipFeatureExtractor
from brainmclip.features.clip_models import random_clip
from brainmclip.losses.brain_mclip_objective import ObjectiveConfig, brain_mclip_objective
from brainmclip.models.brain_mclip import BrainMCLIP, BrainMCLIPConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_epoch(device, tiny: bool, samples: int, batch_size: int) -> dict:
    cfg = load_config("brain_mclip_tiny" if tiny else "brain_mclip")
    width, sem, det = (32, 64, 96) if tiny else (768, 3086, 8747)
    image_tokens, text_tokens = (17, 8) if tiny else (257, 77)
    torch.manual_seed(0)
    with torch.device(device):
        model = BrainMCLIP(BrainMCLIPConfig.from_dict({**cfg["model"], "n_semantic_voxels": sem, "n_detail_voxels": det,
                                                       "image_tokens": image_tokens, "text_tokens": text_tokens,
                                                       "embed_dim": width}))
        n = batch_size
        batch = {"semantic": torch.randn(n, sem), "detail": torch.randn(n, det),
                 "image_semantic": torch.randn(n, image_tokens, width), "image_detail": torch.randn(n, image_tokens, width),
                 "text": torch.randn(n, text_tokens, width)}
    loss_cfg = ObjectiveConfig.from_dict(cfg["loss"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=True)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(batch["semantic"], batch["detail"])
            loss, _ = brain_mclip_objective(out, batch, batch["semantic"], batch["detail"], loss_cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, kernels
    _sync(device)
    steps = -(-samples // batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    return {"train_parameters": sum(p.numel() for p in model.parameters()), "train_steps": steps,
            "train_epoch_s": round(seconds, 2), "train_step_ms": round(1e3 * seconds / steps, 1),
            "train_peak_gb": _peak_gb(device)}


def extract(device, tiny: bool, images: int, batch_size: int) -> dict:
    towers = random_clip("tiny" if tiny else "vit_large_patch14")
    towers.vision.to(device)
    towers.text.to(device)
    extractor = ClipFeatureExtractor(towers)
    rng = np.random.default_rng(0)
    size = 64 if tiny else 425
    captions = [[f"a photo number {i} of a dog", "a red car on a street", "two birds", "a house", "a sign"]
                for i in range(batch_size)]
    pixels = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    extractor.encode(pixels[:2], captions[:2])  # warm-up
    _sync(device)
    start = time.perf_counter()
    done = 0
    while done < images:
        m = min(batch_size, images - done)
        out = extractor.encode(pixels[:m], captions[:m])
        _ = {k: v.cpu() for k, v in out.items()}  # features leave the device, as the store writes them
        done += m
    _sync(device)
    seconds = time.perf_counter() - start
    return {"extract_images": images, "extract_s": round(seconds, 2), "extract_images_per_s": round(images / seconds, 1),
            "extract_peak_gb": _peak_gb(device)}


def _vd_models(device) -> dict:
    """VD-shaped random image_unet, text_unet and VAE, initialised directly on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    common = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280),
              "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8}
    with torch.device(device):  # the scheduler stays out: it keeps numpy-bound tensors on the CPU
        image_unet = UNet2DConditionModel(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                          up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **common)
        text_unet = UNetFlatConditionModel(down_block_types=("CrossAttnDownBlockFlat",) * 3 + ("DownBlockFlat",),
                                           up_block_types=("UpBlockFlat",) + ("CrossAttnUpBlockFlat",) * 3, **common)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=4, sample_size=512)
    return {"image_unet": image_unet, "text_unet": text_unet, "vae": vae}


def reconstruct(device, tiny: bool, images: int, batch_size: int, steps: int) -> dict:
    from diffusers import UniPCMultistepScheduler

    from brainmclip.generation.versatile_diffusion import VersatileDiffusionGenerator, tiny_components

    torch.manual_seed(0)
    start = time.perf_counter()
    components = tiny_components(embed_dim=32) if tiny else {**_vd_models(device), "scheduler": UniPCMultistepScheduler()}
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    generator = VersatileDiffusionGenerator(**components).to(device=device, dtype=dtype)
    del components
    build_s = time.perf_counter() - start
    width = generator.embed_dim
    image_tokens, text_tokens = (17, 8) if tiny else (257, 77)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(images, image_tokens, width)).astype(np.float32))
    text = torch.from_numpy(rng.normal(size=(images, text_tokens, width)).astype(np.float32))
    generator.generate(image[:1], text[:1], num_inference_steps=2)  # warm-up
    _sync(device)
    start = time.perf_counter()
    shape = None
    for b in range(0, images, batch_size):
        out = generator.generate(image[b:b + batch_size], text[b:b + batch_size], num_inference_steps=steps,
                                 guidance_scale=5.0)
        shape = out.shape
    _sync(device)
    seconds = time.perf_counter() - start
    return {"reconstruct_images": images, "reconstruct_steps": steps, "reconstruct_image_px": int(shape[1]),
            "reconstruct_build_s": round(build_s, 2), "reconstruct_s": round(seconds, 2),
            "reconstruct_s_per_image": round(seconds / images, 3), "reconstruct_peak_gb": _peak_gb(device)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks the script, measures nothing useful")
    parser.add_argument("--stages", default="train,extract,reconstruct")
    parser.add_argument("--train-samples", type=int, default=8859)
    parser.add_argument("--extract-images", type=int, default=1000)
    parser.add_argument("--recon-images", type=int, default=50)
    parser.add_argument("--recon-batch", type=int, default=25)
    parser.add_argument("--recon-steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "tiny": args.tiny}
    stages = args.stages.split(",")
    if "train" in stages:
        _reset_peak(device)
        results.update(train_epoch(device, args.tiny, args.train_samples, 32))
        print(results, flush=True)
        save_json(results, args.json)  # each stage's figures are kept even if a later one is cut short
    if "extract" in stages:
        _reset_peak(device)
        results.update(extract(device, args.tiny, args.extract_images, 64))
        print(results, flush=True)
        save_json(results, args.json)
    if "reconstruct" in stages:
        _reset_peak(device)
        results.update(reconstruct(device, args.tiny, args.recon_images, args.recon_batch, args.recon_steps))
    report(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
