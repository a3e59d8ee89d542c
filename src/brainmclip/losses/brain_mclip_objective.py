"""BrainMCLIP's training objective: paper Eqs. 4-5, with the tensors each term compares spelled out.

E and e are CLIP targets, Ê and ê the model's predictions, F_S and F_D the fMRI inputs and
D_S(b_S) the text branch's reconstruction of F_S from its code b_S:

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

from brainmclip.config import check_bool, check_float, check_keys
from brainmclip.errors import InvalidInputError
from brainmclip.losses.multi_granularity import LOSS_TERMS, LossWeights, multi_granularity_terms
from brainmclip.losses.reconstruction import mse
from brainmclip.models.brain_mclip import image_target

__all__ = ["ObjectiveConfig", "objective_terms", "brain_mclip_objective"]


@dataclass
class ObjectiveConfig:
    """Weights of BrainMCLIP's loss terms (saved with every checkpoint)."""

    text: LossWeights = field(default_factory=LossWeights)
    image: LossWeights = field(default_factory=LossWeights)
    reconstruction: float = 1.0
    image_parts: float = 1.0

    def __post_init__(self):
        check_float("loss.reconstruction", self.reconstruction, 0)
        check_float("loss.image_parts", self.image_parts, 0)
        for key in ("text", "image"):
            if not isinstance(getattr(self, key), LossWeights):
                raise InvalidInputError(f"loss.{key}={getattr(self, key)!r}: expected an object of loss weights")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ObjectiveConfig:
        d = dict(check_keys(cls, d, "loss"))
        for key in ("text", "image"):
            if key in d:
                weights = check_keys(LossWeights, d[key], f"loss.{key}")
                # Types first: LossWeights' own range checks assume numbers.
                for name, value in weights.items():
                    if name in LOSS_TERMS:
                        check_float(f"loss.{key}.{name}", value, 0)
                    elif name == "temperature":
                        check_float(f"loss.{key}.{name}", value, 0, low_open=True)
                    else:
                        check_bool(f"loss.{key}.{name}", value)
                d[key] = LossWeights(**weights)
        return cls(**d)


def objective_terms(output, targets: dict[str, Tensor], semantic: Tensor, detail: Tensor,
                    config: ObjectiveConfig) -> dict[str, tuple[float, Tensor]]:
    """Every term of the objective as ``name -> (weight, unweighted differentiable value)``.

    Names: ``text/<term>`` and ``image/<term>`` (terms of L_MG), ``image/parts_mse`` and
    ``reconstruction/<name>``. The total loss is the weighted sum.
    """
    terms: dict[str, tuple[float, Tensor]] = {}
    if output.text is not None:
        for name, value in multi_granularity_terms(targets["text"], output.text, config.text).items():
            terms[f"text/{name}"] = (getattr(config.text, name), value)
    if output.image is not None:
        branches = [name for name in ("image_semantic", "image_detail") if getattr(output, name) is not None]
        if len(branches) == 2 and config.image_parts > 0:
            part_loss = mse(targets["image_semantic"], output.image_semantic) + \
                mse(targets["image_detail"], output.image_detail)
            terms["image/parts_mse"] = (config.image_parts, part_loss)
        fused = image_target(branches, targets)
        for name, value in multi_granularity_terms(fused, output.image, config.image).items():
            terms[f"image/{name}"] = (getattr(config.image, name), value)
    inputs = {"semantic": semantic, "detail": detail}
    if config.reconstruction > 0:
        for name, (prediction, which) in output.reconstructions.items():
            terms[f"reconstruction/{name}"] = (config.reconstruction, mse(inputs[which], prediction))
    return terms


def brain_mclip_objective(output, targets: dict[str, Tensor], semantic: Tensor, detail: Tensor,
                          config: ObjectiveConfig) -> tuple[Tensor, dict[str, float]]:
    """Total loss and its parts (unweighted floats, for logging).

    Parameters
    ----------
    output : BrainMCLIPOutput
    targets : dict
        ``text`` E_T (n, 77, D), ``image_semantic`` e_I,S and ``image_detail`` e_I,D (n, 257, D).
    semantic, detail : Tensor
        The model's inputs F_S and F_D, targets of the fMRI reconstructions.
    """
    total = torch.zeros((), device=semantic.device)
    parts: dict[str, float] = {}
    for name, (weight, value) in objective_terms(output, targets, semantic, detail, config).items():
        total = total + weight * value
        parts[name] = float(value.detach())
    parts["total"] = float(total.detach())
    return total, parts
