"""MindDiffuser's two-stage reconstruction and its Stage 2 plug-in: numerics against independent references, the
reconstruction folder (format, determinism, resume), refine on a folder of PNGs, and one-line refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brainmclip.errors import InvalidInputError, OutputInTheWayError
from brainmclip.generation.minddiffuser import (
    DdimSchedule,
    MindDiffuserOptions,
    minddiffuser_reconstruct,
    refine,
    stage1_sample,
    stage2_optimise,
    structural_loss,
    structural_pixels,
)
from brainmclip.generation.reconstruct import image_seed, load_reconstructions, png_name
from brainmclip.models.predictions import write_predictions

pytest.importorskip("diffusers")

IDS = np.array([101, 205, 309])
FAST = dict(generator="mini", structural_clip="mini", steps=6, strength=0.5, reverse_strength=0.5, stage2_steps=2,
            batch_size=1)


@pytest.fixture(scope="module")
def models():
    from brainmclip.features.clip_models import load_clip
    from brainmclip.features.minddiffuser_targets import StructuralFeatures
    from brainmclip.generation.stable_diffusion import load_stable_diffusion

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = load_stable_diffusion("mini")
    towers = load_clip("mini")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, towers.vision):
        module.requires_grad_(False)
    yield pipe, StructuralFeatures(towers.vision), towers
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes():
    from brainmclip.miniature.world import build_bank

    return build_bank(len(IDS), seed=0, stream="heldout", size=64)


def _make_predictions(root: Path, models, scenes, ids=IDS, masks=True, rows=None) -> Path:
    """A MindDiffuser run (run.json, target-store manifest, masks) and predictions holding the true targets."""
    from brainmclip.features.diffusion_features import encode_sd_text, encode_vae_latents

    pipe, structural, towers = models
    rows = list(range(len(ids))) if rows is None else rows
    images = scenes.images[rows]
    arrays = {"sd_text": encode_sd_text(pipe.text_encoder, pipe.tokenizer, [scenes.captions[r] for r in rows]).numpy(),
              "sd_latent": encode_vae_latents(pipe.vae, images, size=64).flatten(2).numpy()}
    rng = np.random.default_rng(0)
    mask_arrays = {}
    for k, value in structural(images).items():
        arrays[f"struct_{k:02d}"] = value.numpy()
        mask_arrays[f"struct_{k:02d}"] = rng.random(value.shape[1:]) < 0.25
    store, run, pred = root / "store", root / "run", root / "pred"
    store.mkdir(parents=True)
    run.mkdir()
    (store / "manifest.json").write_text(json.dumps({"settings": {
        "command": "extract-minddiffuser", "sd": {"model": "mini"},
        "structural": {"model": towers.identity, **structural.settings()}}}))
    (run / "run.json").write_text(json.dumps({"method": "minddiffuser", "features": "../store"}))
    if masks:
        np.savez(run / "structural_masks.npz", **mask_arrays)
    write_predictions(pred, np.asarray(ids), {k: v.astype(np.float16) for k, v in arrays.items()},
                      {"method": "minddiffuser", "subject": 1, "run": "../run"})
    return pred


@pytest.fixture(scope="module")
def predictions(models, scenes, tmp_path_factory):
    return _make_predictions(tmp_path_factory.mktemp("md"), models, scenes)


# -- numerics -------------------------------------------------------------------------------------------------------

def test_structural_loss_equals_numpy():
    rng = np.random.default_rng(1)
    feats = {2: rng.normal(size=(3, 5, 4)), 4: rng.normal(size=(3, 5, 6))}
    targets = {k: rng.normal(size=v.shape) for k, v in feats.items()}
    masks = {k: rng.random(v.shape[1:]) < 0.3 for k, v in feats.items()}
    got = structural_loss({k: torch.tensor(v) for k, v in feats.items()},
                          {k: torch.tensor(v) for k, v in targets.items()}, {k: torch.tensor(v) for k, v in masks.items()})
    want = sum(((feats[k] - targets[k]) ** 2 * masks[k]).reshape(3, -1).sum(1) for k in feats)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_generated_images_are_measured_like_the_targets(models, scenes):
    _, structural, _ = models
    want = structural(scenes.images)  # the targets' own path: uint8 stimuli through CLIP's preprocessing
    pixels = torch.from_numpy(scenes.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        got = structural.from_pixels(structural_pixels(pixels, structural.image_size))
    for k in structural.layers:  # same operations; only the uint8 rounding of the resized stimulus differs
        scale = want[k].abs().max()
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), atol=2e-2 * float(scale))


def test_schedule_follows_the_published_sampler(models):
    pipe = models[0]
    schedule = DdimSchedule(pipe.scheduler.config, 50)
    # LDM: 50 uniform DDIM steps at i*20 + 1; z is noised to step 37 (t = 741) and decoded from step 34 (t = 681).
    assert schedule.timesteps == [20 * i + 1 for i in range(50)]
    options = MindDiffuserOptions()
    assert (options.noise_step, options.reverse_steps) == (37, 35)
    assert schedule.timesteps[options.noise_step] == 741 and schedule.timesteps[options.reverse_steps - 1] == 681
    assert schedule.alpha(-1) == pytest.approx(float(pipe.scheduler.alphas_cumprod[0]))
    assert schedule.alpha(50) == 0.0


def test_stage1_img2img_equals_diffusers_ddim_steps(models):
    """Noise to step k, reverse r < k steps with CFG 5: diffusers' add_noise and DDIMScheduler.step as reference."""
    from diffusers import DDIMScheduler

    pipe = models[0]
    steps, k, r, scale = 10, 7, 5, 5.0
    gen = torch.Generator().manual_seed(3)
    z, noise = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    c, uc = torch.randn(2, 32, 64, generator=gen), torch.randn(1, 32, 64, generator=gen)
    schedule = DdimSchedule(pipe.scheduler.config, steps)
    with torch.no_grad():
        got = stage1_sample(pipe.unet, schedule, z, c, uc, noise, k, r, scale)
        ref = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        ref.set_timesteps(steps)
        x = ref.add_noise(z, noise, torch.tensor([schedule.timesteps[k]]))
        for t in [int(t) for t in ref.timesteps if t <= schedule.timesteps[r - 1]]:
            cond = pipe.unet(x, t, encoder_hidden_states=c).sample
            base = pipe.unet(x, t, encoder_hidden_states=uc.expand(2, -1, -1)).sample
            x = ref.step(base + scale * (cond - base), t, x, eta=0.0).prev_sample
    np.testing.assert_allclose(got.numpy(), x.numpy(), atol=1e-4, rtol=1e-4)


