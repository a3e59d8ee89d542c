"""Images from predicted CLIP embeddings with Versatile Diffusion (VD) dual guidance.

BrainMCLIP conditions VD's image UNet on a predicted text embedding Ê_T (T_text, D) *and* a predicted image
embedding Ê_I (T_image, D) at once (77 and 257 tokens of width 768 for CLIP ViT-L/14; the token counts and the
width follow whatever CLIP the embeddings come from): every cross-attention block of the image UNet is replaced by a
pair of transformers (the image UNet's own block for the image condition, the text UNet's block at the same place for
the text condition) whose residuals are mixed ``text_weight : 1 - text_weight``.

Every VD workaround lives in this module:

* ``DualTransformer2DModel.forward`` (diffusers) lacks the ``encoder_attention_mask`` argument that the UNet's
  cross-attention blocks pass, so calls fail with ``TypeError``; :class:`MaskTolerantDualTransformer` accepts it.
* ``VersatileDiffusionDualGuidedPipeline.from_pretrained`` of a saved folder fails, so
  :func:`load_versatile_diffusion` loads ``image_unet``, ``text_unet``, ``vae`` and ``scheduler`` one by one.
* diffusers' ``text_to_image_strength`` is the weight of the *first* condition, which VD orders (text, image); our
  ``text_weight`` is fixed to mean "share of the text condition" whatever the order.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.dual_transformer_2d import DualTransformer2DModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = [
    "VD_COMPONENTS",
    "MaskTolerantDualTransformer",
    "VersatileDiffusionGenerator",
    "best_of_n",
    "cosine_scorer",
    "generator_folder",
    "load_versatile_diffusion",
    "tiny_components",
    "tiny_versatile_diffusion",
]

VD_COMPONENTS = ("image_unet", "text_unet", "vae", "scheduler")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")

Generators = torch.Generator | list[torch.Generator] | None


class MaskTolerantDualTransformer(DualTransformer2DModel):
    """``DualTransformer2DModel`` built from two existing blocks, whose ``forward`` accepts ``encoder_attention_mask``.

    Condition order is always (text, image): ``transformers[0]`` is the image UNet's block (image condition),
    ``transformers[1]`` the text UNet's block (text condition), and ``mix_ratio`` is the share of the text condition.
    """

    def __init__(self, image_block: Transformer2DModel, text_block: Transformer2DModel):
        torch.nn.Module.__init__(self)  # DualTransformer2DModel.__init__ would allocate two fresh blocks
        self.transformers = torch.nn.ModuleList([image_block, text_block])
        self.mix_ratio = 0.5
        # (text, image) token counts: diffusers' defaults (CLIP ViT-L/14); the generator sets them for every call.
        self.condition_lengths = [77, 257]
        self.transformer_index_for_condition = [1, 0]

    def forward(self, hidden_states, encoder_hidden_states, timestep=None, attention_mask=None,
                cross_attention_kwargs=None, return_dict: bool = True, encoder_attention_mask=None, **unused):
        if encoder_attention_mask is not None:
            raise InvalidInputError("dual-guided attention does not support encoder_attention_mask; pass None")
        ratio = self.mix_ratio
        if not isinstance(ratio, torch.Tensor) and ratio in (0.0, 1.0):
            # One condition has weight 0: its block's residual would be multiplied by 0, so it is not computed
            # (half the attention cost for image-only or text-only generation and training steps).
            condition = 0 if ratio == 1.0 else 1
            start = sum(self.condition_lengths[:condition])
            block = self.transformers[self.transformer_index_for_condition[condition]]
            out = block(hidden_states, encoder_hidden_states=encoder_hidden_states[:, start:start
                                                                                   + self.condition_lengths[condition]],
                        timestep=timestep, cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
            return (out,) if not return_dict else Transformer2DModelOutput(sample=out)
        return super().forward(hidden_states, encoder_hidden_states, timestep=timestep, attention_mask=attention_mask,
                               cross_attention_kwargs=cross_attention_kwargs, return_dict=return_dict)


def _convert_to_dual_attention(image_unet: UNet2DConditionModel, text_unet: UNetFlatConditionModel) -> int:
    """Pair each ``Transformer2DModel`` of ``image_unet`` with the text UNet's block at the same path; returns the count."""
    names = [name for name, module in image_unet.named_modules() if type(module) is Transformer2DModel]
    for name in names:
        parent_name, index = name.rsplit(".", 1)
        try:
            text_block = text_unet.get_submodule(name)
        except AttributeError as err:
            raise InvalidInputError(f"text_unet has no transformer block at {name!r}; it does not match image_unet") from err
        if not isinstance(text_block, Transformer2DModel):
            raise InvalidInputError(f"text_unet.{name} is {type(text_block).__name__}, not Transformer2DModel")
        parent = image_unet.get_submodule(parent_name)
        parent[int(index)] = MaskTolerantDualTransformer(parent[int(index)], text_block)
    image_unet.register_to_config(dual_cross_attention=True)
    return len(names)


