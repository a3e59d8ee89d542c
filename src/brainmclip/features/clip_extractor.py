"""Multi-layer CLIP features in Versatile Diffusion's conditioning space (the targets BrainMCLIP learns).

For a vision layer k (output of transformer block k, HF ``hidden_states[k]``) every token is
passed through ``post_layernorm`` and ``visual_projection`` and divided by the norm of the
projected CLS token: for the last layer this is exactly VD's image conditioning. BrainMCLIP's
targets are e_I,D = mean over layers 11..20 (detail) and e_I,S = layer 24 (semantic). Text
tokens (``last_hidden_state``) go through ``text_projection`` and are divided by the norm of
the projected EOS token; E_T averages this over an image's captions. Token counts follow the model
(ViT-L/14: 257 image and 77 text tokens; mini-CLIP: 65 and 32).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from brainmclip.errors import InvalidInputError
from brainmclip.features.clip_models import ClipTowers
from brainmclip.features.tokenizer import tokenize

__all__ = ["ClipFeatureExtractor", "MERGE_ORDERS", "CLIP_MEAN", "CLIP_STD", "module_outputs"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MERGE_ORDERS = ("project-then-average", "average-then-project")


class ClipFeatureExtractor:
    """CLIP embeddings of images and captions.

    Parameters
    ----------
    towers : ClipTowers
    detail_layers : sequence of int
        Vision blocks averaged into the detail embedding (default 11..20).
    semantic_layer : int
        Vision block of the semantic embedding (default 24, the last).
    merge : {'project-then-average', 'average-then-project'}
        Whether each detail layer is projected and normalised before averaging (default), or
        the hidden states are averaged first.
    """

    def __init__(self, towers: ClipTowers, detail_layers: Sequence[int] = tuple(range(11, 21)),
                 semantic_layer: int = 24, merge: str = "project-then-average"):
        n = towers.n_vision_layers
        layers = [*detail_layers, semantic_layer]
        if not detail_layers or min(layers) < 1 or max(layers) > n:
            raise InvalidInputError(f"layers {sorted(set(layers))} outside 1..{n} (the model has {n} vision blocks)")
        if merge not in MERGE_ORDERS:
            raise InvalidInputError(f"Unknown merge={merge!r}; choose from {list(MERGE_ORDERS)}")
        self.towers = towers
        self.detail_layers = tuple(int(k) for k in detail_layers)
        self.semantic_layer = int(semantic_layer)
        self.merge = merge
        self.image_size = towers.vision.config.image_size

    @property
    def device(self) -> torch.device:
        return next(self.towers.vision.parameters()).device

    def _autocast(self):
        # bf16 on GPU only: on CPUs without bf16 units bf16 matmuls are orders of magnitude slower than fp32.
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def settings(self) -> dict:
        return {"detail_layers": list(self.detail_layers), "semantic_layer": self.semantic_layer, "merge": self.merge,
                "preprocessing": {"resize": f"shortest side {self.image_size}, bicubic, antialias",
                                  "crop": f"centre {self.image_size}", "mean": CLIP_MEAN, "std": CLIP_STD,
                                  "input": "uint8 RGB"},
                "text": "last_hidden_state -> text_projection / ||projected EOS||, mean over captions",
                "image": "post_layernorm -> visual_projection / ||projected CLS||"}

    # -- images -------------------------------------------------------------------------
    def preprocess(self, images) -> torch.Tensor:
        """uint8 images (n, H, W, 3) -> normalised float pixels (n, 3, S, S) for the vision tower.

        Inputs must be uint8: floats already in [0, 1] would be scaled twice (a classic bug).
        """
        images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InvalidInputError(f"images of dtype {images.dtype} and shape {tuple(images.shape)}; "
                             "expected uint8 RGB of shape (n, height, width, 3)")
        x = images.permute(0, 3, 1, 2)
        x = TF.resize(x, self.image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, [self.image_size, self.image_size])
        x = x.float() / 255.0
        return TF.normalize(x, CLIP_MEAN, CLIP_STD)

    def _project_image_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        vision = self.towers.vision
        tokens = vision.visual_projection(vision.vision_model.post_layernorm(hidden))
        return tokens / tokens[:, :1].norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def encode_images(self, images) -> dict[str, torch.Tensor]:
        """Detail and semantic embeddings, each float32 (n, n_tokens, embed_dim)."""
        pixels = self.preprocess(images).to(self.device)
        with self._autocast():
            out = self.towers.vision.vision_model(pixel_values=pixels, output_hidden_states=True)
            hidden = out.hidden_states
            if self.merge == "project-then-average":
                detail = torch.stack([self._project_image_tokens(hidden[k]).float() for k in self.detail_layers]).mean(0)
            else:
                detail = self._project_image_tokens(torch.stack([hidden[k] for k in self.detail_layers]).mean(0))
            semantic = self._project_image_tokens(hidden[self.semantic_layer])
        return {"image_detail": detail.float().cpu(), "image_semantic": semantic.float().cpu()}

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        """CLIP's final image embedding (projected pooled CLS), float32 (n, embed_dim)."""
        pixels = self.preprocess(images).to(self.device)
        with self._autocast():
            return self.towers.vision(pixel_values=pixels).image_embeds.float().cpu()

    # -- text ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected, EOS-normalised token embeddings of each text, float32 (n, context_length, embed_dim)."""
        ids, eos = tokenize(self.towers.tokenizer, list(texts), self.towers.context_length)
        ids, eos = ids.to(self.device), eos.to(self.device)
        text = self.towers.text
        with self._autocast():
            hidden = text.text_model(input_ids=ids).last_hidden_state
            tokens = text.text_projection(hidden)
            pooled = tokens[torch.arange(len(ids), device=ids.device), eos]
            tokens = tokens / pooled.norm(dim=-1, keepdim=True)[:, None]
        return tokens.float().cpu()

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP's final text embedding (projected EOS token), float32 (n, embed_dim)."""
        ids, eos = tokenize(self.towers.tokenizer, list(texts), self.towers.context_length)
        ids, eos = ids.to(self.device), eos.to(self.device)
        with self._autocast():
            hidden = self.towers.text.text_model(input_ids=ids).last_hidden_state
            pooled = hidden[torch.arange(len(ids), device=ids.device), eos]
            return self.towers.text.text_projection(pooled).float().cpu()

    def encode_captions(self, captions: Sequence[Sequence[str]]) -> torch.Tensor:
        """E_T: :meth:`encode_texts` averaged over each image's captions, float32 (n, context_length, embed_dim)."""
        empty = [i for i, c in enumerate(captions) if not c]
        if empty:
            raise InvalidInputError(f"{len(empty)} images have no caption (first: row {empty[0]}); E_T needs at least one")
        flat = [text for caps in captions for text in caps]
        owner = torch.repeat_interleave(torch.tensor([len(c) for c in captions]))
        tokens = self.encode_texts(flat)
        sums = torch.zeros(len(captions), *tokens.shape[1:])
        sums.index_add_(0, owner, tokens)
        return sums / torch.bincount(owner, minlength=len(captions))[:, None, None]

    def encode(self, images, captions) -> dict[str, torch.Tensor]:
        """All three BrainMCLIP targets for a batch."""
        return {**self.encode_images(images), "text": self.encode_captions(captions)}


@contextmanager
def module_outputs(model: torch.nn.Module, names: Sequence[str]):
    """Capture the outputs of named submodules during forward passes.

    Yields a dict that fills with ``{name: output tensor}`` (for MindDiffuser's structural
    features: the linear layers inside CLIP ViT-B/32's attention blocks)::

        with module_outputs(clip.vision, ["vision_model.encoder.layers.1.self_attn.out_proj"]) as feats:
            clip.vision(pixel_values=x)
    """
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise InvalidInputError(f"Unknown module {unknown[0]!r}; e.g. {[n for n in modules if n][:3]}")
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: captured.__setitem__(n, out))
               for n in names]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()
