"""`brainmclip reconstruct` end to end with the tiny generator and tiny CLIP."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from brainmclip.cli import main
from brainmclip.features import ClipFeatureExtractor, random_clip
from brainmclip.generation import reconstruct as recon_module
from brainmclip.generation.reconstruct import ReconstructOptions, image_seed, load_reconstructions, reconstruct
from brainmclip.generation.versatile_diffusion import tiny_versatile_diffusion
from brainmclip.models.predictions import write_predictions


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models are dominated by thread start-up; one thread is faster and steadier.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _predictions(path, n=5, d=32, tokens=257, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.array([11, 3, 42, 7, 19, 23, 5, 8][:n])
    arrays = {"image": rng.normal(size=(n, tokens, d)).astype(np.float32),
              "text": rng.normal(size=(n, 77, d)).astype(np.float32)}
    return write_predictions(path, ids, arrays, {"method": "ridge", "subject": 1, "split": "test"})


FAST = dict(generator="tiny", clip="tiny", steps=3, batch_size=2)


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def test_one_png_per_image_deterministic(tmp_path):
    pred = _predictions(tmp_path / "pred")
    a = reconstruct(pred, tmp_path / "a", ReconstructOptions(**FAST), progress=False)
    assert len(a) == 5 and all(p.exists() for p in a.paths)
    assert a.load(0).shape == (32, 32, 3) and a.manifest["complete"]
    reconstruct(pred, tmp_path / "b", ReconstructOptions(**FAST), progress=False)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    # Batch size does not change pixels: every image has its own seed.
    c = reconstruct(pred, tmp_path / "c", ReconstructOptions(**{**FAST, "batch_size": 5}), progress=False)
    assert _digests(tmp_path / "c") == _digests(tmp_path / "a")
    assert len({d for d in _digests(tmp_path / "a").values()}) == 5
    assert c.manifest["images"]["11"]["seed"] == image_seed(42, 11, 0)


def test_predictions_condition_the_images(tmp_path):
    a = reconstruct(_predictions(tmp_path / "p1", seed=0), tmp_path / "a", ReconstructOptions(**FAST), progress=False)
    b = reconstruct(_predictions(tmp_path / "p2", seed=1), tmp_path / "b", ReconstructOptions(**FAST), progress=False)
    assert not np.array_equal(a.load(0), b.load(0))


def test_interrupted_run_resumes_with_the_missing_images(tmp_path, monkeypatch):
    pred = _predictions(tmp_path / "pred")
    reference = reconstruct(pred, tmp_path / "ref", ReconstructOptions(**FAST), progress=False)
    real = recon_module.Image.Image.save
    calls = {"n": 0}

    def dying(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(recon_module.Image.Image, "save", dying)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(pred, tmp_path / "run", ReconstructOptions(**FAST), progress=False)
    assert len(list((tmp_path / "run").glob("*.png"))) == 2
    assert not list((tmp_path / "run").glob(".*tmp-*"))  # no half-written PNG left behind
    with pytest.raises(ValueError, match="did not finish"):
        load_reconstructions(tmp_path / "run")
    monkeypatch.setattr(recon_module.Image.Image, "save", real)
    reconstruct(pred, tmp_path / "run", ReconstructOptions(**FAST), progress=False)
    assert _digests(tmp_path / "run") == _digests(reference.root)


def test_init_images_are_used(tmp_path):
    pred = _predictions(tmp_path / "pred", n=2)
    init = tmp_path / "init"
    init.mkdir()
    for nsd_id, colour in ((11, (250, 10, 10)), (3, (10, 10, 250))):
        Image.fromarray(np.full((48, 48, 3), colour, np.uint8)).save(init / f"nsd{nsd_id:05d}.png")
    plain = reconstruct(pred, tmp_path / "plain", ReconstructOptions(**FAST), progress=False)
    with_init = reconstruct(pred, tmp_path / "init_out", ReconstructOptions(**FAST, init_dir=str(init), strength=0.5),
                            progress=False)
    assert not np.array_equal(plain.load(0), with_init.load(0))
    (init / "nsd00003.png").unlink()
    with pytest.raises(FileNotFoundError, match="nsd00003.png"):
        reconstruct(pred, tmp_path / "x", ReconstructOptions(**FAST, init_dir=str(init)), progress=False)


def test_best_of_n_keeps_the_candidate_closest_to_the_prediction(tmp_path):
    pred_dir = _predictions(tmp_path / "pred", n=3)
    out = reconstruct(pred_dir, tmp_path / "best", ReconstructOptions(**FAST, samples=3), progress=False)
    # Recompute every candidate directly and score it with the tiny CLIP, outside reconstruct().
    generator = tiny_versatile_diffusion()
    extractor = ClipFeatureExtractor(random_clip("tiny"))
    grey = np.full((1, 224, 224, 3), 128, np.uint8)
    u_img, u_txt = extractor.encode_images(grey)["image_semantic"][0], extractor.encode_texts([""])[0]
    pred = np.load(pred_dir / "image.npy").astype(np.float32)
    text = np.load(pred_dir / "text.npy").astype(np.float32)
    for i, nsd_id in enumerate(out.stimulus_ids):
        scores = []
        candidates = []
        for k in range(3):
            g = [torch.Generator().manual_seed(image_seed(42, nsd_id, k))]
            img = generator.generate(torch.tensor(pred[i:i + 1]), torch.tensor(text[i:i + 1]), num_inference_steps=3,
                                     uncond_image=u_img, uncond_text=u_txt, generator=g)
            candidates.append(img[0])
            cls = extractor.encode_images(img)["image_semantic"][0, 0].numpy()
            target = pred[i, 0]
            scores.append(cls @ target / np.linalg.norm(cls) / np.linalg.norm(target))
        best = int(np.argmax(scores))
        assert out.manifest["images"][str(int(nsd_id))]["sample"] == best
        np.testing.assert_array_equal(out.load(i), candidates[best])


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    wrong_tokens = _predictions(tmp_path / "p250", tokens=250)
    assert main(["-q", "reconstruct", "--pred", str(wrong_tokens), "--out", str(tmp_path / "o"), "--generator", "tiny",
                 "--clip", "tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "(n, 257, 32)" in err
    wrong_width = _predictions(tmp_path / "p64", d=64)
    assert main(["-q", "reconstruct", "--pred", str(wrong_width), "--out", str(tmp_path / "o2"), "--generator", "tiny",
                 "--clip", "tiny"]) == 1
    assert "(n, 257, 32)" in capsys.readouterr().err
    assert main(["-q", "reconstruct", "--pred", str(tmp_path / "none"), "--out", str(tmp_path / "o3"),
                 "--generator", "tiny", "--clip", "tiny"]) == 1
    assert "manifest.json: missing" in capsys.readouterr().err
    (tmp_path / "vd").mkdir()
    assert main(["-q", "reconstruct", "--pred", str(wrong_tokens), "--out", str(tmp_path / "o4"), "--generator",
                 str(tmp_path / "vd"), "--clip", "tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "image_unet" in err


def test_cli_reconstruct(tmp_path, capsys):
    pred = _predictions(tmp_path / "pred", n=2)
    assert main(["-q", "reconstruct", "--pred", str(pred), "--out", str(tmp_path / "r"), "--generator", "tiny",
                 "--clip", "tiny", "--steps", "2"]) == 0
    assert "2 reconstructions of ridge predictions" in capsys.readouterr().out
    assert main(["-q", "reconstruct", "--pred", str(pred), "--out", str(tmp_path / "r"), "--generator", "tiny",
                 "--clip", "tiny", "--steps", "3"]) == 1
    assert "--force" in capsys.readouterr().err