def _dual_blocks(image_unet: torch.nn.Module) -> list[DualTransformer2DModel]:
    return [module for module in image_unet.modules() if isinstance(module, DualTransformer2DModel)]


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.from_numpy(np.ascontiguousarray(value))
    except TypeError as err:
        raise InvalidInputError(f"{name}: expected a numpy array or torch tensor, got {type(value).__name__}") from err


class VersatileDiffusionGenerator:
    """Dual-guided VD generator over ready-built diffusers components (diffusers style, but no CLIP encoders).

    Predictions already are the conditioning, so only the UNets, the VAE and a scheduler are needed. The text UNet's
    transformer blocks are moved into ``image_unet`` at construction; ``text_unet`` is then dropped (``None``),
    as the rest of it is never used for dual guidance.
    """

    def __init__(self, image_unet: UNet2DConditionModel, text_unet: UNetFlatConditionModel | None,
                 vae: AutoencoderKL, scheduler: SchedulerMixin | None = None):
        if not _dual_blocks(image_unet):
            if text_unet is None:
                raise InvalidInputError("image_unet has no dual attention blocks and no text_unet was given to build them")
            if _convert_to_dual_attention(image_unet, text_unet) == 0:
                raise InvalidInputError("image_unet has no Transformer2DModel blocks to convert to dual attention")
        self.image_unet = image_unet.eval()
        self.text_unet = None  # its transformer blocks now live inside image_unet
        self.vae = vae.eval()
        self.scheduler = scheduler if scheduler is not None else UniPCMultistepScheduler()
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.image_unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_unet.dtype

    @property
    def embed_dim(self) -> int:
        return int(self.image_unet.config.cross_attention_dim)

    def to(self, device=None, dtype=None) -> VersatileDiffusionGenerator:
        # Casting to the dtype a model already has makes diffusers warn for nothing; skip it.
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype if dtype != self.dtype else None)) if v}
        if kwargs:
            self.image_unet.to(**kwargs)
            self.vae.to(**kwargs)
        return self

    # ---------------------------------------------------------------------------------------------- steps
    def check_inputs(self, image_embeds, text_embeds, text_weight, strength, height, width, uncond_image, uncond_text,
                     init_images, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Checked tensors; token counts are free (they follow the CLIP the embeddings come from) but must agree."""
        d = self.embed_dim
        image = text = None
        if image_embeds is not None:
            image = _as_tensor(image_embeds, "image_embeds")
            if image.ndim != 3 or image.shape[-1] != d or image.shape[1] < 1:
                raise InvalidInputError(f"image_embeds: shape {tuple(image.shape)}; expected (n, image tokens, {d})")
        elif text_embeds is None:
            raise InvalidInputError("image_embeds and text_embeds are both None; VD needs at least one condition")
        elif text_weight != 1:
            raise InvalidInputError(f"image_embeds is None but text_weight={text_weight}; a text-only condition needs "
                             "text_weight=1")
        if text_embeds is not None:
            text = _as_tensor(text_embeds, "text_embeds")
            n_want = image.shape[0] if image is not None else text.shape[0]
            if text.ndim != 3 or text.shape[0] != n_want or text.shape[-1] != d or text.shape[1] < 1:
                raise InvalidInputError(f"text_embeds: shape {tuple(text.shape)}; expected ({n_want}, text tokens, {d})")
        elif text_weight != 0:
            raise InvalidInputError(f"text_embeds is None but text_weight={text_weight}; pass text embeddings "
                                    f"or text_weight=0")
        n = image.shape[0] if image is not None else text.shape[0]
        image_tokens = image.shape[1] if image is not None else None
        if not 0.0 <= text_weight <= 1.0:
            raise InvalidInputError(f"text_weight={text_weight}; expected a share in [0, 1]")
        if init_images is not None and not 0.0 < strength <= 1.0:
            raise InvalidInputError(f"strength={strength}; expected 0 < strength <= 1")
        for name, value, tokens in (("uncond_image", uncond_image, image_tokens),
                                    ("uncond_text", uncond_text, None if text is None else text.shape[1])):
            if value is None:
                continue
            shape = tuple(_as_tensor(value, name).shape)
            core = shape[1:] if len(shape) == 3 and shape[0] == 1 else shape
            if len(core) != 2 or core[1] != d or (tokens is not None and core[0] != tokens):
                want = f"({tokens if tokens is not None else 'tokens'}, {d})"
                raise InvalidInputError(f"{name}: shape {shape}; expected {want} like the embeddings it stands in for")
        for name, size in (("height", height), ("width", width)):
            if size <= 0 or size % self.vae_scale_factor:
                raise InvalidInputError(f"{name}={size}; expected a positive multiple of {self.vae_scale_factor}")
        if isinstance(generator, list) and len(generator) != n:
            raise InvalidInputError(f"generator: {len(generator)} generators for {n} images; pass one per image")
        if init_images is not None and len(init_images) != n:
            raise InvalidInputError(f"init_images: {len(init_images)} images for {n} embeddings; pass one per image")
        return image, text

    def set_mix(self, text_weight, text_tokens: int, image_tokens: int) -> None:
        """Route (text, image) conditions of these lengths to their blocks; ``text_weight`` is the text share.

        The blocks order conditions (text, image) and ``mix_ratio`` weights the first. ``text_weight`` may be a float
        or a tensor broadcastable to the hidden states, e.g. (n, 1, 1, 1) for a share per sample in training.
        """
        for block in _dual_blocks(self.image_unet):
            block.condition_lengths = [int(text_tokens), int(image_tokens)]
            block.transformer_index_for_condition = [1, 0]  # text -> text UNet's block, image -> image UNet's block
            block.mix_ratio = text_weight if isinstance(text_weight, torch.Tensor) else float(text_weight)

    def encode_condition(self, image: torch.Tensor | None, text: torch.Tensor | None, uncond_image, uncond_text,
                         do_cfg: bool) -> torch.Tensor:
        """(n, T_text + T_image, D) dual condition, preceded by the unconditional one under classifier-free guidance.

        Unconditional embeddings default to zeros; VD's own are CLIP embeddings of "" and of a mid-grey image, which
        the caller supplies (they need the real CLIP encoders). A missing condition's slot holds its unconditional
        embedding (one zero token when there is none either); ``set_mix`` then weights that slot 0.
        """
        n, d = (image if image is not None else text).shape[0], self.embed_dim
        kw = {"device": self.device, "dtype": self.dtype}

        def uncond(value, tokens):
            if value is None:
                return torch.zeros(n, tokens, d, **kw)
            value = _as_tensor(value, "uncond").to(**kw)
            return value.reshape(1, -1, d).expand(n, -1, d)

        if text is not None:
            text_tokens = text.shape[1]
        else:
            text_tokens = _as_tensor(uncond_text, "uncond_text").reshape(-1, d).shape[0] if uncond_text is not None else 1
        if image is not None:
            image_tokens = image.shape[1]
        else:
            image_tokens = _as_tensor(uncond_image, "uncond_image").reshape(-1, d).shape[0] \
                if uncond_image is not None else 1
        u_text, u_image = uncond(uncond_text, text_tokens), uncond(uncond_image, image_tokens)
        c_text = u_text if text is None else text.to(**kw)  # image-only predictions: ignored at text_weight=0
        c_image = u_image if image is None else image.to(**kw)  # text-only predictions: ignored at text_weight=1
        cond = torch.cat([c_text, c_image], dim=1)
        return torch.cat([torch.cat([u_text, u_image], dim=1), cond]) if do_cfg else cond

    def prepare_timesteps(self, num_inference_steps: int, strength: float, img2img: bool) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        if not img2img:
            return timesteps
        order = getattr(self.scheduler, "order", 1)
        start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0) * order
        if start >= len(timesteps):
            raise InvalidInputError(f"strength={strength} with {num_inference_steps} steps leaves no denoising step")
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return timesteps[start:]

    def prepare_latents(self, n: int, height: int, width: int, generator: Generators, init_images,
                        first_timestep: torch.Tensor) -> torch.Tensor:
        shape = (n, self.image_unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        # noise is drawn on the generators' device (CPU generators -> same pixels on any accelerator)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        if init_images is None:
            return noise * self.scheduler.init_noise_sigma
        pixels = self.preprocess_images(init_images, height, width)
        latents = []
        for i in range(n):
            gen = generator[i] if isinstance(generator, list) else generator
            dist = self.vae.encode(pixels[i:i + 1]).latent_dist
            latents.append(dist.sample(generator=gen))
        init_latents = torch.cat(latents) * self.vae.config.scaling_factor
        return self.scheduler.add_noise(init_latents, noise, first_timestep.repeat(n))

    def preprocess_images(self, images, height: int, width: int) -> torch.Tensor:
        """uint8 (n, h, w, 3) images (array or list) -> float (n, 3, height, width) in [-1, 1]."""
        out = []
        for i, image in enumerate(images):
            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
                raise InvalidInputError(f"init_images[{i}]: {array.dtype} {array.shape}; expected uint8 (h, w, 3)")
            x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            if x.shape[-2:] != (height, width):
                x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
            out.append(x.clamp(-1, 1))
        return torch.cat(out).to(device=self.device, dtype=self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)

    def _step_kwargs(self, generator: Generators) -> dict:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        return {"generator": generator} if "generator" in accepted and isinstance(generator, torch.Generator) else {}

    # ---------------------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, image_embeds, text_embeds, *, num_inference_steps: int = 20, guidance_scale: float = 5.0,
                 text_weight: float = 0.4, uncond_image=None, uncond_text=None, generator: Generators = None,
                 init_images=None, strength: float = 0.85, height: int | None = None, width: int | None = None,
                 output_type: str = "np"):
        """uint8 images (n, H, W, 3) from predicted image (n, T_image, D) and text (n, T_text, D) embeddings.

        ``text_weight`` is the share of the text condition (image share ``1 - text_weight``). ``generator``: one
        ``torch.Generator`` per image for batch-independent determinism. ``init_images`` (uint8, any size): start
        from these, noised to the timestep given by ``strength`` (img2img). ``output_type``: "np" or "latent".
        """
        if output_type not in ("np", "latent"):
            raise InvalidInputError(f"output_type={output_type!r}; expected 'np' or 'latent'")
        height = height or self.image_unet.config.sample_size * self.vae_scale_factor
        width = width or self.image_unet.config.sample_size * self.vae_scale_factor

        # 1. Check inputs
        image, text = self.check_inputs(image_embeds, text_embeds, text_weight, strength, height, width,
                                        uncond_image, uncond_text, init_images, generator)
        n = (image if image is not None else text).shape[0]
        do_cfg = guidance_scale > 1.0

        # 2. Encode the dual condition (with the unconditional one for classifier-free guidance)
        condition = self.encode_condition(image, text, uncond_image, uncond_text, do_cfg)
        text_tokens = text.shape[1] if text is not None else condition.shape[1] - image.shape[1]
        self.set_mix(text_weight, text_tokens, condition.shape[1] - text_tokens)

        # 3. Prepare timesteps and latents (pure noise, or noised VAE latents of init_images)
        timesteps = self.prepare_timesteps(num_inference_steps, strength, init_images is not None)
        latents = self.prepare_latents(n, height, width, generator, init_images, timesteps[:1])
        step_kwargs = self._step_kwargs(generator)

        # 4. Denoising loop with classifier-free guidance
        for t in timesteps:
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.image_unet(model_input, t, encoder_hidden_states=condition, return_dict=False)[0]
            if do_cfg:
                uncond_pred, cond_pred = noise_pred.chunk(2)
                noise_pred = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

        # 5. Decode with the VAE to uint8
        if output_type == "latent":
            return latents
        return self.decode_latents(latents)


# -------------------------------------------------------------------------------------------------- best of N
def best_of_n(candidates, score: Callable[[object], Sequence[float] | np.ndarray]) -> int:
    """Index of the highest-scoring of N candidates; ``score(candidates)`` returns N scores (ties: first)."""
    scores = np.asarray(score(candidates), dtype=np.float64).reshape(-1)
    if len(scores) != len(candidates) or len(scores) == 0:
        raise InvalidInputError(f"score returned {len(scores)} scores for {len(candidates)} candidates")
    if not np.isfinite(scores).all():
        raise InvalidInputError("score returned NaN or inf")
    return int(np.argmax(scores))


def cosine_scorer(embed: Callable[[object], np.ndarray], target) -> Callable[[object], np.ndarray]:
    """Scorer: cosine similarity of ``embed(candidates)`` (N, D) to ``target`` (D,), e.g. the predicted CLS token.

    For a predicted image embedding (T_image, D) pass ``target=pred[0]`` (its CLS token) and a CLIP image embedder that
    returns the matching CLS (pre-projection) embeddings.
    """
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    target = target / max(np.linalg.norm(target), 1e-12)

    def score(candidates) -> np.ndarray:
        emb = np.asarray(embed(candidates), dtype=np.float64)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb @ target

    return score


# -------------------------------------------------------------------------------------------------- loading
def _resolve_root(path_or_id: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    from brainmclip.miniature import is_miniature, model_folder

    if is_miniature(path_or_id):
        return model_folder("vd")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:  # a local path, not a hub id
        raise MissingInputError(f"{path_or_id}: not a folder of Versatile Diffusion components")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id), local_files_only=True, cache_dir=cache_dir,
                                      allow_patterns=[f"{c}/*" for c in VD_COMPONENTS]))
    except Exception as err:  # LocalEntryNotFoundError, HFValidationError, offline errors: never download
        raise MissingInputError(f"{path_or_id}: no local folder and not in the Hugging Face cache "
                                f"({type(err).__name__}); download it first or pass a local path") from None


def generator_folder(path_or_id: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder :func:`load_versatile_diffusion` reads for ``path_or_id`` ('mini', a folder, a cached hub id)."""
    return _resolve_root(path_or_id, cache_dir)


def _check_component(root: Path, name: str, model: bool) -> None:
    folder = root / name
    if not folder.is_dir():
        raise MissingInputError(f"{root}: component folder {name}/ is missing (need {', '.join(VD_COMPONENTS)})")
    config = "config.json" if model else "scheduler_config.json"
    if not (folder / config).is_file():
        raise MissingInputError(f"{folder}: {config} is missing")
    if model and not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir()):
        raise MissingInputError(f"{folder}: no weights (*.safetensors or *.bin) found")


