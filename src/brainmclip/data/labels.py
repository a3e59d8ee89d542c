"""Class labels of stimuli, for zero-shot classification and for holding classes out of training.

A prepared dataset may carry ``labels.json`` (GOD's object categories are written there by ``prepare``)::

    {"format": "brainmclip-labels/1", "classes": ["goldfish", ...], "stimulus_ids": [...], "labels": [...]}

``labels[i]`` indexes ``classes`` for ``stimulus_ids[i]``. Without that file, a dataset prepared from a
simulated NSD tree is labelled by the category of each scene's main (largest) object, read from the tree's
``simulation/scenes.jsonl``: the same rule the miniature world's quality checks use (``scene:colour`` and
``scene:background`` label such a dataset by the main object's colour or the background instead). Real NSD images have
several COCO objects and no single class, so they need a labels file (CSV ``stimulus_id,class`` or the JSON
above) given explicitly.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainmclip.atomic import write_json_atomic
from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.paths import resolve_path

__all__ = ["LABELS_FILE", "LABELS_FORMAT", "SCENE_KINDS", "ClassLabels", "load_class_labels", "write_class_labels"]

LABELS_FILE = "labels.json"
LABELS_FORMAT = "brainmclip-labels/1"


@dataclass(frozen=True)
class ClassLabels:
    """Class names and the class of each stimulus id."""

    names: tuple[str, ...]
    by_id: dict[int, int]
    source: str = ""
    #: Every class visible in each image, where the source knows it (a simulated scene's objects); an image
    #: showing a held-out class anywhere is then kept out of training, not only one whose main object is it.
    present: dict[int, frozenset[int]] | None = None

    def showing(self, classes) -> set[int]:
        """Ids of the images that show any of ``classes`` (names): as main object, or anywhere when known."""
        wanted = set(self.index(classes))
        main = {i for i, c in self.by_id.items() if c in wanted}
        if self.present is None:
            return main
        return main | {i for i, cs in self.present.items() if cs & wanted}

    def of(self, ids) -> np.ndarray:
        """Class index (into :attr:`names`) of each id, int64; an id without a label is an error."""
        ids = np.asarray(ids, np.int64).ravel()
        missing = [int(i) for i in ids if int(i) not in self.by_id]
        if missing:
            raise InvalidInputError(f"{len(missing)} stimuli have no class label in {self.source or 'the labels'} "
                                    f"(first id {missing[0]}); expected a label for every classified stimulus")
        return np.array([self.by_id[int(i)] for i in ids], np.int64)

    def index(self, names) -> list[int]:
        """Indices of class ``names``; an unknown name is an error listing the known ones."""
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise InvalidInputError(f"Unknown class {unknown[0]!r}; the labels know {list(self.names)}")
        return [self.names.index(n) for n in names]


def write_class_labels(folder: str | os.PathLike, names, stimulus_ids, labels) -> Path:
    """Write ``folder/labels.json``; every label must index ``names``."""
    names = [str(n) for n in names]
    ids = np.asarray(stimulus_ids, np.int64).ravel()
    labels = np.asarray(labels, np.int64).ravel()
    if len(ids) != len(labels):
        raise InvalidInputError(f"{len(ids)} stimulus ids but {len(labels)} labels; expected one label per id")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"class names {names} repeat a name; expected distinct names")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise InvalidInputError(f"labels span {labels.min()}..{labels.max()}; expected indices into {len(names)} "
                                "classes")
    path = Path(folder) / LABELS_FILE
    write_json_atomic(path, {"format": LABELS_FORMAT, "classes": names, "stimulus_ids": ids.tolist(),
                             "labels": labels.tolist()})
    return path


def _from_json(path: Path) -> ClassLabels:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("format") != LABELS_FORMAT:
        raise InvalidInputError(f"{path}: not a labels file (expected JSON with format {LABELS_FORMAT!r})")
    names, ids, labels = data.get("classes"), data.get("stimulus_ids"), data.get("labels")
    if not (isinstance(names, list) and isinstance(ids, list) and isinstance(labels, list)) or len(ids) != len(labels):
        raise InvalidInputError(f"{path}: expected lists 'classes', and 'stimulus_ids' and 'labels' of equal length")
    if any(not isinstance(v, int) or not 0 <= v < len(names) for v in labels):
        raise InvalidInputError(f"{path}: a label is not an index into its {len(names)} classes")
    return ClassLabels(tuple(names), dict(zip(map(int, ids), labels, strict=True)), str(path))


def _from_csv(path: Path) -> ClassLabels:
    names: list[str] = []
    by_id: dict[int, int] = {}
    # utf-8-sig: a byte-order mark (spreadsheet exports write one) would otherwise make the first id look like
    # a header, and that row would be skipped without a word.
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"{path}: not a UTF-8 CSV file ({exc}); expected lines 'stimulus_id,class'") from None
    for line_no, row in enumerate(rows, 1):
        if not row or (line_no == 1 and not row[0].strip().lstrip("-").isdigit()):
            continue  # blank line or header
        if len(row) < 2:
            raise InvalidInputError(f"{path}:{line_no}: {row!r}; expected 'stimulus_id,class'")
        try:
            stim = int(row[0])
        except ValueError:
            raise InvalidInputError(f"{path}:{line_no}: stimulus id {row[0]!r} is not an integer") from None
        name = row[1].strip()
        if name not in names:
            names.append(name)
        by_id[stim] = names.index(name)
    if not by_id:
        raise InvalidInputError(f"{path}: no labels; expected lines 'stimulus_id,class'")
    return ClassLabels(tuple(names), by_id, str(path))


#: What a simulated scene can be labelled by: ``scene:category`` (default), ``scene:colour`` (of the main object)
#: or ``scene:background``.
SCENE_KINDS = ("category", "colour", "background")


def _from_simulation(root: Path, kind: str = "category") -> ClassLabels:
    from brainmclip.data.synthetic.simulate import load_scenes
    from brainmclip.miniature.world import BACKGROUND_NAMES, CATEGORY_NAMES, COLOUR_NAMES, scene_labels

    names = {"category": CATEGORY_NAMES, "colour": COLOUR_NAMES, "background": BACKGROUND_NAMES}[kind]
    scenes = load_scenes(root)
    by_id = {nsd_id: int(scene_labels(scene)[kind]) for nsd_id, scene in scenes.items()}
    if kind == "background":
        present = None  # one background per scene: the main label is all there is
    else:
        attribute = "category" if kind == "category" else "colour"
        present = {nsd_id: frozenset(names.index(getattr(o, attribute)) for o in scene.objects)
                   for nsd_id, scene in scenes.items()}
    return ClassLabels(tuple(names), by_id, f"{root / 'simulation' / 'scenes.jsonl'} ({kind})", present)


def _simulated_root(prepared: Path) -> Path | None:
    try:
        manifest = json.loads((prepared / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not manifest.get("nsd_root"):
        return None
    # Recorded relative to the dataset folder (brainmclip.paths.record_path), so the two can move together.
    root = resolve_path(manifest["nsd_root"], prepared)
    return root if (root / "simulation" / "scenes.jsonl").is_file() else None


def load_class_labels(prepared: str | os.PathLike, labels_file: str | os.PathLike | None = None) -> ClassLabels:
    """Labels for a prepared dataset: ``labels_file`` if given, else its ``labels.json``, else its simulated tree's.

    ``labels_file`` ``scene:category``, ``scene:colour`` or ``scene:background`` labels a dataset prepared from a
    simulated NSD tree by that attribute of its scenes.
    """
    if labels_file is not None and str(labels_file).startswith("scene:"):
        kind = str(labels_file)[len("scene:"):]
        if kind not in SCENE_KINDS:
            raise InvalidInputError(f"labels {labels_file!r}: expected scene:{' / scene:'.join(SCENE_KINDS)}")
        root = _simulated_root(Path(prepared))
        if root is None:
            raise InvalidInputError(f"{prepared}: labels {labels_file!r} need a dataset prepared from a simulated NSD "
                                    "tree (with simulation/scenes.jsonl)")
        return _from_simulation(root, kind)
    if labels_file is not None:
        path = Path(labels_file)
        if not path.is_file():
            raise MissingInputError(f"{path}: no such labels file (CSV 'stimulus_id,class' or {LABELS_FILE})")
        return _from_json(path) if path.suffix == ".json" else _from_csv(path)
    prepared = Path(prepared)
    if (prepared / LABELS_FILE).is_file():
        return _from_json(prepared / LABELS_FILE)
    root = _simulated_root(prepared)
    if root is not None:
        return _from_simulation(root)
    raise InvalidInputError(f"{prepared}: no class labels (no {LABELS_FILE}, and not prepared from a simulated NSD "
                            "tree); pass a labels file (CSV 'stimulus_id,class')")
