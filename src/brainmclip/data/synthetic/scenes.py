"""Procedural scenes: what is in each simulated image, and the captions that describe it.

A scene is drawn from the seed and the image's NSD index alone, so the same image comes
out whatever subjects or sessions a run asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ATTRIBUTE_NAMES",
    "BACKGROUNDS",
    "CATEGORIES",
    "COLOURS",
    "DOMAINS",
    "Scene",
    "PLURALS",
    "SIZE_WORDS",
    "SceneObject",
    "make_captions",
    "sample_scene",
    "scene_attributes",
]

# Object categories and the category-selective domain(s) each one drives. The weights are
# the share of a face / body / place / word response an object evokes, loosely after the
# fLoc localiser categories that define NSD's floc-* ROIs.
CATEGORIES: dict[str, dict[str, float]] = {
    "person": {"body": 1.0, "face": 0.6},
    "face": {"face": 1.0},
    "dog": {"body": 0.7, "face": 0.4},
    "bird": {"body": 0.5, "face": 0.2},
    "car": {"place": 0.2},
    "boat": {"place": 0.3},
    "house": {"place": 1.0},
    "tree": {"place": 0.6},
    "sign": {"word": 1.0},
    "ball": {},
}
DOMAINS = ("face", "body", "place", "word")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (240, 215, 40),
    "orange": (245, 140, 30),
    "purple": (130, 50, 170),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "brown": (120, 75, 35),
    "pink": (245, 150, 190),
}

# Background name -> (upper colour, lower colour, horizon height as a fraction, place weight).
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], float, float]] = {
    "field": ((120, 180, 235), (90, 160, 70), 0.55, 0.5),
    "beach": ((140, 200, 240), (225, 205, 150), 0.6, 0.6),
    "room": ((220, 205, 180), (140, 100, 70), 0.7, 0.9),
    "street": ((170, 180, 190), (95, 95, 100), 0.6, 0.8),
    "snow": ((200, 215, 230), (240, 240, 245), 0.5, 0.4),
}
_BACKGROUND_PHRASES = {
    "field": ["in a grassy field", "on the grass", "in a green field", "in a meadow"],
    "beach": ["on a sandy beach", "on the beach", "by the sea", "on the sand"],
    "room": ["in a room", "inside a room", "indoors", "in a brown room"],
    "street": ["on a street", "on a city street", "on the road", "in the street"],
    "snow": ["in the snow", "on a snowy field", "on snow", "in a snowy place"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["", "", "medium"], "large": ["large", "big", "huge"]}
PLURALS = {"person": "people", "face": "faces", "dog": "dogs", "bird": "birds", "car": "cars", "boat": "boats",
            "house": "houses", "tree": "trees", "sign": "signs", "ball": "balls"}
_NUMBER_WORDS = {2: "two", 3: "three"}
SIZES = {"small": 0.16, "medium": 0.26, "large": 0.38}


@dataclass(frozen=True)
class SceneObject:
    """One object: ``x``, ``y`` are its centre and ``size`` its height, as fractions of the image."""

    category: str
    colour: str
    size_name: str
    x: float
    y: float

    @property
    def size(self) -> float:
        return SIZES[self.size_name]

    @property
    def side(self) -> str:
        return "left" if self.x < 0.38 else "right" if self.x > 0.62 else "middle"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]
    texture_seed: int

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        """Inverse of :meth:`to_dict` (positions as rounded there)."""
        objects = tuple(SceneObject(o["category"], o["colour"], o["size"], float(o["x"]), float(o["y"]))
                        for o in d["objects"])
        return cls(d["background"], objects, int(d["texture_seed"]))

    def to_dict(self) -> dict:
        return {
            "background": self.background,
            "texture_seed": self.texture_seed,
            "objects": [
                {"category": o.category, "colour": o.colour, "size": o.size_name, "x": round(o.x, 4), "y": round(o.y, 4)}
                for o in self.objects
            ],
        }


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a background and 1-3 objects; a second object often repeats the first's category."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    n_objects = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    categories = list(CATEGORIES)
    first = categories[rng.integers(len(categories))]
    objects = []
    for i in range(n_objects):
        category = first if (i > 0 and rng.random() < 0.35) else categories[rng.integers(len(categories))]
        size_name = list(SIZES)[rng.integers(len(SIZES))]
        size = SIZES[size_name]
        # Keep objects inside the frame; spread them horizontally so several rarely overlap fully.
        x = float(np.clip((i + rng.uniform(0.15, 0.85)) / n_objects, size / 2, 1 - size / 2))
        y = float(rng.uniform(0.45, 0.85 - size / 2) if category not in ("bird", "sign") else rng.uniform(0.2, 0.7))
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        objects.append(SceneObject(category, colour, size_name, x, y))
    objects.sort(key=lambda o: o.x)
    return Scene(background, tuple(objects), int(rng.integers(2**31)))


def _noun_phrase(obj: SceneObject, rng: np.random.Generator, article: bool = True) -> str:
    size = SIZE_WORDS[obj.size_name][rng.integers(3)]
    words = [w for w in (size, obj.colour, obj.category) if w]
    if rng.random() < 0.25:
        words = [w for w in (size, obj.category) if w]
    phrase = " ".join(words)
    if article:
        phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
    return phrase


def make_captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """Generate ``n`` different captions from the scene, in the loose style of COCO."""
    place = _BACKGROUND_PHRASES[scene.background]
    objs = scene.objects
    captions: list[str] = []
    attempts = 0
    while len(captions) < n and attempts < 50:
        attempts += 1
        style = rng.integers(5)
        where = place[rng.integers(len(place))]
        if style == 0:
            text = " and ".join(_noun_phrase(o, rng) for o in objs) + " " + where
        elif style == 1:
            cats = {o.category for o in objs}
            if len(objs) > 1 and len(cats) == 1:
                text = f"{_NUMBER_WORDS[len(objs)]} {PLURALS[objs[0].category]} {where}"
            else:
                text = "there is " + ", ".join(_noun_phrase(o, rng) for o in objs) + " " + where
        elif style == 2:
            main = max(objs, key=lambda o: o.size)
            text = f"{_noun_phrase(main, rng)} on the {main.side} side of the picture"
            if len(objs) > 1:
                text += f" with {len(objs) - 1} other object" + ("s" if len(objs) > 2 else "")
        elif style == 3:
            text = f"a picture {where} showing " + " and ".join(_noun_phrase(o, rng) for o in objs)
        else:
            o = objs[rng.integers(len(objs))]
            text = f"{_noun_phrase(o, rng)} {where}"
            if len(objs) > 1:
                others = [p for p in objs if p is not o]
                text += " next to " + _noun_phrase(others[0], rng)
        text = text[0].upper() + text[1:] + "."
        if text not in captions:
            captions.append(text)
    return captions


ATTRIBUTE_NAMES = (
    [f"category:{c}" for c in CATEGORIES]
    + [f"domain:{d}" for d in DOMAINS]
    + [f"colour:{c}" for c in COLOURS]
    + [f"background:{b}" for b in BACKGROUNDS]
    + ["n_objects", "object_area", "mean_x", "mean_y"]
)


def scene_attributes(scene: Scene) -> np.ndarray:
    """The semantic description high-level voxels read, shape ``(len(ATTRIBUTE_NAMES),)``.

    Category and colour entries are summed object areas (a large object drives more), domain
    entries mix categories by :data:`CATEGORIES` and add the background's place weight.
    """
    cats = np.zeros(len(CATEGORIES))
    doms = np.zeros(len(DOMAINS))
    cols = np.zeros(len(COLOURS))
    bgs = np.zeros(len(BACKGROUNDS))
    cat_index = {c: i for i, c in enumerate(CATEGORIES)}
    col_index = {c: i for i, c in enumerate(COLOURS)}
    bgs[list(BACKGROUNDS).index(scene.background)] = 1.0
    doms[DOMAINS.index("place")] += BACKGROUNDS[scene.background][3]
    area_total = 0.0
    for o in scene.objects:
        area = o.size**2
        area_total += area
        # sqrt: a second object of a category adds less than the first (response saturation).
        cats[cat_index[o.category]] += area
        cols[col_index[o.colour]] += area
        for domain, weight in CATEGORIES[o.category].items():
            doms[DOMAINS.index(domain)] += weight * np.sqrt(area)
    extra = [len(scene.objects), area_total, np.mean([o.x for o in scene.objects]), np.mean([o.y for o in scene.objects])]
    return np.concatenate([np.sqrt(cats), doms, np.sqrt(cols), bgs, extra]).astype(np.float32)
