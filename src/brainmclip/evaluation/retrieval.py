"""Retrieval metrics between predicted (brain-decoded) and true image embeddings.

Two conventions from the literature, both computed from one cosine-similarity matrix whose row
``i`` is brain embedding ``i`` and column ``j`` image embedding ``j`` (the true pairs lie on the
diagonal):

* MindEye's top-1 ``n``-way accuracy: among ``n_way`` random test items, is the true partner the
  most similar one? Averaged over random subsets, reported with a 95% confidence interval.
* BrainCLIP's Recall@K over all test items: is the true partner among the ``K`` most similar?

"Image retrieval" is brain -> image (a brain embedding searches the images: a row searches the
columns); "brain retrieval" is image -> brain (an image searches the brain embeddings: a column
searches the rows). MindEye1's code builds its similarity matrix the other way round (rows images)
and so calls the first direction "brain retrieval": its "image retrieval" numbers are our brain
retrieval. Results carry both names with their direction (:data:`DIRECTIONS`).

The interval of a top-1 accuracy is ``mean ± 1.96 * sd / sqrt(repeats)`` over the random subsets,
with the sample standard deviation (``ddof=1``); MindEye's scripts use ``ddof=0``, which makes the
interval narrower by a factor ``sqrt((R - 1) / R)`` (0.983 for 30 repeats).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from brainmclip.errors import InvalidInputError

__all__ = ["DIRECTIONS", "INTERVAL", "decoded_retrieval", "draw_subsets", "pairwise_identification", "recall_at_k",
           "retrieval_report", "similarity_matrix", "top1_n_way"]

#: What each direction means, stored with every result so a table never has to guess.
DIRECTIONS = {
    "image_retrieval": "brain -> image: each brain embedding ranks the candidate images (MindEye1's code calls "
                       "this brain retrieval)",
    "brain_retrieval": "image -> brain: each image ranks the candidate brain embeddings (MindEye1's code calls "
                       "this image retrieval)",
}
#: How the top-1 interval is computed.
INTERVAL = "mean ± 1.96 · sd(ddof=1) / √repeats over the random subsets"

# Budget for one column chunk of both inputs, cast to float32, in similarity_matrix.
_CHUNK_BYTES = 64 * 2**20
_NORM_FLOOR = 1e-12


def _as_2d(x):
    """Flatten ``(n, ...)`` to ``(n, D)`` without copying (a view for arrays, memmaps and tensors)."""
    if hasattr(x, "detach"):  # torch tensor: keep it a tensor so chunks are converted one by one
        x = x.detach()
        return x.reshape(x.shape[0], -1)
    x = np.asarray(x)
    if x.ndim < 1:
        raise InvalidInputError("embeddings must be an (n, ...) array")
    return x.reshape(x.shape[0], -1)


def _columns(x, start: int, stop: int) -> np.ndarray:
    """Columns ``start:stop`` of a flattened array or tensor as float32 numpy."""
    block = x[:, start:stop]
    if hasattr(block, "detach"):
        return block.float().cpu().numpy()
    return np.asarray(block, dtype=np.float32)


def similarity_matrix(brain, images, chunk_bytes: int = _CHUNK_BYTES) -> np.ndarray:
    """Cosine similarity of every brain embedding with every image embedding.

    Each sample is flattened to one vector. The feature axis is processed in column chunks, so
    peak memory is about ``chunk_bytes`` plus the ``(n_brain, n_images)`` result, whatever the
    input dtype (float16 memmaps and torch tensors are read chunk by chunk, never copied whole).
    Dot products and norms are accumulated in float64 and normalised at the end, which equals
    normalising first and multiplying after.

    Parameters
    ----------
    brain : array_like or torch.Tensor, shape (n_brain, ...)
        Predicted embeddings, e.g. (n, 257, 768).
    images : array_like or torch.Tensor, shape (n_images, ...)
        Target embeddings with the same number of features per sample.
    chunk_bytes : int
        Memory budget of one float32 column chunk of both inputs together.

    Returns
    -------
    numpy.ndarray, float64, shape (n_brain, n_images)
        ``S[i, j] = cos(brain_i, images_j)``; a zero vector has similarity 0 with everything.
    """
    b, im = _as_2d(brain), _as_2d(images)
    if b.shape[1] != im.shape[1]:
        raise InvalidInputError(f"brain has {b.shape[1]} features per sample, images {im.shape[1]}")
    n_b, n_i, n_feat = b.shape[0], im.shape[0], b.shape[1]
    step = max(1, int(chunk_bytes) // (4 * max(1, n_b + n_i)))
    dots = np.zeros((n_b, n_i), dtype=np.float64)
    sq_b = np.zeros(n_b, dtype=np.float64)
    sq_i = np.zeros(n_i, dtype=np.float64)
    for start in range(0, n_feat, step):
        stop = min(n_feat, start + step)
        cb, ci = _columns(b, start, stop), _columns(im, start, stop)
        dots += cb @ ci.T
        sq_b += np.einsum("ij,ij->i", cb, cb, dtype=np.float64)
        sq_i += np.einsum("ij,ij->i", ci, ci, dtype=np.float64)
    norm_b = np.maximum(np.sqrt(sq_b), _NORM_FLOOR)
    norm_i = np.maximum(np.sqrt(sq_i), _NORM_FLOOR)
    return dots / norm_b[:, None] / norm_i[None, :]


def _square_similarity(similarity) -> np.ndarray:
    s = similarity.detach().cpu().numpy() if hasattr(similarity, "detach") else np.asarray(similarity)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise InvalidInputError(f"retrieval needs a non-empty square similarity matrix (true pairs on the "
                                f"diagonal), got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise InvalidInputError("similarity matrix has non-finite entries")
    return s


def draw_subsets(n: int, n_way: int, n_repeats: int, seed: int = 0) -> np.ndarray:
    """The item subsets :func:`top1_n_way` scores, one row per repeat.

    Each repeat draws ``min(n_way, n)`` distinct indices with
    ``numpy.random.default_rng(seed).choice(n, k, replace=False)`` (one generator, repeats drawn
    in order) and sorts them, so exact ties resolve to the lowest item index. If ``n_way >= n``
    every repeat is simply ``arange(n)`` and the generator is not used.

    Parameters
    ----------
    n : int
        Number of items.
    n_way : int
        Requested subset size (>= 2).
    n_repeats : int
        Number of subsets (>= 1).
    seed : int
        Seed of the generator.

    Returns
    -------
    numpy.ndarray, int64, shape (n_repeats, min(n_way, n))
    """
    if n_way < 2 or n_repeats < 1 or n < 1:
        raise InvalidInputError(f"need n_way >= 2, n_repeats >= 1 and n >= 1; got n_way={n_way}, "
                                f"n_repeats={n_repeats}, n={n}")
    if n_way >= n:
        return np.tile(np.arange(n, dtype=np.int64), (n_repeats, 1))
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(n, size=n_way, replace=False)) for _ in range(n_repeats)]).astype(np.int64)


def _summary(per_repeat: np.ndarray) -> dict:
    """Mean and normal-approximation 95% CI of per-repeat accuracies."""
    mean = float(per_repeat.mean())
    # A single repeat has no spread to estimate, so its interval is NaN rather than zero-width.
    n = len(per_repeat)
    half = 1.96 * float(per_repeat.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half,
            "per_repeat": [float(a) for a in per_repeat]}


def top1_n_way(similarity, n_way: int = 300, n_repeats: int = 30, seed: int = 0) -> dict:
    """MindEye-style top-1 ``n_way`` retrieval accuracy in both directions.

    For each subset from :func:`draw_subsets` (rows and columns restricted to the same items):

    * image retrieval (brain -> image): row ``i`` is correct iff ``argmax_j S[i, j] == i``;
    * brain retrieval (image -> brain): column ``j`` is correct iff ``argmax_i S[i, j] == j``.

    The accuracy of a repeat is the fraction correct within its subset. The reported interval is
    ``mean ± 1.96 * std(per_repeat, ddof=1) / sqrt(n_repeats)`` (NaN for a single repeat). Ties go
    to the first (lowest-index) item, as ``numpy.argmax`` does; this only matters for exact ties.
    Chance level is ``1 / n_way``.

    Parameters
    ----------
    similarity : array_like, shape (n, n)
        Row ``i`` brain embedding ``i``, column ``j`` image embedding ``j``.
    n_way : int
        Candidates per query. If larger than ``n``, all ``n`` items are used (``"n_way"`` in the
        result is the size actually used, ``"n_way_requested"`` the one asked for).
    n_repeats : int
        Number of random subsets.
    seed : int
        Seed of the subset draws.

    Returns
    -------
    dict
        ``image_retrieval`` and ``brain_retrieval``, each ``{"mean", "ci95_low", "ci95_high",
        "per_repeat"}`` (fractions in [0, 1]), plus ``n_way``, ``n_way_requested``, ``n_repeats``,
        ``n_items``, ``directions`` (:data:`DIRECTIONS`), ``interval`` (:data:`INTERVAL`) and, when
        ``n_way`` was clipped, a ``note``.
    """
    s = _square_similarity(similarity)
    n = s.shape[0]
    subsets = draw_subsets(n, n_way, n_repeats, seed)  # (R, k)
    k = subsets.shape[1]
    target = np.arange(k)
    image_acc = np.empty(len(subsets))
    brain_acc = np.empty(len(subsets))
    # One (k, k) block at a time keeps memory at k^2 whatever the number of repeats.
    for r, items in enumerate(subsets):
        block = s[np.ix_(items, items)]
        image_acc[r] = (block.argmax(axis=1) == target).mean()
        brain_acc[r] = (block.argmax(axis=0) == target).mean()
    result = {"image_retrieval": _summary(image_acc), "brain_retrieval": _summary(brain_acc),
              "n_way": int(k), "n_way_requested": int(n_way), "n_repeats": int(n_repeats), "n_items": int(n),
              "directions": dict(DIRECTIONS), "interval": INTERVAL}
    if n_way > n:
        result["note"] = f"n_way={n_way} exceeds the {n} items; all {n} were used in every repeat"
    return result


def recall_at_k(similarity, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """BrainCLIP-style Recall@K over all items, in both directions, as fractions in [0, 1].

    The rank of query ``i``'s true partner is ``1 + #{candidates with strictly greater similarity
    than S[i, i]}``, so exact ties count in the true item's favour. Recall@K is the fraction of
    queries with rank <= K.

    Parameters
    ----------
    similarity : array_like, shape (n, n)
        Row ``i`` brain embedding ``i``, column ``j`` image embedding ``j``.
    ks : sequence of int
        Cut-offs (>= 1); a K above ``n`` gives 1.

    Returns
    -------
    dict
        ``image_retrieval`` (rows query columns) and ``brain_retrieval`` (columns query rows), each
        ``{"recall@K": fraction for each K, "mean_recall": mean over ks}``, plus ``ks`` and ``n_items``.
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise InvalidInputError(f"ks must be a non-empty list of positive integers, got {ks}")
    s = _square_similarity(similarity)
    diag = np.diag(s)
    image_rank = (s > diag[:, None]).sum(axis=1) + 1
    brain_rank = (s > diag[None, :]).sum(axis=0) + 1

    def summarise(rank: np.ndarray) -> dict:
        out = {f"recall@{k}": float((rank <= k).mean()) for k in ks}
        out["mean_recall"] = float(np.mean([out[f"recall@{k}"] for k in ks]))
        return out

    return {"image_retrieval": summarise(image_rank), "brain_retrieval": summarise(brain_rank),
            "ks": ks, "n_items": int(s.shape[0]), "directions": dict(DIRECTIONS)}


