"""Per-image representations of every CLIP vision layer, for the layer-wise analyses.

The representation of image ``i`` at layer ``k`` (output of transformer block ``k``, HF
``hidden_states[k]``, k = 1..L) is one vector: the block's CLS token followed by its patch tokens
average-pooled onto a ``grid x grid`` lattice, concatenated. Why this one:

- Whole token stacks, not only CLS or a global mean: early visual cortex is retinotopic, so a
  representation that throws away *where* things are (CLS, mean of patches) would handicap the
  early layers against early visual areas before any comparison is made. Keeping the patch
  tokens in their spatial layout lets a layer be judged on what it encodes, not on what a
  summary of it keeps.
- Pooled to a small grid: the analyses compare images through ``n x n`` similarity matrices, so
  every layer's features for all images must be held at once; pooling bounds that memory
  (ViT-L/14's 16 x 16 patches pooled to 4 x 4 keep 17 x 1024 numbers per image and layer instead
  of 257 x 1024). Mini-CLIP's 8 x 8 patches at ``grid=8`` are kept whole.
- Raw residual stream (no ``post_layernorm`` / projection): the comparison is between the
  layers themselves, and the final layer norm and projection belong to layer L's output head only.

Images are preprocessed exactly as for the decoding targets
(:meth:`brainmclip.features.clip_extractor.ClipFeatureExtractor.preprocess`) and streamed through
the vision tower ``batch_size`` at a time, so only one batch of activations lives at once besides
the pooled results.
"""

from __future__ import annotations

import numpy as np

from brainmclip.errors import InvalidInputError

__all__ = ["layer_representations", "representation_size", "DEFAULT_GRID"]

#: Side of the lattice patch tokens are pooled to: 4 x 4 cells keep coarse retinotopy at a bounded size.
DEFAULT_GRID = 4


def representation_size(towers, grid: int = DEFAULT_GRID) -> int:
    """Length of one layer's vector for one image: (1 + pooled patches) x hidden size."""
    config = towers.vision.config
    side = config.image_size // config.patch_size
    return (1 + min(grid, side) ** 2) * config.hidden_size


def layer_representations(towers, images, layers=None, grid: int = DEFAULT_GRID, batch_size: int = 32):
    """Run the vision tower over ``images`` and keep a pooled vector per image for each layer.

    Parameters
    ----------
    towers : brainmclip.features.clip_models.ClipTowers
        From :func:`brainmclip.features.clip_models.load_clip` ('mini', 'tiny', a folder ...).
    images : uint8 array-like of shape (n, H, W, 3)
        RGB stimuli; may be a memory map (read one batch at a time).
    layers : sequence of int, optional
        Vision blocks 1..L to keep (default all of them).
    grid : int
        Side of the lattice patch tokens are average-pooled to; a grid at least as fine as the
        model's patch grid keeps every token.
    batch_size : int
        Images per forward pass.

    Returns
    -------
    numpy.ndarray of float32, shape (len(layers), n, representation_size(towers, grid))
        Row ``[j, i]`` is image ``i`` at block ``layers[j]``: CLS, then the pooled patch tokens in
        row-major grid order, each a hidden-size vector.
    """
    import torch
    import torch.nn.functional as F

    from brainmclip.features.clip_extractor import ClipFeatureExtractor

    n_layers = towers.n_vision_layers
    layers = tuple(range(1, n_layers + 1)) if layers is None else tuple(int(k) for k in layers)
    if not layers or min(layers) < 1 or max(layers) > n_layers:
        raise InvalidInputError(f"layers {list(layers)} outside 1..{n_layers} (the model has {n_layers} vision blocks)")
    if grid < 1 or batch_size < 1:
        raise InvalidInputError(f"grid={grid} and batch_size={batch_size} must be positive")
    n = len(images)
    # The extractor is used for its preprocessing only; any valid layer choice builds it.
    prep = ClipFeatureExtractor(towers, detail_layers=(1,), semantic_layer=n_layers)
    config = towers.vision.config
    side = config.image_size // config.patch_size
    cells = min(grid, side)
    out = np.empty((len(layers), n, representation_size(towers, grid)), np.float32)
    device = prep.device
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            pixels = prep.preprocess(np.asarray(images[start:stop])).to(device)
            # float32 throughout: the analyses compare small differences between layers.
            hidden = towers.vision.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
            for j, k in enumerate(layers):
                h = hidden[k].float()
                patches = h[:, 1:].transpose(1, 2).reshape(len(h), -1, side, side)
                if cells != side:
                    patches = F.adaptive_avg_pool2d(patches, cells)
                tokens = torch.cat([h[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)
                out[j, start:stop] = tokens.reshape(len(h), -1).cpu().numpy()
    return out