def load_versatile_diffusion(path_or_id: str | os.PathLike = "shi-labs/versatile-diffusion", device="cpu",
                             dtype: torch.dtype = torch.float32,
                             scheduler: SchedulerMixin | None = None,
                             cache_dir: str | os.PathLike | None = None) -> VersatileDiffusionGenerator:
    """VD weights from a local folder or the existing HF cache, component by component (never downloads).

    ``"mini"`` loads mini-VD, the miniature VD shipped with the package, through the same code.

    ``VersatileDiffusionDualGuidedPipeline.from_pretrained`` of a saved folder fails in diffusers, so each of
    ``image_unet``, ``text_unet``, ``vae`` and ``scheduler`` is loaded from its subfolder. The scheduler defaults
    to UniPC built from the folder's scheduler config.
    """
    root = _resolve_root(path_or_id, cache_dir)
    for name in VD_COMPONENTS:
        _check_component(root, name, model=name != "scheduler")
    kw = {"torch_dtype": dtype, "local_files_only": True}
    image_unet = UNet2DConditionModel.from_pretrained(root, subfolder="image_unet", **kw)
    text_unet = UNetFlatConditionModel.from_pretrained(root, subfolder="text_unet", **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
    if scheduler is None:
        scheduler = UniPCMultistepScheduler.from_config(UniPCMultistepScheduler.load_config(root, subfolder="scheduler"))
    generator = VersatileDiffusionGenerator(image_unet, text_unet, vae, scheduler)
    del text_unet  # only its transformer blocks are kept, inside image_unet
    return generator.to(device=device, dtype=dtype)


# -------------------------------------------------------------------------------------------------- tiny model
def tiny_components(embed_dim: int = 32, seed: int = 0) -> dict:
    """Tiny random, unconverted VD components (image_unet, text_unet, vae, scheduler) with VD's structure."""
    torch.manual_seed(seed)
    common = {"sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": (8, 16),
              "layers_per_block": 1, "norm_num_groups": 4, "cross_attention_dim": embed_dim, "attention_head_dim": 4}
    image_unet = UNet2DConditionModel(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **common)
    text_unet = UNetFlatConditionModel(down_block_types=("CrossAttnDownBlockFlat", "DownBlockFlat"),
                                       up_block_types=("UpBlockFlat", "CrossAttnUpBlockFlat"), **common)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    return {"image_unet": image_unet, "text_unet": text_unet, "vae": vae, "scheduler": UniPCMultistepScheduler()}


def tiny_versatile_diffusion(embed_dim: int = 32, seed: int = 0) -> VersatileDiffusionGenerator:
    """Tiny random VD generator (32 px output, ~0.1 s per 2 steps on CPU) for tests and demos."""
    return VersatileDiffusionGenerator(**tiny_components(embed_dim, seed))
