"""CLIP's pooled embeddings from a feature store and a CLIP: image and text vectors, the per-caption cache.

References are independent of :mod:`brainmclip.features.pooled`: the image embedding is CLIP's own
``image_embeds`` (a second pass over the stimuli), the text embedding Hugging Face's
``CLIPTextModelWithProjection`` output, groupings a hand loop over the prepared captions, means numpy.
"""

from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import InvalidInputError
from brainmclip.features import pooled
from brainmclip.features.clip_extractor import ClipFeatureExtractor
from brainmclip.features.clip_models import load_clip
from brainmclip.features.extract import extract_features
from brainmclip.features.feature_store import TARGETS, open_feature_store
from brainmclip.features.tokenizer import tokenize

FLOAT16 = 2e-3  # what float16 storage of unit vectors keeps


@pytest.fixture(scope="module")
def towers():
    torch.set_num_threads(1)
    return load_clip("mini")


@pytest.fixture(scope="module")
def tiny_store(tiny_nsd, tmp_path_factory):
    """Subject 1, sessions 1-3 (47 images), in a mini-CLIP store of several shards.

    mini-CLIP (trained on the simulated scenes) gives the images clearly different embeddings; the random tiny
    CLIP maps them all within a cosine of about 1e-4 of each other, too close to tell a swapped row."""
    base = tmp_path_factory.mktemp("pooled")
    prepared = prepare_subject(tiny_nsd.root, 1, base / "prepared", PrepareOptions(sessions=(1, 2, 3)), progress=False)
    extract_features([prepared.root], base / "features", model="mini", shard_size=16, progress=False)
    return load_prepared(prepared.root), base / "features"


@pytest.fixture
def store(tiny_store, tmp_path):
    """A private copy of the store: the caption cache each test writes starts empty."""
    root = tmp_path / "features"
    shutil.copytree(tiny_store[1], root)
    return open_feature_store(root)


def _by_id(prepared):
    """id -> (image, captions), a hand loop over every split."""
    out = {}
    for samples in prepared.splits.values():
        for row, nsd_id in enumerate(samples.stimulus_ids.tolist()):
            out.setdefault(int(nsd_id), (np.asarray(samples.images[row]), list(samples.captions[row])))
    return out


def _hf_text(towers, texts) -> np.ndarray:
    ids, _ = tokenize(towers.tokenizer, texts, towers.context_length)
    with torch.no_grad():
        out = towers.text(input_ids=ids).text_embeds.double().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _mixed_ids(prepared) -> np.ndarray:
    """Ids from every split, shuffled, with a repeat: order and shard boundaries must not matter."""
    ids = np.array(sorted(_by_id(prepared)), np.int64)
    rng = np.random.default_rng(3)
    return np.concatenate([rng.permutation(ids), ids[:2]])


# -- image embeddings ----------------------------------------------------------------------------------------


def test_image_embeddings_are_clips_own_image_embeds(tiny_store, store, towers):
    prepared, _ = tiny_store
    table = _by_id(prepared)
    ids = _mixed_ids(prepared)
    assert len(store.manifest["checksums"]) > 2  # several shards, so rows come from more than one file
    got = pooled.image_embeddings(store, ids)
    images = np.stack([table[int(i)][0] for i in ids])
    extractor = ClipFeatureExtractor(towers, (1,), towers.n_vision_layers)
    ref = extractor.image_embeds(images).double().numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert got.shape == (len(ids), towers.embed_dim) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(got, ref, atol=FLOAT16)
    n = len(np.unique(ids))  # the first n rows are distinct images
    apart = np.abs(ref[:n, None] - ref[None, :n]).max(-1)
    assert (apart + np.eye(n)).min() > 10 * FLOAT16  # a swapped row would not pass


def test_store_get_token_is_one_column_of_get(tiny_store, store):
    ids = _mixed_ids(tiny_store[0])
    whole = store.get(ids)
    for token in (0, 5, -1):
        part = store.get(ids, token=token)
        assert set(part) == set(TARGETS)
        for target in TARGETS:
            assert part[target].shape == (len(ids), whole[target].shape[2])
            np.testing.assert_array_equal(part[target], whole[target][:, token])
    for target in TARGETS:  # the last token by its number (the text and image targets have different counts)
        last = whole[target].shape[1] - 1
        np.testing.assert_array_equal(store.get(ids, [target], token=last)[target], whole[target][:, last])
    half = store.get(ids[:5], ["image_semantic"], dtype=np.float16, token=0)["image_semantic"]
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, whole["image_semantic"][:5, 0].astype(np.float16))


# -- text embeddings ------------------------------------------------------------------------------------------


def test_text_embeddings_are_hugging_faces_text_embeds(towers):
    texts = ["a photo of a dog.", "Two small red boats on the beach", "", "a tree " * 60, "A HOUSE in the snow!"]
    got = pooled.text_embeddings(towers, texts, batch_size=2)  # batches of 2, 2 and 1
    assert got.shape == (5, towers.embed_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, _hf_text(towers, texts), atol=1e-5)
    assert pooled.text_embeddings(towers, []).shape == (0, towers.embed_dim)


