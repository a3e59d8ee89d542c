"""MindDiffuser's decoding targets, computed once per NSD image into a feature store.

Per image (all stored float16, one row per NSD id, in the shards of a
:class:`~brainmclip.features.feature_store.FeatureStore` whose settings name these targets):

``sd_text``  (n, 77, 768) for SD v1
    c: Stable Diffusion's text conditioning, the SD text encoder's ``last_hidden_state``, averaged
    over the image's captions (:func:`~brainmclip.features.diffusion_features.encode_sd_text`).
    mini-SD: (n, 32, 64).
``sd_latent``  (n, C, H*W): (n, 4, 4096) for SD v1 at 512 px
    z: the VAE posterior mean times the VAE's scaling factor of the image resized (bicubic,
    antialiased) to SD's native size (UNet ``sample_size`` x the VAE's downsampling factor: 512
    for SD v1, 64 for mini-SD whose z is 4 x 16 x 16). The store holds each channel flattened in
    row-major order, ``z.reshape(n, C, H * W)``, so every target has the store's 3-D row layout;
    ``stored.reshape(n, C, H, W)`` (shape in ``settings["sd_latent"]["shape"]``) restores it, and
    ``stored.reshape(n, -1)`` is the C*H*W vector in the order the published code regresses.
``struct_NN``  (n, tokens, width): (n, 50, 768) for CLIP ViT-B/32
    Structural features: the output of one linear layer of the CLIP vision tower for every token
    (CLS first), for each ``NN`` in ``layers`` (default 2, 4, 6, 8, 10, 12).

Which linear layers. The paper says the structural features are "derived from the linear layers of
the 2nd, 4th, 6th, 8th, 10th, and 12th attention modules" of CLIP ViT-B/32 and calls them
shallow features; it decodes each as 38,400 values (= 50 tokens x 768). The published code names
them ``Linear-2`` ... ``Linear-12``: forward hooks on every module of OpenAI CLIP's visual tower,
each named by its class and how many of that class ran before it. OpenAI's attention is
``nn.MultiheadAttention``, which applies its ``out_proj`` weights without calling that module, so
the only ``Linear`` modules that run are each residual block's MLP ``c_fc`` and ``c_proj``:
``Linear-n`` is block ceil(n/2)'s ``c_fc`` (n odd, 3072 wide) or ``c_proj`` (n even, 768 wide).
The default ``convention="linear-index"`` follows the published code: layer n -> the MLP
output projection (transformers' ``mlp.fc2``) of block n/2, i.e. blocks 1-6 for 2..12, each
768 wide, matching the 38,400 values per layer. ``convention="attention-out"`` follows the
sentence literally instead: layer n -> ``self_attn.out_proj`` of block n.

mini-CLIP (the miniature world's CLIP, 24 blocks of width 64, 65 tokens) keeps the same indices:
Linear-2 ... Linear-12 are the MLP outputs of its blocks 1-6, its shallowest quarter, which is where
the paper wants structure (early visual cortex) rather than semantics. Pass other ``layers`` to
choose others; the store records the exact module of every target.

Images enter the vision tower with CLIP's own preprocessing (shortest side to the tower's input
size, bicubic with antialiasing, centre crop, CLIP's mean and std; NSD images are square, so the
crop removes nothing). The published code squashes to 224 px and normalises with ImageNet's
statistics instead; what matters is that stage 2 measures generated images the same way as these
targets, so :class:`StructuralFeatures` is the one definition both use. Everything runs in float32
(also on a GPU): the targets are stored once, and bf16 would cost more precision than float16
storage does.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainmclip.atomic import locks_output
from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.features.clip_extractor import ClipFeatureExtractor, module_outputs
from brainmclip.features.extract import ExtractResult
from brainmclip.features.feature_store import FeatureStore, open_feature_store
from brainmclip.quiet import quiet_hf_loading

__all__ = ["COMMAND", "CONVENTIONS", "DEFAULT_LAYERS", "MindDiffuserExtractResult", "StructuralFeatures",
           "add_arguments", "extract_minddiffuser_targets", "load_minddiffuser_targets", "run",
           "structural_target_name", "target_names"]

log = logging.getLogger("brainmclip.extract")

COMMAND = "extract-minddiffuser"
DEFAULT_SD = "CompVis/stable-diffusion-v1-4"
DEFAULT_STRUCTURAL_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_LAYERS = (2, 4, 6, 8, 10, 12)
CONVENTIONS = ("linear-index", "attention-out")
SD_PARTS = ("text_encoder", "tokenizer", "vae")


def structural_target_name(layer: int) -> str:
    return f"struct_{int(layer):02d}"


def target_names(layers: Sequence[int]) -> list[str]:
    """The store's targets, in order: ``sd_text``, ``sd_latent``, ``struct_NN`` per layer."""
    return ["sd_text", "sd_latent", *(structural_target_name(k) for k in layers)]


