"""Building blocks shared by the decoders."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from brainmclip.errors import InvalidInputError

__all__ = ["EncoderBlock", "ResidualMlpBlock", "TokenHead", "count_parameters"]


class EncoderBlock(nn.Module):
    """fMRI -> hidden: Linear -> LayerNorm -> GELU -> Dropout."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.act(self.norm(self.linear(x))))


class ResidualMlpBlock(nn.Module):
    """x + Dropout(GELU(LayerNorm(Linear(x))))."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.act(self.norm(self.linear(x))))


class TokenHead(nn.Module):
    """hidden -> (tokens, embed_dim) with one linear map (default) or through a rank-r bottleneck.

    The dense head dominates the parameter count (hidden x 257 x 768); the low-rank option
    trades accuracy for memory on small GPUs and is never the default.

    The output bias is added in float32, also under bf16 autocast: started at the mean target
    (:meth:`start_at`), the bias carries a component shared by all images that is many times
    larger than the image-to-image differences the weights add, and a bf16 sum would round those
    differences to a few steps of 2^-8 of the mean. The weights' product stays in the autocast dtype.
    """

    def __init__(self, in_dim: int, tokens: int, embed_dim: int, rank: int = 0):
        super().__init__()
        self.tokens, self.embed_dim = tokens, embed_dim
        out = tokens * embed_dim
        self.proj = nn.Sequential(nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, out)) if rank else \
            nn.Linear(in_dim, out)

    def forward(self, x: Tensor) -> Tensor:
        low_rank = isinstance(self.proj, nn.Sequential)
        last = self.proj[-1] if low_rank else self.proj
        y = nn.functional.linear(self.proj[0](x) if low_rank else x, last.weight)
        y = y.to(torch.promote_types(y.dtype, last.bias.dtype)) + last.bias
        return y.view(*x.shape[:-1], self.tokens, self.embed_dim)

    @torch.no_grad()
    def start_at(self, mean: Tensor) -> None:
        """Make the head output ``mean`` (tokens, embed_dim) for every input: bias = mean, last weights = 0.

        PyTorch's default init makes the head emit image-to-image noise several times larger than
        the targets vary (4x for the toy model on the small simulated preset: sd 0.38 vs 0.094;
        paper-size 768-wide VD-normalised tokens are smaller still, ~0.04 per element), and CLIP
        stacks share a large component across images. A default-initialised head spends its
        first epochs undoing both while the scale-free CKA and Sims terms keep the noise alive;
        on the small preset it ended below the mean predictor (median R^2 -0.56). Started at
        the mean it learns only what tells images apart.
        """
        if tuple(mean.shape) != (self.tokens, self.embed_dim):
            raise InvalidInputError(f"mean has shape {tuple(mean.shape)}, the head outputs {(self.tokens, self.embed_dim)}")
        last = self.proj[-1] if isinstance(self.proj, nn.Sequential) else self.proj
        last.bias.copy_(mean.reshape(-1).to(last.bias))
        last.weight.zero_()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
