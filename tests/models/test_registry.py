"""The method table behind ``brainmclip train`` / ``predict``: option checks, BrainCLIP and pooled-target ridge runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

from brainmclip.cli import main
from brainmclip.config import load_config
from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import InvalidInputError
from brainmclip.features.extract import extract_features
from brainmclip.features.feature_store import open_feature_store
from brainmclip.models.predictions import load_predictions
from brainmclip.models.registry import METHODS, OPTIONS, get_method, method_names


@pytest.fixture(scope="module")
def tiny_data(tiny_nsd, tmp_path_factory):
    """Subject 1 of the shared tiny simulated NSD, prepared, with its tiny-CLIP feature store."""
    base = tmp_path_factory.mktemp("registry")
    prepared = prepare_subject(tiny_nsd.root, 1, base / "prepared", PrepareOptions(), progress=False)
    extract_features([prepared.root], base / "features", model="tiny", progress=False)
    return prepared.root, base / "features"


def _cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["-q", *[str(a) for a in args]])
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


# ----------------------------------------------------------------------------- the table
def test_table_lists_every_method_with_known_options_and_loadable_configs():
    assert method_names() == list(METHODS)
    assert set(METHODS) == {"brain_mclip", "brainclip", "ridge", "minddiffuser", "gt_embedding"}
    for name, method in METHODS.items():
        assert method.name == name and get_method(name) is method and method.description
        assert method.options <= set(OPTIONS)
        for config in method.default_config:
            assert load_config(config).get("method", name) == name
    assert METHODS["brainclip"].options == {"config", "overrides", "resume"}
    assert METHODS["ridge"].options == {"config", "overrides"}
    assert METHODS["gt_embedding"].options == set()
    with pytest.raises(InvalidInputError, match="Unknown method 'lasso'"):
        get_method("lasso")


def test_check_options_refuses_what_a_method_does_not_take():
    brainclip = METHODS["brainclip"]
    # Given but empty (the CLI's defaults) is not "given".
    brainclip.check_options({"config": ["brainclip_vae_v"], "overrides": ["train.epochs=1"], "resume": True,
                             "stop_after_steps": None, "cpu": False})
    with pytest.raises(InvalidInputError) as info:
        brainclip.check_options({"cpu": True, "stop_after_steps": 10, "resume": True})
    message = str(info.value)
    assert "\n" not in message and "--cpu" in message and "--stop-after-steps" in message
    assert "--method brainclip" in message and "--resume" not in message.split("(")[0]
    with pytest.raises(InvalidInputError, match=r"--config .*--method gt_embedding \(it takes none of them\)"):
        METHODS["gt_embedding"].check_options({"config": ["x"], "overrides": []})


@pytest.mark.parametrize(("method", "flags", "flag"), [
    ("ridge", ["--resume"], "--resume"),
    ("gt_embedding", ["--config", "X"], "--config"),
    ("brainclip", ["--cpu"], "--cpu"),
    ("brainclip", ["--stop-after-steps", "5"], "--stop-after-steps"),
    ("ridge", ["--set", "ridge.n_folds=3", "--cpu"], "--cpu"),
])
def test_cli_refuses_a_flag_the_method_does_not_take(capsys, tmp_path, method, flags, flag):
    out = tmp_path / "run"
    code, _, err = _cli(capsys, "train", "--method", method, "--data", tmp_path / "nodata",
                        "--features", tmp_path / "nofeatures", "--out", out, *flags)
    assert code == 1, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert flag in err and f"--method {method}" in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- BrainCLIP through the CLI
def test_cli_trains_and_predicts_brainclip(capsys, tiny_data, tmp_path):
    data, features = tiny_data
    run = tmp_path / "brainclip"
    code, out, err = _cli(capsys, "train", "--method", "brainclip", "--config", "brainclip_linear_v", "--data", data,
                          "--features", features, "--out", run, "--set", "train.epochs=2",
                          "--set", "train.batch_size=64")
    assert code == 0, err
    assert "BrainCLIP run at" in out and "best epoch" in out
    record = json.loads((run / "run.json").read_text())
    assert record["method"] == "brainclip" and record["config"]["train"]["epochs"] == 2 and record["complete"]
    weights = (run / "model_best.safetensors").read_bytes()
    # --resume of a finished run: accepted for this method, nothing left to train.
    code, _, err = _cli(capsys, "train", "--method", "brainclip", "--data", data, "--features", features,
                        "--out", run, "--resume")
    assert code == 0, err
    assert (run / "model_best.safetensors").read_bytes() == weights
    code, out, err = _cli(capsys, "predict", "--run", run)
    assert code == 0, err
    pred = load_predictions(run / "predictions_test")
    n = len(np.unique(load_prepared(data).splits["test"].stimulus_ids))
    assert pred.method == "brainclip" and pred.image.shape == pred.text.shape == (n, 1, 32)
    np.testing.assert_array_equal(pred.image, pred.text)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(pred.image, np.float32), axis=-1), 1, atol=2e-3)


# ----------------------------------------------------------------------------- ridge to CLIP's pooled embedding
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pooled_image_targets(features, ids) -> np.ndarray:
    """Token 0 of the store's semantic target, normalised: CLIP's image embedding."""
    tokens = open_feature_store(features).get(ids, ["image_semantic"])["image_semantic"]
    return _unit(np.asarray(tokens[:, 0], np.float64))


def test_ridge_to_clip_image_matches_sklearn(capsys, tiny_data, tmp_path):
    data, features = tiny_data
    run = tmp_path / "ridge_clip"
    code, out, err = _cli(capsys, "train", "--method", "ridge", "--config", "ridge_clip_v", "--data", data,
                          "--features", features, "--out", run, "--set", "ridge.n_folds=3")
    assert code == 0, err
    assert sorted(p.name for p in run.glob("ridge_*.npz")) == ["ridge_clip.npz"]
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["ridge"]["targets"] == "clip_image" and set(record["alphas"]) == {"clip"}
    alpha = record["alphas"]["clip"]
    grid = record["config"]["ridge"]["alphas"]
    assert alpha in grid

    prepared = load_prepared(data)
    train, test = prepared.splits["train"], prepared.splits["test"]
    X = np.asarray(train.betas, np.float64)
    Y = _pooled_image_targets(features, train.stimulus_ids)
    # The alpha: lowest total squared error over 3 contiguous folds (sklearn's KFold without shuffling).
    errors = []
    for a in grid:
        sse = 0.0
        for fit_rows, val_rows in KFold(3).split(X):
            model = Ridge(alpha=a).fit(X[fit_rows], Y[fit_rows])
            sse += float(np.sum((model.predict(X[val_rows]) - Y[val_rows]) ** 2))
        errors.append(sse)
    ranked = np.sort(errors)
    if ranked[1] - ranked[0] > 1e-6 * ranked[0]:  # no near-tie
        assert alpha == grid[int(np.argmin(errors))]
    want = _unit(Ridge(alpha=alpha).fit(X, Y).predict(np.asarray(test.betas, np.float64)))

    # float32 outputs of the run, through the method table ...
    outputs = METHODS["ridge"].outputs(run, record, prepared, "test")
    assert outputs["image"].shape == (len(test.stimulus_ids), 1, 32)
    np.testing.assert_allclose(outputs["image"][:, 0], want, atol=1e-4)
    np.testing.assert_array_equal(outputs["image"], outputs["text"])
    # ... and the float16 prediction files written by `brainmclip predict`.
    code, _, err = _cli(capsys, "predict", "--run", run)
    assert code == 0, err
    pred = load_predictions(run / "predictions_test")
    assert pred.method == "ridge" and pred.image.shape == pred.text.shape == (len(pred), 1, 32)
    assert pred.image_semantic is None and pred.manifest["clip"] == record["clip"]
    np.testing.assert_array_equal(pred.image, pred.text)
    rows = {int(i): r for r, i in enumerate(test.stimulus_ids.tolist())}
    got = np.asarray(pred.image[:, 0], np.float32)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1, atol=2e-3)
    np.testing.assert_allclose(got, want[[rows[int(i)] for i in pred.stimulus_ids]], atol=1e-3)


def test_ridge_to_clip_text_writes_pooled_predictions(capsys, tiny_data, tmp_path):
    data, features = tiny_data
    run = tmp_path / "ridge_text"
    code, _, err = _cli(capsys, "train", "--method", "ridge", "--config", "ridge_clip_t", "--data", data,
                        "--features", features, "--out", run, "--set", "ridge.n_folds=3",
                        "--set", "ridge.alphas=[100.0]")
    assert code == 0, err
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["ridge"]["targets"] == "clip_text" and record["alphas"] == {"clip": 100.0}
    outputs = METHODS["ridge"].outputs(run, record, load_prepared(data), "val")
    assert outputs["image"].shape[1:] == (1, 32)
    np.testing.assert_allclose(np.linalg.norm(outputs["image"], axis=-1), 1, atol=1e-5)
