"""Zero-shot classification by prompting: ensemble weights, top-k scoring, the text forward CoOp needs, CoOp itself
and the classify command on a hand-made prediction folder."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from brainmclip.errors import InvalidInputError
from brainmclip.evaluation import zero_shot as zs
from brainmclip.features.clip_models import load_clip
from brainmclip.features.tokenizer import tokenize
from brainmclip.models import coop

PROMPTS = ["a photo of a dog.", "a blurry photo of the big tree.", "There is a red ball.", "a house"]


@pytest.fixture(scope="module")
def mini():
    torch.set_num_threads(1)
    return load_clip("mini")


@pytest.fixture(scope="module")
def tiny():
    return load_clip("tiny")


def _own_forward(towers, texts) -> np.ndarray:
    """CLIPTextModelWithProjection's own output, unit-normalised in numpy."""
    ids, _ = tokenize(towers.tokenizer, texts, towers.context_length)
    with torch.no_grad():
        out = towers.text(input_ids=ids).text_embeds.double().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def scenes(mini):
    """mini-CLIP image embeddings of miniature-world scenes: a train-stream set and a held-out-stream set."""
    from brainmclip.features.clip_extractor import ClipFeatureExtractor
    from brainmclip.miniature.world import build_bank

    extractor = ClipFeatureExtractor(mini, detail_layers=(mini.n_vision_layers,), semantic_layer=mini.n_vision_layers)
    size = mini.vision.config.image_size
    out = {}
    for stream in ("train", "heldout"):
        bank = build_bank(200, seed=0, stream=stream, size=size)
        out[stream] = (extractor.image_embeds(bank.images).numpy(), bank.labels["category"].astype(np.int64))
    return out


# -- templates and ensemble weights ----------------------------------------------------------------------------


def test_templates_are_the_papers_eighteen():
    assert len(zs.BRAINCLIP_TEMPLATES) == 18 == len(set(zs.BRAINCLIP_TEMPLATES))
    assert zs.BRAINCLIP_TEMPLATES[0] == "a photo of a {}." and zs.BRAINCLIP_TEMPLATES[-1] == "a photo of the big {}."
    assert all(t.count("{}") == 1 for t in zs.BRAINCLIP_TEMPLATES)


@pytest.mark.parametrize("which", ["tiny", "mini"])
def test_manual_text_forward_equals_the_models_own(which, tiny, mini):
    towers = {"tiny": tiny, "mini": mini}[which]
    ours = zs.text_features(towers, PROMPTS)
    np.testing.assert_allclose(ours, _own_forward(towers, PROMPTS), atol=1e-5)
    # The causal mask matters: without it the end-of-text state sees nothing new but the result changes.
    ids, eos = tokenize(towers.tokenizer, PROMPTS, towers.context_length)
    text_model = towers.text.text_model
    with torch.no_grad():
        hidden = text_model.embeddings(input_ids=ids)
        hidden = text_model.final_layer_norm(text_model.encoder(inputs_embeds=hidden).last_hidden_state)
        unmasked = towers.text.text_projection(hidden[torch.arange(len(ids)), eos]).numpy()
    unmasked /= np.linalg.norm(unmasked, axis=1, keepdims=True)
    assert np.abs(unmasked - ours).max() > 1e-3


def test_context_slots_hold_the_context(mini):
    """[SOS] ctx [name] . [EOS] with ctx = the token embeddings of 'a picture showing a' is that prompt's own forward."""
    names = ["dog", "house", "tree"]
    phrase_ids, phrase_eos = tokenize(mini.tokenizer, ["a picture showing a"], mini.context_length)
    n_ctx = int(phrase_eos[0]) - 1
    assert n_ctx == 4  # four words in mini-CLIP's vocabulary
    with torch.no_grad():
        vectors = mini.text.text_model.embeddings.token_embedding(phrase_ids[0, 1:1 + n_ctx]).numpy()
    weights = zs.context_weights(mini, names, zs.LearnedContext(vectors))
    np.testing.assert_allclose(weights, _own_forward(mini, [f"a picture showing a {n}." for n in names]), atol=1e-5)
    empty = zs.context_weights(mini, names, zs.LearnedContext(np.zeros((0, vectors.shape[1]), np.float32)))
    np.testing.assert_allclose(empty, _own_forward(mini, [f"{n}." for n in names]), atol=1e-5)
    ids, eos = zs.context_tokens(mini, ["dog"], n_ctx)
    plain, plain_eos = tokenize(mini.tokenizer, ["dog."], mini.context_length)
    assert int(eos[0]) == int(plain_eos[0]) + n_ctx and ids[0, 0] == plain[0, 0]
    assert ids[0, 1 + n_ctx:int(eos[0]) + 1].tolist() == plain[0, 1:int(plain_eos[0]) + 1].tolist()
    with pytest.raises(InvalidInputError, match="positions"):
        zs.context_tokens(mini, ["dog " * 40], n_ctx)


