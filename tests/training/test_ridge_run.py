"""`brainmclip train --method ridge` writes runs and predictions that later stages read like BrainMCLIP's."""

from __future__ import annotations

import numpy as np

from brainmclip.cli import main
from brainmclip.evaluation.retrieval import similarity_matrix, top1_n_way
from brainmclip.features import open_feature_store
from brainmclip.models.predictions import load_predictions


def test_ridge_run_predicts_in_the_shared_format(tiny_data, tmp_path, capsys):
    data, features = tiny_data
    run = tmp_path / "ridge"
    assert main(["-q", "train", "--method", "ridge", "--data", str(data), "--features", str(features),
                 "--out", str(run), "--set", "ridge.n_folds=3"]) == 0
    assert "alphas chosen by CV" in capsys.readouterr().out
    assert main(["-q", "predict", "--run", str(run)]) == 0
    pred = load_predictions(run / "predictions_test")
    assert pred.method == "ridge" and pred.image.shape == (len(pred), 257, 32) and pred.text.shape[1] == 77
    np.testing.assert_allclose(np.asarray(pred.image, np.float32),
                               (np.asarray(pred.image_semantic, np.float32) + np.asarray(pred.image_detail, np.float32)) / 2,
                               atol=2e-3)
    targets = open_feature_store(features).get(pred.stimulus_ids)
    fused = (targets["image_semantic"] + targets["image_detail"]) / 2
    top1 = top1_n_way(similarity_matrix(np.asarray(pred.image, np.float32), fused), n_way=len(pred), n_repeats=1)
    assert top1["image_retrieval"]["mean"] > 2 / len(pred)  # chance is 1 / n
