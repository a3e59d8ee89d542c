"""The scene world the miniature models learn from: scenes, captions, labels, drawn apart from every simulated NSD.

The miniature models are trained on the same kind of procedural scenes as the simulated NSD (same categories,
colours, backgrounds, renderer and caption generator), but never on its stimuli. The simulator seeds every draw with
``numpy.random.default_rng([seed, purpose, ...])`` where ``purpose`` is one of its small codes (0-6); the
miniature world draws from ``[seed, STREAM, kind, index]`` with stream codes >= 1000 that the simulator never
uses, so the two streams are independent for every simulator seed below 2**32.

:class:`SceneBank` holds a batch of rendered scenes with captions and labels: the ``train`` stream feeds training,
the ``heldout`` stream the quality checks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from brainmclip.atomic import atomic_path
from brainmclip.data.synthetic.render import render_object_masks, render_scene
from brainmclip.data.synthetic.scenes import BACKGROUNDS, CATEGORIES, COLOURS, PLURALS, Scene, make_captions, sample_scene
from brainmclip.errors import InvalidInputError

__all__ = [
    "STREAMS",
    "SIMULATOR_PURPOSES",
    "SceneBank",
    "build_bank",
    "caption_vocabulary",
    "load_or_build_bank",
    "scene_labels",
    "world_scene",
    "zero_shot_prompts",
]

#: The simulator's purpose codes (design, scene, caption, anatomy, tuning, session, brain): never used here.
SIMULATOR_PURPOSES = tuple(range(7))
#: Stream codes of the miniature world. Disjoint from :data:`SIMULATOR_PURPOSES`.
STREAMS = {"train": 1000, "heldout": 1001}
_SCENE, _CAPTION = 0, 1
#: Scenes are drawn at this size, then shrunk (bicubic, antialiased) to the models' input size, like the
#: simulated stimuli (128 px in the small preset, 425 px in the nsd preset) are shrunk by CLIP's preprocessing.
RENDER_SIZE = 128
CATEGORY_NAMES = tuple(CATEGORIES)
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)

# Caption-style prompts for zero-shot category classification: phrasings of the caption generator without the
# background (a background in every prompt pulls the average towards it). Chosen on held-out scenes 3000-3999 among
# six sets (this one: 91.9% there; the caption templates with backgrounds: 89.4%); quality figures use scenes 0-499.
_PROMPT_TEMPLATES = (
    "A {}.",
    "There is a {}.",
    "A picture showing a {}.",
    "A big {}.",
    "A small {}.",
    *(f"{'An' if colour[0] in 'aeiou' else 'A'} {colour} {{}}." for colour in COLOURS),
)


def _rng(seed: int, stream: str, kind: int, index: int) -> np.random.Generator:
    if stream not in STREAMS:
        raise InvalidInputError(f"Unknown stream={stream!r}; choose from {sorted(STREAMS)}")
    return np.random.default_rng([int(seed), STREAMS[stream], kind, int(index)])


def world_scene(seed: int, stream: str, index: int) -> Scene:
    """Scene ``index`` of a miniature-world stream."""
    return sample_scene(_rng(seed, stream, _SCENE, index))


def _main_objects(scene: Scene):
    largest = max(o.size for o in scene.objects)
    return [o for o in scene.objects if o.size == largest]


def scene_labels(scene: Scene) -> dict:
    """Labels of a scene for probes and quality checks.

    The *main* object is the largest one (the first from the left when several share the largest size);
    ``main_categories`` marks every category among the largest objects, so a classifier that names any of
    them is right.
    """
    main = _main_objects(scene)
    cats = np.zeros(len(CATEGORY_NAMES), bool)
    for o in main:
        cats[CATEGORY_NAMES.index(o.category)] = True
    present = np.zeros(len(CATEGORY_NAMES), bool)
    for o in scene.objects:
        present[CATEGORY_NAMES.index(o.category)] = True
    return {"category": CATEGORY_NAMES.index(main[0].category), "main_categories": cats, "categories": present,
            "colour": COLOUR_NAMES.index(main[0].colour), "background": BACKGROUND_NAMES.index(scene.background),
            "x": main[0].x, "y": main[0].y, "size": main[0].size, "n_objects": len(scene.objects)}


def _shrink(image: np.ndarray, size: int) -> np.ndarray:
    """The same resize CLIP's preprocessing applies to a stimulus (bicubic, antialiased, torchvision)."""
    if image.shape[0] == size:
        return image
    x = torch.from_numpy(np.ascontiguousarray(image).copy()).permute(2, 0, 1)
    x = TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return x.permute(1, 2, 0).numpy()


@dataclass
class SceneBank:
    """Rendered scenes of one stream with their captions and labels.

    Attributes
    ----------
    images : uint8 array of shape (n, size, size, 3)
    captions : list of list of str
        5-6 captions per scene, from the simulator's caption generator.
    labels : dict of arrays
        :func:`scene_labels` stacked: ``category``, ``colour``, ``background``, ``n_objects`` (int, (n,)),
        ``x``, ``y``, ``size`` (float, (n,)), ``main_categories``, ``categories`` (bool, (n, 10)); and
        ``category_map`` (int8, (n, size, size)): the category index each pixel shows, -1 for background.
    seed, stream, start : where the scenes come from (indices ``start .. start + n - 1`` of the stream).
    short_captions : list of list of str
        Three terse captions of the largest object per scene (:func:`short_caption`).
    """

    images: np.ndarray
    captions: list[list[str]]
    labels: dict[str, np.ndarray]
    seed: int
    stream: str
    start: int = 0
    short_captions: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.images)


