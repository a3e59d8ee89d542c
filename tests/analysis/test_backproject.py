"""backproject: linear encoders from CLIP embeddings to voxels, applied to predicted embeddings, per ROI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from brainmclip.analysis.backproject import (
    ROIS,
    fit_encoder,
    pool_embeddings,
    roi_masks,
    roi_summary,
    voxel_correlations,
)
from brainmclip.cli import main
from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.prepared import load_prepared
from brainmclip.features.feature_store import FeatureStore
from brainmclip.models.predictions import write_predictions

TOKENS, DIM = 3, 8


# -- pieces against independent references -----------------------------------------------------------
def test_encoder_is_ridge_regression():
    """One alpha: the encoder's predictions are sklearn's Ridge (and the normal equations) on the unscaled X."""
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8)) * 3.0 + 1.0
    Y = X @ rng.normal(size=(8, 5)) + rng.normal(size=(60, 5))
    X_new = rng.normal(size=(7, 8))
    alpha = 4.0
    (model, scale) = fit_encoder(X, Y, alphas=[alpha])
    ours = model.predict((X_new / scale).astype(np.float32))
    # dividing X by `scale` before a penalty alpha is the same as a penalty alpha * scale^2 on X itself
    ref = Ridge(alpha=alpha * scale**2).fit(X, Y).predict(X_new)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    W = np.linalg.solve(Xc.T @ Xc + alpha * scale**2 * np.eye(8), Xc.T @ Yc)
    np.testing.assert_allclose(ours, (X_new - X.mean(0)) @ W + Y.mean(0), rtol=1e-4, atol=1e-4)
    assert scale == pytest.approx(np.sqrt(np.mean((X - X.mean(0)) ** 2)), rel=1e-5)


def test_encoder_alpha_per_voxel():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 6))
    Y = np.stack([X @ rng.normal(size=6), rng.normal(size=80)], 1)  # one predictable voxel, one pure noise
    model, _ = fit_encoder(X, Y, alphas=[1e-2, 1e2, 1e6], n_folds=4)
    assert model.alpha_.shape == (2,)
    assert model.alpha_[0] < model.alpha_[1]  # noise is best predicted by (almost) its mean


def test_voxel_correlations_and_roi_summary():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    b[:, 3] = 1.0  # a constant voxel has no correlation
    r = voxel_correlations(a, b)
    np.testing.assert_allclose(r[:3], [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(3)], atol=1e-12)
    assert np.isnan(r[3])
    summary = roi_summary(r, {"x": np.array([True, True, False, True]), "y": np.array([False, False, False, True])})
    assert summary["x"][0] == pytest.approx(r[:2].mean()) and summary["x"][2] == 2
    assert summary["x"][1] == pytest.approx(np.std(r[:2], ddof=1) / np.sqrt(2))
    assert summary["y"][2] == 0 and np.isnan(summary["y"][0])
    with pytest.raises(ValueError, match="same shape|one shape"):
        voxel_correlations(a, b[:, :2])


def test_pool_embeddings():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    assert pool_embeddings(x, "flat").shape == (2, 12)
    pooled = pool_embeddings(x, "cls+mean")
    np.testing.assert_array_equal(pooled, np.concatenate([x[:, 0], x[:, 1:].mean(1)], 1))
    with pytest.raises(ValueError, match="Unknown pooling"):
        pool_embeddings(x, "max")


# -- the command on a tiny subject with planted structure --------------------------------------------------
@pytest.fixture(scope="module")
def planted(tiny_nsd, tmp_path_factory):
    """A tiny prepared subject and a feature store whose semantic embedding is a linear read-out of the high-level
    voxels and whose detail embedding one of the low-level voxels (the same for every image, train and test)."""
    base = tmp_path_factory.mktemp("backproject")
    prepared = load_prepared(prepare_subject(tiny_nsd.root, 1, base / "prepared", PrepareOptions(),
                                             progress=False).root)
    rng = np.random.default_rng(3)
    ids, betas = [], []
    for split in ("train", "val", "test"):
        ids.append(prepared.splits[split].stimulus_ids)
        betas.append(np.asarray(prepared.splits[split].betas))
    ids, betas = np.concatenate(ids), np.concatenate(betas)
    high, low = prepared.voxels.group("high_level"), prepared.voxels.group("low_level")

    def readout(columns):
        weights = rng.normal(size=(len(columns), TOKENS * DIM)) / np.sqrt(len(columns))
        return (betas[:, columns] @ weights).reshape(len(ids), TOKENS, DIM).astype(np.float32)

    arrays = {"image_semantic": readout(high), "image_detail": readout(low),
              "text": rng.normal(size=(len(ids), 2, DIM)).astype(np.float32)}
    store = FeatureStore.create(base / "features", {"model": "planted", "embed_dim": DIM})
    store.write_shard(ids, arrays)
    store.finish()
    test = prepared.test.stimulus_ids
    row = {int(i): r for r, i in enumerate(ids)}
    true = {k: arrays[k][[row[int(i)] for i in test]] for k in ("image_semantic", "image_detail")}
    noisy = {k: v + 0.3 * v.std() * rng.normal(size=v.shape).astype(np.float32) for k, v in true.items()}
    noisy["image"] = (noisy["image_semantic"] + noisy["image_detail"]) / 2
    manifest = {"method": "brain_mclip", "subject": 1, "split": "test"}
    write_predictions(base / "pred", test, noisy, manifest)
    write_predictions(base / "pred_fused", test, {"image": noisy["image"]}, {**manifest, "method": "mindeye"})
    write_predictions(base / "pred_subj2", test, noisy, {**manifest, "subject": 2})
    write_predictions(base / "pred_wide", test, {"image": np.zeros((len(test), TOKENS, DIM + 1), np.float32)},
                      manifest)
    return base, prepared


def test_roi_masks(planted):
    _, prepared = planted
    masks = roi_masks(prepared.voxels)
    assert list(masks) == list(ROIS)
    prf = prepared.voxels.roi_labels["prf-visualrois"]
    np.testing.assert_array_equal(masks["V1"], (prf == 1) | (prf == 2))
    np.testing.assert_array_equal(masks["hV4"], prf == 7)
    np.testing.assert_array_equal(masks["early"], masks["V1"] | masks["V2"] | masks["V3"] | masks["hV4"])
    higher = masks["bodies"] | masks["faces"] | masks["places"] | masks["words"]
    np.testing.assert_array_equal(masks["higher"], higher)
    np.testing.assert_array_equal(np.flatnonzero(masks["higher"]), prepared.voxels.group("high_level"))


def test_planted_pathways_show_up_per_roi(planted, tmp_path, capsys):
    base, prepared = planted
    out = tmp_path / "bp"
    assert main(["analyze", "backproject", "--data", str(prepared.root), "--features", str(base / "features"),
                 "--predictions", str(base / "pred"), "--out", str(out), "--folds", "3"]) == 0
    assert "ê_I,S and ê_I,D" in capsys.readouterr().out
    rows = {r["ROI"]: r for r in csv.DictReader((out / "roi_correlations.csv").open())}
    assert list(rows) == list(ROIS)
    for roi in ("V1", "V2", "early"):  # the detail embedding was read out of the low-level voxels
        assert float(rows[roi]["r detail (pred)"]) > float(rows[roi]["r semantic (pred)"]) + 0.1, rows[roi]
    for roi in ("higher", "bodies", "faces", "places"):  # the semantic one out of the high-level voxels
        assert float(rows[roi]["r semantic (pred)"]) > float(rows[roi]["r detail (pred)"]) + 0.1, rows[roi]
    # noise-free embeddings do at least as well as the noisy predictions in their own areas
    assert float(rows["early"]["r detail (true emb.)"]) >= float(rows["early"]["r detail (pred)"]) - 0.02
    data = np.load(out / "correlations.npz")
    masks = roi_masks(prepared.voxels)
    assert float(rows["V1"]["r detail (pred)"]) == pytest.approx(np.nanmean(data["r_detail"][masks["V1"]]), abs=1e-4)
    assert int(rows["V1"]["voxels"]) == masks["V1"].sum()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["analysis"] == "backproject" and manifest["settings"]["pooling"] == "flat"
    assert (out / "figure.png").stat().st_size > 10_000


def test_fused_only_predictions_fall_back_with_a_note(planted, tmp_path, capsys):
    base, prepared = planted
    out = tmp_path / "fused"
    assert main(["analyze", "backproject", "--data", str(prepared.root), "--features", str(base / "features"),
                 "--predictions", str(base / "pred_fused"), "--out", str(out), "--pooling", "cls+mean",
                 "--folds", "3"]) == 0
    printed = capsys.readouterr().out
    assert "image.npy" in printed and "note:" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert "no image_semantic.npy" in manifest["caption"] and manifest["settings"]["pooling"] == "cls+mean"


def test_clear_errors(planted, tmp_path, capsys, fails):
    base, prepared = planted
    argv = ["analyze", "backproject", "--data", str(prepared.root), "--features", str(base / "features"),
            "--out", str(tmp_path / "o"), "--predictions"]
    fails([*argv, str(base / "pred_subj2")], "predictions of subject 2, but .* is subject 1")
    fails([*argv, str(base / "pred_wide")], "different CLIPs")
    fails([*argv, str(tmp_path / "nothing")], "nothing")
    other = tmp_path / "other_store"
    store = FeatureStore.create(other, {"model": "planted", "embed_dim": DIM})
    store.write_shard(prepared.test.stimulus_ids, {k: np.zeros((len(prepared.test), TOKENS, DIM), np.float32)
                                                   for k in ("image_semantic", "image_detail", "text")})
    fails([*argv[:5], str(other), *argv[6:], str(base / "pred")], "lacks .* training images")
    assert not (tmp_path / "o" / "manifest.json").exists()
