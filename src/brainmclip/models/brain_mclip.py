"""BrainMCLIP (AAAI 2026): fMRI from low/high-level visual areas to multi-layer CLIP embeddings.

Text branch:  b_S = E_S(F_S);  Ê_T = D_T(backbone_T(b_S));  D_S(b_S) reconstructs F_S.
Image branch: b_I,S = E_I,S(F_S), b_I,D = E_I,D(F_D); one shared backbone and one shared
fMRI-image decoder D_I give ê_I,S = D_I(backbone(b_I,S)) and ê_I,D = D_I(backbone(b_I,D));
Ê_I = (ê_I,S + ê_I,D) / 2. D_I,S and D_I,D reconstruct F_S and F_D from either code: the
crossed pairs (D_I,D(b_I,S) vs F_D, D_I,S(b_I,D) vs F_S) are the cross-reconstruction.
F_S are the high-level (floc) voxels, F_D the low- and high-level ones: the ``semantic`` and ``detail``
voxel groups of a prepared dataset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from brainmclip.config import check_bool, check_float, check_int, check_keys
from brainmclip.errors import InvalidInputError
from brainmclip.models.layers import EncoderBlock, ResidualMlpBlock, TokenHead, count_parameters

__all__ = ["BrainMCLIPConfig", "BrainMCLIP", "BrainMCLIPOutput", "BRANCHES", "image_target"]

# Which branches a model has: the paper's Table 3 ablations are these switches.
BRANCHES = ("text", "image_semantic", "image_detail")


@dataclass
class BrainMCLIPConfig:
    """Sizes and switches of a BrainMCLIP model (saved with every checkpoint).

    Attributes
    ----------
    n_semantic_voxels, n_detail_voxels : int
        Widths of F_S and F_D; filled in from the prepared dataset's voxel groups.
    hidden_dim : int
        Width of every encoder output and backbone.
    image_tokens, text_tokens, embed_dim : int
        Target shapes (257 x 768 and 77 x 768 for CLIP ViT-L/14); filled in from the feature store.
    dropout : float
        After each encoder and inside each backbone block.
    backbone_blocks : int
        Residual MLP blocks per backbone (the paper's "two-layer MLP-based backbone").
    head_rank : int
        0 = dense linear output heads (default, the paper); r > 0 = rank-r heads for small GPUs.
    branches : list of str
        Subset of ``BRANCHES``. All three is the full model; ["text"] is text only; ["text",
        "image_semantic"] and ["text", "image_detail"] are the single-path image ablations.
    cross_reconstruction : bool
        Decode each image code into the other group's voxels (off: self-reconstruction only).
    start_at_mean : bool
        A new training run starts each output head at the training targets' mean (bias = mean,
        last weights = 0; ours, the paper is silent). Off: PyTorch's default init.
    """

    n_semantic_voxels: int = 0
    n_detail_voxels: int = 0
    hidden_dim: int = 2560
    image_tokens: int = 257
    text_tokens: int = 77
    embed_dim: int = 768
    dropout: float = 0.15
    backbone_blocks: int = 2
    head_rank: int = 0
    branches: list[str] = field(default_factory=lambda: list(BRANCHES))
    cross_reconstruction: bool = True
    start_at_mean: bool = True

    def __post_init__(self):
        for name in ("n_semantic_voxels", "n_detail_voxels", "head_rank", "backbone_blocks"):
            check_int(f"model.{name}", getattr(self, name), 0)
        for name in ("hidden_dim", "image_tokens", "text_tokens", "embed_dim"):
            check_int(f"model.{name}", getattr(self, name), 1)
        check_float("model.dropout", self.dropout, 0, 1, high_open=True)
        check_bool("model.cross_reconstruction", self.cross_reconstruction)
        check_bool("model.start_at_mean", self.start_at_mean)
        if (not isinstance(self.branches, (list, tuple)) or not self.branches
                or not all(isinstance(b, str) and b in BRANCHES for b in self.branches)):
            raise InvalidInputError(f"model.branches={self.branches!r}: expected a non-empty list drawn from "
                                    f"{list(BRANCHES)}")
        if self.cross_reconstruction and not {"image_semantic", "image_detail"} <= set(self.branches):
            # Cross-reconstruction needs both image codes; single-path ablations switch it off.
            self.cross_reconstruction = False

    @property
    def has_image(self) -> bool:
        return any(b.startswith("image") for b in self.branches)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BrainMCLIPConfig:
        return cls(**check_keys(cls, d, "model"))


def image_target(branches, targets: dict):
    """The CLIP image embedding a model with these branches predicts as Ê_I.

    Both image paths: E_I = (e_I,S + e_I,D) / 2. A single-path ablation learns, and is judged
    against, the one embedding its path stands for. None for a text-only model. Works on
    tensors and arrays alike.
    """
    semantic, detail = "image_semantic" in branches, "image_detail" in branches
    if semantic and detail:
        return (targets["image_semantic"] + targets["image_detail"]) / 2
    if semantic:
        return targets["image_semantic"]
    return targets["image_detail"] if detail else None


@dataclass
class BrainMCLIPOutput:
    """Predictions and fMRI reconstructions of one forward pass.

    ``text`` (n, 77, D), ``image`` (n, 257, D) and its parts are None for branches a model
    lacks. ``reconstructions`` maps a name to (prediction, which input it reconstructs:
    'semantic' = F_S or 'detail' = F_D).
    """

    text: Tensor | None
    image: Tensor | None
    image_semantic: Tensor | None
    image_detail: Tensor | None
    reconstructions: dict[str, tuple[Tensor, str]]


def _backbone(dim: int, blocks: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(*[ResidualMlpBlock(dim, dropout) for _ in range(blocks)])


class BrainMCLIP(nn.Module):
    def __init__(self, config: BrainMCLIPConfig):
        super().__init__()
        if config.n_semantic_voxels < 1 or config.n_detail_voxels < 1:
            raise InvalidInputError("n_semantic_voxels and n_detail_voxels must be set (from the prepared dataset)")
        self.config = c = config
        h, ns, nd = c.hidden_dim, c.n_semantic_voxels, c.n_detail_voxels
        if "text" in c.branches:
            self.text_encoder = EncoderBlock(ns, h, c.dropout)          # E_S
            self.text_fmri_decoder = nn.Linear(h, ns)                    # D_S
            self.text_backbone = _backbone(h, c.backbone_blocks, c.dropout)
            self.text_head = TokenHead(h, c.text_tokens, c.embed_dim, c.head_rank)  # D_T
        if "image_semantic" in c.branches:
            self.image_semantic_encoder = EncoderBlock(ns, h, c.dropout)  # E_I,S
            self.image_semantic_decoder = nn.Linear(h, ns)                # D_I,S
        if "image_detail" in c.branches:
            self.image_detail_encoder = EncoderBlock(nd, h, c.dropout)    # E_I,D
            self.image_detail_decoder = nn.Linear(h, nd)                  # D_I,D
        if c.has_image:
            self.image_backbone = _backbone(h, c.backbone_blocks, c.dropout)
            self.image_head = TokenHead(h, c.image_tokens, c.embed_dim, c.head_rank)  # D_I

    def forward(self, semantic: Tensor, detail: Tensor) -> BrainMCLIPOutput:
        """``semantic`` = F_S (n, n_semantic_voxels), ``detail`` = F_D (n, n_detail_voxels)."""
        c = self.config
        recs: dict[str, tuple[Tensor, str]] = {}
        text = image = image_s = image_d = None
        if "text" in c.branches:
            b_s = self.text_encoder(semantic)
            recs["text_self"] = (self.text_fmri_decoder(b_s), "semantic")
            text = self.text_head(self.text_backbone(b_s))
        codes = []
        if "image_semantic" in c.branches:
            b_is = self.image_semantic_encoder(semantic)
            recs["image_semantic_self"] = (self.image_semantic_decoder(b_is), "semantic")
            codes.append(b_is)
        if "image_detail" in c.branches:
            b_id = self.image_detail_encoder(detail)
            recs["image_detail_self"] = (self.image_detail_decoder(b_id), "detail")
            codes.append(b_id)
        if codes:
            # Both codes go through the shared backbone and D_I in one pass: the same maths as two
            # passes, but the 257 x 768 head's weights are read once and its gradient made once.
            decoded = self.image_head(self.image_backbone(torch.cat(codes))).split(len(codes[0]))
            image_s = decoded[0] if "image_semantic" in c.branches else None
            image_d = decoded[-1] if "image_detail" in c.branches else None
        if c.cross_reconstruction:
            recs["cross_semantic_to_detail"] = (self.image_detail_decoder(b_is), "detail")
            recs["cross_detail_to_semantic"] = (self.image_semantic_decoder(b_id), "semantic")
        if image_s is not None and image_d is not None:
            image = (image_s + image_d) / 2
        else:
            image = image_s if image_s is not None else image_d
        return BrainMCLIPOutput(text, image, image_s, image_d, recs)

    def start_at_mean(self, means: dict[str, Tensor]) -> None:
        """Start each output head at the mean target (``text``; ``image_semantic`` and ``image_detail``).

        The shared image head predicts both image parts, so with both paths it starts at their
        average, E_I's mean; a single-path model starts at the mean of its own path's target.
        """
        if "text" in self.config.branches:
            self.text_head.start_at(means["text"])
        if self.config.has_image:
            self.image_head.start_at(image_target(self.config.branches, means))

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per top-level module and in total."""
        counts = {name: count_parameters(module) for name, module in self.named_children()}
        counts["total"] = count_parameters(self)
        return counts

