"""BrainCLIP end to end through the command line, on a simulated NSD and a simulated GOD.

NSD: prepare -> extract (tiny CLIP) -> train brainclip (linear V&T, and VAE V) -> predict (test and train)
-> evaluate --pred (retrieval) -> report --analyses -> classify (labels from the simulated scenes).
GOD: simulate-god -> prepare --format god -> extract -> train brainclip -> predict -> classify with a CoOp
context learned on the train predictions. Every step must exit 0 and leave what the next one reads; user
mistakes end as one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from brainmclip.cli import main
from brainmclip.models.predictions import load_predictions


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one torch thread is faster and steadier."""


def _ok(*argv) -> None:
    args = ["-q", *map(str, argv)]
    assert main(args) == 0, args


def _check_brainclip_predictions(folder, n: int, dim: int = 32) -> np.ndarray:
    pred = load_predictions(folder)
    assert pred.method == "brainclip" and len(pred) == n
    assert pred.image.shape == pred.text.shape == (n, 1, dim) and pred.image.dtype == np.float16
    vectors = np.asarray(pred.image[:, 0], np.float64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)
    np.testing.assert_array_equal(pred.image, pred.text)
    assert pred.manifest["clip"] == "random:tiny"
    return vectors


def _check_zero_shot(folder, prompt: str) -> dict:
    result = json.loads((folder / "zero_shot.json").read_text())
    assert result["prompt"] == prompt and result["method"] == "brainclip" and result["n_rows"] > 0
    for table in result["tables"]:
        assert 0 <= table["topk"]["1"]["accuracy"] <= 1 and table["topk"]["1"]["chance"] > 0
    return result


def test_brainclip_chain_on_simulated_nsd(tiny_nsd, tmp_path):
    prepared, features, run = tmp_path / "prepared", tmp_path / "features", tmp_path / "run"
    _ok("prepare", "--nsd-root", tiny_nsd.root, "--subject", 1, "--out", prepared)
    _ok("extract", "--data", prepared, "--model", "tiny", "--out", features)
    _ok("train", "--method", "brainclip", "--config", "brainclip_linear_vt", "--set", "train.epochs=2",
        "--data", prepared, "--features", features, "--out", run)
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["loss"] == {**record["config"]["loss"], "alpha": 0.5, "beta": 0.5}
    assert record["config"]["train"]["epochs"] == 2
    _ok("predict", "--run", run)
    _ok("predict", "--run", run, "--split", "train")
    test = _check_brainclip_predictions(run / "predictions_test", 40)
    _check_brainclip_predictions(run / "predictions_train", 181)
    assert np.linalg.matrix_rank(test) > 1  # not one vector for every image

    evaluation = tmp_path / "retrieval"
    _ok("evaluate", "--pred", run / "predictions_test", "--out", evaluation, "--bootstrap", 100)
    md = (evaluation / "retrieval.md").read_text()
    assert "BrainCLIP-Linear (V&T)" in md and "fMRI→text" in md
    (entry,) = json.loads((evaluation / "retrieval.json").read_text())["runs"]
    for kind in ("image", "text"):
        for name, value in entry[kind].items():
            assert 0 <= value["ci95"][0] <= value["value"] <= value["ci95"][1] <= 1, (kind, name)
    assert (features / "captions" / "manifest.json").is_file()  # the caption cache lives with the store
    report = tmp_path / "report"
    _ok("report", "--analyses", evaluation, "--out", report)
    html = (report / "index.html").read_text()
    assert "fMRI → image / text retrieval" in html and "BrainCLIP-Linear (V&amp;T)" in html

    classified = tmp_path / "classified"
    _ok("classify", "--pred", run / "predictions_test", "--out", classified)
    result = _check_zero_shot(classified, "ensemble")
    assert result["labels_source"].endswith("scenes.jsonl (category)") and result["n_rows"] == 40

    vae = tmp_path / "vae"
    _ok("train", "--method", "brainclip", "--config", "brainclip_vae_v", "--set", "train.epochs=2",
        "--set", "vae.steps=20", "--set", "model.hidden_dim=16", "--set", "model.latent_dim=8",
        "--data", prepared, "--features", features, "--out", vae)
    assert json.loads((vae / "run.json").read_text())["config"]["model"]["mapping"] == "vae"
    _ok("predict", "--run", vae)
    _check_brainclip_predictions(vae / "predictions_test", 40)


def test_brainclip_chain_on_simulated_god(tmp_path):
    god, prepared, features, run = (tmp_path / n for n in ("god", "prepared", "features", "run"))
    _ok("simulate-god", "--preset", "tiny", "--out", god)
    _ok("prepare", "--format", "god", "--input", god, "--images", god / "images", "--class-names",
        god / "class_names.csv", "--subject", 1, "--out", prepared)
    labels = json.loads((prepared / "labels.json").read_text())
    class_names = [line.split(",")[1].strip() for line in (god / "class_names.csv").read_text().splitlines()[1:]
                   if line.strip()]
    assert set(labels["classes"]) <= set(class_names)  # named classes, not WordNet ids
    _ok("extract", "--data", prepared, "--model", "tiny", "--out", features)
    _ok("train", "--method", "brainclip", "--config", "brainclip_linear_v", "--set", "train.epochs=2",
        "--data", prepared, "--features", features, "--out", run)
    _ok("predict", "--run", run)
    _ok("predict", "--run", run, "--split", "train")
    n_test = len(load_predictions(run / "predictions_test"))
    _check_brainclip_predictions(run / "predictions_test", n_test)

    classified = tmp_path / "classified"
    _ok("classify", "--pred", run / "predictions_test", "--out", classified, "--train-context", "--steps", 5)
    result = _check_zero_shot(classified, "coop")
    assert result["n_rows"] == n_test and result["labels_source"].endswith("labels.json")
    assert (classified / "context.safetensors").is_file()


def _fails(capsys, argv, pattern) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err
    return err


def test_user_mistakes_are_one_line(tiny_nsd, tmp_path, capsys):
    _fails(capsys, ["prepare", "--format", "god", "--subject", 1, "--out", tmp_path / "p"],
           "--input is required for --format god")
    _fails(capsys, ["prepare", "--nsd-root", tiny_nsd.root, "--images", tmp_path, "--subject", 1,
                    "--out", tmp_path / "p"], "--images: for --format god only")
    _fails(capsys, ["prepare", "--nsd-root", tiny_nsd.root, "--class-names", tmp_path / "c.csv", "--subject", 1,
                    "--out", tmp_path / "p"], "--class-names: for --format god only")
    assert not (tmp_path / "p").exists()
    not_predictions = tmp_path / "folder"
    not_predictions.mkdir()
    (not_predictions / "manifest.json").write_text(json.dumps({"format": "brainmclip-prepared/1", "complete": True}))
    _fails(capsys, ["evaluate", "--pred", not_predictions, "--out", tmp_path / "e"], "expected 'brainmclip-predictions/1'")
    _fails(capsys, ["evaluate", "--pred", tmp_path, "--out", tmp_path / "e"], "prediction folder")
    _fails(capsys, ["evaluate", "--pred", tmp_path / "absent", "--out", tmp_path / "e"], "absent")
    assert not (tmp_path / "e" / "retrieval.json").exists()
