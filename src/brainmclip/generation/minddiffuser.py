"""MindDiffuser's two-stage reconstruction with Stable Diffusion, and its Stage 2 as a plug-in over any method.

Inputs are the decoded targets of a MindDiffuser run (``brainmclip predict`` on it): c (``sd_text``, SD's text
conditioning), z (``sd_latent``, the VAE latent times its ``scaling_factor``) and the structural features f̂_l
(``struct_NN``, outputs of linear layers of a CLIP vision tower), plus the run's feature-selection masks M_l
(``structural_masks.npz``, Algorithm 1). The target store behind the run names the Stable Diffusion that made c
and z and the structural CLIP, its layers and layer convention; both are loaded from there unless given.

Stage 1 (semantics, what the paper calls a 37-step forward diffusion and a 35-step reverse denoising). The
published code builds a 50-step DDIM schedule with η = 0 on the LDM sampler, whose step i (0 = least noisy) sits at
training timestep τ_i = ``timesteps[i]`` (i·20 + 1 for SD v1, i.e. diffusers' DDIM timesteps with
``steps_offset`` 1) and whose final ᾱ is ᾱ at timestep 0. It then calls ``stochastic_encode(z, 37)``:
x = sqrt(ᾱ_{τ_37}) z + sqrt(1 - ᾱ_{τ_37}) ε (τ_37 = 741), and ``decode(x, c, 35)``: 35 DDIM steps at τ_34, τ_33,
..., τ_0 (681 down to 1), i.e. the reverse starts two schedule steps below the noise level it was given (the
sampler treats the latent noised to t = 741 as if it were at t = 681). Here ``strength`` sets the noise step
k = round(strength · steps) (0.74 → 37) and ``reverse_strength`` the number of reverse steps
r = round(reverse_strength · steps), run at τ_{r-1} ... τ_0 exactly as the published sampler does; by default r
keeps the published gap below k (two steps of 50, i.e. r = k - round(0.04 · steps): 35 for k = 37) at any strength;
``reverse_strength = strength`` gives LDM's own img2img (``scripts/img2img.py``: noise to step k, decode k steps).
k = ``steps`` (strength 1) starts from pure noise (the start of text-to-image sampling). Each reverse step uses
classifier-free guidance with scale s (5): ε = ε(x, ∅) + s (ε(x, c) - ε(x, ∅)), ∅ = the UNet condition of the
empty prompt (LDM's ``get_learned_conditioning([""])``); v- and x0-predicting UNets are converted to ε and x̂0
exactly, and x̂0 is not clipped (LDM's sampler does not clip; SD v1.4's scheduler configuration says
``clip_sample: false``). The VAE
decodes x / scaling_factor and the image is clamp((x + 1) / 2, 0, 1).

Stage 2 (structure). Adam (lr 0.01, torch defaults otherwise) on z and c for 60 steps, minimising per image
L = Σ_l ||M_l ⊙ (f_l(x(z, c)) − f̂_l)||² (the paper's equation: squared error summed over the kept dimensions,
layers weighted equally). "Regenerating the image each step" is what the published code does literally: every
iteration noises the current z afresh (a new ε from the random stream) to step k, runs the whole r-step guided
reverse, decodes, measures f_l and backpropagates through all of it, CLIP, VAE decoder and every UNet call. The same
is done here; memory stays bounded by recomputing each reverse step in the backward pass (activation
checkpointing per step), so only the r + 1 latents of the trajectory are kept. ``noise="fixed"`` instead reuses
the first ε in every iteration (a deterministic objective). The output image is the one regenerated from the final
(z, c) with the next ε; with ``stage2_steps=0`` that is the Stage 1 image. Each image draws its ε from its own
seeded generator (:func:`brainmclip.generation.reconstruct.image_seed`), so a seed fixes the pixels.

The generated image is measured exactly as :class:`~brainmclip.features.minddiffuser_targets.StructuralFeatures`
measured the stimuli for the targets (shortest side to the tower's input size, bicubic with antialiasing, centre
crop, CLIP's mean and std, then the same hooked linear layers), in float32 and on the unquantised float image.

Differences from the published code, which this module does not follow: it optimises z only (the paper says z and
c; ``optimize`` chooses), runs 300 iterations with an exponential lr decay (γ = 0.999) and weighs layers by the
inverse norm of their target (times 1.5, 1.2, 1, 1, 1, 1) on a mean rather than summed squared error, plus a cosine
term on the final CLIP embedding; its CLIP input is squashed to 224 px with ImageNet statistics.

``refine`` is the plug-in ("+MindDiffuser", the paper's Table 4): another method's reconstruction PNGs are
VAE-encoded (resized as the z targets were, posterior mean times the scaling factor) and used as the start z, c and
the structural targets come from the MindDiffuser predictions of the same images, and Stage 2 runs as above.

Both write the shared reconstruction folder (``nsd<id>.png`` per image, a manifest with settings, identity,
per-image records and a complete flag; resume, ``force`` and the output lock as in
:mod:`brainmclip.generation.reconstruct`), so ``brainmclip evaluate --recon`` and ``report`` read them unchanged.
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
from PIL import Image
from torch.utils.checkpoint import checkpoint
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from brainmclip.atomic import atomic_path, crash_point, locks_output, read_manifest
from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.features.clip_extractor import CLIP_MEAN, CLIP_STD
from brainmclip.generation.reconstruct import (
    RECON_FORMAT,
    image_seed,
    load_reconstructions,
    model_file_sha256,
    model_identity,
    open_reconstruction_folder,
    png_name,
)
from brainmclip.generation.stable_diffusion import stable_diffusion_identity
from brainmclip.models.predictions import load_predictions, prediction_run
from brainmclip.paths import record_path, resolve_path
from brainmclip.types import GeneratedImages

__all__ = ["MindDiffuserOptions", "NOISE_MODES", "PARAMETERS", "DdimSchedule", "add_arguments",
           "add_refine_arguments", "minddiffuser_reconstruct", "refine", "run", "run_refine", "stage1_sample",
           "stage2_optimise", "structural_loss", "structural_pixels"]

log = logging.getLogger("brainmclip.minddiffuser")

NOISE_MODES = ("fresh", "fixed")
PARAMETERS = ("z", "c")
MASKS_FILE = "structural_masks.npz"


@dataclass(frozen=True)
class MindDiffuserOptions:
    """Settings of a MindDiffuser reconstruction or refinement (saved in its manifest).

    ``generator``: the Stable Diffusion (folder, cached hub id, 'mini'); None takes the one the run's target store
    names (it must be the SD whose VAE and text encoder made z and c). ``structural_clip``: likewise for the CLIP
    of the structural features. ``steps``: DDIM schedule length. ``strength``: noise step k = round(strength·steps)
    that z is diffused to. ``reverse_strength``: number of reverse steps r = round(reverse_strength·steps), run from
    schedule step r-1 down (None: the published gap, r = k - round(0.04·steps), at least 1; r never exceeds k).
    ``guidance_scale``: classifier-free guidance of c against the empty
    prompt. ``stage2_steps``: Adam iterations (0 = Stage 1 only), ``lr`` its learning rate, ``optimize`` which of
    z and c it updates, ``noise``: 'fresh' (a new ε every iteration, as published) or 'fixed'. ``size``: output
    side in pixels (default: the generator's native size). ``limit``: make only the first ``limit`` predicted images
    (in the predictions' order), for a costly run on part of the test set; raising it later adds the next images.
    """

    generator: str | None = None
    structural_clip: str | None = None
    steps: int = 50
    strength: float = 0.74
    reverse_strength: float | None = None
    guidance_scale: float = 5.0
    stage2_steps: int = 60
    lr: float = 0.01
    optimize: tuple[str, ...] = PARAMETERS
    noise: str = "fresh"
    seed: int = 42
    size: int | None = None
    batch_size: int = 1
    limit: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "optimize", tuple(self.optimize))
        if self.steps < 1 or self.batch_size < 1 or self.stage2_steps < 0:
            raise InvalidInputError(f"steps={self.steps}, batch_size={self.batch_size}, stage2_steps="
                                    f"{self.stage2_steps}; expected positive steps and batch size, stage2_steps >= 0")
        if not 0 < self.strength <= 1:
            raise InvalidInputError(f"strength={self.strength}; expected a share of the steps in (0, 1]")
        if self.reverse_strength is not None and not 0 < self.reverse_strength <= 1:
            raise InvalidInputError(f"reverse_strength={self.reverse_strength}; expected a share in (0, 1] or None")
        if self.noise_step < 1 or self.reverse_steps < 1:
            raise InvalidInputError(f"strength {self.strength} / reverse_strength {self.reverse_strength} of "
                                    f"{self.steps} steps rounds to no step; raise them or the steps")
        if self.reverse_steps > self.noise_step:
            raise InvalidInputError(f"reverse_strength {self.reverse_strength} gives {self.reverse_steps} reverse steps "
                                    f"from z noised to step {self.noise_step} (strength {self.strength}); expected at "
                                    "most as many reverse steps as noise steps (reverse_strength <= strength)")
        if self.limit is not None and self.limit < 1:
            raise InvalidInputError(f"limit={self.limit}; expected a positive number of images or None (all)")
        if not np.isfinite(self.guidance_scale):
            raise InvalidInputError(f"guidance_scale={self.guidance_scale}; expected a finite number")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise InvalidInputError(f"lr={self.lr}; expected a positive learning rate")
        if not self.optimize or set(self.optimize) - set(PARAMETERS) or len(set(self.optimize)) != len(self.optimize):
            raise InvalidInputError(f"optimize={list(self.optimize)}; expected one or both of {list(PARAMETERS)}")
        if self.noise not in NOISE_MODES:
            raise InvalidInputError(f"Unknown noise={self.noise!r}; choose from {list(NOISE_MODES)}")
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise InvalidInputError(f"size={self.size}; expected a positive multiple of 8 pixels")

    @property
    def noise_step(self) -> int:
        """k: the schedule step z is diffused to (``steps`` = pure noise)."""
        return int(round(self.strength * self.steps))

    @property
    def reverse_steps(self) -> int:
        """r: reverse steps, run at schedule steps r-1, ..., 0."""
        if self.reverse_strength is None:
            return max(1, self.noise_step - int(round(0.04 * self.steps)))
        return int(round(self.reverse_strength * self.steps))


# -- Stage 1: the sampler ------------------------------------------------------------------------------------------

class DdimSchedule:
    """A ``steps``-step DDIM schedule in the LDM sampler's indexing: step i = 0 is the least noisy.

    ``timesteps[i]`` is the training timestep of step i (diffusers' DDIM timesteps in ascending order, so SD v1's
    ``steps_offset`` 1 gives 1, 21, ..., 981 for 50 steps as LDM does); ᾱ before step 0 is the scheduler's final
    ᾱ (ᾱ at timestep 0 unless ``set_alpha_to_one``).
    """

    def __init__(self, scheduler_config, steps: int):
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(scheduler_config)
        ddim.set_timesteps(steps)
        self.steps = steps
        self.timesteps = [int(t) for t in ddim.timesteps][::-1]
        self.alphas_cumprod = ddim.alphas_cumprod.double()
        self.final = float(ddim.final_alpha_cumprod)
        self.prediction_type = ddim.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise InvalidInputError(f"scheduler prediction_type={self.prediction_type!r}; expected 'epsilon', "
                                    "'v_prediction' or 'sample'")

    def alpha(self, i: int) -> float:
        """ᾱ of step i (i = -1: the final ᾱ the last step lands on; i = steps: pure noise, ᾱ = 0)."""
        if i < 0:
            return self.final
        if i >= self.steps:
            return 0.0
        return float(self.alphas_cumprod[self.timesteps[i]])


def _eps_and_x0(output: torch.Tensor, x: torch.Tensor, a: float, prediction_type: str):
    sa, sb = a ** 0.5, (1 - a) ** 0.5
    if prediction_type == "epsilon":
        return output, (x - sb * output) / sa
    if prediction_type == "v_prediction":
        return sa * output + sb * x, sa * x - sb * output
    return (x - sa * output) / sb, output


def _ddim_step(unet, x: torch.Tensor, c: torch.Tensor, uc: torch.Tensor | None, t: int, a: float, a_prev: float,
               guidance_scale: float, prediction_type: str) -> torch.Tensor:
    """One guided DDIM step (η = 0) from ᾱ = ``a`` at timestep ``t`` to ᾱ = ``a_prev``."""
    n = len(x)
    dtype = unet.dtype
    if uc is None:  # guidance 1: the conditional prediction alone
        out = unet(x.to(dtype), torch.full((n,), t, device=x.device), encoder_hidden_states=c.to(dtype)).sample.float()
    else:
        both = unet(torch.cat([x, x]).to(dtype), torch.full((2 * n,), t, device=x.device),
                    encoder_hidden_states=torch.cat([uc.expand(n, -1, -1), c]).to(dtype)).sample.float()
        base, cond = both.chunk(2)
        out = base + guidance_scale * (cond - base)
    eps, x0 = _eps_and_x0(out, x, a, prediction_type)
    return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def stage1_sample(unet, schedule: DdimSchedule, z: torch.Tensor, c: torch.Tensor, uc: torch.Tensor | None,
                  noise: torch.Tensor, noise_step: int, reverse_steps: int, guidance_scale: float,
                  checkpointed: bool = False) -> torch.Tensor:
    """Latents after diffusing ``z`` to schedule step ``noise_step`` with ``noise`` and ``reverse_steps`` guided DDIM
    steps at steps reverse_steps-1, ..., 0 with condition ``c`` (see the module's description).

    ``uc`` is the unconditional condition (ignored when ``guidance_scale`` is 1). Differentiable in z and c; with
    ``checkpointed`` each step's activations are recomputed in the backward pass instead of kept.
    """
    if not 1 <= reverse_steps <= schedule.steps or not 1 <= noise_step <= schedule.steps:
        raise InvalidInputError(f"noise step {noise_step}, reverse steps {reverse_steps}; expected both in "
                                f"1..{schedule.steps}")
    a = schedule.alpha(noise_step)
    x = a ** 0.5 * z + (1 - a) ** 0.5 * noise if a > 0 else noise
    uc = None if guidance_scale == 1 else uc
    if guidance_scale != 1 and uc is None:
        raise InvalidInputError("classifier-free guidance needs the unconditional condition uc")
    for i in range(reverse_steps - 1, -1, -1):
        args = (unet, x, c, uc, schedule.timesteps[i], schedule.alpha(i), schedule.alpha(i - 1), guidance_scale,
                schedule.prediction_type)
        if checkpointed and torch.is_grad_enabled():
            x = checkpoint(_ddim_step, *args, use_reentrant=False)
        else:
            x = _ddim_step(*args)
    return x


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (times the scaling factor) to float images (n, 3, H, W) in [0, 1]."""
    dtype = next(vae.parameters()).dtype
    image = vae.decode((latents / vae.config.scaling_factor).to(dtype)).sample.float()
    return ((image + 1) / 2).clamp(0, 1)


# -- Stage 2: the structural loss and its optimisation ---------------------------------------------------------------

def structural_pixels(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Float images (n, 3, H, W) in [0, 1] -> the vision tower's normalised input, differentiably, with the same
    operations CLIP's preprocessing applies to uint8 stimuli (shortest side to ``image_size``, bicubic with
    antialiasing, centre crop, CLIP's mean and std)."""
    x = TF.resize(images, image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [image_size, image_size])
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


def structural_loss(features: dict[int, torch.Tensor], targets: dict[int, torch.Tensor],
                    masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """Σ_l ||M_l ⊙ (f_l − f̂_l)||² per image, (n,) float32: ``features`` and ``targets`` (n, tokens, width) per
    layer, ``masks`` (tokens, width) bool or 0/1 per layer."""
    total = None
    for layer, target in targets.items():
        diff = (features[layer].float() - target.float()) * masks[layer].to(torch.float32)
        term = diff.pow(2).flatten(1).sum(1)
        total = term if total is None else total + term
    return total


class _Measure:
    """Images -> structural features of the run's layers, as the targets were measured (float32)."""

    def __init__(self, structural, targets: dict[int, torch.Tensor], masks: dict[int, torch.Tensor]):
        self.structural = structural
        self.targets = targets
        self.masks = masks

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.structural.vision.parameters()).device
        feats = self.structural.from_pixels(structural_pixels(images.float(), self.structural.image_size).to(device))
        return structural_loss(feats, self.targets, self.masks)


def stage2_optimise(unet, vae, schedule: DdimSchedule, measure, z: torch.Tensor, c: torch.Tensor,
                    uc: torch.Tensor | None, generators: list[torch.Generator], options: MindDiffuserOptions,
                    on_step=None) -> tuple[torch.Tensor, np.ndarray]:
    """Stage 2 for a batch: Adam on z and/or c, then the image regenerated from the result.

    ``measure(images) -> (n,)`` is the structural loss of decoded images (differentiable). ``generators``: one per
    image, drawing ε for each regeneration. Returns float images (n, 3, H, W) in [0, 1] and the loss per image
    and iteration, shape (n, stage2_steps + 1): the images optimised at each iteration, then the returned image.
    """
    device = z.device
    shape = z.shape[1:]

    def draw() -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g, device=device, dtype=torch.float32) for g in generators])

    z = z.detach().float().clone()
    c = c.detach().float().clone()
    params = {"z": z, "c": c}
    for name in options.optimize:
        params[name].requires_grad_(True)
    optimizer = torch.optim.Adam([params[name] for name in options.optimize], lr=options.lr)
    fixed = draw() if options.noise == "fixed" else None
    losses = []

    def generate(noise):
        latents = stage1_sample(unet, schedule, z, c, uc, noise, options.noise_step, options.reverse_steps,
                                options.guidance_scale, checkpointed=True)
        return _decode(vae, latents)

    for it in range(options.stage2_steps):
        noise = fixed if fixed is not None else draw()
        with torch.enable_grad():
            loss = measure(generate(noise))
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
        optimizer.step()
        losses.append(loss.detach().cpu().numpy())
        if on_step is not None:
            on_step(it)
    with torch.no_grad():
        images = generate(fixed if fixed is not None else draw())
        losses.append(measure(images).cpu().numpy())
    return images, np.stack(losses, 1).astype(np.float64)


# -- inputs ---------------------------------------------------------------------------------------------------------

@dataclass
class _Inputs:
    """What both commands read from a MindDiffuser prediction folder."""

    pred: object
    pred_dir: Path
    ids: np.ndarray
    layers: list[int]
    store_settings: dict
    masks: dict[str, np.ndarray] | None
    masks_file: Path | None
    generator: str
    structural_clip: str
    convention: str


def _check_ids(ids: np.ndarray, where: Path) -> None:
    if len(np.unique(ids)) != len(ids):
        raise InvalidInputError(f"{where}/stimulus_ids.npy: repeated NSD ids; expected one prediction per image "
                                "(their PNGs would overwrite each other)")
    if len(ids) and ids.min() < 0:
        raise InvalidInputError(f"{where}/stimulus_ids.npy: NSD id {int(ids.min())}; expected ids >= 0")


def _read_inputs(pred_dir: Path, options: MindDiffuserOptions, need_latent: bool) -> _Inputs:
    pred = load_predictions(pred_dir)
    ids = np.asarray(pred.stimulus_ids)
    _check_ids(ids, pred_dir)
    ids = ids[:options.limit]
    layers = sorted(int(name[len("struct_"):]) for name in pred.targets if name.startswith("struct_"))
    needed = ["sd_text", "sd_latent"] if need_latent else ["sd_text"]
    missing = [name for name in needed if name not in pred.targets] + ([] if layers else ["struct_NN"])
    if missing:
        raise InvalidInputError(f"{pred_dir}: the predictions hold no MindDiffuser target {', '.join(missing)} (it "
                                f"holds {sorted(pred.targets) or 'none'}); predict from a MindDiffuser run")
    for name in needed + [f"struct_{k:02d}" for k in layers]:
        value = pred.targets[name]
        for start in range(0, len(value), 256):
            block = np.asarray(value[start:start + 256]).reshape(min(256, len(value) - start), -1)
            bad = ~np.isfinite(block).all(1)
            if bad.any():
                row = start + int(np.flatnonzero(bad)[0])
                raise InvalidInputError(f"{pred_dir}/{name}.npy: row {row} (NSD id {int(ids[row])}) holds NaN or inf; "
                                        "expected finite predictions (predict again from a healthy run)")
    run_dir, run_record = prediction_run(pred, pred_dir)
    if run_dir is None:
        raise InvalidInputError(f"{pred_dir}/manifest.json names no run; expected predictions of a MindDiffuser run")
    run_file = run_dir / "run.json"
    if not run_record:
        raise MissingInputError(f"{run_file}: the MindDiffuser run behind {pred_dir} is not available (its target "
                                "store names the SD and the structural CLIP)")
    if not run_record.get("features"):
        raise InvalidInputError(f"{run_file}: names no feature store; expected a MindDiffuser run")
    store_manifest = resolve_path(run_record["features"], run_dir) / "manifest.json"
    if not store_manifest.is_file():
        raise MissingInputError(f"{store_manifest}: the MindDiffuser target store of run {run_dir} is not available "
                                "(it names the SD and the structural CLIP)")
    settings = json.loads(store_manifest.read_text()).get("settings", {})
    if settings.get("command") != "extract-minddiffuser" or "structural" not in settings or "sd" not in settings:
        raise InvalidInputError(f"{store_manifest}: not a MindDiffuser target store's manifest; the run must be "
                                "trained on brainmclip extract-minddiffuser targets")
    masks_file = run_dir / MASKS_FILE
    masks = None
    if masks_file.is_file():
        with np.load(masks_file, allow_pickle=False) as f:
            masks = {name: f[name].astype(bool) for name in f.files}
        absent = [f"struct_{k:02d}" for k in layers if f"struct_{k:02d}" not in masks]
        if absent:
            raise InvalidInputError(f"{masks_file}: no mask for {', '.join(absent)}; expected one per decoded layer")
    else:
        masks_file = None
        log.warning("%s: no %s; every structural dimension counts (all-ones masks)", run_dir, MASKS_FILE)
    return _Inputs(pred, pred_dir, ids, layers, settings, masks, masks_file,
                   options.generator or settings["sd"]["model"],
                   options.structural_clip or settings["structural"]["model"]["model"],
                   settings["structural"].get("convention", "linear-index"))


def _pixel_options(options: MindDiffuserOptions) -> dict:
    values = asdict(options)
    values["optimize"] = list(options.optimize)
    # limit only chooses which images are made, not how; raising it resumes the same folder.
    return {k: v for k, v in values.items() if k not in ("batch_size", "generator", "structural_clip", "limit")}


def _identity(kind: str, inputs: _Inputs, arrays: list[str], options: MindDiffuserOptions, device, dtype,
              init: str | None = None) -> dict:
    return {
        "kind": kind,
        "predictions": {name: model_file_sha256(inputs.pred_dir / f"{name}.npy") for name in arrays},
        "masks": model_file_sha256(inputs.masks_file) if inputs.masks_file else "all-ones",
        "generator": stable_diffusion_identity(inputs.generator),
        "structural_clip": model_identity(inputs.structural_clip, "clip"),
        "structural": {"layers": inputs.layers, "convention": inputs.convention},
        "options": _pixel_options(options),
        "init_images": init,
        "number_format": {"device": device, "dtype": str(dtype)},
    }


def _settings(inputs: _Inputs, out: Path, options: MindDiffuserOptions, method: str, kind: str) -> dict:
    return {"options": {**asdict(options), "optimize": list(options.optimize)},
            "predictions": record_path(inputs.pred_dir, out),
            "predictions_manifest": inputs.pred.manifest.get("run"), "method": method, "limit": options.limit,
            "subject": inputs.pred.subject, "generator": kind, "sd": inputs.generator,
            "structural_clip": inputs.structural_clip,
            "structural": {"layers": inputs.layers, "convention": inputs.convention},
            "masks": MASKS_FILE if inputs.masks_file else "all-ones (the run has no structural_masks.npz)",
            "stage1": {"sampler": "DDIM, eta 0", "steps": options.steps, "noise_step": options.noise_step,
                       "reverse_steps": options.reverse_steps,
                       "reverse": f"schedule steps {options.reverse_steps - 1}..0",
                       "guidance_scale": options.guidance_scale, "unconditional": "empty prompt"},
            "stage2": {"steps": options.stage2_steps, "optimizer": "Adam", "lr": options.lr,
                       "parameters": list(options.optimize), "noise": options.noise,
                       "loss": "sum_l ||M_l * (f_l(x(z, c)) - f_hat_l)||^2",
                       "gradient": "through the whole Stage 1 reverse, checkpointed per step"}}


# -- the models -----------------------------------------------------------------------------------------------------

@dataclass
class _Models:
    pipe: object
    schedule: DdimSchedule
    structural: object
    uc: torch.Tensor
    size: int
    latent_shape: tuple[int, int, int]


def _load_models(inputs: _Inputs, options: MindDiffuserOptions, device, dtype) -> _Models:
    from brainmclip.features.clip_models import load_clip
    from brainmclip.features.minddiffuser_targets import StructuralFeatures
    from brainmclip.generation.stable_diffusion import load_stable_diffusion, stable_diffusion_folder

    pipe = load_stable_diffusion(inputs.generator, device=device, dtype=dtype)
    sd = inputs.store_settings["sd"]
    root = stable_diffusion_folder(inputs.generator)
    for part in ("text_encoder", "vae"):
        recorded = sd.get(f"{part}_config_sha256")
        if recorded and recorded != hashlib.sha256((root / part / "config.json").read_bytes()).hexdigest():
            raise InvalidInputError(f"generator {inputs.generator!r}: its {part} is not the one the targets were made "
                                    f"with ({sd.get('model')!r}); pass that Stable Diffusion as --generator")
    towers = load_clip(inputs.structural_clip, device=device)
    recorded = inputs.store_settings["structural"]["model"].get("config_sha256")
    if recorded and towers.identity.get("config_sha256") not in (None, recorded):
        raise InvalidInputError(f"structural CLIP {inputs.structural_clip!r} is not the one the targets were made "
                                f"with ({inputs.store_settings['structural']['model'].get('model')!r}); pass that "
                                "CLIP as --structural-clip")
    structural = StructuralFeatures(towers.vision.float(), inputs.layers, inputs.convention)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, towers.vision):
        module.requires_grad_(False)
    factor = pipe.vae_scale_factor
    size = options.size or pipe.unet.config.sample_size * factor
    if size % factor:
        raise InvalidInputError(f"size={size}; expected a multiple of the VAE's factor {factor}")
    latent_shape = (int(pipe.unet.config.in_channels), size // factor, size // factor)
    tokens = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        uc = pipe.text_encoder(tokens)[0].float()
    _check_shapes(inputs, pipe, structural, uc, latent_shape)
    return _Models(pipe, DdimSchedule(pipe.scheduler.config, options.steps), structural, uc, size, latent_shape)


def _check_shapes(inputs: _Inputs, pipe, structural, uc, latent_shape) -> None:
    targets, where = inputs.pred.targets, inputs.pred_dir
    text = targets["sd_text"]
    if tuple(text.shape[1:]) != tuple(uc.shape[1:]):
        raise InvalidInputError(f"{where}/sd_text.npy: shape {tuple(text.shape)}; the generator's text condition is "
                                f"(n, {uc.shape[1]}, {uc.shape[2]})")
    if "sd_latent" in targets:
        want = (latent_shape[0], latent_shape[1] * latent_shape[2])
        if tuple(targets["sd_latent"].shape[1:]) != want:
            raise InvalidInputError(f"{where}/sd_latent.npy: shape {tuple(targets['sd_latent'].shape)}; the "
                                    f"generator at this size expects (n, {want[0]}, {want[1]}) (C, H*W)")
    for k in inputs.layers:
        name = f"struct_{k:02d}"
        want = (structural.n_tokens, structural.width(k))
        if tuple(targets[name].shape[1:]) != want:
            raise InvalidInputError(f"{where}/{name}.npy: shape {tuple(targets[name].shape)}; the structural CLIP's "
                                    f"layer {k} gives (n, {want[0]}, {want[1]})")
        if inputs.masks is not None and tuple(inputs.masks[name].shape) != want:
            raise InvalidInputError(f"{inputs.masks_file}: mask {name} of shape {tuple(inputs.masks[name].shape)}; "
                                    f"expected {want}")


def _measure(inputs: _Inputs, models: _Models, rows: list[int], device) -> _Measure:
    targets, masks = {}, {}
    for k in inputs.layers:
        name = f"struct_{k:02d}"
        targets[k] = torch.as_tensor(np.asarray(inputs.pred.targets[name][rows], np.float32), device=device)
        mask = inputs.masks[name] if inputs.masks is not None else np.ones(targets[k].shape[1:], bool)
        masks[k] = torch.as_tensor(mask, device=device)
    return _Measure(models.structural, targets, masks)


# -- the two commands -----------------------------------------------------------------------------------------------

def _device():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # bf16 on GPU only (bf16 matmuls are very slow on most CPUs); the structural CLIP and the loss stay float32.
    return device, (torch.bfloat16 if device == "cuda" else torch.float32)


@locks_output()
def minddiffuser_reconstruct(pred_dir, out, options: MindDiffuserOptions | None = None, force: bool = False,
                             progress: bool = True) -> GeneratedImages:
    """MindDiffuser's Stage 1 and Stage 2 for every prediction in ``pred_dir``, written as a reconstruction folder.

    A folder made with the same identity is resumed (only missing PNGs are made); one made with another is refused
    unless ``force``, which first removes the PNGs its manifest lists.
    """
    start = time.perf_counter()
    options = options or MindDiffuserOptions()
    pred_dir, out = Path(pred_dir), Path(out)
    inputs = _read_inputs(pred_dir, options, need_latent=True)
    device, dtype = _device()
    arrays = ["stimulus_ids", "sd_text", "sd_latent", *(f"struct_{k:02d}" for k in inputs.layers)]
    identity = _identity("minddiffuser", inputs, arrays, options, device, dtype)
    # Stage 1 alone is its own row in an evaluation beside the full method.
    method = "minddiffuser" if options.stage2_steps else "minddiffuser_stage1"
    settings = _settings(inputs, out, options, method, "minddiffuser")
    return _run(inputs, out, options, identity, settings, force, progress, start, None)


@locks_output()
def refine(recon_dir, pred_dir, out, options: MindDiffuserOptions | None = None, force: bool = False,
           progress: bool = True, base_method: str | None = None) -> GeneratedImages:
    """MindDiffuser's Stage 2 on another method's reconstructions ("+MindDiffuser").

    ``recon_dir``: a reconstruction folder (any method) or a folder of PNGs named ``nsd<id>.png``, one for every
    image of ``pred_dir`` (MindDiffuser predictions of the same stimuli: c and the structural targets). Each PNG is
    VAE-encoded as the start z. ``base_method`` names the refined method in the manifest (default: the one its
    reconstruction manifest records, else the folder's name).
    """
    start = time.perf_counter()
    options = options or MindDiffuserOptions()
    recon_dir, pred_dir, out = Path(recon_dir), Path(pred_dir), Path(out)
    if recon_dir.resolve() == out.resolve():
        raise InvalidInputError(f"--out {out} is the folder being refined; choose another --out")
    inputs = _read_inputs(pred_dir, options, need_latent=False)
    base, paths = _base_images(recon_dir, inputs.ids, pred_dir)
    method = f"{base_method or base}+MindDiffuser"
    device, dtype = _device()
    digest = hashlib.sha256()
    for nsd_id, path in zip(inputs.ids, paths, strict=True):
        digest.update(f"{png_name(nsd_id)}\0{model_file_sha256(path)}\n".encode())
    arrays = ["stimulus_ids", "sd_text", *(f"struct_{k:02d}" for k in inputs.layers)]
    identity = _identity("minddiffuser-refine", inputs, arrays, options, device, dtype, digest.hexdigest())
    settings = _settings(inputs, out, options, method, "minddiffuser-refine")
    settings["base"] = {"recon": record_path(recon_dir, out), "method": base_method or base}
    return _run(inputs, out, options, identity, settings, force, progress, start, paths)


def _base_images(recon_dir: Path, ids: np.ndarray, pred_dir: Path) -> tuple[str, list[Path]]:
    """The refined method's name and one PNG per prediction id, checked to be there."""
    if not recon_dir.is_dir():
        raise MissingInputError(f"--recon {recon_dir}: no such folder (expected reconstruction PNGs nsd<id>.png)")
    base = recon_dir.name
    if (recon_dir / "manifest.json").is_file():
        manifest = read_manifest(recon_dir, RECON_FORMAT, "a reconstruction folder", "reconstruct")
        base = str(manifest.get("settings", {}).get("method") or base)
        made = {int(k) for k in manifest.get("images", {})}
        lacking = sorted(set(ids.tolist()) - made)
        if lacking:
            raise InvalidInputError(f"--recon {recon_dir} holds no reconstruction of {len(lacking)} of the {len(ids)} "
                                    f"images to refine (first NSD id {lacking[0]}); expected every image {pred_dir} "
                                    "predicts (or pass --limit to refine the first ones)")
    paths = [recon_dir / png_name(i) for i in ids]
    lacking = [p for p in paths if not p.is_file()]
    if lacking:
        raise InvalidInputError(f"--recon {recon_dir}: no {lacking[0].name} ({len(lacking)} of {len(paths)} images "
                                f"of {pred_dir} missing); expected one PNG per predicted NSD id")
    return base, paths


def _run(inputs: _Inputs, out: Path, options: MindDiffuserOptions, identity: dict, settings: dict, force: bool,
         progress: bool, start: float, init_paths: list[Path] | None) -> GeneratedImages:
    ids = inputs.ids
    folder = open_reconstruction_folder(out, ids, settings, identity,
                                        {"generator": inputs.generator, "structural_clip": inputs.structural_clip,
                                         "kind": settings["generator"]}, options.batch_size, force)
    if folder.up_to_date():
        log.info("%s: all %d images already made with these inputs and settings", out, len(ids))
        return load_reconstructions(out)
    size = options.size or (folder.previous or {}).get("size")
    if folder.chunks:
        size = _generate(inputs, out, options, init_paths, folder, progress)
    folder.write_manifest(True, size, n_images=len(ids), seconds=round(time.perf_counter() - start, 2),
                          new_images=folder.n_new)
    log.info("%s of %d images (%d new) in %s", settings["method"], len(ids), folder.n_new, out)
    return load_reconstructions(out)


def _start_latents(inputs: _Inputs, models: _Models, rows: list[int], init_paths: list[Path] | None, device):
    """z to start from: the decoded latents, or the VAE encoding of the base method's PNGs."""
    if init_paths is None:
        z = np.asarray(inputs.pred.targets["sd_latent"][rows], np.float32)
        return torch.as_tensor(z.reshape(len(rows), *models.latent_shape), device=device)
    vae = models.pipe.vae
    latents = []
    for r in rows:
        with Image.open(init_paths[r]) as img:
            image = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
        # As the z targets were made (encode_vae_latents): bicubic antialiased resize, [-1, 1], posterior mean.
        x = TF.resize(image, [models.size, models.size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = (x.float() / 127.5 - 1.0)[None].to(device, next(vae.parameters()).dtype)
        with torch.no_grad():
            latents.append(vae.encode(x).latent_dist.mean.float()[0] * vae.config.scaling_factor)
    return torch.stack(latents).to(device, torch.float32)


def _generate(inputs: _Inputs, out: Path, options: MindDiffuserOptions, init_paths, folder, progress: bool) -> int:
    device, dtype = _device()
    models = _load_models(inputs, options, device, dtype)
    ids, done, records = inputs.ids, folder.done, folder.records
    folder.write_manifest(False, models.size)
    bar = tqdm(total=len(ids), initial=len(done), desc=folder.settings["generator"], unit="img",
               disable=not progress)
    for rows in folder.chunks:
        # The whole batch is made again even when part of it was written before an interruption: batched arithmetic
        # rounds by batch composition, and this keeps every image as an uninterrupted run makes it.
        gens = [torch.Generator(device).manual_seed(image_seed(options.seed, ids[r], 0)) for r in rows]
        z = _start_latents(inputs, models, rows, init_paths, device)
        c = torch.as_tensor(np.asarray(inputs.pred.targets["sd_text"][rows], np.float32), device=device)
        measure = _measure(inputs, models, rows, device)
        images, losses = stage2_optimise(
            models.pipe.unet, models.pipe.vae, models.schedule, measure.loss, z, c, models.uc, gens, options,
            on_step=lambda it: bar.set_postfix_str(f"stage 2 step {it + 1}/{options.stage2_steps}", refresh=True))
        pixels = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        missing = [j for j, r in enumerate(rows) if int(ids[r]) not in done]
        for j in missing:
            records[str(int(ids[rows[j]]))] = {
                "sample": 0, "seed": image_seed(options.seed, ids[rows[j]], 0), "batch_size": options.batch_size,
                "structural_loss_start": round(float(losses[j, 0]), 6),
                "structural_loss_final": round(float(losses[j, -1]), 6)}
        folder.write_manifest(False, models.size)  # records first: a record without its PNG is dropped on resume
        for j in missing:
            with atomic_path(out / png_name(ids[rows[j]])) as tmp:
                Image.fromarray(pixels[j]).save(tmp, format="PNG")
            crash_point("minddiffuser-image")
            done.add(int(ids[rows[j]]))
            bar.update(1)
    bar.close()
    return models.size


# -- command line ---------------------------------------------------------------------------------------------------

def _common_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = MindDiffuserOptions()
    parser.add_argument("--generator", default=None,
                        help="Stable Diffusion folder or cached hub id (never downloaded), 'mini' for mini-SD "
                             "(default: the SD the run's target store names)")
    parser.add_argument("--structural-clip", default=None,
                        help="CLIP of the structural features (default: the one the run's target store names)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="DDIM schedule length (default %(default)s)")
    parser.add_argument("--strength", type=float, default=defaults.strength,
                        help="noise step of z as a share of the steps (default %(default)s: step 37 of 50)")
    parser.add_argument("--reverse-strength", type=float, default=None,
                        help="reverse steps as a share of the steps, at most --strength (default: two steps of 50 "
                             "below the noise step, as published: 35 for 37)")
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale,
                        help="classifier-free guidance of c against the empty prompt (default %(default)s)")
    parser.add_argument("--stage2-steps", type=int, default=defaults.stage2_steps,
                        help="Adam iterations of Stage 2 (0: Stage 1 only; default %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Stage 2 learning rate (default %(default)s)")
    parser.add_argument("--optimize", default=",".join(defaults.optimize),
                        help="what Stage 2 updates: z, c or z,c (default %(default)s)")
    parser.add_argument("--noise", choices=NOISE_MODES, default=defaults.noise,
                        help="fresh: a new noise draw each Stage 2 iteration (as published); fixed: the same one")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--size", type=int, default=None, help="output side in pixels (default: the generator's)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="images per batch; the same size gives the same PNGs")
    parser.add_argument("--limit", type=int, default=None,
                        help="make only the first N predicted images (a later, larger N adds the next ones)")
    parser.add_argument("--force", action="store_true",
                        help="delete the PNGs this folder's manifest lists and make every image again")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``reconstruct-minddiffuser``: Stage 1 and Stage 2 from MindDiffuser predictions."""
    parser.add_argument("--pred", required=True, type=Path, help="prediction folder of a MindDiffuser run")
    parser.add_argument("--out", required=True, type=Path, help="reconstruction folder")
    _common_arguments(parser)


def add_refine_arguments(parser: argparse.ArgumentParser) -> None:
    """``refine``: MindDiffuser's Stage 2 over another method's reconstructions."""
    parser.add_argument("--recon", required=True, type=Path,
                        help="reconstructions to refine (a reconstruction folder or PNGs named nsd<id>.png)")
    parser.add_argument("--pred", required=True, type=Path,
                        help="MindDiffuser predictions of the same images (c and the structural targets)")
    parser.add_argument("--out", required=True, type=Path, help="reconstruction folder for the refined images")
    parser.add_argument("--base-method", default=None,
                        help="name of the refined method in the manifest (default: from --recon's manifest)")
    _common_arguments(parser)


def _options(args) -> MindDiffuserOptions:
    optimize = tuple(p.strip() for p in str(args.optimize).split(",") if p.strip())
    return MindDiffuserOptions(generator=args.generator, structural_clip=args.structural_clip, steps=args.steps,
                               strength=args.strength, reverse_strength=args.reverse_strength,
                               guidance_scale=args.guidance_scale, stage2_steps=args.stage2_steps, lr=args.lr,
                               optimize=optimize, noise=args.noise, seed=args.seed, size=args.size,
                               batch_size=args.batch_size, limit=args.limit)


def _summary(result: GeneratedImages) -> str:
    settings = result.manifest["settings"]
    return (f"{len(result)} {settings['method']} reconstructions (subject {settings['subject']}) at {result.root}, "
            f"{result.manifest['size']} px, {result.manifest.get('seconds', 0):.1f} s")


def run(args) -> int:
    result = minddiffuser_reconstruct(args.pred, args.out, _options(args), force=args.force,
                                      progress=not getattr(args, "quiet", False))
    print(_summary(result))
    return 0


def run_refine(args) -> int:
    result = refine(args.recon, args.pred, args.out, _options(args), force=args.force,
                    progress=not getattr(args, "quiet", False), base_method=args.base_method)
    print(_summary(result))
    return 0