# -- structural features ------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook once the deepest wanted layer has run: the blocks above it are not needed."""


class StructuralFeatures:
    """The outputs of chosen linear layers of a CLIP vision tower (MindDiffuser's structural features).

    Parameters
    ----------
    vision : transformers ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection``
    layers : sequence of int
        Layer numbers in ``convention``'s sense (default 2, 4, 6, 8, 10, 12).
    convention : {'linear-index', 'attention-out'}
        'linear-index' (default, the published code): layer n is the n-th linear layer of the MLPs in
        forward order, i.e. block ceil(n/2)'s ``mlp.fc1`` (n odd) or ``mlp.fc2`` (n even).
        'attention-out': layer n is block n's ``self_attn.out_proj``.
    """

    def __init__(self, vision, layers: Sequence[int] = DEFAULT_LAYERS, convention: str = "linear-index"):
        if convention not in CONVENTIONS:
            raise InvalidInputError(f"Unknown convention={convention!r}; choose from {list(CONVENTIONS)}")
        layers = [int(k) for k in layers]
        n_blocks = int(vision.config.num_hidden_layers)
        top = 2 * n_blocks if convention == "linear-index" else n_blocks
        if not layers or len(set(layers)) != len(layers) or min(layers) < 1 or max(layers) > top:
            raise InvalidInputError(f"structural layers {layers}; expected distinct numbers in 1..{top} "
                                    f"({convention} on a tower of {n_blocks} blocks)")
        self.vision = vision
        self.layers = tuple(layers)
        self.convention = convention
        self.modules = {k: self.module_name(k) for k in self.layers}
        # The tower's own preprocessing (resize, centre crop, CLIP mean/std), shared with BrainMCLIP's extractor.
        self._pre = ClipFeatureExtractor(_TowerView(vision), detail_layers=(1,), semantic_layer=1)
        self.image_size = int(vision.config.image_size)

    def module_name(self, layer: int) -> str:
        prefix = "vision_model.encoder.layers"
        if self.convention == "attention-out":
            return f"{prefix}.{layer - 1}.self_attn.out_proj"
        block = (layer + 1) // 2
        return f"{prefix}.{block - 1}.mlp.{'fc1' if layer % 2 else 'fc2'}"

    @property
    def n_tokens(self) -> int:
        config = self.vision.config
        return (config.image_size // config.patch_size) ** 2 + 1

    def width(self, layer: int) -> int:
        modules = dict(self.vision.named_modules())
        return int(modules[self.modules[layer]].out_features)

    def settings(self) -> dict:
        return {"convention": self.convention, "layers": list(self.layers),
                "modules": {structural_target_name(k): m for k, m in self.modules.items()},
                "tokens": self.n_tokens, "widths": {structural_target_name(k): self.width(k) for k in self.layers},
                "preprocessing": self._pre.settings()["preprocessing"], "compute_dtype": "float32"}

    def preprocess(self, images) -> torch.Tensor:
        """uint8 images (n, H, W, 3) -> normalised pixels (n, 3, S, S) on the tower's device."""
        return self._pre.preprocess(images).to(next(self.vision.parameters()).device)

    def from_pixels(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{layer: (n, tokens, width)}`` from normalised pixels; differentiable (stage 2 backpropagates through
        it). Blocks above the deepest wanted layer are skipped."""
        deepest = self.modules[max(self.layers)]  # in both conventions a higher number runs later
        names = list(self.modules.values())

        def stop(_module, _inputs, _output):
            raise _Stop

        with module_outputs(self.vision, names) as captured:
            handle = dict(self.vision.named_modules())[deepest].register_forward_hook(stop)
            try:
                self.vision.vision_model(pixel_values=pixel_values)
            except _Stop:
                pass
            finally:
                handle.remove()
        return {k: captured[m] for k, m in self.modules.items()}

    @torch.no_grad()
    def __call__(self, images) -> dict[int, torch.Tensor]:
        """float32 CPU tensors ``{layer: (n, tokens, width)}`` of uint8 images (n, H, W, 3)."""
        out = self.from_pixels(self.preprocess(images))
        return {k: v.float().cpu() for k, v in out.items()}


@dataclass
class _TowerView:
    """Enough of :class:`~brainmclip.features.clip_models.ClipTowers` for the CLIP preprocessing of one tower."""

    vision: object

    @property
    def n_vision_layers(self) -> int:
        return int(self.vision.config.num_hidden_layers)


# -- Stable Diffusion parts -----------------------------------------------------------------------


def _sd_identity(sd: str, root: Path) -> dict:
    from brainmclip.miniature import is_miniature

    if is_miniature(sd):
        identity = {"model": "mini", "source": "brainmclip miniature world (trained on simulated scenes)"}
    elif Path(sd).expanduser().is_dir():
        identity = {"model": str(Path(sd).expanduser().resolve()), "source": "local folder"}
    else:
        identity = {"model": str(sd), "source": "huggingface cache", "revision": root.name}
    import hashlib

    for part in ("text_encoder", "vae"):
        identity[f"{part}_config_sha256"] = hashlib.sha256((root / part / "config.json").read_bytes()).hexdigest()
    return identity


def load_sd_parts(sd: str, device) -> tuple[object, object, object, int, dict]:
    """SD's text encoder, tokenizer and VAE (not the UNet), the native image size, and what they are."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from brainmclip.features.tokenizer import load_clip_tokenizer
    from brainmclip.generation.stable_diffusion import stable_diffusion_folder

    root = stable_diffusion_folder(sd)
    missing = [p for p in SD_PARTS if not (root / p).is_dir()]
    if missing:
        raise MissingInputError(f"{root}: not a Stable Diffusion folder (missing {', '.join(missing)}; need "
                                f"{', '.join(SD_PARTS)} in SD's layout)")
    with quiet_hf_loading():
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True,
                                                     dtype=torch.float32).eval().to(device)
        vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True, dtype=torch.float32)
        vae = vae.eval().to(device)
        tokenizer = load_clip_tokenizer(root / "tokenizer", int(text_encoder.config.max_position_embeddings))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_config = root / "unet" / "config.json"
    size = (int(json.loads(unet_config.read_text())["sample_size"]) * factor if unet_config.is_file()
            else int(vae.config.sample_size))
    return text_encoder, tokenizer, vae, size, _sd_identity(sd, root)


