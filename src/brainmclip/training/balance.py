"""How much each loss term pulls on the model: per-term gradient norms on one batch.

Loss weights only mean something relative to the gradients their terms produce: an MSE on
targets of ~0.04 per element is ~1e-3 and moves the weights far less than ``1 - CKA`` does at
the same weight. The trainer logs these shares at its first step, and the loss-weight sweep
reports them, so a weight is chosen knowing what it does.
"""

from __future__ import annotations

import torch

from brainmclip.losses.brain_mclip_objective import ObjectiveConfig, objective_terms

__all__ = ["gradient_norms"]


def gradient_norms(model, batch: dict[str, torch.Tensor], config: ObjectiveConfig) -> dict[str, dict[str, float]]:
    """Per objective term: the norm of its weighted gradient on the output heads and on all parameters.

    Returns ``{term: {"weight": w, "value": unweighted value, "heads": |grad| on the text/image
    output heads, "all": |grad| on every parameter, "share": heads-norm / sum of heads-norms}}``.
    The model is put in eval mode (no dropout) for the measurement and restored afterwards.
    """
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    heads = {id(p) for name in ("text_head", "image_head") if hasattr(model, name)
             for p in getattr(model, name).parameters()}
    try:
        out = model(batch["semantic"], batch["detail"])
        terms = objective_terms(out, batch, batch["semantic"], batch["detail"], config)
        result = {}
        names = list(terms)
        for k, name in enumerate(names):
            weight, value = terms[name]
            grads = torch.autograd.grad(weight * value, params, retain_graph=k < len(names) - 1, allow_unused=True)
            sq_all = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
            sq_heads = sum(float(g.double().pow(2).sum()) for p, g in zip(params, grads, strict=True)
                           if g is not None and id(p) in heads)
            result[name] = {"weight": float(weight), "value": float(value.detach()), "heads": sq_heads ** 0.5,
                            "all": sq_all ** 0.5}
    finally:
        model.train(was_training)
    total = sum(r["heads"] for r in result.values()) or 1.0
    for r in result.values():
        r["share"] = r["heads"] / total
    return result
