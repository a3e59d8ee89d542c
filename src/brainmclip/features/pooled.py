"""CLIP's final (pooled, projected) embeddings: one vector per image and per caption.

BrainCLIP aligns fMRI with these vectors rather than with token sequences. The image vector needs no
second pass over the images: token 0 of the feature store's semantic target (the last vision block,
projected and divided by its own norm) *is* CLIP's image embedding at unit length. Caption vectors
(the projected end-of-text token of each caption, kept one per caption so training can draw a random
caption per image and epoch) are computed with the store's CLIP once and cached in ``STORE/captions/``::

    STORE/captions/manifest.json         the CLIP identity the vectors were made with
    STORE/captions/part_<first id>.npz   ids (k,), counts (k,), embeds (sum(counts), D) float16, unit length

Each part is written under a temporary name and renamed, so an interrupted run leaves whole parts only
and a rerun computes just the missing images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from brainmclip.atomic import atomic_path, write_json_atomic
from brainmclip.errors import InvalidInputError
from brainmclip.integrity import reading

__all__ = ["CaptionEmbeddings", "caption_embeddings", "clip_name_of", "image_embeddings", "pooled_prediction",
           "store_clip", "text_embeddings", "unit"]

log = logging.getLogger("brainmclip.extract")

_PART_SIZE = 2048
_CAPTIONS = "captions"


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pooled_prediction(pred) -> np.ndarray:
    """One unit-length CLIP-space vector per row of a prediction, float32 ``(n, D)``.

    Pooled predictions (BrainCLIP) hold it as their single token; token predictions (BrainMCLIP, ridge)
    give token 0 of the semantic image branch, which is CLIP's projected image embedding.
    """
    if pred.image is None:
        raise InvalidInputError(f"{pred.method} predictions have no image embedding; a CLIP-space vector needs one")
    source = pred.image_semantic if pred.image_semantic is not None else pred.image
    return unit(np.asarray(source[:, 0], np.float32))


def clip_name_of(store) -> str:
    """The ``load_clip`` name of the CLIP a feature store was extracted with."""
    model = store.manifest["settings"]["model"]
    if model.get("model") == "mini":
        return "mini"
    return str(model.get("folder") or model["model"])


def store_clip(store, device="cpu"):
    """The feature store's CLIP towers, checked to be the ones its manifest names."""
    from brainmclip.features.clip_models import load_clip

    towers = load_clip(clip_name_of(store), device=device)
    recorded = store.manifest["settings"]["model"].get("config_sha256")
    if recorded and towers.identity.get("config_sha256") not in (None, recorded):
        raise InvalidInputError(f"{store.root}: made with a CLIP whose config differs from {clip_name_of(store)!r} "
                                "now; extract the store again")
    semantic = store.manifest["settings"]["extractor"]["semantic_layer"]
    if semantic != towers.n_vision_layers:
        raise InvalidInputError(f"{store.root}: its semantic target is vision block {semantic}, not the last "
                                f"({towers.n_vision_layers}); CLIP's image embedding needs a store extracted with "
                                f"--final {towers.n_vision_layers}")
    return towers


def image_embeddings(store, ids) -> np.ndarray:
    """CLIP's image embedding of each id at unit length, float32 ``(n, D)``, from the store's semantic target."""
    return unit(store.get(ids, ["image_semantic"], token=0)["image_semantic"])


