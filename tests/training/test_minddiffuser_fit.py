"""MindDiffuser's trainer: one voxel-selected ridge per target, Algorithm 1's masks, predictions through the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainmclip.cli import main
from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.prepared import load_prepared
from brainmclip.features.feature_store import open_feature_store
from brainmclip.features.minddiffuser_targets import extract_minddiffuser_targets
from brainmclip.models.predictions import load_predictions
from brainmclip.models.voxel_ridge import VoxelSelectedRidge

pytest.importorskip("diffusers")

SETTINGS = ["--set", "decoders.sd_text=20", "--set", "decoders.sd_latent=30", "--set", "decoders.structural=25",
            "--set", "ridge.n_folds=3", "--set", "ridge.alphas=[10,1000]", "--set", "selection.top_percent=20"]


@pytest.fixture(scope="module")
def run(tiny_nsd, tmp_path_factory):
    base = tmp_path_factory.mktemp("minddiffuser")
    prepared = prepare_subject(tiny_nsd.root, 1, base / "subj01", PrepareOptions(), progress=False)
    extract_minddiffuser_targets([prepared.root], base / "targets", sd="mini", structural_clip="mini", layers=(2, 4),
                                 progress=False)
    out = base / "run"
    assert main(["-q", "train", "--method", "minddiffuser", "--data", str(prepared.root), "--features",
                 str(base / "targets"), "--out", str(out), *SETTINGS]) == 0
    return prepared.root, base / "targets", out


def test_each_decoder_is_the_voxel_selected_ridge_of_its_target(run):
    data, targets, out = run
    prepared = load_prepared(data, images=False)
    store = open_feature_store(targets)
    X = np.asarray(prepared.train.betas, np.float32)
    Y = store.get(prepared.train.stimulus_ids, ["sd_text"])["sd_text"]
    direct = VoxelSelectedRidge(n_voxels=20, alphas=[10, 1000], n_folds=3).fit(X, Y.reshape(len(Y), -1))
    saved = VoxelSelectedRidge.load(out / "decoder_sd_text.npz")
    np.testing.assert_array_equal(saved.selected_, direct.selected_)
    np.testing.assert_allclose(saved.coef_, direct.coef_, rtol=1e-10, atol=1e-12)


def test_masks_keep_the_top_share_of_dimensions_by_validation_r(run):
    data, targets, out = run
    prepared = load_prepared(data, images=False)
    store = open_feature_store(targets)
    X_val = np.asarray(prepared.val.betas, np.float32)
    true = store.get(prepared.val.stimulus_ids, ["struct_04"])["struct_04"].reshape(len(X_val), -1).astype(np.float64)
    pred = VoxelSelectedRidge.load(out / "decoder_struct_04.npz").predict(X_val).reshape(len(X_val), -1)
    r = np.array([np.corrcoef(pred[:, j], true[:, j])[0, 1] if true[:, j].std() > 0 and pred[:, j].std() > 0 else 0.0
                  for j in range(true.shape[1])])
    with np.load(out / "structural_masks.npz") as masks:
        mask = masks["struct_04"].ravel()
        assert set(masks.files) == {"struct_02", "struct_04"}
    assert mask.sum() == round(0.2 * mask.size)
    assert r[mask].min() >= r[~mask].max() - 1e-9  # every kept dimension decodes at least as well as every dropped one
    record = json.loads((out / "run.json").read_text())
    assert record["complete"] and record["decoders"]["struct_04"]["val_r_kept"] > record["decoders"]["struct_04"]["val_r"]


def test_predictions_hold_every_target_in_the_store_layout(run):
    data, targets, out = run
    assert main(["-q", "predict", "--run", str(out)]) == 0
    pred = load_predictions(out / "predictions_test")
    store = open_feature_store(targets)
    assert set(pred.targets) == set(store.targets)
    for name, value in pred.targets.items():
        assert value.shape == (len(pred), *store.get(pred.stimulus_ids[:1], [name])[name].shape[1:])
    assert pred.image is None and pred.method == "minddiffuser"


def test_rerun_keeps_the_decoders_and_other_settings_are_refused(run, capsys):
    data, targets, out = run
    before = (out / "decoder_sd_latent.npz").stat().st_mtime_ns
    assert main(["-q", "train", "--method", "minddiffuser", "--data", str(data), "--features", str(targets), "--out",
                 str(out), *SETTINGS]) == 0
    assert (out / "decoder_sd_latent.npz").stat().st_mtime_ns == before
    assert main(["-q", "train", "--method", "minddiffuser", "--data", str(data), "--features", str(targets), "--out",
                 str(out), *SETTINGS, "--set", "selection.top_percent=50"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["-q", "train", "--method", "minddiffuser", "--data", str(data), "--features", str(targets), "--out",
                 str(out), "--resume"]) == 1
