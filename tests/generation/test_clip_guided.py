"""BrainCLIP's CLIP-guided Stable Diffusion: the guidance gradient, the sampler steps, and the reconstruction folder."""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from brainmclip.data.prepared import PreparedWriter, VoxelSet
from brainmclip.errors import InvalidInputError, OutputInTheWayError
from brainmclip.generation import clip_guided as cg
from brainmclip.generation.clip_guided import (
    ClipGuidedOptions,
    ddim_step,
    ddpm_mean_variance,
    guidance_gradient,
    reconstruct_clip_guided,
    spherical_distance_loss,
)
from brainmclip.generation.reconstruct import image_seed, load_reconstructions
from brainmclip.models.predictions import write_predictions

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the loss and its gradient (float64, against closed forms and finite differences) -----------------------------

def test_spherical_loss_is_half_the_squared_great_circle_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    ua, ub = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    angle = np.arccos(np.clip((ua * ub).sum(1), -1, 1))
    got = spherical_distance_loss(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, angle ** 2 / 2, rtol=1e-12)


def test_spherical_loss_gradient_closed_form_and_finite_differences():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=7), rng.normal(size=7)
    ta = torch.tensor(a, requires_grad=True)
    spherical_distance_loss(ta, torch.from_numpy(b)).backward()
    # L = θ²/2 with cos θ = â·b̂: ∂L/∂â = -θ/sin θ · b̂, then the normalisation's Jacobian (I - ââᵀ)/||a||.
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    theta = np.arccos(ua @ ub)
    closed = -(theta / np.sin(theta)) * (np.eye(7) - np.outer(ua, ua)) @ ub / np.linalg.norm(a)
    np.testing.assert_allclose(ta.grad.numpy(), closed, rtol=1e-9, atol=1e-12)

    def loss(v):
        u = v / np.linalg.norm(v)
        return np.arccos(np.clip(u @ ub, -1, 1)) ** 2 / 2

    h = 1e-6
    numeric = np.array([(loss(a + h * e) - loss(a - h * e)) / (2 * h) for e in np.eye(7)])
    np.testing.assert_allclose(ta.grad.numpy(), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guidance_gradient_through_a_toy_model_matches_finite_differences(prediction_type):
    """x_t -> toy UNet -> x̂0 -> x̃ = f x̂0 + (1-f) x_t -> toy decoder + CLIP -> loss: autograd vs central differences."""
    g = torch.Generator().manual_seed(0)
    shape, dim = (2, 3, 2, 2), 5
    w_unet = torch.randn(12, 12, generator=g, dtype=torch.float64) / 4
    w_embed = torch.randn(12, dim, generator=g, dtype=torch.float64)
    targets = torch.randn(2, dim, generator=g, dtype=torch.float64)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    a = 0.37

    def predict(z):
        return torch.tanh(z.reshape(2, -1) @ w_unet).reshape(shape)

    def embed(z):
        e = torch.sin(z.reshape(2, -1)) @ w_embed
        return e / e.norm(dim=-1, keepdim=True)

    grad, eps, x0 = guidance_gradient(x, a, predict, embed, targets, prediction_type)

    def total(z):
        out = predict(z)
        eps_form = prediction_type == "epsilon"
        x0_ = (z - (1 - a) ** 0.5 * out) / a ** 0.5 if eps_form else a ** 0.5 * z - (1 - a) ** 0.5 * out
        f = (1 - a) ** 0.5
        u = embed(f * x0_ + (1 - f) * z)
        t = targets / targets.norm(dim=-1, keepdim=True)
        theta = torch.arccos((u * t).sum(-1).clamp(-1, 1))
        return float((theta ** 2 / 2).sum())

    h = 1e-6
    numeric = torch.zeros_like(x)
    flat = numeric.view(-1)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        flat[i] = (total(x + e.view(shape)) - total(x - e.view(shape))) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-9)
    # ε and x̂0 agree with each other: x_t = sqrt(ᾱ) x̂0 + sqrt(1 - ᾱ) ε
    torch.testing.assert_close(a ** 0.5 * x0 + (1 - a) ** 0.5 * eps, x)