# -- caption embeddings: grouping and cache --------------------------------------------------------------------


_REAL_TEXT_EMBEDDINGS = pooled.text_embeddings


def _counting(monkeypatch, fail_on_call: int | None = None):
    """Wrap ``pooled.text_embeddings``: record the texts of each call; raise on call ``fail_on_call``."""
    calls: list[list[str]] = []

    def wrapped(towers, texts, *args, **kwargs):
        calls.append(list(texts))
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise KeyboardInterrupt
        return _REAL_TEXT_EMBEDDINGS(towers, texts, *args, **kwargs)

    monkeypatch.setattr(pooled, "text_embeddings", wrapped)
    return calls


def test_caption_embeddings_group_every_caption_by_image(tiny_store, store, towers, monkeypatch):
    prepared, _ = tiny_store
    table = _by_id(prepared)
    ids = _mixed_ids(prepared)
    monkeypatch.setattr(pooled, "_PART_SIZE", 16)
    calls = _counting(monkeypatch)
    caps = pooled.caption_embeddings(store, [prepared], ids, towers=towers, progress=False)
    assert len(caps) == len(ids) and caps.ids.tolist() == ids.tolist()
    assert sum(len(c) for c in calls) == sum(len(table[i][1]) for i in set(ids.tolist()))  # each caption once
    for row, nsd_id in enumerate(ids.tolist()):
        captions = table[nsd_id][1]
        group = caps.embeds[caps.offsets[row]:caps.offsets[row + 1]]
        assert len(group) == len(captions)
        np.testing.assert_allclose(group, _hf_text(towers, captions), atol=FLOAT16)
    assert {len(table[i][1]) for i in ids.tolist()} != {5}  # some images have more captions than others

    # The cache: a manifest naming the store's CLIP and whole parts of at most 16 images, each id once.
    folder = store.root / "captions"
    parts = sorted(folder.glob("part_*.npz"))
    assert len(parts) == -(-len(table) // 16)
    stored = []
    for part in parts:
        with np.load(part) as z:
            assert z["embeds"].dtype == np.float16 and len(z["embeds"]) == z["counts"].sum()
            assert part.name == f"part_{int(z['ids'][0]):06d}.npz"
            stored += z["ids"].tolist()
    assert sorted(stored) == sorted(table)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporaries left

    # A second call (fresh store object, subset of ids, no towers given) reads the cache and computes nothing.
    calls.clear()
    again = pooled.caption_embeddings(open_feature_store(store.root), [prepared], ids[:7], towers=None,
                                      progress=False)
    assert calls == []
    np.testing.assert_array_equal(again.embeds, caps.embeds[:caps.offsets[7]])


def test_an_interrupted_caption_run_keeps_whole_parts_and_a_rerun_finishes(tiny_store, store, towers, monkeypatch,
                                                                          tmp_path):
    prepared, _ = tiny_store
    table = _by_id(prepared)
    ids = np.array(sorted(table), np.int64)
    monkeypatch.setattr(pooled, "_PART_SIZE", 10)
    calls = _counting(monkeypatch, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        pooled.caption_embeddings(store, [prepared], ids, towers=towers, progress=False)
    folder = store.root / "captions"
    assert [p.name for p in folder.iterdir() if p.suffix == ".npz"] == [f"part_{ids[0]:06d}.npz"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert calls[0] == [c for i in ids[:10].tolist() for c in table[i][1]]

    calls = _counting(monkeypatch)
    caps = pooled.caption_embeddings(store, [prepared], ids, towers=towers, progress=False)
    assert [c for call in calls for c in call] == [c for i in ids[10:].tolist() for c in table[i][1]]  # only the rest
    assert len(list(folder.glob("part_*.npz"))) == -(-len(ids) // 10)
    # The same vectors as a run that was never interrupted.
    fresh = tmp_path / "uninterrupted"
    shutil.copytree(tiny_store[1], fresh)
    whole = pooled.caption_embeddings(open_feature_store(fresh), [prepared], ids, towers=towers, progress=False)
    np.testing.assert_array_equal(caps.offsets, whole.offsets)
    np.testing.assert_array_equal(caps.embeds, whole.embeds)


def test_caption_embeddings_refuse_unknown_ids_and_another_clips_cache(tiny_store, store, towers):
    prepared, _ = tiny_store
    known = sorted(_by_id(prepared))
    with pytest.raises(InvalidInputError, match="no captions"):
        pooled.caption_embeddings(store, [prepared], [known[0], 72999], towers=towers, progress=False)
    pooled.caption_embeddings(store, [prepared], known[:2], towers=towers, progress=False)
    other = copy.deepcopy(store.manifest)
    other["settings"]["model"]["model"] = "random:other"
    impostor = SimpleNamespace(root=store.root, manifest=other)
    with pytest.raises(InvalidInputError, match="another CLIP"):
        pooled.caption_embeddings(impostor, [prepared], known[:2], towers=towers, progress=False)


def test_an_image_without_captions_is_refused(tiny_store, store, towers):
    prepared, _ = tiny_store
    samples = prepared.splits["train"]
    nsd_id = int(samples.stimulus_ids[0])
    bare = SimpleNamespace(splits={"train": SimpleNamespace(stimulus_ids=samples.stimulus_ids[:1], captions=[[]])})
    with pytest.raises(InvalidInputError, match="no caption"):
        pooled.caption_embeddings(store, [bare], [nsd_id], towers=towers, progress=False)


# -- CaptionEmbeddings ----------------------------------------------------------------------------------------


def _hand_made(seed=0):
    rng = np.random.default_rng(seed)
    counts = np.array([1, 5, 3, 6, 2])
    embeds = rng.normal(size=(counts.sum(), 8)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return pooled.CaptionEmbeddings(np.array([10, 11, 12, 13, 14]), offsets, embeds), counts


def test_mean_is_the_normalised_mean_of_each_images_captions():
    caps, counts = _hand_made()
    got = caps.mean()
    start = 0
    for row, n in enumerate(counts):
        mean = caps.embeds[start:start + n].astype(np.float64).mean(0)
        np.testing.assert_allclose(got[row], mean / np.linalg.norm(mean), atol=1e-6)
        start += n


def test_sample_draws_own_captions_uniformly_and_by_seed():
    caps, counts = _hand_made()
    own = [{tuple(v) for v in caps.embeds[caps.offsets[r]:caps.offsets[r + 1]]} for r in range(len(counts))]
    seen = [dict() for _ in counts]
    rng = np.random.default_rng(0)
    for _ in range(600):
        draw = caps.sample(rng)
        assert draw.shape == (5, 8)
        for row, vector in enumerate(draw):
            key = tuple(vector)
            assert key in own[row]
            seen[row][key] = seen[row].get(key, 0) + 1
    for row, n in enumerate(counts):
        assert len(seen[row]) == n  # every caption drawn
        assert min(seen[row].values()) > 600 / n * 0.6  # roughly uniform
    np.testing.assert_array_equal(caps.sample(np.random.default_rng(5)), caps.sample(np.random.default_rng(5)))
    assert not np.array_equal(caps.sample(np.random.default_rng(5)), caps.sample(np.random.default_rng(6)))


def test_subset_keeps_rows_and_their_captions():
    caps, _ = _hand_made()
    rows = np.array([3, 0, 3])
    sub = caps.subset(rows)
    assert sub.ids.tolist() == [13, 10, 13] and sub.offsets.tolist() == [0, 6, 7, 13]
    for k, r in enumerate(rows):
        np.testing.assert_array_equal(sub.embeds[sub.offsets[k]:sub.offsets[k + 1]],
                                      caps.embeds[caps.offsets[r]:caps.offsets[r + 1]])
    np.testing.assert_allclose(sub.mean(), caps.mean()[rows], atol=1e-7)
    empty = caps.subset(np.array([], np.int64))
    assert len(empty) == 0 and empty.offsets.tolist() == [0] and len(empty.embeds) == 0


# -- predictions and the store's CLIP ---------------------------------------------------------------------------


def test_pooled_prediction_takes_token_zero_of_the_semantic_branch():
    rng = np.random.default_rng(1)
    image, semantic = rng.normal(size=(4, 3, 6)), rng.normal(size=(4, 3, 6))
    token_pred = SimpleNamespace(method="ridge", image=image, image_semantic=semantic)
    np.testing.assert_allclose(pooled.pooled_prediction(token_pred),
                               semantic[:, 0] / np.linalg.norm(semantic[:, 0], axis=1, keepdims=True), atol=1e-6)
    single = SimpleNamespace(method="brainclip", image=image[:, :1].astype(np.float16), image_semantic=None)
    got = pooled.pooled_prediction(single)
    assert got.dtype == np.float32 and got.shape == (4, 6)
    ref = image[:, 0].astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(got, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(InvalidInputError, match="no image embedding"):
        pooled.pooled_prediction(SimpleNamespace(method="text_only", image=None, image_semantic=None))


def test_clip_name_of_names_what_load_clip_takes(store):
    assert pooled.clip_name_of(store) == "mini"
    tiny = SimpleNamespace(manifest={"settings": {"model": {"model": "random:tiny", "seed": 0}}})
    assert pooled.clip_name_of(tiny) == "random:tiny"
    local = SimpleNamespace(manifest={"settings": {"model": {"model": "/models/clip-l", "source": "local folder"}}})
    assert pooled.clip_name_of(local) == "/models/clip-l"


def _store_with(store, **changes):
    manifest = copy.deepcopy(store.manifest)
    for key, value in changes.items():
        section, name = key.split("__")
        manifest["settings"][section][name] = value
    return SimpleNamespace(root=store.root, manifest=manifest)


def test_store_clip_loads_the_stores_clip_and_refuses_other_stores(store):
    towers = pooled.store_clip(store)
    assert towers.identity == store.manifest["settings"]["model"]
    with pytest.raises(InvalidInputError, match=r"vision block 12, not the last \(24\).*--final 24"):
        pooled.store_clip(_store_with(store, extractor__semantic_layer=12))
    with pytest.raises(InvalidInputError, match="config differs"):
        pooled.store_clip(_store_with(store, model__config_sha256="0" * 64))
