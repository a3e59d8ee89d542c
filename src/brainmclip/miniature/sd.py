"""mini-SD: Stable Diffusion in miniature, a text-conditioned UNet on mini-CLIP's text tower, sharing mini-VD's VAE.

Stable Diffusion v1 conditions its UNet on the CLIP text encoder's ``last_hidden_state`` (before the projection);
mini-SD does the same with mini-CLIP's text tower, which stays frozen, and uses the VAE trained for mini-VD. The
caption is replaced by the empty one with a small probability for classifier-free guidance. The exported folder has
Stable Diffusion's layout (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``, ``model_index.json``)
and loads with diffusers' ``StableDiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler
from transformers import CLIPTextModel

from brainmclip.atomic import write_json_atomic
from brainmclip.config import check_keys
from brainmclip.errors import MissingInputError
from brainmclip.features.clip_models import load_clip, resolve_model_folder
from brainmclip.features.tokenizer import tokenize
from brainmclip.miniature.card import file_checksums, write_model_card
from brainmclip.miniature.clip import load_miniature_config
from brainmclip.miniature.training import Phase, cosine_with_warmup, run_phase, training_folder
from brainmclip.miniature.vae import encode_bank
from brainmclip.miniature.vd import (
    UnetConfig,
    _cached,
    _clip_identity,
    _digest,
    build_unet,
    diffusion_loss,
    object_pixel_weights,
    train_scheduler_config,
)
from brainmclip.miniature.world import load_or_build_bank

__all__ = ["train_mini_sd"]

log = logging.getLogger("brainmclip.miniature.sd")


@dataclass
class _SdConfig:
    description: str
    seed: int
    bank: dict
    unet: dict
    scheduler: dict


def train_mini_sd(out, clip: str | Path = "mini", vae: str | Path = "mini", config: str = "sd",
                  overrides: list[str] | None = None, force: bool = False, cache=None, progress: bool = True,
                  command: str = "", quality_scenes: int | None = None) -> Path:
    """Train mini-SD's UNet into ``out`` (resumable) and export ``out/model``.

    ``quality_scenes``: held-out captions the model card's quality figures use (default 100).

    ``vae``: a folder holding an AutoencoderKL, or a mini-VD folder (its ``vae/``), or 'mini' (the shipped mini-VD).
    """
    with training_folder(out, force) as out:
        raw = load_miniature_config(config, overrides)
        check_keys(_SdConfig, raw, "mini-SD")
        seed = int(raw["seed"])
        size = int(raw["bank"]["image_size"])
        start = time.perf_counter()
        towers = load_clip(str(clip))
        text_encoder = CLIPTextModel(towers.text.config)
        text_encoder.load_state_dict(towers.text.text_model.state_dict())
        text_encoder.eval().requires_grad_(False)
        tokenizer = towers.tokenizer
        context = towers.context_length
        vae_folder = _vae_folder(vae)
        autoencoder = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=torch.float32).eval()
        scale = float(autoencoder.config.scaling_factor)
        bank = load_or_build_bank(Path(cache) if cache else out / "cache", raw["bank"]["n_scenes"], seed, "train",
                                  size, progress=progress)
        vae_files = file_checksums(vae_folder)
        latents = _cached(out / "cache" / f"latents-{_digest(vae_files, raw['bank'], seed)}.npy",
                          lambda: encode_bank(autoencoder, bank.images, progress=progress))
        with torch.no_grad():
            empty_ids, _ = tokenize(tokenizer, [""], context)
            empty = text_encoder(input_ids=empty_ids).last_hidden_state[0]

        unet_cfg = UnetConfig.from_dict(raw["unet"])
        unet = build_unet(unet_cfg, latents.shape[-1], latents.shape[1], text_encoder.config.hidden_size, seed)
        noise_schedule = DDPMScheduler(**train_scheduler_config(raw.get("scheduler", {})))
        optimizer = torch.optim.AdamW(unet.parameters(), lr=unet_cfg.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(unet_cfg.steps,
                                                                                   unet_cfg.warmup_steps, 0.05))

        def step_fn(step: int, rng: np.random.Generator) -> dict[str, float]:
            b = unet_cfg.batch_size
            rows = np.sort(rng.choice(len(bank), b, replace=False))
            x0 = torch.from_numpy(np.asarray(latents[rows], np.float32)) * scale
            ids, _ = tokenize(tokenizer, [bank.captions[i][rng.integers(len(bank.captions[i]))] for i in rows],
                              context)
            with torch.no_grad():
                cond = text_encoder(input_ids=ids).last_hidden_state
            drop = torch.from_numpy(rng.random(b) < unet_cfg.condition_dropout)
            cond = torch.where(drop[:, None, None], empty, cond)
            noise = torch.randn_like(x0)
            t = torch.from_numpy(rng.integers(0, noise_schedule.config.num_train_timesteps, b))
            pred = unet(noise_schedule.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
            weight = (object_pixel_weights(bank.labels["category_map"][rows], x0.shape[-1], unet_cfg.object_weight)
                      if unet_cfg.object_weight else None)
            loss = diffusion_loss(pred, x0, noise, t, noise_schedule, unet_cfg.snr_gamma, weight)
            loss.backward()
            return {"loss": loss.item()}

        settings = {**raw, "clip": _clip_identity(towers, clip), "vae": {"folder": str(vae_folder),
                                                                        "checksums": vae_files}}
        phase = Phase("unet", {"unet": unet}, optimizer, schedule, unet_cfg.steps, step_fn,
                      settings={k: v for k, v in settings.items() if k != "description"})
        stats = run_phase(out, phase, seed, progress=progress)
        folder = export_mini_sd(unet, autoencoder, text_encoder, towers.tokenizer, resolve_model_folder(str(clip)),
                                raw.get("scheduler", {}), out / "model")
        from brainmclip.miniature.quality import sd_quality

        quality = sd_quality(folder, clip, progress=progress, **({} if quality_scenes is None else
                                                                 {"n": quality_scenes}))
        n_params = sum(p.numel() for m in (unet, autoencoder, text_encoder) for p in m.parameters())
        write_model_card(folder, "mini-SD", raw.get("description", ""), command or "brainmclip miniature train sd",
                         seed, settings, stats["seconds"], n_params, quality)
        log.info("mini-SD exported to %s in %.0f s: %s", folder, time.perf_counter() - start, quality)
        return folder


def _vae_folder(vae: str | Path) -> Path:
    if str(vae) == "mini":
        from brainmclip.miniature import model_folder

        return model_folder("vd") / "vae"
    folder = Path(vae)
    if (folder / "vae" / "config.json").is_file():
        return folder / "vae"
    if (folder / "config.json").is_file():
        return folder
    raise MissingInputError(f"{folder}: no AutoencoderKL here (expected config.json, or a vae/ subfolder)")


def export_mini_sd(unet, vae, text_encoder, tokenizer, clip_folder: Path | None, scheduler_cfg: dict,
                   folder: Path) -> Path:
    """Stable Diffusion's folder layout in float16 (replacing an earlier export)."""
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        copy.deepcopy(module).to(torch.float16).save_pretrained(staging / name, safe_serialization=True)
    tokenizer_dir = staging / "tokenizer"
    tokenizer_dir.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        if clip_folder is None or not (clip_folder / name).is_file():
            raise MissingInputError(f"CLIP folder {clip_folder} lacks {name}; mini-SD needs a CLIP with tokenizer files")
        shutil.copy2(clip_folder / name, tokenizer_dir / name)
    PNDMScheduler(**train_scheduler_config(scheduler_cfg), skip_prk_steps=True).save_pretrained(staging / "scheduler")
    import diffusers

    write_json_atomic(staging / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False})
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder
