"""BrainCLIP's fMRI-guided generation: Stable Diffusion sampled under the gradient of a CLIP spherical distance.

Classifier guidance (Dhariwal & Nichol 2021) with the classifier replaced by CLIP and the class label by the fMRI
embedding ê (one unit vector in CLIP's projected space per image). At each reverse step t of a sampler on Stable
Diffusion's latent space (x_t holds latents times the VAE's ``scaling_factor``; ᾱ_t is the scheduler's cumulative
product of alphas):

1. the UNet predicts ε (with the empty prompt; or a prompt, with classifier-free guidance when its scale is not 1);
   x̂0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t) (v- and x0-predicting UNets are converted to ε and x̂0 exactly);
2. the image judged is a mix of x̂0 and x_t (BrainCLIP's eq. 10, as in its released sampler and in Crowson's
   CLIP-guided diffusion): x̃ = f·x̂0 + (1 - f)·x_t with f = sqrt(1 - ᾱ_t), so early, noisy steps judge the clean
   estimate and late steps the current state;
3. x̃ is decoded by the VAE, resized to CLIP's input side (bicubic, antialiased, shortest side then centre crop) and
   normalised with CLIP's mean and std in torch, and CLIP embeds it: a = CLIP(x̃) / ||CLIP(x̃)||;
4. loss L = d² / 2 with the spherical (great-circle) distance d = 2·arcsin(||a - ê|| / 2), i.e.
   L = 2·arcsin²(||a - ê|| / 2) (Crowson's constant); g = ∂L/∂x_t by autograd through CLIP, the VAE decoder and
   the UNet;
5. the step is shifted towards lower L with guidance scale s:

   - ``sampler="ddpm"`` (the default; ancestral over the respaced steps, BrainCLIP's eq. 9): the posterior
     q(x_prev | x_t, x̂0) with β = 1 - ᾱ_t/ᾱ_prev has mean μ and variance σ² = β (1 - ᾱ_prev)/(1 - ᾱ_t);
     μ' = μ - s·σ²·g and x_prev = μ' + σ z (no noise at the last step);
   - ``sampler="ddim"`` (η = 0): Dhariwal & Nichol's DDIM form ε' = ε + sqrt(1 - ᾱ_t)·s·g, then
     x̂0' = (x_t - sqrt(1 - ᾱ_t) ε') / sqrt(ᾱ_t) and x_prev = sqrt(ᾱ_prev)·x̂0' + sqrt(1 - ᾱ_prev)·ε'.

Defaults: 50 steps of the ancestral sampler with s = 200. On mini-SD + mini-CLIP (64 px scenes, 50 steps, the same
seeds) the mean CLIP cosine of image and target goes from 0.27 unguided to 0.81 at s = 200-800 with the ancestral
sampler, and from 0.18 to 0.73 with DDIM, whose best scale is 200 (0.70 at 400, 0.65 at 800). The same loss in the
same ε form is used at scale 100 for Stable Diffusion v1 in the diffusers community's CLIP-guided pipeline, so 200
is of the right order there too; tune it for other generators. Image-prior strength 0.7 is the middle of the range
BrainCLIP's released sampler recommends for an init image (skipping 200-500 of 1000 steps); on mini-SD strengths
0.5-0.9 gave the same cosine to within noise.

Sampling starts from Gaussian noise (``init="noise"``), or from the "image prior" (``init="image-prior"``): the
image of a bank whose CLIP embedding (the same CLIP, same preprocessing) is nearest by cosine to ê, encoded by the
VAE (the mean of its latent distribution), and forward-noised to the step at ``strength`` (img2img: the last
round(steps x strength) steps run). The bank is a prepared dataset, of which only the train and val splits' images
are used (never test: the images being reconstructed must not be candidates), or a folder of PNG/JPEG files. Its
embeddings are cached in the output folder, so a resumed run does not compute them again.

The output is a reconstruction folder exactly as ``brainmclip reconstruct`` writes it (one ``nsd<id>.png`` per
prediction, a manifest with settings, identity, per-image records and a complete flag; resume, ``force`` and the
output lock work the same way), so ``brainmclip evaluate`` and ``report`` read it unchanged. Every image has its own
seeded generator (:func:`brainmclip.generation.reconstruct.image_seed`), which draws its start noise and, for the
ancestral sampler, its step noise: the same seed gives the same PNG bytes on the same device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from brainmclip.atomic import (
    atomic_path,
    crash_point,
    locks_output,
)
from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.features.clip_extractor import CLIP_MEAN, CLIP_STD
from brainmclip.generation.reconstruct import (
    check_finite_predictions,
    image_seed,
    load_reconstructions,
    model_file_sha256,
    model_identity,
    open_reconstruction_folder,
    png_name,
)
from brainmclip.generation.stable_diffusion import DEFAULT_SD, stable_diffusion_identity
from brainmclip.models.predictions import load_predictions
from brainmclip.paths import record_path
from brainmclip.types import GeneratedImages

__all__ = ["ClipGuidedOptions", "INITS", "PriorBank", "SAMPLERS", "add_arguments", "clip_image_embeds", "ddim_step",
           "ddpm_mean_variance", "guidance_gradient", "guided_sample", "load_prior_bank", "prior_embeddings",
           "reconstruct_clip_guided", "run", "spherical_distance_loss"]

log = logging.getLogger("brainmclip.clip_guided")

SAMPLERS = ("ddim", "ddpm")
INITS = ("noise", "image-prior")
GENERATOR_KIND = "clip-guided"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_PRIOR_CACHE = "prior_bank"


@dataclass(frozen=True)
class ClipGuidedOptions:
    """Settings of a CLIP-guided reconstruction run (saved in its manifest).

    ``generator``: a Stable Diffusion folder or cached hub id (v1 layout), or 'mini' (the shipped mini-SD).
    ``clip``: the guiding CLIP, which must be the CLIP whose space the predictions are in; None takes the one the
    predictions' manifest names. ``guidance_scale``: s in the guidance step (0 = unguided sampling). ``sampler``:
    'ddpm' (ancestral, mean-shift form) or 'ddim' (η = 0, ε form). ``init``: 'noise' or 'image-prior' (then
    ``prior`` names the bank and ``strength`` the share of the steps that run). ``prompt`` and
    ``text_guidance_scale``: an optional text condition for the UNet with classifier-free guidance (1 = the prompt's
    prediction alone; the default empty prompt is the unconditional model). ``size``: output side in pixels (default:
    the generator's native size, 512 for SD v1.4).
    """

    generator: str = DEFAULT_SD
    clip: str | None = None
    steps: int = 50
    guidance_scale: float = 200.0
    sampler: str = "ddpm"
    init: str = "noise"
    prior: str | None = None
    strength: float = 0.7
    prompt: str = ""
    text_guidance_scale: float = 1.0
    seed: int = 42
    size: int | None = None
    batch_size: int = 4

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise InvalidInputError(f"Unknown sampler={self.sampler!r}; choose from {list(SAMPLERS)}")
        if self.init not in INITS:
            raise InvalidInputError(f"Unknown init={self.init!r}; choose from {list(INITS)}")
        if self.init == "image-prior" and not self.prior:
            raise InvalidInputError("init='image-prior' needs a prior: a prepared dataset folder or a folder of "
                                    "PNG/JPEG images")
        if self.steps < 1 or self.batch_size < 1:
            raise InvalidInputError(f"steps={self.steps}, batch_size={self.batch_size}; expected positive integers")
        if not (np.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise InvalidInputError(f"guidance_scale={self.guidance_scale}; expected a finite number >= 0")
        if not np.isfinite(self.text_guidance_scale):
            raise InvalidInputError(f"text_guidance_scale={self.text_guidance_scale}; expected a finite number")
        if not 0 < self.strength <= 1:
            raise InvalidInputError(f"strength={self.strength}; expected a share in (0, 1]")
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise InvalidInputError(f"size={self.size}; expected a positive multiple of 8 pixels")


# -- the guidance loss ---------------------------------------------------------------------------------------------

def spherical_distance_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d² / 2 per row, d = 2·arcsin(||â - b̂|| / 2) the great-circle distance of the normalised rows."""
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    return 2 * torch.arcsin((a - b).norm(dim=-1) / 2).pow(2)


def clip_image_embeds(towers, images: torch.Tensor) -> torch.Tensor:
    """CLIP's unit image embedding of float images (n, 3, H, W) in [0, 1], differentiable.

    The same preprocessing as the feature extractor, in torch: shortest side to CLIP's input side (bicubic,
    antialiased), centre crop, CLIP's mean and std.
    """
    side = int(towers.vision.config.image_size)
    h, w = images.shape[-2:]
    scale = side / min(h, w)
    new = (max(side, round(h * scale)), max(side, round(w * scale)))
    if new != (h, w):
        images = F.interpolate(images, size=new, mode="bicubic", antialias=True, align_corners=False)
    top, left = (new[0] - side) // 2, (new[1] - side) // 2
    images = images[..., top:top + side, left:left + side]
    mean = images.new_tensor(CLIP_MEAN)[:, None, None]
    std = images.new_tensor(CLIP_STD)[:, None, None]
    dtype = next(towers.vision.parameters()).dtype
    embeds = towers.vision(pixel_values=((images - mean) / std).to(dtype)).image_embeds.float()
    return F.normalize(embeds, dim=-1)


# -- the sampler ---------------------------------------------------------------------------------------------------

class _Schedule:
    """Timesteps and ᾱ of the generator's noise schedule for ``steps`` DDIM-style steps."""

    def __init__(self, scheduler_config, steps: int):
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(scheduler_config)
        ddim.set_timesteps(steps)
        self.timesteps = [int(t) for t in ddim.timesteps]
        self.alphas = ddim.alphas_cumprod.double()
        self.final = float(ddim.final_alpha_cumprod)
        self.prediction_type = ddim.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise InvalidInputError(f"scheduler prediction_type={self.prediction_type!r}; expected 'epsilon', "
                                    "'v_prediction' or 'sample'")

    def alpha(self, t: int) -> float:
        return float(self.alphas[t]) if t >= 0 else self.final

    def previous(self, index: int) -> int:
        return self.timesteps[index + 1] if index + 1 < len(self.timesteps) else -1


def _eps_and_x0(output: torch.Tensor, x: torch.Tensor, a: float, prediction_type: str):
    sa, sb = a ** 0.5, (1 - a) ** 0.5
    if prediction_type == "epsilon":
        return output, (x - sb * output) / sa
    if prediction_type == "v_prediction":
        return sa * output + sb * x, sa * x - sb * output
    return (x - sa * output) / sb, output


def guidance_gradient(x: torch.Tensor, a: float, predict, embed, targets: torch.Tensor,
                      prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """g = ∂L/∂x_t of L = Σ_i spherical_distance_loss(embed(x̃_i), target_i), and the step's ε and x̂0 (detached).

    ``predict(x_t)`` is the UNet's output, ``embed(latents)`` decodes latents and returns their unit CLIP image
    embeddings; x̃ = f·x̂0 + (1 - f)·x_t with f = sqrt(1 - ᾱ_t) (BrainCLIP's eq. 10). The gradient flows through
    the UNet as well (x̂0 depends on x_t through ε).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        eps, x0 = _eps_and_x0(predict(x), x, a, prediction_type)
        f = (1 - a) ** 0.5
        loss = spherical_distance_loss(embed(f * x0 + (1 - f) * x), targets).sum()
        grad = torch.autograd.grad(loss, x)[0]
    return grad.detach(), eps.detach(), x0.detach()


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (times the scaling factor) to float images in [0, 1]."""
    dtype = next(vae.parameters()).dtype
    image = vae.decode((latents / vae.config.scaling_factor).to(dtype)).sample.float()
    return (image / 2 + 0.5).clamp(0, 1)


def _text_conditions(pipe, prompt: str, text_guidance_scale: float, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The UNet's text condition, and the empty prompt's when classifier-free guidance mixes the two."""
    def encode(text: str) -> torch.Tensor:
        tokens = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            return pipe.text_encoder(tokens)[0]

    cond = encode(prompt)
    uses_cfg = bool(prompt) and text_guidance_scale != 1.0
    return cond, encode("") if uses_cfg else None


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a: float, a_prev: float, scale: float = 0.0,
              grad: torch.Tensor | None = None) -> torch.Tensor:
    """x_prev of a DDIM step (η = 0) from ᾱ_t = ``a`` to ᾱ_prev = ``a_prev``, guided in Dhariwal & Nichol's ε form:
    ε' = ε + sqrt(1 - ᾱ_t)·s·g, x̂0' = (x_t - sqrt(1 - ᾱ_t) ε') / sqrt(ᾱ_t), x_prev = sqrt(ᾱ_prev) x̂0' +
    sqrt(1 - ᾱ_prev) ε'."""
    if grad is not None and scale:
        eps = eps + (1 - a) ** 0.5 * scale * grad
    x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def ddpm_mean_variance(x: torch.Tensor, x0: torch.Tensor, a: float, a_prev: float, scale: float = 0.0,
                       grad: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Mean and variance of the ancestral step q(x_prev | x_t, x̂0) from ᾱ_t = ``a`` to ᾱ_prev = ``a_prev``, the mean
    shifted by -s·σ²·g (classifier guidance's mean form)."""
    beta = 1 - a / a_prev
    mean = (a_prev ** 0.5 * beta / (1 - a)) * x0 + ((a / a_prev) ** 0.5 * (1 - a_prev) / (1 - a)) * x
    variance = beta * (1 - a_prev) / (1 - a)
    if grad is not None and scale:
        mean = mean - scale * variance * grad
    return mean, variance


def guided_sample(pipe, towers, targets: torch.Tensor, generators: list[torch.Generator], *, steps: int = 50,
                  guidance_scale: float = 200.0, sampler: str = "ddpm", prompt: str = "",
                  text_guidance_scale: float = 1.0, init_latents: torch.Tensor | None = None, strength: float = 1.0,
                  size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-guided images towards ``targets`` (n, D) in CLIP's projected space; see the module's description.

    ``generators``: one per image (its start noise and step noise). ``init_latents``: (n, C, h, w) latents times the
    VAE's scaling factor to start from, forward-noised to the step at ``strength``; None starts from noise.
    Returns uint8 images (n, size, size, 3) and the CLIP cosine of each final image with its target.
    """
    if sampler not in SAMPLERS:
        raise InvalidInputError(f"Unknown sampler={sampler!r}; choose from {list(SAMPLERS)}")
    unet, vae = pipe.unet, pipe.vae
    device = unet.device
    unet_dtype = unet.dtype
    n = len(targets)
    if len(generators) != n:
        raise InvalidInputError(f"{len(generators)} generators for {n} targets; expected one per image")
    size = size or unet.config.sample_size * pipe.vae_scale_factor
    shape = (unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    targets = F.normalize(torch.as_tensor(targets, dtype=torch.float32, device=device), dim=-1)
    schedule = _Schedule(pipe.scheduler.config, steps)
    cond, uncond = _text_conditions(pipe, prompt, text_guidance_scale, device)

    noise = torch.stack([torch.randn(shape, generator=g, device=device, dtype=torch.float32) for g in generators])
    timesteps = schedule.timesteps
    if init_latents is None:
        x = noise
    else:
        run = min(max(int(round(steps * strength)), 1), steps)
        timesteps = timesteps[steps - run:]
        a = schedule.alpha(timesteps[0])
        x = a ** 0.5 * init_latents.to(device, torch.float32) + (1 - a) ** 0.5 * noise
    first = schedule.timesteps.index(timesteps[0])

    def predict(x_in: torch.Tensor, t: int) -> torch.Tensor:
        step = torch.full((n,), t, device=device, dtype=torch.long)
        out = unet(x_in.to(unet_dtype), step, encoder_hidden_states=cond.expand(n, -1, -1)).sample.float()
        if uncond is not None:
            base = unet(x_in.to(unet_dtype), step, encoder_hidden_states=uncond.expand(n, -1, -1)).sample.float()
            out = base + text_guidance_scale * (out - base)
        return out

    for k, t in enumerate(timesteps):
        index = first + k
        a, a_prev = schedule.alpha(t), schedule.alpha(schedule.previous(index))
        grad = None
        if guidance_scale > 0:
            grad, eps, x0 = guidance_gradient(x, a, lambda z, t=t: predict(z, t),
                                              lambda z: clip_image_embeds(towers, _decode(vae, z)), targets,
                                              schedule.prediction_type)
        else:
            with torch.no_grad():
                eps, x0 = _eps_and_x0(predict(x, t), x, a, schedule.prediction_type)
        if sampler == "ddim":
            x = ddim_step(x, eps, a, a_prev, guidance_scale, grad)
        else:
            mean, variance = ddpm_mean_variance(x, x0, a, a_prev, guidance_scale, grad)
            if k + 1 < len(timesteps):
                z = torch.stack([torch.randn(shape, generator=g, device=device, dtype=torch.float32)
                                 for g in generators])
                mean = mean + variance ** 0.5 * z
            x = mean
    with torch.no_grad():
        images = _decode(vae, x)
        cosine = (clip_image_embeds(towers, images) * targets).sum(-1).cpu().numpy()
    pixels = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return pixels, cosine


# -- the image prior -----------------------------------------------------------------------------------------------

@dataclass
class PriorBank:
    """Candidate start images: a prepared dataset's train and val images, or the PNG/JPEG files of a folder.

    ``keys[i]`` names candidate i in manifests ('nsd<id>' or the file name); ``identity`` is a sha256 of the
    candidates' content.
    """

    source: Path
    kind: str
    keys: list[str]
    identity: str
    _arrays: list | None = None      # prepared: [(images array, row)] per candidate
    _files: list[Path] | None = None  # folder: one file per candidate

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, i: int) -> np.ndarray:
        """Candidate ``i`` as uint8 RGB (H, W, 3)."""
        if self._arrays is not None:
            array, row = self._arrays[i]
            return np.asarray(array[row])
        with Image.open(self._files[i]) as img:
            return np.asarray(img.convert("RGB"))


def load_prior_bank(path) -> PriorBank:
    """The image prior at ``path``: a prepared dataset (train and val images; test is never used) or an image folder."""
    from brainmclip.data.prepared import PREPARED_FORMAT, load_prepared
    from brainmclip.integrity import file_checksum

    root = Path(path)
    if not root.is_dir():
        raise MissingInputError(f"--prior {root}: no such folder (expected a prepared dataset or a folder of "
                                "PNG/JPEG images)")
    manifest_file = root / "manifest.json"
    if manifest_file.is_file():
        try:
            fmt = json.loads(manifest_file.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        if fmt != PREPARED_FORMAT:
            raise InvalidInputError(f"--prior {root}: its manifest.json is not a prepared dataset's ({fmt!r}); "
                                    "expected a prepared dataset or a folder of PNG/JPEG images")
        prepared = load_prepared(root)
        sums = prepared.manifest.get("checksums") or {}
        keys, arrays, digest = [], [], hashlib.sha256()
        for split in ("train", "val"):
            samples = prepared.splits[split]
            if len(samples) and samples.images is None:
                raise InvalidInputError(f"--prior {root}: prepared without images; the image prior needs them")
            if not len(samples):
                continue
            for name in (f"{split}/images.npy", f"{split}/stimulus_ids.npy"):
                entry = sums.get(name) or file_checksum(root / name)
                digest.update(f"{name}\0{json.dumps(entry, sort_keys=True)}\n".encode())
            keys += [f"nsd{int(i):05d}" for i in samples.stimulus_ids]
            arrays += [(samples.images, r) for r in range(len(samples))]
        if not keys:
            raise InvalidInputError(f"--prior {root}: train and val splits are empty; the image prior needs images")
        return PriorBank(root, "prepared", keys, digest.hexdigest(), _arrays=arrays)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise MissingInputError(f"--prior {root}: no PNG or JPEG files (and no prepared dataset manifest)")
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}\0{model_file_sha256(p)}\n".encode())
    return PriorBank(root, "folder", [p.name for p in files], digest.hexdigest(), _files=files)


@torch.no_grad()
def _embed_bank(bank: PriorBank, towers, batch_size: int, progress: bool) -> np.ndarray:
    device = next(towers.vision.parameters()).device
    out = np.empty((len(bank), towers.embed_dim), np.float32)
    bar = tqdm(total=len(bank), desc="image prior embeddings", unit="img", disable=not progress)
    for start in range(0, len(bank), batch_size):
        rows = range(start, min(start + batch_size, len(bank)))
        images = [torch.from_numpy(bank.image(i).copy()).permute(2, 0, 1).float()[None] / 255 for i in rows]
        if len({im.shape for im in images}) == 1:
            embeds = clip_image_embeds(towers, torch.cat(images).to(device))
        else:
            embeds = torch.cat([clip_image_embeds(towers, im.to(device)) for im in images])
        out[start:start + len(rows)] = embeds.cpu().numpy()
        bar.update(len(rows))
    bar.close()
    return out


def prior_embeddings(bank: PriorBank, towers, clip_identity: str, cache_dir: Path | None = None,
                     batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Unit CLIP embeddings of the bank (n_bank, D), cached in ``cache_dir`` under the bank's and CLIP's identity."""
    key = hashlib.sha256(f"{bank.identity}\0{clip_identity}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{_PRIOR_CACHE}-{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                keys, embeds = cached["keys"].tolist(), cached["embeds"]
            if keys == bank.keys and embeds.shape == (len(bank), towers.embed_dim):
                return embeds
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is computed again
        log.info("%s: stale image prior cache, computing it again", path)
    embeds = _embed_bank(bank, towers, batch_size, progress)
    if path is not None:
        for old in path.parent.glob(f"{_PRIOR_CACHE}-*.npz"):  # caches of other banks or CLIPs (ours only)
            old.unlink(missing_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, keys=np.array(bank.keys), embeds=embeds)
    return embeds


def _prior_latents(vae, images: list[np.ndarray], size: int, device) -> torch.Tensor:
    """Bank images at ``size`` (shortest side, bicubic antialiased, centre crop), VAE latent means times the scale."""
    from torchvision.transforms.v2 import functional as TF

    batch = []
    for image in images:
        x = torch.from_numpy(np.ascontiguousarray(image).copy()).permute(2, 0, 1)
        x = TF.center_crop(TF.resize(x, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True),
                           [size, size])
        batch.append(x.float() / 127.5 - 1)
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        latents = vae.encode(torch.stack(batch).to(device, dtype)).latent_dist.mean.float()
    return latents * vae.config.scaling_factor


# -- the reconstruction folder -------------------------------------------------------------------------------------

def _clip_name(pred, options: ClipGuidedOptions, pred_dir: Path) -> str:
    name = options.clip or pred.manifest.get("clip")
    if not name:
        raise InvalidInputError(f"{pred_dir}: the predictions do not name their CLIP; pass --clip (the CLIP whose "
                                "space the predictions are in)")
    return str(name)


def _used_arrays(pred) -> list[str]:
    """The prediction arrays the fMRI embedding comes from (as in ``pooled_prediction``)."""
    return ["stimulus_ids", "image_semantic" if pred.image_semantic is not None else "image"]


def clip_guided_identity(pred, pred_dir: Path, options: ClipGuidedOptions, clip: str, bank: PriorBank | None,
                         device: str, dtype) -> dict:
    """Everything that decides the pixels of a CLIP-guided reconstruction folder, as comparable JSON."""
    pixel_options = {k: v for k, v in asdict(options).items() if k not in ("batch_size", "generator", "clip", "prior")}
    if options.init == "noise":
        pixel_options.pop("strength")
    return {
        "kind": GENERATOR_KIND,
        "predictions": {name: model_file_sha256(pred_dir / f"{name}.npy") for name in _used_arrays(pred)},
        "generator": stable_diffusion_identity(options.generator),
        "clip": model_identity(clip, "clip"),
        "options": pixel_options,
        "prior_bank": bank.identity if bank is not None else None,
        "number_format": {"device": device, "dtype": str(dtype)},
    }


@locks_output()
def reconstruct_clip_guided(pred_dir, out, options: ClipGuidedOptions | None = None, force: bool = False,
                            progress: bool = True) -> GeneratedImages:
    """CLIP-guided Stable Diffusion images of every prediction in ``pred_dir``, written as a reconstruction folder.

    A folder made with the same identity is resumed (only missing PNGs are made); one made with another is refused
    unless ``force``, which first removes the PNGs its manifest lists.
    """
    from brainmclip.features.pooled import pooled_prediction

    start = time.perf_counter()
    options = options or ClipGuidedOptions()
    pred_dir, out = Path(pred_dir), Path(out)
    pred = load_predictions(pred_dir)
    if pred.image is None:
        raise InvalidInputError(f"{pred_dir}: the predictions hold no image embedding; CLIP guidance needs one")
    ids = np.asarray(pred.stimulus_ids)
    if len(np.unique(ids)) != len(ids):
        raise InvalidInputError(f"{pred_dir}/stimulus_ids.npy: repeated NSD ids; expected one prediction per image "
                                "(their PNGs would overwrite each other)")
    if len(ids) and ids.min() < 0:
        raise InvalidInputError(f"{pred_dir}/stimulus_ids.npy: NSD id {int(ids.min())}; expected ids >= 0")
    check_finite_predictions(pred, pred_dir)
    clip = _clip_name(pred, options, pred_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # bf16 on GPU only: bf16 matmuls are very slow on most CPUs.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bank = load_prior_bank(options.prior) if options.init == "image-prior" else None
    settings = {"options": asdict(options), "predictions": record_path(pred_dir, out),
                "predictions_manifest": pred.manifest.get("run"), "method": pred.method, "subject": pred.subject,
                "generator": GENERATOR_KIND, "clip": clip,
                "sampler": {"name": options.sampler, "steps": options.steps, "guidance_scale": options.guidance_scale,
                            "loss": "2*arcsin(||a-e||/2)^2 (d^2/2, spherical distance)",
                            "judged": "sqrt(1-abar_t)*x0_hat + (1-sqrt(1-abar_t))*x_t"}}
    identity = clip_guided_identity(pred, pred_dir, options, clip, bank, device, dtype)
    folder = open_reconstruction_folder(out, ids, settings, identity, {"generator": options.generator, "clip": clip,
                                                                       "kind": GENERATOR_KIND},
                                        options.batch_size, force)
    if folder.up_to_date():
        log.info("%s: all %d images already made with these inputs and settings", out, len(ids))
        return load_reconstructions(out)
    size = options.size or (folder.previous or {}).get("size")
    if folder.chunks:
        targets = pooled_prediction(pred)
        bad = ~np.isfinite(targets).all(1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InvalidInputError(f"{pred_dir}: the fMRI embedding of row {row} (NSD id {int(ids[row])}) holds NaN "
                                    "or inf; expected finite embeddings")
        size = _generate(targets, ids, out, options, clip, bank, folder.chunks, folder.done, folder.records, device,
                         dtype, folder.write_manifest, progress)
    folder.write_manifest(True, size, n_images=len(ids), seconds=round(time.perf_counter() - start, 2),
                          new_images=folder.n_new)
    log.info("CLIP-guided reconstructions of %d images (%d new) in %s", len(ids), folder.n_new, out)
    return load_reconstructions(out)


def _generate(targets: np.ndarray, ids: np.ndarray, out: Path, options: ClipGuidedOptions, clip: str,
              bank: PriorBank | None, chunks: list[list[int]], done: set[int], records: dict, device, dtype,
              write_manifest, progress: bool) -> int:
    from brainmclip.features.clip_models import load_clip
    from brainmclip.generation.stable_diffusion import load_stable_diffusion

    towers = load_clip(clip, device=device)
    if targets.shape[1] != towers.embed_dim:
        raise InvalidInputError(f"predictions of width {targets.shape[1]}, but CLIP {clip!r} embeds in "
                                f"{towers.embed_dim} dims; pass the CLIP whose space the predictions are in")
    pipe = load_stable_diffusion(options.generator, device=device, dtype=dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, towers.vision, towers.text):
        module.requires_grad_(False)
    size = options.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if size % pipe.vae_scale_factor:
        raise InvalidInputError(f"size={size}; expected a multiple of the VAE's factor {pipe.vae_scale_factor}")
    nearest = cosines = None
    if bank is not None:
        bank_embeds = prior_embeddings(bank, towers, identity_of_clip(clip), out, progress=progress)
        similarity = targets @ bank_embeds.T
        nearest, cosines = similarity.argmax(1), similarity.max(1)
    write_manifest(False, size)

    bar = tqdm(total=len(ids), initial=len(done), desc="clip-guided", unit="img", disable=not progress)
    for rows in chunks:
        # The whole batch is made again even when part of it was written before an interruption: batched arithmetic
        # rounds by batch composition, and this keeps every image as an uninterrupted run makes it.
        gens = [torch.Generator(device).manual_seed(image_seed(options.seed, ids[r], 0)) for r in rows]
        init = None
        if bank is not None:
            init = _prior_latents(pipe.vae, [bank.image(int(nearest[r])) for r in rows], size, device)
        images, final = guided_sample(
            pipe, towers, torch.from_numpy(targets[rows]), gens, steps=options.steps,
            guidance_scale=options.guidance_scale, sampler=options.sampler, prompt=options.prompt,
            text_guidance_scale=options.text_guidance_scale, init_latents=init, strength=options.strength, size=size)
        missing = [j for j, r in enumerate(rows) if int(ids[r]) not in done]
        for j in missing:
            r = rows[j]
            record = {"sample": 0, "seed": image_seed(options.seed, ids[r], 0), "batch_size": options.batch_size,
                      "clip_cosine": round(float(final[j]), 6)}
            if bank is not None:
                record.update(prior=bank.keys[int(nearest[r])], prior_cosine=round(float(cosines[r]), 6))
            records[str(int(ids[r]))] = record
        write_manifest(False, size)  # records first: a record without its PNG is dropped when resuming
        for j in missing:
            with atomic_path(out / png_name(ids[rows[j]])) as tmp:
                Image.fromarray(images[j]).save(tmp, format="PNG")
            crash_point("clip-guided-image")
            done.add(int(ids[rows[j]]))
            bar.update(1)
    bar.close()
    return size


def identity_of_clip(name: str) -> str:
    """What identifies the guiding CLIP (its files' content, or a random model's name)."""
    return model_identity(name, "clip")


# -- command line --------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ClipGuidedOptions()
    parser.add_argument("--pred", required=True, type=Path, help="prediction folder (brainmclip predict)")
    parser.add_argument("--out", required=True, type=Path, help="reconstruction folder")
    parser.add_argument("--generator", default=defaults.generator,
                        help="Stable Diffusion folder or cached hub id (never downloaded); 'mini' for the shipped "
                             f"mini-SD (default {defaults.generator})")
    parser.add_argument("--clip", default=None,
                        help="guiding CLIP: the one whose space the predictions are in (default: the one their "
                             "manifest names)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"sampler steps (default {defaults.steps})")
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale,
                        help=f"CLIP guidance scale s (0: unguided; default {defaults.guidance_scale:g})")
    parser.add_argument("--sampler", choices=SAMPLERS, default=defaults.sampler,
                        help="ddpm (ancestral, guidance shifts the mean; default) or ddim (eta 0, guidance shifts the "
                             "noise prediction)")
    parser.add_argument("--init", choices=INITS, default=defaults.init,
                        help="start from Gaussian noise or from the nearest image of --prior, noised to --strength")
    parser.add_argument("--prior", type=Path, default=None,
                        help="image prior: a prepared dataset (its train and val images) or a folder of PNG/JPEG")
    parser.add_argument("--strength", type=float, default=defaults.strength,
                        help=f"share of the steps run from the image prior (default {defaults.strength:g})")
    parser.add_argument("--prompt", default=defaults.prompt, help="optional text condition for the UNet")
    parser.add_argument("--text-guidance-scale", type=float, default=defaults.text_guidance_scale,
                        help="classifier-free guidance scale of --prompt (1: none)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--size", type=int, default=None, help="output side in pixels (default: the generator's)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="images per batch; the same size gives the same PNGs")
    parser.add_argument("--force", action="store_true",
                        help="delete the PNGs this folder's manifest lists and make every image again")


def run(args) -> int:
    options = ClipGuidedOptions(generator=args.generator, clip=args.clip, steps=args.steps,
                                guidance_scale=args.guidance_scale, sampler=args.sampler, init=args.init,
                                prior=str(args.prior) if args.prior else None, strength=args.strength,
                                prompt=args.prompt, text_guidance_scale=args.text_guidance_scale, seed=args.seed,
                                size=args.size, batch_size=args.batch_size)
    result = reconstruct_clip_guided(args.pred, args.out, options, force=args.force,
                                     progress=not getattr(args, "quiet", False))
    settings = result.manifest["settings"]
    print(f"{len(result)} CLIP-guided reconstructions of {settings['method']} predictions (subject "
          f"{settings['subject']}) at {result.root}, {result.manifest['size']} px, "
          f"{result.manifest.get('seconds', 0):.1f} s")
    return 0