# -- extraction -------------------------------------------------------------------------------------


class MindDiffuserExtractResult(ExtractResult):
    """:class:`~brainmclip.features.extract.ExtractResult` of a MindDiffuser target store."""

    def summary(self) -> str:
        s = self.store.manifest["settings"]
        rate = self.n_extracted / self.seconds if self.seconds > 0 else 0.0
        text, latent, st = s["sd_text"], s["sd_latent"], s["structural"]
        widths = sorted(set(st["widths"].values()))
        return "\n".join([
            f"MindDiffuser targets at {self.store.root} (SD {s['sd']['model']}, structural CLIP "
            f"{st['model']['model']})",
            f"  {self.n_requested} images requested, {self.n_extracted} extracted now ({rate:.2f} images/s), "
            f"{len(self.store)} stored",
            f"  c = sd_text {text['tokens']}x{text['dim']}; z = sd_latent {'x'.join(map(str, latent['shape']))} "
            f"(stored as {latent['shape'][0]}x{latent['shape'][1] * latent['shape'][2]}, {latent['image_size']} px); "
            f"structural = {st['convention']} layers {', '.join(map(str, st['layers']))} "
            f"({st['tokens']} tokens x {'/'.join(map(str, widths))}); float16",
        ])


@locks_output()
def extract_minddiffuser_targets(prepared_paths: Sequence[str | Path], out: str | Path, sd: str = DEFAULT_SD,
                                 structural_clip: str = DEFAULT_STRUCTURAL_CLIP,
                                 layers: Sequence[int] = DEFAULT_LAYERS, convention: str = "linear-index",
                                 batch_size: int = 16, shard_size: int = 256, cpu: bool = False,
                                 progress: bool = True) -> MindDiffuserExtractResult:
    """c, z and the structural features of every image of ``prepared_paths`` into the store ``out``.

    Images are keyed by NSD id (each stored once however many subjects saw it) and cut into shards of
    ``shard_size``; a rerun computes only missing shards (and those found damaged). Under ``accelerate launch``
    each process takes every n-th shard.
    """
    from accelerate import Accelerator

    from brainmclip.features.clip_models import load_clip
    from brainmclip.features.diffusion_features import encode_sd_text, encode_vae_latents
    from brainmclip.features.extract import collect_images, fill_store

    start = time.perf_counter()
    if batch_size < 1 or shard_size < 1:
        raise InvalidInputError(f"batch_size={batch_size}, shard_size={shard_size}; expected positive integers")
    if convention not in CONVENTIONS:
        raise InvalidInputError(f"Unknown convention={convention!r}; choose from {list(CONVENTIONS)}")
    source = collect_images(prepared_paths)
    accelerator = Accelerator(cpu=cpu)
    device = accelerator.device
    text_encoder, tokenizer, vae, size, sd_identity = load_sd_parts(sd, device)
    towers = load_clip(structural_clip, device=device)
    structural = StructuralFeatures(towers.vision, layers, convention)
    clip_identity = towers.identity
    del towers  # the text tower is not needed
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = [int(vae.config.latent_channels), size // factor, size // factor]
    settings = {
        "command": COMMAND, "method": "minddiffuser", "targets": target_names(structural.layers),
        "sd": sd_identity,
        "sd_text": {"tokens": int(text_encoder.config.max_position_embeddings),
                    "dim": int(text_encoder.config.hidden_size),
                    "definition": "SD text encoder last_hidden_state, mean over the image's captions"},
        "sd_latent": {"shape": latent_shape, "stored": "(C, H*W): each channel flattened row-major",
                      "image_size": size, "resize": "bicubic, antialias, to image_size x image_size",
                      "definition": "VAE posterior mean x scaling_factor",
                      "scaling_factor": float(vae.config.scaling_factor)},
        "structural": {"model": clip_identity, **structural.settings()},
        "dtype": "float16",
    }

    def encode(images, captions) -> dict[str, np.ndarray]:
        z = encode_vae_latents(vae, images, size=size)
        batch = {"sd_text": encode_sd_text(text_encoder, tokenizer, captions).numpy(),
                 "sd_latent": z.reshape(len(z), z.shape[1], -1).numpy()}
        for k, value in structural(images).items():
            batch[structural_target_name(k)] = value.numpy()
        return batch

    store, n_requested, n_missing = fill_store(source, out, settings, encode, accelerator, batch_size, shard_size,
                                               "MindDiffuser targets", "minddiffuser-shard", progress)
    return MindDiffuserExtractResult(store, n_requested, n_missing, time.perf_counter() - start)


# -- reading ---------------------------------------------------------------------------------------


def load_minddiffuser_targets(store: FeatureStore | str | Path, ids) -> dict[str, np.ndarray]:
    """float32 targets of ``ids`` (in that order): ``sd_text`` (n, tokens, dim), ``sd_latent`` (n, C, H, W), and
    ``struct_NN`` (n, tokens, width) per structural layer."""
    if not isinstance(store, FeatureStore):
        store = open_feature_store(store)
    settings = store.manifest.get("settings", {})
    if settings.get("command") != COMMAND or "sd_latent" not in store.targets:
        raise InvalidInputError(f"{store.root} is not a MindDiffuser target store (it holds {list(store.targets)}); "
                                f"make one with brainmclip {COMMAND}")
    out = store.get(ids)
    c, h, w = settings["sd_latent"]["shape"]
    out["sd_latent"] = out["sd_latent"].reshape(len(out["sd_latent"]), c, h, w)
    return out


# -- command line ----------------------------------------------------------------------------------


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}; expected layer numbers like 2,4,6,8,10,12") from None
    if not layers:
        raise argparse.ArgumentTypeError(f"{text!r} names no layer; expected e.g. 2,4,6,8,10,12")
    return layers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, nargs="+", type=Path, help="prepared dataset folder(s)")
    parser.add_argument("--out", required=True, type=Path, help="feature store folder for the targets")
    parser.add_argument("--sd", default=DEFAULT_SD,
                        help="Stable Diffusion v1 (text encoder, tokenizer, VAE): a local folder or cached hub id "
                             "(never downloaded), 'mini' for the miniature world's mini-SD (default %(default)s)")
    parser.add_argument("--structural-clip", default=DEFAULT_STRUCTURAL_CLIP,
                        help="CLIP whose vision tower gives the structural features: a local folder or cached hub "
                             "id, 'mini' for mini-CLIP, 'tiny' for the random test model (default %(default)s)")
    parser.add_argument("--layers", default=DEFAULT_LAYERS, type=_layer_list,
                        help="structural layers (default 2,4,6,8,10,12)")
    parser.add_argument("--convention", default="linear-index", choices=CONVENTIONS,
                        help="linear-index (default, the published code): layer n = the n-th MLP linear layer, "
                             "i.e. block n/2's MLP output for even n; attention-out: block n's attention out_proj")
    parser.add_argument("--batch-size", default=16, type=int)
    parser.add_argument("--shard-size", default=256, type=int, help="images per shard file")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")


def run(args) -> int:
    result = extract_minddiffuser_targets(args.data, args.out, sd=args.sd, structural_clip=args.structural_clip,
                                          layers=args.layers, convention=args.convention,
                                          batch_size=args.batch_size, shard_size=args.shard_size, cpu=args.cpu,
                                          progress=not getattr(args, "quiet", False))
    print(result.summary())
    return 0
