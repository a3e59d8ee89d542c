"""The miniature world's scenes never coincide with a simulated NSD stimulus, and its helpers do what they say."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainmclip.data.synthetic import load_preset
from brainmclip.data.synthetic import simulate as simulate_module
from brainmclip.data.synthetic.scenes import CATEGORIES
from brainmclip.miniature.clip import load_miniature_config
from brainmclip.miniature.world import (
    SIMULATOR_PURPOSES,
    STREAMS,
    build_bank,
    caption_vocabulary,
    scene_labels,
    short_caption,
    swap_category,
    world_scene,
)


def _key(scene) -> str:
    return json.dumps(scene.to_dict(), sort_keys=True)


def test_streams_are_not_the_simulators():
    # The simulator seeds every draw with [seed, purpose, ...] and purpose < 7; the world uses codes >= 1000.
    simulator_codes = {v for k, v in vars(simulate_module).items() if k.startswith("_") and k.isupper()
                       and isinstance(v, int) and not isinstance(v, bool) and k != "_TRIAL_CHUNK"}
    assert simulator_codes == set(SIMULATOR_PURPOSES)
    assert not set(STREAMS.values()) & simulator_codes
    assert len(set(STREAMS.values())) == len(STREAMS)


@pytest.mark.slow
def test_no_training_scene_is_a_simulated_stimulus():
    """Every scene the shipped models trained on (each config's bank) differs from every stimulus of every preset
    at the demo's seed and the tests' seed: no leakage into any test set."""
    n_train = max(load_miniature_config(name)["bank"]["n_scenes"] for name in ("clip", "vd", "sd"))
    seeds = {load_miniature_config(name)["seed"] for name in ("clip", "vd", "sd")}
    training = {_key(world_scene(seed, "train", i)) for seed in seeds for i in range(n_train)}
    heldout = {_key(world_scene(seed, "heldout", i)) for seed in seeds for i in range(2000)}
    assert len(training) == n_train * len(seeds)  # distinct scenes (a broken stream would repeat)
    assert not training & heldout
    for preset in ("tiny", "small", "nsd"):
        n_total = load_preset(preset).n_total_images
        for seed in (0, 7):
            stimuli = {_key(simulate_module._scene(seed, i)) for i in range(n_total)}
            assert not training & stimuli, (preset, seed)
            assert not heldout & stimuli, (preset, seed)


def test_bank_is_deterministic_and_labelled():
    a = build_bank(12, seed=3, stream="heldout", size=32)
    b = build_bank(12, seed=3, stream="heldout", size=32)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert a.images.shape == (12, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.labels["category_map"].shape == (12, 32, 32)
    for i in range(12):
        scene = world_scene(3, "heldout", i)
        labels = scene_labels(scene)
        assert a.labels["category"][i] == labels["category"]
        largest = max(o.size for o in scene.objects)
        named = {o.category for o in scene.objects if o.size == largest}
        assert {c for c, hit in zip(CATEGORIES, labels["main_categories"], strict=True) if hit} == named
        # the map only shows categories that are in the scene, and some object is visible
        shown = set(np.unique(a.labels["category_map"][i])) - {-1}
        assert shown and shown <= {list(CATEGORIES).index(o.category) for o in scene.objects}
    c = build_bank(12, seed=3, stream="train", size=32)
    assert not np.array_equal(a.images, c.images)


def test_swap_category_changes_only_the_category():
    rng = np.random.default_rng(0)
    for caption in ("A small red dog on the beach.", "Two dogs in the snow.", "There is a tree, a big ball indoors."):
        swapped = swap_category(caption, rng)
        before, after = caption.split(), swapped.split()
        assert len(before) == len(after)
        changed = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
        assert changed and all(x.strip(".,").lower().rstrip("s") != y.strip(".,").lower().rstrip("s")
                               for x, y in changed)
    assert swapped != caption
    assert swap_category("A picture of nothing.", rng) is None
    assert swap_category("Two dogs in the snow.", np.random.default_rng(1)).split()[1] in (
        "people", "faces", "birds", "cars", "boats", "houses", "trees", "signs", "balls")


def test_vocabulary_and_short_captions():
    words = caption_vocabulary(200)
    assert {"dog", "red", "beach", "picture", "."} <= set(words)
    rng = np.random.default_rng(0)
    scene = world_scene(0, "train", 5)
    text = short_caption(scene, rng)
    assert text.endswith(".") and CATEGORIES and any(c in text for c in CATEGORIES)
