"""BrainMCLIP's training objective (paper Eqs. 4-5, with SPEC section 5's reading of them).

    L_text  = L_MG(E_T, Ê_T) + MSE(F_S, D_S(b_S))
    L_image = L_MG(E_I, Ê_I) + L_Crec + MSE(e_I,S, ê_I,S) + MSE(e_I,D, ê_I,D)
    L       = L_text + L_image            (trained jointly)

L_Crec sums the MSE of every image-branch fMRI reconstruction: the two self-reconstructions
and, unless switched off, the two crossed ones. L_MG's terms are set by :class:`LossWeights`
(MSE + CKA + Sims by default; the paper's loss ablations are other weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from brainmclip.config import check_keys
from brainmclip.losses.multi_granularity import LossWeights, multi_granularity_loss
from brainmclip.losses.reconstruction import mse

__all__ = ["ObjectiveConfig", "brain_mclip_objective"]


@dataclass
class ObjectiveConfig:
    """Weights of BrainMCLIP's loss terms (saved with every checkpoint)."""

    text: LossWeights = field(default_factory=LossWeights)
    image: LossWeights = field(default_factory=LossWeights)
    reconstruction: float = 1.0
    image_parts: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ObjectiveConfig:
        d = dict(check_keys(cls, d, "loss"))
        for key in ("text", "image"):
            if key in d and isinstance(d[key], dict):
                d[key] = LossWeights(**d[key])
        return cls(**d)


def brain_mclip_objective(output, targets: dict[str, Tensor], semantic: Tensor, detail: Tensor,
                          config: ObjectiveConfig) -> tuple[Tensor, dict[str, float]]:
    """Total loss and its parts (floats, for logging).

    Parameters
    ----------
    output : BrainMCLIPOutput
    targets : dict
        ``text`` E_T (n, 77, D), ``image_semantic`` e_I,S and ``image_detail`` e_I,D (n, 257, D).
    semantic, detail : Tensor
        The model's inputs F_S and F_D, targets of the fMRI reconstructions.
    """
    parts: dict[str, float] = {}
    total = torch.zeros((), device=semantic.device)
    if output.text is not None:
        loss, terms = multi_granularity_loss(targets["text"], output.text, config.text)
        total = total + loss
        parts.update({f"text/{k}": float(v) for k, v in terms.items()})
    if output.image is not None:
        if output.image_semantic is not None and output.image_detail is not None:
            fused = (targets["image_semantic"] + targets["image_detail"]) / 2
            part_loss = mse(targets["image_semantic"], output.image_semantic) + \
                mse(targets["image_detail"], output.image_detail)
            total = total + config.image_parts * part_loss
            parts["image/parts_mse"] = float(part_loss.detach())
        else:
            # Single-path ablations learn the one CLIP embedding their path stands for.
            fused = targets["image_semantic"] if output.image_semantic is not None else targets["image_detail"]
        loss, terms = multi_granularity_loss(fused, output.image, config.image)
        total = total + loss
        parts.update({f"image/{k}": float(v) for k, v in terms.items()})
    inputs = {"semantic": semantic, "detail": detail}
    for name, (prediction, which) in output.reconstructions.items():
        loss = mse(inputs[which], prediction)
        total = total + config.reconstruction * loss
        parts[f"reconstruction/{name}"] = float(loss.detach())
    parts["total"] = float(total.detach())
    return total, parts
