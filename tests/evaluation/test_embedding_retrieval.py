"""fMRI -> image / text retrieval in CLIP's embedding space: ranks with ties, recall intervals, and the whole
evaluation on real tiny predictions against a numpy computation that shares none of its code path.

The reference reads the prediction and store arrays with ``np.load`` / the store's plain ``get``, computes
caption embeddings with Hugging Face's ``CLIPTextModelWithProjection`` (rounded to float16, as the cache
stores them) and ranks with a Python loop.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from brainmclip.analysis.common import find_analyses, load_analysis
from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import InvalidInputError
from brainmclip.evaluation import embedding_retrieval as er
from brainmclip.features import pooled
from brainmclip.features.clip_models import load_clip
from brainmclip.features.extract import extract_features
from brainmclip.features.feature_store import open_feature_store
from brainmclip.features.tokenizer import tokenize
from brainmclip.training.ground_truth import write_ground_truth_run
from brainmclip.training.predict import predict
from brainmclip.training.ridge_fit import train_ridge

# -- ranks and recall ----------------------------------------------------------------------------------------

# Row i is query i; column i its true item. Row 0: true item best. Row 1: tied with one column for best.
# Row 2: two columns strictly better, one tied. Row 3: every column tied.
SIMILARITY = np.array([[0.9, 0.1, 0.2, 0.3],
                       [0.5, 0.5, 0.1, 0.2],
                       [0.8, 0.7, 0.4, 0.4],
                       [0.3, 0.3, 0.3, 0.3]])
HAND_RANKS = [1, 1, 3, 1]


def test_query_ranks_count_ties_in_the_true_items_favour():
    assert er.query_ranks(SIMILARITY).tolist() == HAND_RANKS
    assert er.query_ranks(SIMILARITY.astype(np.float16)).tolist() == HAND_RANKS
    assert er.query_ranks(-SIMILARITY).tolist() == [4, 3, 1, 1]
    # Rows permuted together with columns: the same ranks, permuted.
    order = [2, 0, 3, 1]
    assert er.query_ranks(SIMILARITY[np.ix_(order, order)]).tolist() == [HAND_RANKS[i] for i in order]


def test_recall_values_and_chance_by_hand():
    ranks = np.array(HAND_RANKS)
    out = er.recall_with_interval(ranks, ks=(1, 2, 5), n_boot=50)
    assert out["recall@1"]["value"] == 0.75 and out["recall@2"]["value"] == 0.75 and out["recall@5"]["value"] == 1
    assert out["recall@1"]["chance"] == 0.25 and out["recall@2"]["chance"] == 0.5 and out["recall@5"]["chance"] == 1
    assert out["mean_recall"]["value"] == pytest.approx((0.75 + 0.75 + 1) / 3)
    assert out["mean_recall"]["chance"] == pytest.approx((0.25 + 0.5 + 1) / 3)
    assert set(er.recall_with_interval(ranks)) == {f"recall@{k}" for k in er.KS} | {"mean_recall"}


def test_bootstrap_interval_holds_the_estimate_and_follows_the_seed():
    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 40, size=60)
    a = er.recall_with_interval(ranks, n_boot=400, seed=3)
    assert a == er.recall_with_interval(ranks, n_boot=400, seed=3)
    b = er.recall_with_interval(ranks, n_boot=400, seed=4)
    assert any(a[k]["ci95"] != b[k]["ci95"] for k in a)
    for entry in a.values():
        lo, hi = entry["ci95"]
        assert 0 <= lo <= entry["value"] <= hi <= 1
        assert hi > lo  # 60 queries with hits and misses: the interval has width
    # A 95% interval of a proportion from 60 queries is about +-2 standard errors wide.
    p = a["recall@10"]["value"]
    width = a["recall@10"]["ci95"][1] - a["recall@10"]["ci95"][0]
    assert width == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / 60), rel=0.3)
    perfect = er.recall_with_interval(np.ones(20, np.int64), n_boot=30)
    assert all(e["value"] == 1 and e["ci95"] == [1, 1] for e in perfect.values())


def test_describe_run_labels():
    assert er.describe_run("brainclip", {"model": {"mapping": "linear"}, "loss": {"alpha": 1, "beta": 0}}) == \
        "BrainCLIP-Linear (V)"
    assert er.describe_run("brainclip", {"model": {"mapping": "vae"}, "loss": {"alpha": 0.5, "beta": 0.5},
                                      "data": {"holdout_classes": ["dog", "car"]}}) == \
        "BrainCLIP-VAE (V&T), without 2 classes"
    assert er.describe_run("brainclip", {"model": {"mapping": "vae"}, "loss": {"alpha": 0, "beta": 1}}) == \
        "BrainCLIP-VAE (T)"
    assert er.describe_run("ridge", {"ridge": {"targets": "clip_image"}}) == "Ridge (V)"
    assert er.describe_run("ridge", {"ridge": {"targets": "clip_text"}}) == "Ridge (T)"
    assert er.describe_run("ridge", {}) == "Ridge (token targets)"
    assert er.describe_run("gt_embedding", {}) == "GT embedding"
    assert er.describe_run("brain_mclip", {}) == "BrainMCLIP"


# -- the evaluation on real tiny predictions -------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictions(tiny_nsd, tmp_path_factory):
    """Subject 1 (all sessions: 40 test images), a mini-CLIP store, a ridge run to CLIP's image embedding and a
    ground-truth run, each with test predictions. mini-CLIP, trained on the simulated scenes, separates the
    test images (cosines up to about 0.85); the random tiny CLIP maps them all within about 1e-4 of each other,
    where float16 storage alone would decide the ranks."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("embedding_retrieval")
    prepared = prepare_subject(tiny_nsd.root, 1, base / "prepared", PrepareOptions(), progress=False)
    extract_features([prepared.root], base / "features", model="mini", progress=False)
    train_ridge(prepared.root, base / "features", base / "ridge", config=["ridge_clip_v"], progress=False)
    write_ground_truth_run(prepared.root, base / "features", base / "gt")
    return {"base": base, "prepared": prepared.root, "features": base / "features",
            "ridge": predict(base / "ridge", "test"), "gt": predict(base / "gt", "test")}


