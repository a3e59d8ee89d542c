"""mini-VD: Versatile Diffusion's dual-guided image generator in miniature, trained on mini-CLIP embeddings.

The components are VD's own diffusers classes in VD's folder layout (``image_unet`` a ``UNet2DConditionModel``,
``text_unet`` a ``UNetFlatConditionModel``, ``vae`` an ``AutoencoderKL``, ``scheduler``), so
:func:`brainmclip.generation.versatile_diffusion.load_versatile_diffusion` reads the folder exactly as it reads the
real weights. In VD the image UNet's cross-attention blocks read the image condition and the text UNet's blocks at
the same places read the text condition; dual guidance runs both and mixes their residuals. mini-VD is trained in
that dual form directly: each step is image only (text share 0), text only (share 1) or mixed (a uniform share per
sample), and each condition is replaced by its unconditional embedding (mini-CLIP of "" / of a mid-grey image, VD's
choice) with a small probability, which is what classifier-free guidance needs. Only the text UNet's transformer
blocks take part in dual guidance; the rest of ``text_unet`` (VD's text-generation path) keeps its random initialisation.

Conditions are VD's: the image condition is mini-CLIP's last vision layer, every token through ``post_layernorm``
and ``visual_projection`` and divided by the projected CLS norm; the text condition is the projected text tokens
divided by the projected EOS norm (:class:`brainmclip.features.clip_extractor.ClipFeatureExtractor`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel, UniPCMultistepScheduler
from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
from tqdm.auto import tqdm

from brainmclip.atomic import write_json_atomic
from brainmclip.config import check_keys
from brainmclip.errors import InvalidInputError
from brainmclip.features.clip_extractor import ClipFeatureExtractor
from brainmclip.features.clip_models import load_clip
from brainmclip.generation.versatile_diffusion import (
    MaskTolerantDualTransformer,
    VersatileDiffusionGenerator,
)
from brainmclip.miniature.card import file_checksums, write_model_card
from brainmclip.miniature.clip import load_miniature_config
from brainmclip.miniature.training import Phase, cosine_with_warmup, run_phase, training_folder
from brainmclip.miniature.vae import VaeConfig, build_vae, encode_bank, vae_phase
from brainmclip.miniature.world import load_or_build_bank

__all__ = ["UnetConfig", "build_unet", "diffusion_loss", "object_pixel_weights", "train_mini_vd",
           "unconditional_embeddings", "train_scheduler_config"]

log = logging.getLogger("brainmclip.miniature.vd")


@dataclass
class UnetConfig:
    """UNet architecture (diffusers arguments; ``attention`` marks the levels with cross-attention) and training."""

    block_out_channels: list[int]
    layers_per_block: int
    attention: list[bool]
    attention_head_dim: int
    norm_num_groups: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 100
    condition_dropout: float = 0.1
    text_share: list[float] | None = None  # probabilities of (image only, text only, mixed); VD only
    snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023); 0 turns it off
    object_weight: float = 0.0  # extra loss weight of latent pixels an object covers (objects are a few % of them)

    @classmethod
    def from_dict(cls, d: dict) -> UnetConfig:
        return cls(**check_keys(cls, d, "unet"))


def build_unet(cfg: UnetConfig, sample_size: int, in_channels: int, cross_attention_dim: int, seed: int,
               flat: bool = False):
    """VD's ``image_unet`` (or, ``flat=True``, its ``text_unet``, with the same block layout) from the config."""
    if len(cfg.attention) != len(cfg.block_out_channels):
        raise InvalidInputError("unet.attention needs one entry per level of block_out_channels")
    kind = "Flat" if flat else "2D"
    down = tuple(f"CrossAttnDownBlock{kind}" if a else f"DownBlock{kind}" for a in cfg.attention)
    up = tuple(f"CrossAttnUpBlock{kind}" if a else f"UpBlock{kind}" for a in reversed(cfg.attention))
    torch.manual_seed(seed)
    cls = UNetFlatConditionModel if flat else UNet2DConditionModel
    return cls(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
               block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
               down_block_types=down, up_block_types=up, norm_num_groups=cfg.norm_num_groups,
               cross_attention_dim=cross_attention_dim, attention_head_dim=cfg.attention_head_dim)


