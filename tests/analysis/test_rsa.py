"""RSA between ROIs and CLIP layers: the numerics, the command, and the simulated brain's layer preferences."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial.distance import pdist, squareform
from scipy.stats import spearmanr

from brainmclip.analysis.clip_layers import layer_representations, representation_size
from brainmclip.analysis.common import load_analysis
from brainmclip.analysis.rsa import ROIS, rdm, rdm_upper, roi_masks, rsa_matrix, split_patterns
from brainmclip.cli import main
from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.prepared import load_prepared
from brainmclip.data.synthetic import make_synthetic_nsd
from brainmclip.data.synthetic.presets import load_preset
from brainmclip.features.clip_models import load_clip


@pytest.fixture(scope="module")
def tiny_prepared(tiny_nsd, tmp_path_factory):
    return prepare_subject(tiny_nsd.root, 1, tmp_path_factory.mktemp("rsa") / "prepared", PrepareOptions(),
                           progress=False).root


# -- numerics -----------------------------------------------------------------------------
def test_rdm_is_correlation_distance_of_centred_patterns():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5)) + rng.normal(size=5) * 10  # a large pattern shared by every image
    expected = squareform(pdist(x - x.mean(0), metric="correlation"))
    np.testing.assert_allclose(rdm(x), expected, atol=1e-12)
    # Centring over images removes the shared pattern: without it every pair would look alike.
    assert rdm(x)[np.triu_indices(7, 1)].mean() > 5 * squareform(pdist(x, "correlation"))[np.triu_indices(7, 1)].mean()
    np.testing.assert_array_equal(rdm_upper(np.arange(9.0).reshape(3, 3)), [1.0, 2.0, 5.0])


def test_rsa_is_spearman_of_upper_triangles():
    rng = np.random.default_rng(1)
    brain = rng.normal(size=(3, 45))
    brain[1, :10] = brain[1, 0]  # ties are ranked as scipy ranks them
    model = np.stack([brain[0] ** 3,  # a monotone transform of ROI 0: identical ranks
                      -brain[0],      # reversed ranks
                      rng.normal(size=45), np.round(brain[2], 1)])
    expected = np.array([[spearmanr(b, m).statistic for m in model] for b in brain])
    np.testing.assert_allclose(rsa_matrix(brain, model), expected, atol=1e-12)
    assert rsa_matrix(brain, model)[0, 0] == pytest.approx(1.0) and rsa_matrix(brain, model)[0, 1] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="different image pairs"):
        rsa_matrix(brain, model[:, :10])


def test_hand_made_rsa():
    # Four images: two "faces" and two "houses". The ROI separates the classes; the model agrees on
    # which pairs are far apart, so their RDM ranks agree except for the order within classes.
    roi = np.array([[1.0, 0.9, 0.0, 0.1], [0.8, 1.0, 0.1, 0.0], [0.0, 0.1, 1.0, 0.7], [0.1, 0.0, 0.9, 1.0]]).T
    layer = np.array([[2.0, 2.1, -1.0, -1.2, 0.3], [2.2, 1.9, -1.1, -0.9, 0.1],
                      [-1.0, -0.8, 2.0, 2.3, 0.2], [-1.3, -1.1, 1.8, 2.0, 0.4]])
    a, b = rdm_upper(rdm(roi)), rdm_upper(rdm(layer))
    assert rsa_matrix(a, b)[0, 0] == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert rsa_matrix(a, b)[0, 0] > 0.7


def test_layer_representations_pool_the_patch_grid():
    towers = load_clip("tiny")  # 16 x 16 patches of width 32
    images = np.random.default_rng(2).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    feats = layer_representations(towers, images, layers=[1, 24], grid=4, batch_size=2)
    assert feats.shape == (2, 3, representation_size(towers, 4)) == (2, 3, 17 * 32) and feats.dtype == np.float32
    import torch

    from brainmclip.features.clip_extractor import ClipFeatureExtractor

    with torch.no_grad():
        pixels = ClipFeatureExtractor(towers).preprocess(images)
        hidden = towers.vision.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[24]
    tokens = feats[1].reshape(3, 17, 32)
    np.testing.assert_allclose(tokens[:, 0], hidden[:, 0].numpy(), atol=1e-5)  # CLS first
    patches = hidden[:, 1:].reshape(3, 16, 16, 32).numpy()
    np.testing.assert_allclose(tokens[:, 1], patches[:, :4, :4].mean((1, 2)), atol=1e-5)  # top-left cell
    np.testing.assert_allclose(tokens[:, 16], patches[:, 12:, 12:].mean((1, 2)), atol=1e-5)  # bottom-right cell
    whole = layer_representations(towers, images[:1], layers=[24], grid=16)
    np.testing.assert_allclose(whole[0, 0], hidden[0].reshape(-1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="outside 1..24"):
        layer_representations(towers, images, layers=[25])


# -- data ---------------------------------------------------------------------------------
def test_rois_and_averaged_patterns(tiny_nsd, tiny_prepared, tmp_path):
    prepared = load_prepared(tiny_prepared)
    masks = roi_masks(prepared.voxels)
    assert list(masks) == list(ROIS)
    prf = prepared.voxels.roi_labels["prf-visualrois"]
    assert np.array_equal(masks["V2"], (prf == 3) | (prf == 4))
    assert np.array_equal(masks["early"], masks["V1"] | masks["V2"] | masks["V3"] | masks["hV4"])
    assert np.array_equal(np.flatnonzero(masks["higher"]), prepared.voxels.group("high_level"))
    ids, betas, images = split_patterns(prepared, "test", n_images=5)
    assert np.array_equal(ids, prepared.test.stimulus_ids[:5]) and betas.shape == (5, prepared.voxels.n_voxels)
    assert images.shape[0] == 5 and images.dtype == np.uint8
    # Single-trial data: repeats of an image are averaged into one pattern, as for evaluation.
    single = load_prepared(prepare_subject(tiny_nsd.root, 1, tmp_path / "single",
                                           PrepareOptions(single_trial=True), progress=False).root)
    ids, betas, images = split_patterns(single, "test")
    raw = single.test
    assert len(ids) == len(np.unique(raw.stimulus_ids)) < len(raw.stimulus_ids)
    for k in (0, len(ids) - 1):
        rows = raw.stimulus_ids == ids[k]
        np.testing.assert_allclose(betas[k], np.asarray(raw.betas)[rows].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(images[k], raw.images[np.flatnonzero(rows)[0]])


# -- the command --------------------------------------------------------------------------
def test_command_writes_the_analysis(tiny_prepared, tmp_path, capsys):
    out = tmp_path / "rsa"
    assert main(["-q", "analyze", "rsa", "--data", str(tiny_prepared), "--clip", "mini", "--out", str(out)]) == 0
    assert "best layer" in capsys.readouterr().out
    summary = load_analysis(out)
    assert summary["analysis"] == "rsa" and summary["settings"]["n_images"] == 40
    assert [row["ROI"] for row in summary["table"]] == list(ROIS)
    assert set(summary["table"][0]) >= {"best layer", "best RSA", "layer 01", "layer 12", "layer 24"}
    assert "paper" in summary["caption"] and "miniature" in summary["caption"]
    with np.load(out / "rsa.npz") as data:
        assert data["rsa"].shape == (len(ROIS), 24) and np.isfinite(data["rsa"]).all()
        assert list(data["rois"]) == list(ROIS) and len(data["stimulus_ids"]) == 40
        first = data["rsa"][0]
    lines = (out / "rsa.csv").read_text().splitlines()
    assert lines[0].startswith("roi,n_voxels,layer_1,") and len(lines) == 1 + len(ROIS)
    np.testing.assert_allclose([float(v) for v in lines[1].split(",")[2:]], first, atol=1e-6)
    from PIL import Image

    with Image.open(out / "figure.png") as im:
        assert im.size[0] > 800 and im.size[1] > 300


def test_command_errors(tiny_prepared, tmp_path, capsys):
    args = ["analyze", "rsa", "--clip", "mini", "--out", str(tmp_path / "o")]
    assert main([*args, "--data", str(tmp_path / "missing")]) == 1
    assert "no such prepared dataset folder" in capsys.readouterr().err
    assert main([*args, "--data", str(tiny_prepared), "--rois", "V1", "FFA"]) == 1
    err = capsys.readouterr().err
    assert "Unknown ROI 'FFA'" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--data", str(tiny_prepared), "--split", "holdout"]) == 1
    assert "Unknown split='holdout'" in capsys.readouterr().err
    assert main([*args, "--data", str(tiny_prepared), "--n-images", "2"]) == 1
    assert "at least 3" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.json").exists()


# -- the simulated brain ------------------------------------------------------------------
@pytest.fixture(scope="module")
def rsa_world(tmp_path_factory):
    """A simulated subject with enough test images (200) and voxels (1500) for stable RSA profiles.

    The tiny preset's 40 test images and ~20-voxel floc ROIs leave the profiles to noise; this one
    is the tiny preset's image size with more images and voxels, still seconds to write.
    """
    base = tmp_path_factory.mktemp("rsa_world")
    preset = replace(load_preset("tiny"), name="rsa-check", n_images=400, n_shared=200,
                     grid_shapes=((22, 26, 22),) * 8, nsdgeneral_counts=(1500,) * 8)
    nsd = make_synthetic_nsd(base / "nsd", preset=preset, subjects=(1,), seed=0, progress=False)
    return prepare_subject(nsd.root, 1, base / "prepared", PrepareOptions(), progress=False).root


def test_simulated_brain_shows_the_paper_hierarchy(rsa_world, tmp_path):
    """Early visual ROIs match mini-CLIP's intermediate layers best and lose that match at the final
    layer, while the category-selective ROIs keep theirs: the paper's finding in miniature.

    The simulated pRF voxels read local contrast and colour, which mini-CLIP represents best at
    layer 16 (its fourth trained block); its last layer represents the scene's categories best, and
    the floc voxels read those together with object size, colour and background. Over seeds 0-5 of
    this world the early ROIs always peaked at layer 16 and ``drop_early - drop_higher`` (the fall
    from layer 16 to layer 24) was 0.030-0.068 (0.04 for seed 0; 0.08 on the demo's small preset).
    Which layer the floc union prefers is *not* stable (12, 15 or 24 from seed to seed): its RSA is
    flat from layer 12 on, so that is not asserted.
    """
    out = tmp_path / "rsa"
    assert main(["-q", "analyze", "rsa", "--data", str(rsa_world), "--clip", "mini", "--out", str(out),
                 "--rois", "early", "higher"]) == 0
    with np.load(out / "rsa.npz") as data:
        early, higher = data["rsa"]
    assert int(np.argmax(early)) + 1 == 16
    drop_early, drop_higher = early[15] - early[23], higher[15] - higher[23]
    assert drop_early - drop_higher > 0.02
    # Both hierarchies rise out of the first layers: the patch embedding is the worst match for both.
    assert early.max() - early[0] > 0.05 and higher.max() - higher[0] > 0.02
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["rois"] == {"early": 540, "higher": 309}