EPS = 1e-4  # float16 storage moves a cosine of unit vectors by less than this


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(pred_dir, prepared_dir, features) -> dict:
    """Recall@K of fMRI -> image and fMRI -> text by numpy and a loop, from the files themselves."""
    ids = np.load(pred_dir / "stimulus_ids.npy")
    name = "image_semantic" if (pred_dir / "image_semantic.npy").is_file() else "image"
    f = _unit(np.load(pred_dir / f"{name}.npy")[:, 0].astype(np.float64))
    images = _unit(open_feature_store(features).get(ids, ["image_semantic"])["image_semantic"][:, 0])
    towers = load_clip("mini")
    test = load_prepared(prepared_dir, images=False).splits["test"]
    captions = {int(i): c for i, c in zip(test.stimulus_ids.tolist(), test.captions, strict=True)}
    texts = []
    for nsd_id in ids.tolist():
        tokens, _ = tokenize(towers.tokenizer, captions[nsd_id], towers.context_length)
        with torch.no_grad():
            each = _unit(towers.text(input_ids=tokens).text_embeds.numpy()).astype(np.float16)  # as cached
        texts.append(_unit(each.astype(np.float64).mean(0)))
    out = {}
    for kind, candidates in (("image", images), ("text", np.array(texts))):
        sim = f @ candidates.T
        # Rank bounds: scores within EPS of the true item's could fall either way after float rounding.
        best = np.array([1 + sum(sim[q, c] > sim[q, q] + EPS for c in range(len(ids))) for q in range(len(ids))])
        worst = np.array([1 + sum(sim[q, c] > sim[q, q] - EPS for c in range(len(ids)) if c != q)
                          for q in range(len(ids))])
        out[kind] = {k: (float(np.mean(worst <= k)), float(np.mean(best <= k))) for k in er.KS}
    return out


def test_evaluation_equals_a_numpy_reference_and_is_an_analysis(predictions, tmp_path, monkeypatch):
    out = tmp_path / "retrieval"
    report = er.evaluate_embedding_retrieval([predictions["ridge"], predictions["gt"]], out, n_boot=200, seed=1)
    assert json.loads((out / "retrieval.json").read_text()) == report
    assert report["format"] == "brainmclip-retrieval/1" and report["ks"] == list(er.KS)
    ridge, gt = report["runs"]
    assert ridge["label"] == "Ridge (V)" and ridge["method"] == "ridge" and ridge["subject"] == 1
    assert gt["label"] == "GT embedding" and ridge["n_items"] == gt["n_items"] == 40
    for run, pred in ((ridge, predictions["ridge"]), (gt, predictions["gt"])):
        ref = _reference(pred, predictions["prepared"], predictions["features"])
        for kind in ("image", "text"):
            values = []
            for k in er.KS:
                entry = run[kind][f"recall@{k}"]
                low, high = ref[kind][k]
                assert high == low  # no rank in doubt
                assert low <= entry["value"] <= high, (run["label"], kind, k, entry["value"], low, high)
                assert entry["chance"] == pytest.approx(k / 40)
                assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
                values.append(entry["value"])
            assert run[kind]["mean_recall"]["value"] == pytest.approx(np.mean(values))
    # The test images' own CLIP embeddings find their images: every query at rank 1.
    assert gt["image"]["recall@1"]["value"] == 1.0
    assert ridge["image"]["recall@1"]["value"] < 1.0

    md = (out / "retrieval.md").read_text()
    assert "| fMRI→image | Ridge (V) | 1 |" in md and "| fMRI→text | GT embedding | 1 |" in md
    assert "100.0 [100.0, 100.0]" in md  # the ground truth's R@1 and its interval, in percent
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = load_analysis(out)
    assert summary["analysis"] == "retrieval" and summary["figure"] == "figure.png"
    assert len(summary["table"]) == 4 and summary["settings"] == {"n_boot": 200, "seed": 1}
    assert [a["analysis"] for a in find_analyses(out)] == ["retrieval"]
    assert [a["analysis"] for a in find_analyses(tmp_path)] == ["retrieval"]  # as a sub-folder of --analyses

    # The seed fixes the intervals; the caption cache makes the second run compute nothing new.
    monkeypatch.setattr(pooled, "text_embeddings", lambda *a, **k: pytest.fail("caption embeddings recomputed"))
    again = er.evaluate_embedding_retrieval([predictions["ridge"], predictions["gt"]], tmp_path / "again", n_boot=200,
                                         seed=1)
    assert again["runs"] == report["runs"]


def test_evaluation_errors_are_one_line(predictions, tmp_path):
    with pytest.raises(InvalidInputError, match="n_boot=0"):
        er.evaluate_embedding_retrieval([predictions["ridge"]], tmp_path / "x", n_boot=0)
    # A prediction folder whose run.json is gone.
    moved = predictions["base"] / "orphan_run"
    shutil.copytree(predictions["base"] / "ridge", moved)
    pred = predict(moved, "test")
    (moved / "run.json").unlink()
    with pytest.raises(InvalidInputError, match="run.json") as excinfo:
        er.evaluate_embedding_retrieval([pred], tmp_path / "y", n_boot=10)
    assert "\n" not in str(excinfo.value)
    assert not (tmp_path / "y" / "retrieval.json").exists()

