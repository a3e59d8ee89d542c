"""Losses run in float32 even inside a bf16 autocast region.

Training on GPU runs under bf16 autocast, where matmuls round their results to 8 mantissa bits.
CLIP token stacks share a large component across images, and the losses here subtract it
(centring a Gram matrix, comparing near-equal cosines, differences of near-equal values):
rounded before the subtraction, what is left is rounding noise. The cost of float32 is small
next to the model: the losses see (batch x tokens x width) values, not the model's weights.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["full_precision"]

_LOW = (torch.float16, torch.bfloat16)


def full_precision(loss):
    """Decorate ``loss`` so it runs with autocast off and half-precision tensor arguments upcast to float32.

    float32 and float64 inputs are left as they are, so a float64 reference computation stays float64.
    """

    @functools.wraps(loss)
    def wrapped(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        up = {id(a): a.float() for a in tensors if a.dtype in _LOW}
        args = tuple(up.get(id(a), a) for a in args)
        kwargs = {k: up.get(id(v), v) for k, v in kwargs.items()}
        with torch.autocast(device_type=device, enabled=False):
            return loss(*args, **kwargs)

    return wrapped
