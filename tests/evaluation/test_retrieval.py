"""Retrieval metrics against brute-force loops over the same subsets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brainmclip.evaluation.retrieval import (
    draw_subsets,
    recall_at_k,
    retrieval_report,
    similarity_matrix,
    top1_n_way,
)


def redraw(n: int, n_way: int, n_repeats: int, seed: int) -> list[list[int]]:
    """The documented subset logic, written out independently."""
    if n_way >= n:
        return [list(range(n))] * n_repeats
    rng = np.random.default_rng(seed)
    return [sorted(int(i) for i in rng.choice(n, size=n_way, replace=False)) for _ in range(n_repeats)]


def first_argmax(values: list[float]) -> int:
    best = 0
    for k, v in enumerate(values):
        if v > values[best]:
            best = k
    return best


def brute_top1(sim: np.ndarray, subsets: list[list[int]]) -> tuple[list[float], list[float]]:
    image, brain = [], []
    for items in subsets:
        img_hits = sum(first_argmax([sim[i, j] for j in items]) == pos for pos, i in enumerate(items))
        brn_hits = sum(first_argmax([sim[i, j] for i in items]) == pos for pos, j in enumerate(items))
        image.append(img_hits / len(items))
        brain.append(brn_hits / len(items))
    return image, brain


def brute_ranks(sim: np.ndarray) -> tuple[list[int], list[int]]:
    n = sim.shape[0]
    rows = [1 + sum(sim[i, j] > sim[i, i] for j in range(n)) for i in range(n)]
    cols = [1 + sum(sim[i, j] > sim[j, j] for i in range(n)) for j in range(n)]
    return rows, cols


@pytest.fixture
def noisy_pairs():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(60, 4, 8))
    brain = images + 2.5 * rng.normal(size=images.shape)
    return brain, images


# -- similarity matrix -----------------------------------------------------------------------
def test_similarity_matrix_matches_direct_cosine(noisy_pairs):
    brain, images = noisy_pairs
    b, im = brain.reshape(60, -1), images.reshape(60, -1)
    want = (b / np.linalg.norm(b, axis=1, keepdims=True)) @ (im / np.linalg.norm(im, axis=1, keepdims=True)).T
    np.testing.assert_allclose(similarity_matrix(brain, images), want, atol=1e-6)
    # Tiny chunks (a few columns at a time) give the same answer.
    np.testing.assert_allclose(similarity_matrix(brain, images, chunk_bytes=4 * 120 * 3), want, atol=1e-6)
    # Torch tensors (any float dtype) and float16 arrays are read chunk by chunk.
    np.testing.assert_allclose(similarity_matrix(torch.from_numpy(brain), torch.from_numpy(images)), want, atol=1e-6)
    np.testing.assert_allclose(similarity_matrix(brain.astype(np.float16), images.astype(np.float16)), want, atol=2e-3)


def test_similarity_matrix_rectangular_and_zero_rows():
    rng = np.random.default_rng(1)
    brain, images = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    brain[1] = 0.0
    s = similarity_matrix(brain, images)
    assert s.shape == (3, 4) and np.all(s[1] == 0.0) and np.all(np.abs(s) <= 1 + 1e-12)
    with pytest.raises(ValueError):
        similarity_matrix(rng.normal(size=(3, 5)), rng.normal(size=(3, 6)))


# -- top-1 n-way ---------------------------------------------------------------------------
def test_subsets_follow_documented_draw():
    got = draw_subsets(100, 10, 7, seed=3)
    assert got.shape == (7, 10)
    assert got.tolist() == redraw(100, 10, 7, seed=3)
    assert all(len(set(row)) == 10 for row in got.tolist())


@pytest.mark.parametrize("n_way,seed", [(5, 0), (17, 4), (60, 1)])
def test_top1_matches_brute_force(noisy_pairs, n_way, seed):
    sim = similarity_matrix(*noisy_pairs)
    result = top1_n_way(sim, n_way=n_way, n_repeats=6, seed=seed)
    image, brain = brute_top1(sim, redraw(60, n_way, 6, seed))
    np.testing.assert_allclose(result["image_retrieval"]["per_repeat"], image)
    np.testing.assert_allclose(result["brain_retrieval"]["per_repeat"], brain)
    for key, per in (("image_retrieval", image), ("brain_retrieval", brain)):
        mean, half = np.mean(per), 1.96 * np.std(per, ddof=1) / math.sqrt(6)
        assert result[key]["mean"] == pytest.approx(mean)
        assert result[key]["ci95_low"] == pytest.approx(mean - half)
        assert result[key]["ci95_high"] == pytest.approx(mean + half)
    assert result["n_way"] == n_way and result["n_repeats"] == 6 and "note" not in result


def test_top1_perfect_predictions():
    images = np.random.default_rng(2).normal(size=(40, 3, 5))
    result = top1_n_way(similarity_matrix(images, images), n_way=10, n_repeats=5)
    for key in ("image_retrieval", "brain_retrieval"):
        assert result[key]["mean"] == 1.0 and result[key]["per_repeat"] == [1.0] * 5
        assert result[key]["ci95_low"] == result[key]["ci95_high"] == 1.0


def test_top1_random_is_near_chance():
    sim = np.random.default_rng(3).normal(size=(1000, 1000))
    result = top1_n_way(sim, n_way=50, n_repeats=200, seed=0)
    for key in ("image_retrieval", "brain_retrieval"):
        assert result[key]["mean"] == pytest.approx(1 / 50, abs=0.008)
        assert result[key]["ci95_low"] < result[key]["mean"] < result[key]["ci95_high"]


def test_directions_differ_for_asymmetric_similarity():
    # Every row finds its column, but column 0 is claimed by row 1.
    sim = np.array([[1.0, 0.0], [2.0, 3.0]])
    result = top1_n_way(sim, n_way=2, n_repeats=3)
    assert result["image_retrieval"]["mean"] == 1.0
    assert result["brain_retrieval"]["mean"] == 0.5
    recall = recall_at_k(sim, ks=(1, 2))
    assert recall["image_retrieval"]["recall@1"] == 1.0
    assert recall["brain_retrieval"]["recall@1"] == 0.5
    assert recall["brain_retrieval"]["recall@2"] == 1.0


def test_n_way_larger_than_n_uses_all_items(noisy_pairs):
    sim = similarity_matrix(*noisy_pairs)[:12, :12]
    result = top1_n_way(sim, n_way=300, n_repeats=4)
    assert result["n_way"] == 12 and result["n_way_requested"] == 300 and "note" in result
    image, brain = brute_top1(sim, [list(range(12))])
    assert result["image_retrieval"]["per_repeat"] == pytest.approx(image * 4)
    assert result["brain_retrieval"]["per_repeat"] == pytest.approx(brain * 4)
    # On all items, top-1 accuracy is Recall@1 (no ties in continuous data).
    recall = recall_at_k(sim, ks=(1,))
    assert result["image_retrieval"]["mean"] == pytest.approx(recall["image_retrieval"]["recall@1"])
    assert result["brain_retrieval"]["mean"] == pytest.approx(recall["brain_retrieval"]["recall@1"])


def test_ties_go_to_first_index():
    sim = np.ones((3, 3))
    result = top1_n_way(sim, n_way=3, n_repeats=2)
    # argmax of a constant row is item 0, so only item 0 is "found".
    assert result["image_retrieval"]["mean"] == pytest.approx(1 / 3)
    # Recall counts only strictly greater candidates, so ties favour the true item.
    assert recall_at_k(sim, ks=(1,))["image_retrieval"]["recall@1"] == 1.0


def test_single_repeat_has_nan_interval():
    result = top1_n_way(np.eye(4), n_way=2, n_repeats=1)
    assert result["image_retrieval"]["mean"] == 1.0 and math.isnan(result["image_retrieval"]["ci95_low"])


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        top1_n_way(np.zeros((3, 4)))
    with pytest.raises(ValueError):
        top1_n_way(np.full((3, 3), np.nan))
    with pytest.raises(ValueError):
        recall_at_k(np.eye(3), ks=(0,))


# -- recall@K -----------------------------------------------------------------------------
def test_recall_matches_brute_force(noisy_pairs):
    sim = similarity_matrix(*noisy_pairs)
    sim[3, 7] = sim[3, 3]  # an exact tie, which counts for the true item
    rows, cols = brute_ranks(sim)
    ks = (1, 5, 10, 100)
    result = recall_at_k(sim, ks=ks)
    for key, ranks in (("image_retrieval", rows), ("brain_retrieval", cols)):
        for k in ks:
            assert result[key][f"recall@{k}"] == pytest.approx(np.mean([r <= k for r in ranks]))
        assert result[key]["mean_recall"] == pytest.approx(np.mean([result[key][f"recall@{k}"] for k in ks]))
    assert result["image_retrieval"]["recall@100"] == 1.0
    assert result["image_retrieval"] != result["brain_retrieval"]


def test_recall_perfect_and_random():
    assert recall_at_k(np.eye(50) + 0.01)["image_retrieval"] == {
        "recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "mean_recall": 1.0}
    sim = np.random.default_rng(5).normal(size=(2000, 2000))
    result = recall_at_k(sim, ks=(1, 100))
    for key in ("image_retrieval", "brain_retrieval"):
        assert result[key]["recall@100"] == pytest.approx(100 / 2000, abs=0.015)


# -- report --------------------------------------------------------------------------------
def test_retrieval_report(noisy_pairs):
    brain, images = noisy_pairs
    report = retrieval_report(images + 1e-3 * brain, images, n_way=20, n_repeats=5, seed=0)
    assert report["n_items"] == 60
    assert report["top1_n_way"]["image_retrieval"]["mean"] == 1.0
    assert report["recall_at_k"]["brain_retrieval"]["mean_recall"] == 1.0
    noisy = retrieval_report(brain, images, n_way=20, n_repeats=5, seed=0)
    assert noisy["top1_n_way"] == top1_n_way(similarity_matrix(brain, images), n_way=20, n_repeats=5, seed=0)
    with pytest.raises(ValueError):
        retrieval_report(brain[:5], images)


def test_pairwise_identification_by_hand():
    from brainmclip.evaluation.retrieval import pairwise_identification

    # rows: item 0 beats both others, item 1 beats one and ties one, item 2 beats none
    sim = np.array([[0.9, 0.1, 0.2],
                    [0.5, 0.5, 0.1],
                    [0.8, 0.7, 0.3]])
    assert pairwise_identification(sim) == pytest.approx((2 + 1.5 + 0) / 3 / 2)
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_identification(np.ones((1, 1)))


def test_decoded_retrieval_scores_each_embedding_against_its_target():
    from types import SimpleNamespace

    from brainmclip.evaluation.retrieval import DIRECTIONS, decoded_retrieval

    rng = np.random.default_rng(5)
    ids = np.array([7, 3, 11, 5, 2, 9])
    semantic, detail, text = (rng.normal(size=(len(ids), 4, 3)).astype(np.float32) for _ in range(3))

    class Store:
        def get(self, wanted, fields):
            assert list(wanted) == list(ids)
            return {k: v for k, v in (("image_semantic", semantic), ("image_detail", detail), ("text", text))
                    if k in fields}

    image_pred = (semantic + detail) / 2 + 0.3 * rng.normal(size=semantic.shape).astype(np.float32)
    pred = SimpleNamespace(stimulus_ids=ids, image=image_pred, text=None)
    out = decoded_retrieval(pred, Store(), n_way=300, n_repeats=4)
    assert set(out) == {"image"}
    expected = retrieval_report(image_pred, (semantic + detail) / 2, n_way=len(ids), n_repeats=4)
    assert out["image"]["top1_n_way"]["image_retrieval"] == expected["top1_n_way"]["image_retrieval"]
    assert out["image"]["top1_n_way"]["n_way"] == len(ids)  # clipped to the test items
    assert out["image"]["top1_n_way"]["directions"] == DIRECTIONS
    both = decoded_retrieval(SimpleNamespace(stimulus_ids=ids, image=image_pred, text=text), Store(), n_repeats=2)
    assert both["text"]["recall_at_k"]["image_retrieval"]["recall@1"] == 1.0  # text equals its target
