"""layer-sweep: one feature store and one fast decoder per detail-layer range, scored and resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainmclip.analysis.layer_sweep import score_embeddings
from brainmclip.cli import main
from brainmclip.data.prepare import PrepareOptions, prepare_subject


@pytest.fixture(scope="module")
def prepared(tiny_nsd, tmp_path_factory):
    """Sessions 1-4 only (47 train, 12 test images): every range extracts features of all its images."""
    out = tmp_path_factory.mktemp("layer_sweep") / "prepared"
    return prepare_subject(tiny_nsd.root, 1, out, PrepareOptions(sessions=(1, 2, 3, 4)), progress=False).root


def test_scores_against_a_brute_force_reference():
    rng = np.random.default_rng(0)
    n = 12
    semantic, detail = rng.normal(size=(n, 3, 4)), rng.normal(size=(n, 3, 4))
    fused = (semantic + detail) / 2
    pred = fused + 1.5 * rng.normal(size=fused.shape)
    pred_detail = detail + 1.5 * rng.normal(size=detail.shape)
    s = score_embeddings(pred, pred_detail, {"image_semantic": semantic, "image_detail": detail}, n_way=300)

    def unit(x):
        x = x.reshape(len(x), -1)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    cos = unit(pred) @ unit(fused).T  # rows: predictions, columns: targets (n <= n_way: one subset, all items)
    assert s["top1_image"] == pytest.approx(np.mean(cos.argmax(1) == np.arange(n)))
    assert s["top1_brain"] == pytest.approx(np.mean(cos.argmax(0) == np.arange(n)))
    cos_d = unit(pred_detail) @ unit(detail).T
    assert s["top1_detail"] == pytest.approx(np.mean(cos_d.argmax(1) == np.arange(n)))
    r = np.array([[np.corrcoef(fused[i].ravel(), pred[j].ravel())[0, 1] for j in range(n)] for i in range(n)])
    two_way = np.mean([np.mean([r[i, j] < r[j, j] for i in range(n) if i != j]) for j in range(n)])
    assert s["two_way"] == pytest.approx(two_way)
    assert s["n_way"] == n and s["n_images"] == n


def test_sweep_end_to_end_and_resume(prepared, tmp_path, capsys, fails):
    """One range with tiny models: store, ridge run, scores, reconstructions; a rerun redoes nothing."""
    from brainmclip.features.feature_store import open_feature_store
    from brainmclip.models.predictions import load_predictions

    out = tmp_path / "sweep"
    argv = ["analyze", "layer-sweep", "--data", str(prepared), "--clip", "tiny", "--generator", "tiny",
            "--out", str(out), "--ranges", "21-24", "--n-way", "10", "--n-recon", "3", "--steps", "2"]
    assert main(["-q", *argv]) == 0
    assert "21-24" in capsys.readouterr().out
    store = open_feature_store(out / "features" / "21-24")
    assert store.manifest["settings"]["extractor"]["detail_layers"] == [21, 22, 23, 24]
    assert store.manifest["settings"]["extractor"]["semantic_layer"] == 24
    run = json.loads((out / "runs" / "21-24" / "run.json").read_text())
    assert run["method"] == "ridge"

    # the stored scores are those of the run's predictions against that range's targets
    pred = load_predictions(out / "runs" / "21-24" / "predictions_test")
    np.testing.assert_allclose(np.asarray(pred.image, np.float32),
                               (np.asarray(pred.image_semantic, np.float32) + pred.image_detail) / 2, atol=2e-3)
    scores = json.loads((out / "scores.json").read_text())["21-24"]
    again = score_embeddings(pred.image, pred.image_detail, store.get(pred.stimulus_ids), n_way=10)
    for key in ("top1_image", "top1_brain", "two_way", "top1_detail"):
        assert scores[key] == pytest.approx(again[key])
    assert len(scores["recon_ids"]) == 3 and 0 <= scores["recon"]["CLIP"] <= 1
    assert scores["uncalibrated"] == ["CLIP"]  # the tiny CLIP is random: flagged, never reported as a score
    assert len(list((out / "ranges" / "21-24" / "recon").glob("nsd*.png"))) == 3
    assert len(list((out / "ranges" / "21-24" / "recon_true").glob("nsd*.png"))) == 3

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["analysis"] == "layer_sweep" and manifest["table"][0]["detail layers"] == "21-24"
    assert "Uncalibrated" in manifest["caption"]
    assert (out / "figure.png").stat().st_size > 10_000
    header = (out / "scores.csv").read_text().splitlines()[0]
    assert header.startswith("detail layers,n layers,top-1 10-way image retrieval (%)")

    # a rerun reuses the store, the run, the PNGs and the scores
    files = [out / "runs" / "21-24" / "run.json", out / "ranges" / "21-24" / "scores.json",
             *sorted((out / "ranges" / "21-24" / "recon").glob("*.png"))]
    stamps = [p.stat().st_mtime_ns for p in files]
    assert main(["-q", *argv]) == 0
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert json.loads((out / "manifest.json").read_text())["table"] == manifest["table"]
    # a different decoder in the same folder would mix runs
    fails([*argv, "--decoder", "brain_mclip"], "other settings .*decoder")


def test_clear_errors(prepared, tmp_path, capsys, fails):
    base = ["analyze", "layer-sweep", "--data", str(prepared), "--clip", "tiny", "--out", str(tmp_path / "o")]
    fails([*base, "--ranges", "5-"], "--ranges: '5-' is not valid")
    fails([*base, "--ranges", "11-20,20-30"], "--ranges: '20-30' goes past layer 24")
    fails([*base, "--config", "brain_mclip_tiny"], "--decoder brain_mclip only")
    fails([*base, "--n-recon", "1"], "--n-recon")
    fails([*base[:3], str(tmp_path / "missing"), *base[4:]], "missing")
    assert not (tmp_path / "o" / "features").exists()