def test_stage1_strength_one_guidance_one_is_diffusers_ddim_sampling(models, predictions, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = models[0]
    options = MindDiffuserOptions(**{**FAST, "strength": 1.0, "reverse_strength": 1.0, "guidance_scale": 1.0,
                                     "stage2_steps": 0, "steps": 8})
    result = minddiffuser_reconstruct(predictions, tmp_path / "out", options, progress=False)
    c = torch.from_numpy(np.load(predictions / "sd_text.npy")[:1].astype(np.float32))
    ddim = StableDiffusionPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet,
                                   DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False), None, None,
                                   requires_safety_checker=False)
    ddim.set_progress_bar_config(disable=True)
    want = ddim(prompt_embeds=c, guidance_scale=1.0, num_inference_steps=8, output_type="np",
                generator=torch.Generator().manual_seed(image_seed(42, IDS[0], 0))).images[0]
    got = np.asarray(Image.open(result.paths[0])).astype(np.float64) / 255
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6


def test_stage2_gradient_steps_decrease_the_loss_and_checkpointing_is_exact(models, predictions):
    from brainmclip.generation.minddiffuser import _Measure

    pipe, structural, _ = models
    schedule = DdimSchedule(pipe.scheduler.config, 6)
    z = torch.from_numpy(np.load(predictions / "sd_latent.npy")[:1].astype(np.float32)).reshape(1, 4, 16, 16)
    c = torch.from_numpy(np.load(predictions / "sd_text.npy")[:1].astype(np.float32))
    uc = torch.zeros(1, 32, 64)
    targets = {k: torch.from_numpy(np.load(predictions / f"struct_{k:02d}.npy")[:1].astype(np.float32)) * 1.2
               for k in structural.layers}
    measure = _Measure(structural, targets, {k: torch.ones(v.shape[1:], dtype=torch.bool) for k, v in targets.items()})
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (True, False):
        zz = z.clone().requires_grad_(True)
        with torch.enable_grad():
            latents = stage1_sample(pipe.unet, schedule, zz, c, uc, noise, 3, 3, 5.0, checkpointed=checkpointed)
            from brainmclip.generation.minddiffuser import _decode

            measure.loss(_decode(pipe.vae, latents)).sum().backward()
        grads.append(zz.grad)
    np.testing.assert_allclose(grads[0].numpy(), grads[1].numpy(), rtol=1e-4, atol=1e-6 * float(grads[1].abs().max()))
    options = MindDiffuserOptions(**{**FAST, "stage2_steps": 4, "noise": "fixed", "lr": 0.05})
    _, losses = stage2_optimise(pipe.unet, pipe.vae, schedule, measure.loss, z, c, uc,
                                [torch.Generator().manual_seed(0)], options)
    assert losses.shape == (1, 5)
    assert losses[0, 1] < losses[0, 0] and losses[0, -1] < losses[0, 0]