def test_ensemble_weights_equal_a_hand_loop(tiny, mini):
    names = ["dog", "goldfish", "sea lion"]
    templates = zs.BRAINCLIP_TEMPLATES
    for towers in (tiny, mini):
        expected = []
        for name in names:
            emb = _own_forward(towers, [t.format(name) for t in templates])  # one template after another, unit norm
            mean = emb.mean(0)
            expected.append(mean / np.linalg.norm(mean))
        got = zs.class_weights(towers, names)
        assert got.shape == (3, towers.embed_dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, np.array(expected), atol=1e-5)
    with pytest.raises(InvalidInputError, match="twice"):
        zs.class_weights(tiny, ["dog", "dog"])
    with pytest.raises(InvalidInputError, match="'{}'"):
        zs.class_weights(tiny, ["dog"], ["a photo"])


# -- scoring ---------------------------------------------------------------------------------------------------


def test_topk_by_hand_with_ties():
    scores = np.array([[0.9, 0.1, 0.5, 0.2],    # true 0: rank 1
                       [0.3, 0.3, 0.3, 0.1],    # true 1: tied with two others at the top -> top-1 credit 1/3
                       [0.8, 0.7, 0.1, 0.6],    # true 2: last
                       [0.5, 0.4, 0.4, 0.4]])   # true 3: one above, tied with two -> top-1 0, top-2 1/3, top-3 2/3
    labels = [0, 1, 2, 3]
    got = zs.topk_accuracy(scores, labels, ks=(1, 2, 3, 4))
    assert got[1]["correct"] == pytest.approx(1 + 1 / 3)
    assert got[2]["correct"] == pytest.approx(1 + 2 / 3 + 1 / 3)
    assert got[3]["correct"] == pytest.approx(1 + 1 + 2 / 3)
    assert got[4]["accuracy"] == 1.0
    assert [got[k]["chance"] for k in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    assert got[1]["n"] == 4 and got[1]["accuracy"] == pytest.approx((1 + 1 / 3) / 4)
    # Scoring every class alike earns exactly the chance level.
    flat = zs.topk_accuracy(np.zeros((7, 5)), [0, 1, 2, 3, 4, 0, 1], ks=(1, 2, 5))
    assert [flat[k]["accuracy"] for k in (1, 2, 5)] == pytest.approx([0.2, 0.4, 1.0])
    with pytest.raises(InvalidInputError, match="top-5 accuracy among 4 classes"):
        zs.topk_accuracy(scores, labels, ks=(1, 5))


def test_topk_matches_sklearn_and_wilson():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((200, 12))
    labels = rng.integers(0, 12, 200)
    scores[np.arange(100), labels[:100]] += 1.5
    got = zs.topk_accuracy(scores, labels, ks=(1, 3, 5))
    try:
        from sklearn.metrics import top_k_accuracy_score
    except ImportError:  # pragma: no cover - sklearn is in the test environment
        top_k_accuracy_score = None
    for k in (1, 3, 5):
        order = np.argsort(-scores, axis=1)[:, :k]
        by_hand = np.mean([labels[i] in order[i] for i in range(len(labels))])
        assert got[k]["accuracy"] == pytest.approx(by_hand)
        if top_k_accuracy_score is not None:
            assert got[k]["accuracy"] == pytest.approx(top_k_accuracy_score(labels, scores, k=k, labels=range(12)))
    # Wilson's interval by its formula for 8 successes in 10: 0.4902 .. 0.9433.
    low, high = zs.wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    p, n, z = got[1]["accuracy"], 200, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    assert np.mean(got[1]["ci95"]) == pytest.approx(centre)
    assert got[1]["ci95"][0] < p < got[1]["ci95"][1]


def test_scores_are_cosines():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((5, 8)), rng.standard_normal((3, 8))
    expected = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in w] for a in x])
    np.testing.assert_allclose(zs.zero_shot_scores(x, w), expected, atol=1e-6)
    with pytest.raises(InvalidInputError, match="same space"):
        zs.zero_shot_scores(x, w[:, :4])


# -- CoOp ------------------------------------------------------------------------------------------------------