@torch.no_grad()
def text_embeddings(towers, texts, batch_size: int = 256) -> np.ndarray:
    """CLIP's text embedding (projected end-of-text token) of each text at unit length, float32 ``(n, D)``."""
    from brainmclip.features.tokenizer import tokenize

    texts = list(texts)
    device = next(towers.text.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        ids, eos = tokenize(towers.tokenizer, texts[start:start + batch_size], towers.context_length)
        ids, eos = ids.to(device), eos.to(device)
        hidden = towers.text.text_model(input_ids=ids).last_hidden_state
        pooled = hidden[torch.arange(len(ids), device=device), eos]
        out.append(towers.text.text_projection(pooled).float().cpu().numpy())
    dim = towers.embed_dim
    return unit(np.concatenate(out)) if out else np.zeros((0, dim), np.float32)


@dataclass(frozen=True)
class CaptionEmbeddings:
    """Every caption's unit CLIP text embedding, grouped by image: captions of ``ids[i]`` are
    ``embeds[offsets[i]:offsets[i + 1]]``."""

    ids: np.ndarray
    offsets: np.ndarray
    embeds: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def mean(self) -> np.ndarray:
        """Per image the normalised mean of its captions' embeddings, ``(n, D)``."""
        sums = np.add.reduceat(self.embeds.astype(np.float64), self.offsets[:-1], axis=0)
        return unit(sums)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One caption embedding per image, drawn uniformly among its captions, ``(n, D)``."""
        counts = np.diff(self.offsets)
        return self.embeds[self.offsets[:-1] + (rng.random(len(counts)) * counts).astype(np.int64)]

    def subset(self, rows: np.ndarray) -> CaptionEmbeddings:
        counts = np.diff(self.offsets)[rows]
        take = np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows]) if len(rows) else []
        return CaptionEmbeddings(self.ids[rows], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                                 self.embeds[np.asarray(take, np.int64)])


def _captions_of(prepared_list) -> dict[int, list[str]]:
    captions: dict[int, list[str]] = {}
    for prepared in prepared_list:
        for samples in prepared.splits.values():
            for nsd_id, caps in zip(samples.stimulus_ids.tolist(), samples.captions, strict=True):
                captions.setdefault(int(nsd_id), list(caps))
    return captions


def _read_parts(folder: Path) -> dict[int, np.ndarray]:
    found: dict[int, np.ndarray] = {}
    for part in sorted(folder.glob("part_*.npz")):
        with reading(part, "a caption-embedding part", "delete it and run again"), np.load(part) as z:
            ids, counts, embeds = z["ids"], z["counts"], z["embeds"]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for i, nsd_id in enumerate(ids.tolist()):
            found[int(nsd_id)] = embeds[offsets[i]:offsets[i + 1]]
    return found


def caption_embeddings(store, prepared_list, ids, towers=None, progress: bool = True) -> CaptionEmbeddings:
    """Caption embeddings of ``ids`` (in that order), computing and caching the missing ones.

    ``prepared_list`` holds the prepared datasets whose captions belong to the ids; ``towers`` is the
    store's CLIP (loaded when needed and not given).
    """
    ids = np.asarray(ids, np.int64).ravel()
    folder = Path(store.root) / _CAPTIONS
    identity = store.manifest["settings"]["model"]
    manifest = folder / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("model") != identity:
        raise InvalidInputError(f"{folder}: caption embeddings of another CLIP; delete the folder to compute them again")
    found = _read_parts(folder) if folder.is_dir() else {}
    missing = sorted({int(i) for i in ids} - set(found))
    if missing:
        captions = _captions_of(prepared_list)
        unknown = [i for i in missing if i not in captions]
        if unknown:
            raise InvalidInputError(f"{len(unknown)} images have no captions in the prepared datasets (first id "
                                    f"{unknown[0]}); expected each trained or evaluated image in one of them")
        empty = [i for i in missing if not captions[i]]
        if empty:
            raise InvalidInputError(f"image {empty[0]} has no caption; text supervision needs at least one")
        towers = towers or store_clip(store)
        write_json_atomic(manifest, {"model": identity})
        bar = tqdm(total=len(missing), desc="caption embeddings", unit="img", disable=not progress)
        for start in range(0, len(missing), _PART_SIZE):
            part = missing[start:start + _PART_SIZE]
            texts = [c for i in part for c in captions[i]]
            counts = np.array([len(captions[i]) for i in part], np.int64)
            embeds = text_embeddings(towers, texts).astype(np.float16)
            with atomic_path(folder / f"part_{part[0]:06d}.npz") as tmp, open(tmp, "wb") as fh:
                np.savez(fh, ids=np.array(part, np.int64), counts=counts, embeds=embeds)
            offsets = np.concatenate([[0], np.cumsum(counts)])
            for k, nsd_id in enumerate(part):
                found[nsd_id] = embeds[offsets[k]:offsets[k + 1]]
            bar.update(len(part))
        bar.close()
        log.info("caption embeddings of %d images cached in %s", len(missing), folder)
    groups = [found[int(i)] for i in ids]
    counts = np.array([len(g) for g in groups], np.int64)
    embeds = np.concatenate(groups).astype(np.float32) if groups else np.zeros((0, 0), np.float32)
    return CaptionEmbeddings(ids, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), unit(embeds))