def build_bank(n: int, seed: int = 0, stream: str = "train", size: int = 64, start: int = 0,
               progress: bool = False) -> SceneBank:
    """Render scenes ``start .. start + n - 1`` of ``stream`` at ``size`` px, with captions and labels."""
    images = np.empty((n, size, size, 3), np.uint8)
    maps = np.empty((n, size, size), np.int8)
    step = RENDER_SIZE // size
    captions, shorts, labels = [], [], []
    for j in tqdm(range(n), desc=f"render {stream} scenes", unit="scene", disable=not progress):
        scene = world_scene(seed, stream, start + j)
        images[j] = _shrink(render_scene(scene, RENDER_SIZE), size)
        objects = render_object_masks(scene, RENDER_SIZE)[step // 2::step, step // 2::step][:size, :size]
        categories = np.array([CATEGORY_NAMES.index(o.category) for o in scene.objects], np.int8)
        maps[j] = np.where(objects >= 0, categories[np.maximum(objects, 0)], -1)
        crng = _rng(seed, stream, _CAPTION, start + j)
        captions.append(make_captions(scene, crng, n=6 if crng.random() < 0.1 else 5))
        shorts.append([short_caption(scene, crng) for _ in range(3)])
        labels.append(scene_labels(scene))
    stacked = {k: np.stack([np.asarray(lab[k]) for lab in labels]) for k in labels[0]} if labels else {}
    stacked["category_map"] = maps
    return SceneBank(images, captions, stacked, int(seed), stream, int(start), shorts)


_BANK_VERSION = 3  # bump when what a bank holds changes, so stale caches are not read


def load_or_build_bank(cache_dir, n: int, seed: int = 0, stream: str = "train", size: int = 64,
                       progress: bool = False) -> SceneBank:
    """:func:`build_bank`, cached as one ``.npz`` in ``cache_dir`` (written atomically; same arguments, same file)."""
    key = hashlib.sha256(json.dumps([n, seed, stream, size, RENDER_SIZE, _BANK_VERSION]).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"bank-{stream}-{n}-{size}px-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            labels = {k.removeprefix("label_"): f[k] for k in f.files if k.startswith("label_")}
            captions = json.loads(str(f["captions"]))
            shorts = json.loads(str(f["short_captions"]))
            return SceneBank(f["images"], captions, labels, seed, stream, 0, shorts)
    bank = build_bank(n, seed, stream, size, progress=progress)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, images=bank.images, captions=np.array(json.dumps(bank.captions)),
                 short_captions=np.array(json.dumps(bank.short_captions)),
                 **{f"label_{k}": v for k, v in bank.labels.items()})
    return bank


def zero_shot_prompts(categories=CATEGORY_NAMES) -> list[list[str]]:
    """Caption-style prompts per category (averaged into one text embedding each for zero-shot classification)."""
    return [[t.format(c) for t in _PROMPT_TEMPLATES] for c in categories]


def caption_vocabulary(n_scenes: int = 4000, seed: int = 0) -> list[str]:
    """Every word the caption generator and the zero-shot prompts use, sorted (a tokenizer's word list)."""
    words: set[str] = set()
    texts = [p for prompts in zero_shot_prompts() for p in prompts]
    for i in range(n_scenes):
        scene = world_scene(seed, "train", i)
        texts += make_captions(scene, _rng(seed, "train", _CAPTION, i), n=6)
    for text in texts:
        words.update(text.lower().replace(".", " . ").replace(",", " , ").split())
    words.update(CATEGORY_NAMES + COLOUR_NAMES + BACKGROUND_NAMES)
    return sorted(words)


_CATEGORY_WORDS = {**{c: c for c in CATEGORY_NAMES}, **{p: c for c, p in PLURALS.items()}}


def swap_category(caption: str, rng: np.random.Generator) -> str | None:
    """The caption with one of its object categories replaced by another (plurals kept plural), or None if it names
    none. A hard negative for contrastive training: it differs from the truth only in what the object is."""
    words = caption.split(" ")
    bare = [w.strip(".,").lower() for w in words]
    named = sorted({_CATEGORY_WORDS[w] for w in bare if w in _CATEGORY_WORDS})
    if not named:
        return None
    old = named[rng.integers(len(named))]
    new = [c for c in CATEGORY_NAMES if c != old][rng.integers(len(CATEGORY_NAMES) - 1)]
    out = []
    for word, plain in zip(words, bare, strict=True):
        if _CATEGORY_WORDS.get(plain) == old:
            replacement = PLURALS[new] if plain == PLURALS[old] else new
            if word[0].isupper():
                replacement = replacement.capitalize()
            word = word.replace(word.strip(".,"), replacement)
        out.append(word)
    return " ".join(out)


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A terse caption of the scene's largest object ("A big red dog."), the style of zero-shot prompts."""
    from brainmclip.data.synthetic.scenes import SIZE_WORDS

    main = _main_objects(scene)[0]
    size = SIZE_WORDS[main.size_name][rng.integers(3)] if rng.random() < 0.5 else ""
    colour = main.colour if rng.random() < 0.7 else ""
    words = " ".join(w for w in (size, colour, main.category) if w)
    return ("An " if words[0] in "aeiou" else "A ") + words + "."
