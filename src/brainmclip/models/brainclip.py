"""BrainCLIP's fMRI mapping networks: fMRI -> one vector in CLIP's projected (image-text) space.

Two variants:

- **Linear**: one linear layer from the voxels to the ``embed_dim`` CLIP space.
- **VAE**: an fMRI encoder gives a Gaussian posterior over a latent ``z``; a decoder maps ``z`` to CLIP
  space. The decoder is first trained, with an encoder of CLIP image embeddings, as a VAE of *unpaired*
  CLIP image embeddings (cosine reconstruction + KL, :class:`EmbeddingVAE`), then frozen; training on fMRI
  fits only the fMRI encoder. The fMRI therefore has to land where real image embeddings come from, which
  acts as a prior learned from many images without brain data.

At evaluation the VAE uses the posterior mean; in training it samples ``z`` by reparameterisation (the
noise can be passed in, so a batch split into chunks draws the same ``z`` in both passes of an exact
large-batch step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from brainmclip.config import check_choice, check_float, check_int, check_keys

__all__ = ["BrainCLIPConfig", "BrainCLIPLinear", "BrainCLIPVAE", "EmbeddingVAE", "MappingOutput", "build_mapping"]

MAPPINGS = ("linear", "vae")


@dataclass
class BrainCLIPConfig:
    mapping: str = "linear"
    n_voxels: int = 0
    embed_dim: int = 768
    hidden_dim: int = 1024     # VAE encoders' and decoder's hidden width
    latent_dim: int = 256      # VAE latent size
    dropout: float = 0.0       # on the fMRI input (both variants)

    @classmethod
    def from_dict(cls, d: dict) -> BrainCLIPConfig:
        cfg = cls(**check_keys(cls, d, "model"))
        check_choice("model.mapping", cfg.mapping, MAPPINGS)
        for key in ("n_voxels", "embed_dim", "hidden_dim", "latent_dim"):
            check_int(f"model.{key}", getattr(cfg, key), 1)
        check_float("model.dropout", cfg.dropout, 0, 1, high_open=True)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MappingOutput:
    embedding: torch.Tensor           # (n, embed_dim), not normalised
    mu: torch.Tensor | None = None     # VAE posterior, (n, latent_dim)
    logvar: torch.Tensor | None = None


def _gaussian_head(n_in: int, hidden: int, latent: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, 2 * latent))


def _decoder(latent: int, hidden: int, embed_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))


def _sample(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None, training: bool) -> torch.Tensor:
    if not training:
        return mu
    noise = torch.randn_like(mu) if noise is None else noise
    return mu + noise * (0.5 * logvar).exp()


class BrainCLIPLinear(nn.Module):
    def __init__(self, config: BrainCLIPConfig):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        self.linear = nn.Linear(config.n_voxels, config.embed_dim)

    def forward(self, fmri: torch.Tensor, noise: torch.Tensor | None = None) -> MappingOutput:
        return MappingOutput(self.linear(self.dropout(fmri)))


class EmbeddingVAE(nn.Module):
    """A VAE of CLIP image embeddings; its decoder becomes BrainCLIP-VAE's frozen decoder."""

    def __init__(self, config: BrainCLIPConfig):
        super().__init__()
        self.config = config
        self.encoder = _gaussian_head(config.embed_dim, config.hidden_dim, config.latent_dim)
        self.decoder = _decoder(config.latent_dim, config.hidden_dim, config.embed_dim)

    def forward(self, embedding: torch.Tensor, noise: torch.Tensor | None = None) -> MappingOutput:
        mu, logvar = self.encoder(embedding).chunk(2, dim=-1)
        return MappingOutput(self.decoder(_sample(mu, logvar, noise, self.training)), mu, logvar)


class BrainCLIPVAE(nn.Module):
    def __init__(self, config: BrainCLIPConfig):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = _gaussian_head(config.n_voxels, config.hidden_dim, config.latent_dim)
        self.decoder = _decoder(config.latent_dim, config.hidden_dim, config.embed_dim)

    def load_decoder(self, state: dict[str, torch.Tensor]) -> None:
        """Take a trained :class:`EmbeddingVAE`'s decoder weights and freeze them."""
        self.decoder.load_state_dict(state)
        self.decoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.decoder.eval()  # frozen: no dropout or other train-mode behaviour, now or later
        return self

    def forward(self, fmri: torch.Tensor, noise: torch.Tensor | None = None) -> MappingOutput:
        mu, logvar = self.encoder(self.dropout(fmri)).chunk(2, dim=-1)
        return MappingOutput(self.decoder(_sample(mu, logvar, noise, self.training)), mu, logvar)


def build_mapping(config: BrainCLIPConfig) -> nn.Module:
    return BrainCLIPLinear(config) if config.mapping == "linear" else BrainCLIPVAE(config)