def train_scheduler_config(cfg: dict) -> dict:
    """The noise schedule and what the UNet predicts, shared by training (DDPM) and sampling (saved config)."""
    return {"num_train_timesteps": int(cfg.get("num_train_timesteps", 1000)),
            "beta_schedule": cfg.get("beta_schedule", "linear"), "beta_start": float(cfg.get("beta_start", 1e-4)),
            "beta_end": float(cfg.get("beta_end", 0.02)), "prediction_type": cfg.get("prediction_type", "epsilon")}


def diffusion_loss(unet_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   schedule: DDPMScheduler, snr_gamma: float, pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE to the scheduler's prediction target (noise or velocity), min-SNR weighted per sample.

    min-SNR-gamma caps each timestep's weight at gamma / SNR (epsilon) or gamma / (SNR + 1) (velocity) so the many
    nearly noise-free timesteps do not dominate training; it converges several times faster (Hang et al., 2023).
    ``pixel_weight`` (n, 1, h, w) weighs latent pixels within each sample (normalised to mean 1 per sample).
    """
    kind = schedule.config.prediction_type
    target = noise if kind == "epsilon" else schedule.get_velocity(x0, noise, t)
    error = F.mse_loss(unet_output, target, reduction="none")
    if pixel_weight is None:
        per_sample = error.mean(dim=(1, 2, 3))
    else:
        per_sample = (error * pixel_weight).mean(dim=(1, 2, 3)) / pixel_weight.mean(dim=(1, 2, 3))
    if snr_gamma > 0:
        alpha_bar = schedule.alphas_cumprod.to(t.device)[t]
        snr = alpha_bar / (1 - alpha_bar)
        capped = torch.clamp(snr, max=snr_gamma)
        per_sample = per_sample * (capped / snr if kind == "epsilon" else capped / (snr + 1))
    return per_sample.mean()


@torch.no_grad()
def unconditional_embeddings(extractor: ClipFeatureExtractor) -> tuple[torch.Tensor, torch.Tensor]:
    """VD's unconditional image and text conditions: CLIP of a mid-grey image and of the empty caption."""
    size = extractor.image_size
    grey = np.full((1, size, size, 3), 128, np.uint8)
    return extractor.encode_images(grey)["image_semantic"][0], extractor.encode_texts([""])[0]


@torch.no_grad()
def _image_conditions(extractor: ClipFeatureExtractor, images: np.ndarray, progress: bool,
                      batch_size: int = 256) -> np.ndarray:
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="CLIP image conditions", unit="batch",
                      disable=not progress):
        out.append(extractor.encode_images(images[start:start + batch_size])["image_semantic"].half().numpy())
    return np.concatenate(out)


def _digest(*parts) -> str:
    """A short name for what a cached array was computed from, so a cache is never read for other inputs."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cached(path: Path, make) -> np.ndarray:
    from brainmclip.atomic import atomic_path

    if path.is_file():
        return np.load(path, mmap_mode="r")
    value = make()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, value)
    return np.load(path, mmap_mode="r")


def _clip_identity(towers, clip) -> dict:
    """The CLIP the conditions came from, with its files' checksums when it is a folder (mini-CLIP is small)."""
    from brainmclip.features.clip_models import resolve_model_folder

    folder = resolve_model_folder(str(clip))
    identity = dict(towers.identity)
    if folder is not None:
        identity["checksums"] = {k: v for k, v in file_checksums(folder).items() if k.endswith(".safetensors")}
    return identity


def object_pixel_weights(object_maps: np.ndarray, latent_size: int, object_weight: float) -> torch.Tensor:
    """(n, 1, h, w) loss weights: 1 + ``object_weight`` on latent pixels whose image block holds any object pixel.

    ``object_maps`` (n, S, S) is >= 0 where an object is drawn (a bank's ``category_map``).
    """
    covered = torch.from_numpy(np.asarray(object_maps) >= 0).float()[:, None]
    covered = F.adaptive_max_pool2d(covered, latent_size)
    return 1.0 + object_weight * covered