def test_coop_learns_to_undo_a_shared_shift(mini, scenes, tmp_path):
    """A known answer: embeddings pushed towards one class's text ('ball') fool fixed prompts; a learned context
    can move every class's text feature to compensate. Learned on 6 categories, tested on held-out scenes."""
    from brainmclip.miniature.world import CATEGORY_NAMES

    names = list(CATEGORY_NAMES)
    shift = 2.0 * zs.text_features(mini, ["a photo of a ball."])[0]

    def shifted(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True) + shift
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    train_x, train_y = scenes["train"]
    test_x, test_y = scenes["heldout"]
    train_classes, held_classes = [0, 2, 4, 6, 7, 9], [1, 3, 5, 8]

    def subset(x, y, classes):
        keep = np.isin(y, classes)
        return shifted(x[keep]), np.searchsorted(classes, y[keep])

    x, y = subset(train_x, train_y, train_classes)
    context = zs.train_context(mini, x, y, [names[c] for c in train_classes], n_ctx=4, steps=100, lr=2e-3, seed=0)
    untrained = zs.LearnedContext(coop._initial_context(mini, 4, "random", torch.Generator().manual_seed(0)).numpy())

    def accuracy(ctx, classes):
        tx, ty = subset(test_x, test_y, classes)
        scores = zs.zero_shot_scores(tx, zs.context_weights(mini, [names[c] for c in classes], ctx))
        return zs.topk_accuracy(scores, ty, (1,))[1]["accuracy"]

    before, after = accuracy(untrained, train_classes), accuracy(context, train_classes)
    held_after = accuracy(context, held_classes)
    assert after > before + 0.3, (before, after)
    assert held_after > 0.25 + 0.2, held_after  # chance among 4 held-out classes is 0.25
    assert context.settings["final_loss"] < context.settings["first_loss"]
    assert context.settings["logit_scale"] == pytest.approx(zs.clip_logit_scale(mini)[0])
    # Seeded: the same inputs give the same context; saved and loaded it gives the same weights.
    again = zs.train_context(mini, x, y, [names[c] for c in train_classes], n_ctx=4, steps=5, lr=2e-3, seed=0)
    np.testing.assert_array_equal(again.vectors, zs.train_context(mini, x, y, [names[c] for c in train_classes],
                                                                  n_ctx=4, steps=5, lr=2e-3, seed=0).vectors)
    loaded = zs.LearnedContext.load(context.save(tmp_path / "ctx.safetensors"))
    np.testing.assert_array_equal(loaded.vectors, context.vectors)
    assert loaded.settings == json.loads(json.dumps(context.settings))
    assert all(p.requires_grad for p in mini.text.parameters())  # CLIP's flags are put back
    with pytest.raises(InvalidInputError, match="text tower needs"):
        zs.context_weights(load_clip("tiny"), ["dog"], loaded)


# -- classify end to end ----------------------------------------------------------------------------------------


def _prediction_folder(root, embeddings, ids, clip="mini", run=True, name="pred"):
    from brainmclip.models.predictions import write_predictions
    from brainmclip.paths import record_path

    pred = root / name
    manifest = {"method": "brainclip", "subject": 1, "split": "test", "clip": clip}
    if run:
        manifest["run"] = record_path(root / "run", pred)
    e = np.asarray(embeddings, np.float32)[:, None]
    return write_predictions(pred, ids, {"image": e, "text": e}, manifest)


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory, scenes):
    """run/run.json -> prepared/labels.json, and a test prediction of 120 held-out scenes (ids 1000..)."""
    from brainmclip.data.labels import write_class_labels
    from brainmclip.miniature.world import CATEGORY_NAMES

    root = tmp_path_factory.mktemp("zs")
    x, y = scenes["heldout"]
    tx, ty = scenes["train"]
    (root / "prepared").mkdir()
    (root / "run").mkdir()
    ids, train_ids = 1000 + np.arange(120), 5000 + np.arange(len(ty))
    write_class_labels(root / "prepared", CATEGORY_NAMES, np.concatenate([ids, train_ids]), np.concatenate([y[:120], ty]))
    (root / "run" / "run.json").write_text(json.dumps({"data": "../prepared", "method": "brainclip"}))
    _prediction_folder(root, x[:120], ids)
    _prediction_folder(root, tx, train_ids, name="pred_train")
    return root, x[:120], y[:120]