# -- the reconstruction folder --------------------------------------------------------------------------------------

def test_folder_format_determinism_and_resume(predictions, tmp_path):
    out = tmp_path / "md"
    options = MindDiffuserOptions(**FAST)
    result = minddiffuser_reconstruct(predictions, out, options, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["size"] == 64 and manifest["settings"]["method"] == "minddiffuser"
    assert manifest["settings"]["stage1"]["noise_step"] == 3 and manifest["settings"]["masks"] == "structural_masks.npz"
    assert sorted(manifest["images"]) == sorted(str(i) for i in IDS)
    assert all(r["structural_loss_final"] > 0 for r in manifest["images"].values())
    assert [p.name for p in result.paths] == [png_name(i) for i in IDS]
    assert load_reconstructions(out).stimulus_ids.tolist() == IDS.tolist()
    first = {p.name: p.read_bytes() for p in result.paths}
    mtimes = {p.name: os.stat(p).st_mtime_ns for p in result.paths}
    minddiffuser_reconstruct(predictions, out, options, progress=False)  # up to date: nothing touched
    assert {p.name: os.stat(p).st_mtime_ns for p in result.paths} == mtimes
    (out / png_name(IDS[1])).unlink()  # an interrupted run: the missing image is made again, identically
    minddiffuser_reconstruct(predictions, out, options, progress=False)
    assert {p.name: p.read_bytes() for p in result.paths} == first
    other = MindDiffuserOptions(**{**FAST, "seed": 7})
    with pytest.raises(OutputInTheWayError, match="seed"):
        minddiffuser_reconstruct(predictions, out, other, progress=False)
    minddiffuser_reconstruct(predictions, out, other, force=True, progress=False)
    assert (out / png_name(IDS[0])).read_bytes() != first[png_name(IDS[0])]


def test_refine_a_folder_of_pngs(predictions, scenes, tmp_path):
    base = tmp_path / "ridge"
    base.mkdir()
    for nsd_id, image in zip(IDS, scenes.images, strict=True):
        Image.fromarray(image[::-1].copy()).save(base / png_name(nsd_id))  # an upside-down "reconstruction"
    out = tmp_path / "refined"
    result = refine(base, predictions, out, MindDiffuserOptions(**FAST), progress=False)
    settings = result.manifest["settings"]
    assert settings["method"] == "ridge+MindDiffuser" and settings["base"]["method"] == "ridge"
    assert result.manifest["complete"] and len(result) == len(IDS) and all(p.is_file() for p in result.paths)
    records = result.manifest["images"].values()
    assert all(r["structural_loss_final"] > 0 for r in records)
    # a reconstruction folder names its method; refining it again is fine, and the base's manifest is read
    again = refine(out, predictions, tmp_path / "twice", MindDiffuserOptions(**{**FAST, "stage2_steps": 0}),
                   progress=False)
    assert again.manifest["settings"]["method"] == "ridge+MindDiffuser+MindDiffuser"


# -- refusals -------------------------------------------------------------------------------------------------------

def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_refusals(predictions, models, scenes, tmp_path):
    plain = tmp_path / "plain"
    write_predictions(plain, IDS, {"image": np.zeros((3, 1, 8), np.float16)}, {"method": "ridge", "subject": 1})
    with pytest.raises(InvalidInputError) as err:
        minddiffuser_reconstruct(plain, tmp_path / "a", MindDiffuserOptions(**FAST), progress=False)
    assert "no MindDiffuser target" in _one_line(err)

    base = tmp_path / "base"
    base.mkdir()
    for nsd_id, image in zip(IDS[:2], scenes.images[:2], strict=True):
        Image.fromarray(image).save(base / png_name(nsd_id))
    with pytest.raises(InvalidInputError) as err:
        refine(base, predictions, tmp_path / "b", MindDiffuserOptions(**FAST), progress=False)
    assert png_name(IDS[2]) in _one_line(err)

    subset = _make_predictions(tmp_path / "subset", models, scenes, ids=IDS[:2], rows=[0, 1])
    made = minddiffuser_reconstruct(subset, tmp_path / "made", MindDiffuserOptions(**{**FAST, "stage2_steps": 0}),
                                    progress=False)
    with pytest.raises(InvalidInputError) as err:
        refine(made.root, predictions, tmp_path / "c", MindDiffuserOptions(**FAST), progress=False)
    assert "no reconstruction of 1 of the 3 images" in _one_line(err) and "--limit" in _one_line(err)
    assert made.manifest["settings"]["method"] == "minddiffuser_stage1"  # Stage 1 alone is its own row
    # the images the base holds can be refined: --limit takes the first predictions
    limited = refine(made.root, predictions, tmp_path / "c", MindDiffuserOptions(**{**FAST, "limit": 2}),
                     progress=False)
    assert limited.stimulus_ids.tolist() == IDS[:2].tolist()

    for bad, word in [(dict(optimize=("w",)), "optimize"), (dict(strength=0), "strength"),
                      (dict(strength=0.4, reverse_strength=0.6), "at most as many reverse steps"),
                      (dict(limit=0), "limit")]:
        with pytest.raises(InvalidInputError) as err:
            MindDiffuserOptions(**bad)
        assert word in _one_line(err)


def test_reverse_steps_keep_the_published_gap_below_the_noise_step():
    assert (MindDiffuserOptions().noise_step, MindDiffuserOptions().reverse_steps) == (37, 35)  # as published
    assert MindDiffuserOptions(strength=0.4).reverse_steps == 18  # the same two-step gap at another strength
    assert MindDiffuserOptions(steps=100, strength=0.5).reverse_steps == 46  # two steps of 50 = four of 100
    assert MindDiffuserOptions(steps=6, strength=0.2).reverse_steps == 1
    assert MindDiffuserOptions(strength=0.5, reverse_strength=0.5).reverse_steps == 25  # LDM's img2img


def test_limit_makes_the_first_images_and_a_larger_limit_adds_the_next(predictions, tmp_path):
    out = tmp_path / "md"
    options = {**FAST, "stage2_steps": 0}
    first = minddiffuser_reconstruct(predictions, out, MindDiffuserOptions(**options, limit=2), progress=False)
    assert first.stimulus_ids.tolist() == IDS[:2].tolist() and not (out / png_name(IDS[2])).exists()
    assert first.manifest["settings"]["limit"] == 2 and sorted(first.manifest["images"]) == sorted(map(str, IDS[:2]))
    kept = (out / png_name(IDS[0])).read_bytes()
    mtime = os.stat(out / png_name(IDS[0])).st_mtime_ns
    whole = minddiffuser_reconstruct(predictions, out, MindDiffuserOptions(**options), progress=False)
    assert whole.stimulus_ids.tolist() == IDS.tolist() and whole.manifest["new_images"] == 1
    assert os.stat(out / png_name(IDS[0])).st_mtime_ns == mtime and (out / png_name(IDS[0])).read_bytes() == kept


def test_missing_masks_count_every_dimension(models, scenes, tmp_path):
    pred = _make_predictions(tmp_path, models, scenes, ids=IDS[:1], rows=[0], masks=False)
    result = minddiffuser_reconstruct(pred, tmp_path / "out", MindDiffuserOptions(**{**FAST, "stage2_steps": 0}),
                                      progress=False)
    assert result.manifest["settings"]["masks"].startswith("all-ones")
    assert result.manifest["identity"]["masks"] == "all-ones"


def test_loading_stable_diffusion_prints_no_bars_and_restores_the_libraries(capfd):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from brainmclip.generation.stable_diffusion import load_stable_diffusion

    diffusers_logging.enable_progress_bar()
    transformers_logging.enable_progress_bar()
    capfd.readouterr()
    load_stable_diffusion("mini")
    err = capfd.readouterr().err
    assert "Loading" not in err and "it/s" not in err, err
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()