def latent_scale(latents: np.ndarray) -> float:
    """1 / standard deviation of the latents (Stable Diffusion's 0.18215 was chosen the same way)."""
    return float(1.0 / np.asarray(latents, np.float64).std())


def _unconvert(image_unet: UNet2DConditionModel) -> None:
    """Put the image UNet's own transformer blocks back in place of the dual blocks (for saving in VD's layout)."""
    for name, module in list(image_unet.named_modules()):
        if isinstance(module, MaskTolerantDualTransformer):
            parent_name, index = name.rsplit(".", 1)
            image_unet.get_submodule(parent_name)[int(index)] = module.transformers[0]
    image_unet.register_to_config(dual_cross_attention=False)


def train_mini_vd(out, clip: str | Path = "mini", config: str = "vd", overrides: list[str] | None = None,
                  force: bool = False, cache=None, progress: bool = True, command: str = "",
                  quality_scenes: int | None = None) -> Path:
    """Train the VAE, then mini-VD's UNets on mini-CLIP conditions, into ``out``; export ``out/model``.

    ``quality_scenes``: held-out scenes the model card's quality figures use (default 100)."""
    with training_folder(out, force) as out:
        raw = load_miniature_config(config, overrides)
        check_keys(_VdConfig, raw, "mini-VD")
        seed = int(raw["seed"])
        size = int(raw["bank"]["image_size"])
        start = time.perf_counter()
        towers = load_clip(str(clip))
        if towers.vision.config.image_size != size:
            raise InvalidInputError(f"CLIP {clip!r} takes {towers.vision.config.image_size} px images; the config's bank "
                             f"has {size} px")
        extractor = ClipFeatureExtractor(towers, detail_layers=(towers.n_vision_layers,),
                                         semantic_layer=towers.n_vision_layers)
        settings = {**raw, "clip": _clip_identity(towers, clip)}
        bank = load_or_build_bank(Path(cache) if cache else out / "cache", raw["bank"]["n_scenes"], seed, "train",
                                  size, progress=progress)

        # 1. VAE
        vae_cfg = VaeConfig.from_dict(raw["vae"])
        vae = build_vae(vae_cfg, size, seed)
        phase = vae_phase(vae, bank.images, bank.labels["category_map"], vae_cfg,
                          {"vae": raw["vae"], "bank": raw["bank"], "seed": seed})
        vae_stats = run_phase(out, phase, seed, progress=progress)
        latents = _cached(out / "cache" / f"latents-{_digest(vae_cfg.__dict__, raw['bank'], seed)}.npy",
                          lambda: encode_bank(vae, bank.images, progress=progress))
        scale = latent_scale(latents)
        vae.register_to_config(scaling_factor=scale)

        # 2. Conditions: mini-CLIP image tokens of every bank image, the unconditional pair
        image_cond = _cached(out / "cache" / f"image-conditions-{_digest(settings['clip'], raw['bank'], seed)}.npy",
                             lambda: _image_conditions(extractor, bank.images, progress))
        uncond_image, uncond_text = unconditional_embeddings(extractor)

        # 3. The dual-guided UNet
        unet_cfg = UnetConfig.from_dict(raw["unet"])
        latent_size, channels = latents.shape[-1], latents.shape[1]
        image_unet = build_unet(unet_cfg, latent_size, channels, towers.embed_dim, seed)
        text_unet = build_unet(unet_cfg, latent_size, channels, towers.embed_dim, seed + 1, flat=True)
        generator = VersatileDiffusionGenerator(image_unet, text_unet, vae)
        noise_schedule = DDPMScheduler(**train_scheduler_config(raw.get("scheduler", {})))
        parameters = [p for p in image_unet.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=unet_cfg.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(unet_cfg.steps,
                                                                                   unet_cfg.warmup_steps, 0.05))
        shares = np.asarray(unet_cfg.text_share or [0.4, 0.3, 0.3], np.float64)
        shares = shares / shares.sum()

        def step_fn(step: int, rng: np.random.Generator) -> dict[str, float]:
            b = unet_cfg.batch_size
            rows = np.sort(rng.choice(len(bank), b, replace=False))
            x0 = torch.from_numpy(np.asarray(latents[rows], np.float32)) * scale
            image = torch.from_numpy(np.asarray(image_cond[rows], np.float32))
            # One mode per step: image only (share 0), text only (share 1) or a random share per sample. A pure
            # step runs only one of the two attention blocks, which makes training about 1.5x faster.
            mode = rng.choice(3, p=shares)
            if mode == 0:
                text = uncond_text.expand(b, -1, -1)  # weighted 0: never read
            else:
                with torch.no_grad():
                    text = extractor.encode_texts([bank.captions[i][rng.integers(len(bank.captions[i]))]
                                                   for i in rows])
            drop_image = torch.from_numpy(rng.random(b) < unet_cfg.condition_dropout)
            drop_text = torch.from_numpy(rng.random(b) < unet_cfg.condition_dropout)
            image = torch.where(drop_image[:, None, None], uncond_image, image)
            text = torch.where(drop_text[:, None, None], uncond_text, text)
            share = float(mode) if mode < 2 else torch.from_numpy(rng.random(b)).float()[:, None, None, None]
            generator.set_mix(share, text.shape[1], image.shape[1])
            noise = torch.randn_like(x0)
            t = torch.from_numpy(rng.integers(0, noise_schedule.config.num_train_timesteps, b))
            noisy = noise_schedule.add_noise(x0, noise, t)
            pred = image_unet(noisy, t, encoder_hidden_states=torch.cat([text, image], dim=1)).sample
            weight = (object_pixel_weights(bank.labels["category_map"][rows], latent_size, unet_cfg.object_weight)
                      if unet_cfg.object_weight else None)
            loss = diffusion_loss(pred, x0, noise, t, noise_schedule, unet_cfg.snr_gamma, weight)
            loss.backward()
            return {"loss": loss.item()}

        unet_settings = {k: v for k, v in settings.items() if k != "description"}
        phase = Phase("unet", {"image_unet": image_unet}, optimizer, schedule, unet_cfg.steps, step_fn,
                      settings=unet_settings)
        unet_stats = run_phase(out, phase, seed, progress=progress)
        generator.set_mix(0.4, 1, 1)
        folder = export_mini_vd(image_unet, text_unet, vae, raw.get("scheduler", {}), out / "model")
        from brainmclip.miniature.quality import vd_quality

        quality = vd_quality(folder, clip, progress=progress, **({} if quality_scenes is None else
                                                                 {"n": quality_scenes}))
        n_params = sum(p.numel() for m in (image_unet, text_unet, vae) for p in m.parameters())
        write_model_card(folder, "mini-VD", raw.get("description", ""), command or "brainmclip miniature train vd",
                         seed, settings, vae_stats["seconds"] + unet_stats["seconds"], n_params, quality)
        log.info("mini-VD exported to %s in %.0f s: %s", folder, time.perf_counter() - start, quality)
        return folder


@dataclass
class _VdConfig:
    description: str
    seed: int
    bank: dict
    vae: dict
    unet: dict
    scheduler: dict


def export_mini_vd(image_unet, text_unet, vae, scheduler_cfg: dict, folder: Path) -> Path:
    """VD's folder layout, float16 safetensors, UniPC scheduler config (replacing an earlier export)."""
    import copy

    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    image_unet = copy.deepcopy(image_unet)
    _unconvert(image_unet)
    for name, module in (("image_unet", image_unet), ("text_unet", text_unet), ("vae", vae)):
        copy.deepcopy(module).to(torch.float16).save_pretrained(staging / name, safe_serialization=True)
    UniPCMultistepScheduler(**train_scheduler_config(scheduler_cfg)).save_pretrained(staging / "scheduler")
    write_json_atomic(staging / "model_index.json", {
        "_class_name": "VersatileDiffusionDualGuidedPipeline", "_diffusers_version": _diffusers_version(),
        "image_unet": ["diffusers", "UNet2DConditionModel"],
        "text_unet": ["versatile_diffusion", "UNetFlatConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "UniPCMultistepScheduler"]})
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