def retrieval_report(brain, images, n_way: int = 300, n_repeats: int = 30, seed: int = 0,
                     ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Both retrieval metrics for paired embeddings (``brain[i]`` decodes ``images[i]``).

    Parameters
    ----------
    brain, images : array_like or torch.Tensor, shape (n, ...)
        Predicted and target embeddings of the same ``n`` items, in the same order.
    n_way, n_repeats, seed : int
        As in :func:`top1_n_way`.
    ks : sequence of int
        As in :func:`recall_at_k`.

    Returns
    -------
    dict
        ``{"top1_n_way": top1_n_way(...), "recall_at_k": recall_at_k(...), "n_items": n}``.
    """
    if len(brain) != len(images):
        raise InvalidInputError(f"{len(brain)} brain embeddings but {len(images)} image embeddings; they must pair up")
    s = similarity_matrix(brain, images)
    return {"top1_n_way": top1_n_way(s, n_way=n_way, n_repeats=n_repeats, seed=seed),
            "recall_at_k": recall_at_k(s, ks=ks), "n_items": int(s.shape[0])}


def pairwise_identification(similarity) -> float:
    """Mean over rows i of the share of j != i with ``S[i, i] > S[i, j]`` (ties count half); chance 0.5.

    A smooth score for model selection: unlike top-1 it moves with every pair that changes order.
    """
    s = _square_similarity(similarity).astype(np.float64)
    n = len(s)
    if n < 2:
        raise InvalidInputError("pairwise identification needs at least 2 items")
    diag = np.diag(s)[:, None]
    wins = (diag > s).sum(1) + 0.5 * ((diag == s).sum(1) - 1)
    return float(wins.mean() / (n - 1))


def decoded_retrieval(predictions, store, n_way: int = 300, n_repeats: int = 30, seed: int = 0,
                      ks: Sequence[int] = (1, 5, 10)) -> dict:
    """:func:`retrieval_report` of each decoded embedding against its CLIP targets in a feature store.

    ``predictions`` is a :class:`~brainmclip.types.DecodedEmbeddings`; ``store`` an open feature store.
    The image embedding is scored against the fused image target (mean of the semantic and detail
    layers, what Versatile Diffusion is conditioned on), the text embedding against the text target.
    Returns ``{"image": report, "text": report}`` for the embeddings the predictions hold; ``n_way``
    is clipped to the number of test items. Pooled predictions (one token) get the image report only,
    against CLIP's image embedding.
    """
    kinds = [k for k in ("image", "text") if getattr(predictions, k) is not None]
    if not kinds:
        return {}
    if predictions.image is not None and predictions.image.shape[1] == 1:
        # One pooled CLIP vector per row (BrainCLIP, ridge to pooled targets): scored against CLIP's image
        # embedding, token 0 of the semantic target; its text retrieval needs captions (evaluate --pred).
        target = store.get(predictions.stimulus_ids, ["image_semantic"], token=0)["image_semantic"]
        return {"image": retrieval_report(np.asarray(predictions.image[:, 0], np.float32), target,
                                          n_way=min(n_way, len(predictions.stimulus_ids)), n_repeats=n_repeats,
                                          seed=seed, ks=ks)}
    fields = (("image_semantic", "image_detail") if "image" in kinds else ()) + (("text",) if "text" in kinds else ())
    targets = store.get(predictions.stimulus_ids, fields)
    out = {}
    n_way = min(n_way, len(predictions.stimulus_ids))
    for kind in kinds:
        target = (targets["image_semantic"] + targets["image_detail"]) / 2 if kind == "image" else targets["text"]
        out[kind] = retrieval_report(np.asarray(getattr(predictions, kind), np.float32), target, n_way=n_way,
                                     n_repeats=n_repeats, seed=seed, ks=ks)
    return out
