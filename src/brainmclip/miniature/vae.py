"""The miniature VAE: a diffusers ``AutoencoderKL`` for 64 px scenes, shared by mini-VD and mini-SD.

Trained as Stable Diffusion's VAE is in spirit (pixel reconstruction plus a small KL term keeping the latent close
to a unit Gaussian), without the adversarial and perceptual terms. Objects cover a few percent of a scene's pixels,
so a plain pixel loss is met by drawing the background and leaving brown blobs where the objects were; the
reconstruction loss therefore weighs object pixels (known from the renderer) ``object_weight`` times more. Its
``scaling_factor`` is set from the data, as Stable Diffusion's 0.18215 was, so the latents the diffusion models see
have unit variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from brainmclip.config import check_keys
from brainmclip.miniature.training import Phase, cosine_with_warmup

__all__ = ["VaeConfig", "build_vae", "encode_bank", "vae_phase", "to_vae_pixels"]


@dataclass
class VaeConfig:
    """Architecture (diffusers ``AutoencoderKL`` arguments) and training of the VAE."""

    block_out_channels: list[int]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    steps: int
    batch_size: int
    lr: float
    kl_weight: float
    warmup_steps: int = 50
    object_weight: float = 10.0

    @classmethod
    def from_dict(cls, d: dict) -> VaeConfig:
        return cls(**check_keys(cls, d, "vae"))


def build_vae(cfg: VaeConfig, image_size: int, seed: int) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.block_out_channels),
                         layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                         norm_num_groups=cfg.norm_num_groups, sample_size=image_size, scaling_factor=1.0)


def to_vae_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, S, S, 3) -> float (n, 3, S, S) in [-1, 1], the VAE's pixel range."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def vae_phase(vae: AutoencoderKL, images: np.ndarray, object_maps: np.ndarray, cfg: VaeConfig,
              settings: dict) -> Phase:
    """``object_maps`` (n, S, S): >= 0 where an object is drawn (a bank's ``category_map``)."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.steps, cfg.warmup_steps, 0.05))

    def step_fn(step: int, rng: np.random.Generator) -> dict[str, float]:
        rows = rng.choice(len(images), cfg.batch_size, replace=False)
        x = to_vae_pixels(images[rows])
        weight = 1.0 + cfg.object_weight * torch.from_numpy(np.asarray(object_maps[rows]) >= 0).float()[:, None]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # L1 keeps edges sharper than MSE at this size; the KL is averaged per latent element.
        rec = ((recon - x).abs() * weight).mean() / weight.mean()
        kl = posterior.kl().mean() / (posterior.mean[0].numel())
        loss = rec + cfg.kl_weight * kl
        loss.backward()
        return {"l1": rec.item(), "kl": kl.item()}

    return Phase("vae", {"vae": vae}, optimizer, schedule, cfg.steps, step_fn, settings=settings)


@torch.no_grad()
def encode_bank(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """Posterior means of every image, unscaled, float32 (n, C, s, s)."""
    vae.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="VAE latents", unit="batch", disable=not progress):
        out.append(vae.encode(to_vae_pixels(images[start:start + batch_size])).latent_dist.mean.numpy())
    return np.concatenate(out)