def test_unguided_steps_match_diffusers_ddim():
    """Scale 0: the DDIM step is diffusers' DDIM (η = 0), the ancestral mean and variance are DDIM's η = 1 step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(10)
    t, prev = int(scheduler.timesteps[3]), int(scheduler.timesteps[4])
    a, a_prev = float(scheduler.alphas_cumprod[t]), float(scheduler.alphas_cumprod[prev])
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(1, 4, 3, 3, generator=g,
                                                                                      dtype=torch.float64)
    reference = scheduler.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ddim_step(x, eps, a, a_prev), reference)
    x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    mean, variance = ddpm_mean_variance(x, x0, a, a_prev)
    ancestral = scheduler.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
    torch.testing.assert_close(mean, ancestral)
    np.testing.assert_allclose(variance, float(scheduler._get_variance(t, prev)), rtol=1e-6)
    # The guided DDIM step is the unguided one with ε shifted by sqrt(1 - ᾱ_t)·s·g.
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ddim_step(x, eps, a, a_prev, 3.0, grad),
                               ddim_step(x, eps + (1 - a) ** 0.5 * 3.0 * grad, a, a_prev))
    shifted, _ = ddpm_mean_variance(x, x0, a, a_prev, 3.0, grad)
    torch.testing.assert_close(shifted, mean - 3.0 * variance * grad)


# -- on the miniature world ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini():
    from brainmclip.features.clip_models import load_clip
    from brainmclip.generation.stable_diffusion import load_stable_diffusion
    from brainmclip.miniature.quality import ZeroShotClassifier, heldout_bank

    pipe, towers = load_stable_diffusion("mini"), load_clip("mini")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, towers.vision, towers.text):
        module.requires_grad_(False)
    scenes = heldout_bank(10, 64, seed=0, start=20_000)
    classifier = ZeroShotClassifier(towers)
    embeds = classifier.extractor.image_embeds(scenes.images)
    return {"pipe": pipe, "towers": towers, "scenes": scenes, "embeds": embeds / embeds.norm(dim=-1, keepdim=True)}


def test_guidance_pulls_mini_sd_towards_the_target_embedding(mini):
    """Same seeds with and without guidance: the mini-CLIP cosine to the target rises for every image."""
    targets = mini["embeds"][:4]
    cosines = {}
    for scale in (0.0, 200.0):
        gens = [torch.Generator().manual_seed(7 + i) for i in range(4)]
        _, cosines[scale] = cg.guided_sample(mini["pipe"], mini["towers"], targets, gens, steps=12,
                                             guidance_scale=scale, sampler="ddpm")
    assert cosines[200.0].mean() > cosines[0.0].mean() + 0.25 and (cosines[200.0] > cosines[0.0]).all(), cosines


def _prepared(path, scenes, test_ids):
    """A minimal prepared dataset: test split = the reconstructed ids; train and val = other scenes (the prior)."""
    writer = PreparedWriter(path)
    n_vox = 6
    writer.save_voxels(VoxelSet(n_vox, None, None, {}, {"all": np.arange(n_vox)}))
    rows = {"test": (list(test_ids), range(len(test_ids))),
            "train": ([100, 101, 102, 103], range(len(test_ids), len(test_ids) + 4)),
            "val": ([200, 201], range(len(test_ids) + 4, len(test_ids) + 6))}
    for split, (ids, take) in rows.items():
        take = list(take)
        writer.save(f"{split}/betas.npy", np.zeros((len(ids), n_vox), np.float32))
        writer.save(f"{split}/images.npy", scenes.images[take])
        writer.save_split(split, ids, np.arange(len(ids))[:, None], [["a scene"]] * len(ids))
    writer.commit({"subject": 1, "source": "test", "options": {}, "test_set": "shared1000"})
    return path


@pytest.fixture
def predictions(tmp_path, mini):
    """BrainCLIP predictions (n, 1, 64) = mini-CLIP embeddings of 3 scenes, with a run pointing at a prepared set."""
    ids = np.array([12, 5, 30])
    data = _prepared(tmp_path / "prepared", mini["scenes"], ids)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"data": str(data)}))
    image = mini["embeds"][:3].numpy()[:, None]
    return write_predictions(tmp_path / "pred", ids, {"image": image, "text": image},
                             {"method": "brainclip", "subject": 1, "split": "test", "clip": "mini", "run": str(run)})


FAST = dict(generator="mini", steps=3, batch_size=2, size=32)


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("nsd*.png"))}


def test_folder_format_determinism_resume_and_evaluate(tmp_path, predictions, monkeypatch):
    from brainmclip.evaluation.evaluate import evaluate_reconstructions

    a = reconstruct_clip_guided(predictions, tmp_path / "a", ClipGuidedOptions(**FAST), progress=False)
    assert [p.name for p in a.paths] == ["nsd00012.png", "nsd00005.png", "nsd00030.png"]
    assert a.load(0).shape == (32, 32, 3) and a.manifest["complete"] and a.manifest["size"] == 32
    settings = a.manifest["settings"]
    assert settings["method"] == "brainclip" and settings["subject"] == 1 and settings["generator"] == "clip-guided"
    assert settings["clip"] == "mini" and settings["options"]["steps"] == 3
    assert a.manifest["images"]["12"]["seed"] == image_seed(42, 12, 0)
    # Same seed, same bytes; the images differ from each other.
    b = reconstruct_clip_guided(predictions, tmp_path / "b", ClipGuidedOptions(**FAST), progress=False)
    assert _digests(a.root) == _digests(b.root) and len(set(_digests(a.root).values())) == 3
    # A rerun with the same settings leaves the folder as it is.
    before = (a.root / "manifest.json").read_bytes()
    reconstruct_clip_guided(predictions, tmp_path / "a", ClipGuidedOptions(**FAST), progress=False)
    assert (a.root / "manifest.json").read_bytes() == before

    # Interrupted after the first image: the rerun makes only what is missing, to the same bytes.
    real = cg.Image.Image.save
    calls = {"n": 0}

    def dying(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(cg.Image.Image, "save", dying)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_clip_guided(predictions, tmp_path / "run", ClipGuidedOptions(**FAST), progress=False)
    monkeypatch.setattr(cg.Image.Image, "save", real)
    assert len(list((tmp_path / "run").glob("nsd*.png"))) == 1
    with pytest.raises(ValueError, match="did not finish"):
        load_reconstructions(tmp_path / "run")
    made = []
    original = cg.guided_sample
    monkeypatch.setattr(cg, "guided_sample", lambda pipe, towers, targets, gens, **kw: made.append(len(gens))
                        or original(pipe, towers, targets, gens, **kw))
    resumed = reconstruct_clip_guided(predictions, tmp_path / "run", ClipGuidedOptions(**FAST), progress=False)
    assert made == [2, 1] and resumed.manifest["new_images"] == 2  # the first batch again, whole, and the second
    assert _digests(tmp_path / "run") == _digests(a.root)

    # Other settings are refused unless forced.
    with pytest.raises(OutputInTheWayError, match="steps"):
        reconstruct_clip_guided(predictions, tmp_path / "a", ClipGuidedOptions(**{**FAST, "steps": 2}),
                                progress=False)
    forced = reconstruct_clip_guided(predictions, tmp_path / "a", ClipGuidedOptions(**{**FAST, "steps": 2}),
                                     force=True, progress=False)
    assert forced.manifest["settings"]["options"]["steps"] == 2 and _digests(a.root) != _digests(b.root)

    # evaluate reads the folder unchanged.
    report = evaluate_reconstructions([b.root], tmp_path / "eval", clip_model="tiny", allow_random=True, n_boot=20,
                                      metrics=["PixCorr", "SSIM", "CLIP"])
    entry = report["runs"][0]
    assert entry.method == "brainclip" and entry.n_images == 3 and np.isfinite(entry.metrics["PixCorr"])


def test_image_prior_from_train_and_val_only_cached(tmp_path, predictions, monkeypatch):
    data = tmp_path / "prepared"
    options = ClipGuidedOptions(**FAST, init="image-prior", prior=str(data), strength=0.5)
    out = reconstruct_clip_guided(predictions, tmp_path / "p", options, progress=False)
    allowed = {f"nsd{i:05d}" for i in (100, 101, 102, 103, 200, 201)}
    priors = {k: v["prior"] for k, v in out.manifest["images"].items()}
    assert set(priors.values()) <= allowed, priors  # never a test image
    # the recorded prior is the nearest bank image by cosine, computed here independently
    extractor = cg_extractor()
    from brainmclip.data.prepared import load_prepared

    prepared = load_prepared(data)
    bank = np.concatenate([prepared.train.images, prepared.val.images])
    keys = [f"nsd{int(i):05d}" for i in np.concatenate([prepared.train.stimulus_ids, prepared.val.stimulus_ids])]
    emb = extractor.image_embeds(bank).numpy()
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    target = np.load(predictions / "image.npy").astype(np.float32)[:, 0]
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    assert [priors[str(i)] for i in (12, 5, 30)] == [keys[j] for j in (target @ emb.T).argmax(1)]
    assert len(list(out.root.glob("prior_bank-*.npz"))) == 1
    # the prior changes the images; a forced rerun reuses the cached bank embeddings
    plain = reconstruct_clip_guided(predictions, tmp_path / "n", ClipGuidedOptions(**FAST), progress=False)
    assert not np.array_equal(plain.load(0), out.load(0))
    monkeypatch.setattr(cg, "_embed_bank", lambda *a, **k: pytest.fail("bank embeddings computed again"))
    reconstruct_clip_guided(predictions, tmp_path / "p", options, force=True, progress=False)
    # A folder of images is a bank too.
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(prepared.train.images[i]).save(folder / f"img{i}.png")
    monkeypatch.undo()
    out = reconstruct_clip_guided(predictions, tmp_path / "f", ClipGuidedOptions(**FAST, init="image-prior",
                                                                                   prior=str(folder)), progress=False)
    assert {v["prior"] for v in out.manifest["images"].values()} <= {"img0.png", "img1.png", "img2.png"}


def cg_extractor():
    from brainmclip.features.clip_extractor import ClipFeatureExtractor
    from brainmclip.features.clip_models import load_clip

    towers = load_clip("mini")
    return ClipFeatureExtractor(towers, (towers.n_vision_layers,), towers.n_vision_layers)


def test_bad_inputs_are_one_line_errors(tmp_path, predictions):
    with pytest.raises(InvalidInputError, match="needs a prior"):
        ClipGuidedOptions(init="image-prior")
    with pytest.raises(InvalidInputError, match="sampler"):
        ClipGuidedOptions(sampler="euler")
    with pytest.raises(InvalidInputError, match="embeds in 32 dims"):
        reconstruct_clip_guided(predictions, tmp_path / "o", ClipGuidedOptions(**FAST, clip="tiny"), progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        reconstruct_clip_guided(predictions, tmp_path / "o2", ClipGuidedOptions(**FAST, init="image-prior",
                                                                                  prior=str(tmp_path / "none")),
                                progress=False)


def test_command_line(tmp_path, predictions, capsys):
    parser = argparse.ArgumentParser()
    cg.add_arguments(parser)
    args = parser.parse_args(["--pred", str(predictions), "--out", str(tmp_path / "r"), "--generator", "mini",
                              "--steps", "2", "--guidance-scale", "100", "--sampler", "ddim", "--batch-size", "3"])
    args.quiet = True
    assert cg.run(args) == 0
    assert "3 CLIP-guided reconstructions of brainclip predictions (subject 1)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["settings"]["options"]["sampler"] == "ddim" and manifest["settings"]["options"]["guidance_scale"] == 100
