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

pytestmark = pytest.mark.usefixtures("one_thread")


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
    # Every image has its own seed: another batch size draws the same image (to within rounding, see below).
    c = reconstruct(pred, tmp_path / "c", ReconstructOptions(**{**FAST, "batch_size": 5}), progress=False)
    for i in range(5):
        assert np.abs(c.load(i).astype(int) - a.load(i).astype(int)).max() <= 1
    assert len({d for d in _digests(tmp_path / "a").values()}) == 5
    assert c.manifest["images"]["11"]["seed"] == image_seed(42, 11, 0)


def test_batch_size_changes_at_most_one_level_of_a_few_pixels(tmp_path):
    """What the README states: the same batch size gives the same bytes; another batch size the same image to
    within one intensity level in a few pixels (batched matrix products round differently)."""
    pred = _predictions(tmp_path / "pred", n=8)
    runs = {bs: reconstruct(pred, tmp_path / f"b{bs}", ReconstructOptions(**{**FAST, "steps": 10, "batch_size": bs}),
                            progress=False) for bs in (1, 3, 5)}
    again = reconstruct(pred, tmp_path / "b3_again", ReconstructOptions(**{**FAST, "steps": 10, "batch_size": 3}),
                        progress=False)
    assert _digests(again.root) == _digests(runs[3].root)
    for bs in (3, 5):
        for i in range(8):
            diff = np.abs(runs[bs].load(i).astype(int) - runs[1].load(i).astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (bs, i, diff.max(), (diff > 0).sum())


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


def _with_run(pred_dir, tmp_path, branches=None, detail_layers=(1, 2)):
    """Point the predictions at a run whose feature store used these layers (what best-of-N reads)."""
    import json

    store, run = tmp_path / "store", tmp_path / "run"
    store.mkdir(exist_ok=True)
    run.mkdir(exist_ok=True)
    last = random_clip("tiny").n_vision_layers
    (store / "manifest.json").write_text(json.dumps({"settings": {"extractor": {
        "detail_layers": list(detail_layers), "semantic_layer": last, "merge": "project-then-average"}}}))
    (run / "run.json").write_text(json.dumps({"features": str(store),
                                              **({"model_config": {"branches": branches}} if branches else {})}))
    manifest = json.loads((pred_dir / "manifest.json").read_text())
    (pred_dir / "manifest.json").write_text(json.dumps({**manifest, "run": str(run)}))
    return last


@pytest.mark.parametrize("branches", [None, ["text", "image_detail"]], ids=["fused", "detail-only"])
def test_best_of_n_keeps_the_candidate_closest_to_the_prediction(tmp_path, branches):
    pred_dir = _predictions(tmp_path / "pred", n=3)
    last = _with_run(pred_dir, tmp_path, branches)
    out = reconstruct(pred_dir, tmp_path / "best", ReconstructOptions(**FAST, samples=3), progress=False)
    # Recompute every candidate directly and embed it as the decoder's targets were (layers 1-2 and the
    # last one; fused, or the detail path alone), outside reconstruct().
    generator = tiny_versatile_diffusion()
    towers = random_clip("tiny")
    uncond = ClipFeatureExtractor(towers, (last,), last)
    targets = ClipFeatureExtractor(towers, (1, 2), last)
    grey = np.full((1, 224, 224, 3), 128, np.uint8)
    u_img, u_txt = uncond.encode_images(grey)["image_semantic"][0], uncond.encode_texts([""])[0]
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
            emb = targets.encode_images(img)
            own = emb["image_detail"] if branches else (emb["image_semantic"] + emb["image_detail"]) / 2
            v, t = own[0].numpy().ravel(), pred[i].ravel()
            scores.append(v @ t / np.linalg.norm(v) / np.linalg.norm(t))
        best = int(np.argmax(scores))
        assert out.manifest["images"][str(int(nsd_id))]["sample"] == best
        np.testing.assert_allclose(out.manifest["images"][str(int(nsd_id))]["scores"], scores, atol=1e-5)
        np.testing.assert_array_equal(out.load(i), candidates[best])


def test_best_of_n_needs_the_targets_feature_store(tmp_path, capsys):
    pred_dir = _predictions(tmp_path / "pred", n=2)
    assert main(["-q", "reconstruct", "--pred", str(pred_dir), "--out", str(tmp_path / "o"), "--generator", "tiny",
                 "--clip", "tiny", "--samples", "2"]) == 1
    assert "feature store" in capsys.readouterr().err


def test_text_only_predictions_use_the_text_condition_alone(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.array([4, 9])
    text = rng.normal(size=(2, 77, 32)).astype(np.float32)
    only = write_predictions(tmp_path / "text_only", ids, {"text": text}, {"method": "brain_mclip", "subject": 1})
    out = reconstruct(only, tmp_path / "o", ReconstructOptions(**FAST), progress=False)
    assert len(out) == 2 and out.manifest["complete"]
    # The same text with any image prediction at text share 1 draws the same pixels: the image slot is unused.
    image = rng.normal(size=(2, 257, 32)).astype(np.float32)
    both = write_predictions(tmp_path / "both", ids, {"text": text, "image": image},
                             {"method": "brain_mclip", "subject": 1})
    ref = reconstruct(both, tmp_path / "ref", ReconstructOptions(**FAST, text_weight=1.0), progress=False)
    for i in range(2):
        np.testing.assert_array_equal(out.load(i), ref.load(i))
    other = write_predictions(tmp_path / "other", ids, {"text": text[::-1].copy()},
                              {"method": "brain_mclip", "subject": 1})
    assert not np.array_equal(reconstruct(other, tmp_path / "x", ReconstructOptions(**FAST), progress=False).load(0),
                              out.load(0))
    generator = tiny_versatile_diffusion()
    with pytest.raises(ValueError, match="text_weight=1"):
        generator.generate(None, torch.tensor(text), text_weight=0.4, num_inference_steps=1)
    with pytest.raises(ValueError, match="both None"):
        generator.generate(None, None, text_weight=0.0, num_inference_steps=1)


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
