"""``extract_features``: every image of one or more prepared datasets into the feature store.

Images are keyed by NSD id and extracted once even when several subjects share them. The
missing ids are cut into shards; with ``accelerate launch`` (or ``torchrun``) each process
takes every n-th shard, so an image set splits across GPUs of one machine. A rerun extracts
only what is missing, including the images of shards found damaged (cut short or not matching
their recorded checksums), which it removes first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from brainmclip.atomic import crash_point, locks_output
from brainmclip.data.prepared import PreparedSubject, load_prepared
from brainmclip.errors import InvalidInputError
from brainmclip.features.clip_extractor import ClipFeatureExtractor
from brainmclip.features.clip_models import load_clip
from brainmclip.features.feature_store import FeatureStore

__all__ = ["ImageSource", "collect_images", "extract_features", "ExtractResult", "fill_store"]

log = logging.getLogger("brainmclip.extract")


@dataclass
class ImageSource:
    """Where each NSD id's pixels and captions are: (dataset, split, row) of its first occurrence."""

    datasets: list[PreparedSubject]
    locations: dict[int, tuple[int, str, int]]

    def ids(self) -> np.ndarray:
        return np.array(sorted(self.locations), np.int64)

    def fetch(self, ids: Sequence[int]) -> tuple[np.ndarray, list[list[str]]]:
        images, captions = [], []
        for nsd_id in ids:
            d, split, row = self.locations[int(nsd_id)]
            samples = self.datasets[d].splits[split]
            images.append(np.asarray(samples.images[row]))
            captions.append(samples.captions[row])
        return np.stack(images), captions


def collect_images(prepared_paths: Sequence[str | Path]) -> ImageSource:
    datasets, locations = [], {}
    for d, path in enumerate(prepared_paths):
        prepared = load_prepared(path)
        datasets.append(prepared)
        for split, samples in prepared.splits.items():
            if samples.images is None:
                raise InvalidInputError(f"{path}: prepared without images (--no-images); features need the stimuli")
            if (samples.stimulus_ids < 0).any():
                raise InvalidInputError(f"{path}: {split} has rows without an NSD image id; the feature store is keyed by "
                                 "NSD id (prepare with --nsd-root to recover them)")
            for row, nsd_id in enumerate(samples.stimulus_ids.tolist()):
                locations.setdefault(nsd_id, (d, split, row))
    return ImageSource(datasets, locations)


@dataclass(frozen=True)
class ExtractResult:
    store: FeatureStore
    n_requested: int
    n_extracted: int
    seconds: float

    def summary(self) -> str:
        s = self.store.manifest["settings"]
        rate = self.n_extracted / self.seconds if self.seconds > 0 else 0.0
        return "\n".join([
            f"CLIP feature store at {self.store.root} ({s['model']['model']})",
            f"  {self.n_requested} images requested, {self.n_extracted} extracted now "
            f"({rate:.1f} images/s), {len(self.store)} stored",
            f"  detail = layers {s['extractor']['detail_layers'][0]}-{s['extractor']['detail_layers'][-1]} "
            f"({s['extractor']['merge']}), semantic = layer {s['extractor']['semantic_layer']}; "
            f"tokens image {s['image_tokens']}, text {s['text_tokens']}, dim {s['embed_dim']}, float16",
        ])


@locks_output()
def extract_features(prepared_paths: Sequence[str | Path], out: str | Path, model: str = "openai/clip-vit-large-patch14",
                     detail_layers: Sequence[int] = tuple(range(11, 21)), semantic_layer: int = 24,
                     merge: str = "project-then-average", batch_size: int = 32, shard_size: int = 256,
                     cpu: bool = False, progress: bool = True) -> ExtractResult:
    """Extract e_I,D, e_I,S and E_T for every image of ``prepared_paths`` into the store ``out``."""
    from accelerate import Accelerator

    start = time.perf_counter()
    if batch_size < 1 or shard_size < 1:
        raise InvalidInputError(f"batch_size={batch_size}, shard_size={shard_size}; expected positive integers")
    source = collect_images(prepared_paths)
    accelerator = Accelerator(cpu=cpu)
    towers = load_clip(model, device=accelerator.device)
    extractor = ClipFeatureExtractor(towers, detail_layers, semantic_layer, merge)
    settings = {"model": towers.identity, "extractor": extractor.settings(), "embed_dim": towers.embed_dim,
                "image_tokens": towers.n_image_tokens, "text_tokens": towers.tokenizer.model_max_length,
                "dtype": "float16"}
    store, n_requested, n_missing = fill_store(
        source, out, settings, lambda images, captions: {k: v.numpy() for k, v in extractor.encode(images,
                                                                                                 captions).items()},
        accelerator, batch_size, shard_size, "CLIP features", "extract-shard", progress)
    return ExtractResult(store, n_requested, n_missing, time.perf_counter() - start)


def fill_store(source: ImageSource, out, settings: dict, encode, accelerator, batch_size: int, shard_size: int,
               desc: str, crash_name: str, progress: bool) -> tuple[FeatureStore, int, int]:
    """Compute the images of ``source`` missing from the store at ``out`` (made with ``settings``), shard by shard.

    ``encode(images, captions)`` returns ``{target: array with one row per image}``. Temporaries of interrupted
    writes and damaged shards are removed first (by the main process), so their images count as missing and are
    computed again; with several processes each takes every n-th shard. Returns the store and how many images
    were requested and missing.
    """
    if accelerator.is_main_process:
        store = FeatureStore.create(out, settings)
        store.remove_stale_shards()
        store.remove_damaged_shards()
    accelerator.wait_for_everyone()
    store = FeatureStore.create(out, settings)
    requested = source.ids()
    missing = store.missing(requested)
    shards = [missing[i:i + shard_size] for i in range(0, len(missing), shard_size)]
    mine = shards[accelerator.process_index::accelerator.num_processes]
    bar = tqdm(total=sum(len(s) for s in mine), desc=f"{desc} [{accelerator.process_index}]", unit="img",
               disable=not progress or not accelerator.is_local_main_process)
    for ids in mine:
        parts: dict[str, list[np.ndarray]] = {}
        for b in range(0, len(ids), batch_size):
            images, captions = source.fetch(ids[b:b + batch_size])
            for name, value in encode(images, captions).items():
                parts.setdefault(name, []).append(np.asarray(value).astype(np.float16))
            bar.update(len(images))
        store.write_shard(ids, {k: np.concatenate(v) for k, v in parts.items()})
        crash_point(crash_name)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        store.finish()
    log.info("process %d computed %s of %d images", accelerator.process_index, desc, sum(len(s) for s in mine))
    return store, len(requested), len(missing)
