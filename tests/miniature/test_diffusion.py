"""mini-VD and mini-SD training: the diffusion loss against a numpy reference, object weights, and both training
commands end to end (a few steps each), read back by the same loaders as real weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from brainmclip.miniature.vd import diffusion_loss, object_pixel_weights


def _reference_loss(pred, x0, noise, t, kind, gamma, weight=None):
    """Hand-written min-SNR diffusion loss in float64 numpy (linear betas 1e-4..0.02, 1000 steps)."""
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bar = np.cumprod(1 - betas)[t]
    a, s = np.sqrt(alpha_bar)[:, None, None, None], np.sqrt(1 - alpha_bar)[:, None, None, None]
    target = noise if kind == "epsilon" else a * noise - s * x0
    err = (pred - target) ** 2
    w = np.ones_like(err[:, :1]) if weight is None else weight
    per_sample = (err * w).mean(axis=(1, 2, 3)) / w.mean(axis=(1, 2, 3))
    snr = alpha_bar / (1 - alpha_bar)
    capped = np.minimum(snr, gamma)
    return float((per_sample * (capped / snr if kind == "epsilon" else capped / (snr + 1))).mean())


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("weighted", [False, True])
def test_diffusion_loss_matches_numpy(kind, weighted):
    rng = np.random.default_rng(0)
    pred, x0, noise = (rng.normal(size=(4, 3, 5, 5)) for _ in range(3))
    t = np.array([0, 10, 500, 999])
    weight = 1 + 9 * (rng.random((4, 1, 5, 5)) < 0.2) if weighted else None
    schedule = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type=kind)
    as_t = lambda a: torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
    got = diffusion_loss(as_t(pred), as_t(x0), as_t(noise), torch.from_numpy(t), schedule, 5.0,
                         None if weight is None else as_t(weight))
    assert got.item() == pytest.approx(_reference_loss(pred, x0, noise, t, kind, 5.0, weight), rel=1e-4)
    # without min-SNR the loss is the plain mean squared error to the target
    plain = diffusion_loss(as_t(pred), as_t(x0), as_t(noise), torch.from_numpy(t), schedule, 0.0)
    target = noise if kind == "epsilon" else schedule.get_velocity(as_t(x0), as_t(noise), torch.from_numpy(t)).numpy()
    assert plain.item() == pytest.approx(float(((pred - target) ** 2).mean()), rel=1e-4)


def test_object_pixel_weights_hand_computed():
    maps = np.full((1, 8, 8), -1, np.int8)
    maps[0, 0, 0] = 3  # one object pixel in the top-left 2x2 block
    maps[0, 5:7, 6] = 1  # two in the block at (2, 3)
    w = object_pixel_weights(maps, 4, 10.0)
    expected = np.ones((4, 4))
    expected[0, 0] = expected[2, 3] = expected[3, 3] = 11.0
    np.testing.assert_array_equal(w[0, 0].numpy(), expected)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from brainmclip.cli import main

    out = tmp_path_factory.mktemp("mini") / "clip"
    stages = [{"vision_layers": 6, "steps": 1, "lr": 0.002, "warmup_steps": 1},
              {"vision_layers": 24, "steps": 1, "lr": 0.0005, "warmup_steps": 1}]
    assert main(["-q", "miniature", "train", "clip", "--out", str(out), "--set", f"train.stages={json.dumps(stages)}",
                 "--set", "bank.n_scenes=100", "--set", "train.batch_size=16", "--quality-scenes", "10"]) == 0
    return out / "model"


@pytest.mark.slow
def test_vd_and_sd_training_commands_export_loadable_folders(tiny_clip, tmp_path):
    from brainmclip.cli import main
    from brainmclip.generation.stable_diffusion import load_stable_diffusion
    from brainmclip.generation.versatile_diffusion import load_versatile_diffusion

    small = ["--set", "bank.n_scenes=64", "--set", "unet.steps=2", "--set", "unet.batch_size=4",
             "--set", "unet.warmup_steps=1", "--quality-scenes", "4"]
    vd_args = ["-q", "miniature", "train", "vd", "--clip", str(tiny_clip), "--out", str(tmp_path / "vd"), *small,
               "--set", "vae.steps=2", "--set", "vae.batch_size=4", "--set", "vae.warmup_steps=1"]
    assert main(vd_args) == 0
    folder = tmp_path / "vd" / "model"
    assert {p.name for p in folder.iterdir()} >= {"image_unet", "text_unet", "vae", "scheduler", "model_index.json",
                                                  "model_card.json"}
    card = json.loads((folder / "model_card.json").read_text())
    assert card["config"]["clip"]["checksums"]  # which mini-CLIP the conditions came from
    assert set(card["quality"]) >= {"clip_two_way", "category_agreement", "pixcorr"}
    assert card["quality"]["heldout_scenes"] == 4  # the card says how many scenes its figures rest on
    vd = load_versatile_diffusion(str(folder))
    images = vd.generate(np.zeros((1, 65, 64), np.float32), np.zeros((1, 32, 64), np.float32), num_inference_steps=2)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8
    # a rerun finds both phases done
    before = (tmp_path / "vd" / "checkpoints" / "unet.pt").stat().st_mtime_ns
    assert main(vd_args) == 0
    assert (tmp_path / "vd" / "checkpoints" / "unet.pt").stat().st_mtime_ns == before

    assert main(["-q", "miniature", "train", "sd", "--clip", str(tiny_clip), "--vae", str(folder),
                 "--out", str(tmp_path / "sd"), *small]) == 0
    sd = load_stable_diffusion(str(tmp_path / "sd" / "model"))
    out = sd(["a red dog"], num_inference_steps=2, height=64, width=64, output_type="np").images
    assert out.shape == (1, 64, 64, 3)