def test_classify_end_to_end(mini, labelled_folder, tmp_path):
    from brainmclip.miniature.world import CATEGORY_NAMES

    root, x, y = labelled_folder
    result = zs.classify(root / "pred", out=tmp_path / "out")
    table = result.table("all")
    present = sorted(set(y.tolist()))
    assert table.classes == [CATEGORY_NAMES[c] for c in present] and table.n_rows == 120
    # Independent: hand ranking of the float16-stored embeddings against the hand-looped ensemble weights.
    e = x.astype(np.float16).astype(np.float64)
    w = np.stack([(lambda m: m / np.linalg.norm(m))(_own_forward(mini, [t.format(CATEGORY_NAMES[c]) for t in
                                                                         zs.BRAINCLIP_TEMPLATES]).mean(0))
                  for c in present])
    order = np.argsort(-(e @ w.T), axis=1)
    local = np.searchsorted(present, y)
    for k in (1, 5):
        assert table.topk[k]["accuracy"] == pytest.approx(np.mean([local[i] in order[i, :k] for i in range(120)]))
        assert table.topk[k]["chance"] == pytest.approx(k / len(present))
    assert table.topk[1]["accuracy"] > 0.6  # mini-CLIP's own image embeddings: a perfect "decoder"
    saved = zs.ZeroShotResult.load(tmp_path / "out")
    assert saved == result and zs.ZeroShotResult.from_json(result.to_json()) == result
    assert "| top-1 |" in (tmp_path / "out" / zs.TABLE_FILE).read_text()

    held = zs.classify(root / "pred", holdout=["dog", "car", "tree"])
    assert [t.name for t in held.tables] == ["heldout_among_heldout", "heldout_among_all", "seen_among_all"]
    among_held = held.table("heldout_among_heldout")
    assert among_held.classes == ["dog", "car", "tree"] and sorted(among_held.topk) == [1]  # top-5 of 3 dropped
    assert among_held.topk[1]["chance"] == pytest.approx(1 / 3)
    assert among_held.n_rows == int(np.isin(y, [2, 4, 7]).sum()) == held.table("heldout_among_all").n_rows
    assert among_held.topk[1]["accuracy"] >= held.table("heldout_among_all").topk[1]["accuracy"]


def test_classify_with_coop_context(mini, labelled_folder, tmp_path):
    root, _, _ = labelled_folder
    result = zs.classify(root / "pred", prompt="coop", train_context_from=root / "pred_train", holdout=["dog", "car"],
                         steps=20, out=tmp_path / "coop")
    assert (tmp_path / "coop" / zs.CONTEXT_FILE).is_file()
    settings = result.settings["context"]
    assert "dog" not in settings["train_classes"] and settings["n_ctx"] == 4 and settings["source"].startswith("fmri")
    again = zs.classify(root / "pred", prompt="coop", context=tmp_path / "coop" / zs.CONTEXT_FILE, holdout=["dog", "car"])
    assert again.tables == result.tables


def test_coop_from_image_embeddings(labelled_folder, monkeypatch):
    """context_source 'image' reads the train rows' CLIP image embeddings from the run's feature store."""
    import brainmclip.features.feature_store as feature_store
    import brainmclip.features.pooled as pooled
    from brainmclip.models.predictions import load_predictions

    root, _, _ = labelled_folder
    record = json.loads((root / "run" / "run.json").read_text())
    monkeypatch.setattr(zs, "_read_run", lambda pred_dir, manifest: (root / "run", {**record, "features": "store"}))
    asked = []
    monkeypatch.setattr(feature_store, "open_feature_store", lambda path: path)
    train_embeds = pooled.pooled_prediction(load_predictions(root / "pred_train"))

    def image_embeddings(store, ids):
        asked.append((store, np.asarray(ids)))
        return train_embeds[np.asarray(ids) - 5000]

    monkeypatch.setattr(pooled, "image_embeddings", image_embeddings)
    result = zs.classify(root / "pred", prompt="coop", train_context_from=root / "pred_train", context_source="image",
                         steps=5)
    assert result.settings["context"]["source"].startswith("image") and asked[0][0] == root / "run" / "store"
    assert len(asked[0][1]) == 200


def test_run_cli(labelled_folder, tmp_path, capsys):
    root, _, _ = labelled_folder
    parser = argparse.ArgumentParser()
    zs.add_arguments(parser)
    args = parser.parse_args(["--pred", str(root / "pred"), "--out", str(tmp_path / "o"), "--classes", "dog", "car",
                              "house", "--topk", "1", "2", "--no-progress"])
    assert zs.run(args) == 0
    result = zs.ZeroShotResult.load(tmp_path / "o" / zs.RESULT_FILE)
    assert result.table("all").classes == ["dog", "car", "house"] and sorted(result.table("all").topk) == [1, 2]
    assert "top-2" in capsys.readouterr().out


def test_bad_inputs_are_one_clear_error(labelled_folder, tmp_path):
    root, x, _ = labelled_folder
    cases = [
        (dict(classes=["dog", "unicorn"]), "Unknown class 'unicorn'"),
        (dict(holdout=["unicorn"]), "Unknown class 'unicorn'"),
        (dict(ks=(1, 20)), "top-20 accuracy among"),
        (dict(prompt="coop"), "needs a learned context"),
        (dict(prompt="nearest"), "Unknown prompt"),
        (dict(clip="tiny"), "64 dimensions but CLIP 'tiny'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidInputError) as err:
            zs.classify(root / "pred", **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), (kwargs, str(err.value))
    unlabelled = _prediction_folder(tmp_path, x[:4], np.arange(4) + 90000, name="unlabelled")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"data": str(root / "prepared")}))
    with pytest.raises(InvalidInputError, match="has a class label") as err:
        zs.classify(unlabelled)
    assert "\n" not in str(err.value)
