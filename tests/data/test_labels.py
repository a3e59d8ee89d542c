"""Class labels: labels.json round trip, CSV files, a simulated tree's scenes, and one-line errors.

The simulated tree's labels are checked against a reading of ``simulation/scenes.jsonl`` with ``json``
alone: the main object is the largest (small < medium < large), the leftmost among equals.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainmclip.data.labels import LABELS_FILE, LABELS_FORMAT, ClassLabels, load_class_labels, write_class_labels
from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.errors import InvalidInputError, MissingInputError

SIZE_ORDER = {"small": 0, "medium": 1, "large": 2}


@pytest.fixture(scope="module")
def simulated(tiny_nsd, tmp_path_factory):
    """A dataset prepared from the tiny simulated tree (sessions 1-3), and that tree's scenes read by hand."""
    prepared = prepare_subject(tiny_nsd.root, 1, tmp_path_factory.mktemp("labels") / "prepared",
                               PrepareOptions(sessions=(1, 2, 3)), progress=False)
    lines = (tiny_nsd.root / "simulation" / "scenes.jsonl").read_text().splitlines()
    scenes = {int(r["nsd_id"]): r for r in map(json.loads, filter(str.strip, lines))}
    ids = sorted({int(i) for s in prepared.splits.values() for i in s.stimulus_ids.tolist()})
    return prepared.root, scenes, ids


def _main_object(scene: dict) -> dict:
    best = None
    for o in scene["objects"]:
        key = (-SIZE_ORDER[o["size"]], o["x"])
        if best is None or key < best[0]:
            best = (key, o)
    return best[1]


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert text and "\n" not in text, text
    return text


# -- labels.json ---------------------------------------------------------------------------------------------


def test_labels_json_round_trip(tmp_path):
    names = ["goldfish", "sea lion", "dog"]
    ids = [1518878005958, 7, 3, 12]
    labels = [0, 2, 2, 1]
    path = write_class_labels(tmp_path, names, np.array(ids), np.array(labels))
    assert path == tmp_path / LABELS_FILE
    data = json.loads(path.read_text())
    assert data == {"format": LABELS_FORMAT, "classes": names, "stimulus_ids": ids, "labels": labels}
    for loaded in (load_class_labels(tmp_path), load_class_labels("/elsewhere", labels_file=path)):
        assert loaded.names == tuple(names) and loaded.by_id == dict(zip(ids, labels, strict=True))
        assert loaded.of([12, 1518878005958, 3]).tolist() == [1, 0, 2]
        assert loaded.of(np.array([[7]])).dtype == np.int64
        assert loaded.index(["dog", "goldfish"]) == [2, 0]
        assert loaded.showing(["dog"]) == {7, 3}  # no scene objects known: main class only
    assert not [p for p in tmp_path.iterdir() if p.name != LABELS_FILE]  # written atomically, no temporaries


@pytest.mark.parametrize("names, ids, labels, pattern", [
    (["a", "b"], [1, 2, 3], [0, 1], "3 stimulus ids but 2 labels"),
    (["a", "a"], [1], [0], "repeat a name"),
    (["a", "b"], [1, 2], [0, 2], r"labels span 0\.\.2"),
    (["a", "b"], [1, 2], [-1, 0], "labels span -1"),
])
def test_write_class_labels_refuses_inconsistent_labels(tmp_path, names, ids, labels, pattern):
    with pytest.raises(InvalidInputError, match=pattern) as excinfo:
        write_class_labels(tmp_path, names, ids, labels)
    _one_line(excinfo)
    assert not (tmp_path / LABELS_FILE).exists()


def test_of_and_index_name_what_is_missing():
    labels = ClassLabels(("cat", "dog"), {5: 0, 9: 1}, "my.csv")
    with pytest.raises(InvalidInputError, match=r"2 stimuli have no class label in my.csv \(first id 4\)") as e:
        labels.of([5, 4, 9, 8])
    _one_line(e)
    with pytest.raises(InvalidInputError, match=r"Unknown class 'cow'.*\['cat', 'dog'\]") as e:
        labels.index(["dog", "cow"])
    _one_line(e)
    with pytest.raises(InvalidInputError, match="Unknown class 'cow'"):
        labels.showing(["cow"])
    assert labels.of([]).tolist() == []


# -- CSV -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [True, False])
def test_csv_labels_with_and_without_header(tmp_path, header):
    lines = ["stimulus_id,class"] if header else []
    lines += ["10,dog", "", "11, sea lion", "12,dog", "13,goldfish,extra column ignored"]
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(lines) + "\n")
    labels = load_class_labels(tmp_path / "unused", labels_file=path)
    assert labels.names == ("dog", "sea lion", "goldfish")  # in order of first appearance
    assert labels.by_id == {10: 0, 11: 1, 12: 0, 13: 2}
    assert labels.source == str(path)


@pytest.mark.parametrize("header", [True, False])
def test_csv_with_a_byte_order_mark_keeps_its_first_row(tmp_path, header):
    """Spreadsheet exports start with a UTF-8 byte-order mark; it must not turn the first id into a 'header'."""
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (b"stimulus_id,class\n" if header else b"") + "10,café\n11,dog\n".encode())
    labels = load_class_labels(tmp_path, labels_file=path)
    assert labels.by_id == {10: 0, 11: 1} and labels.names == ("café", "dog")


@pytest.mark.parametrize("text, pattern", [
    ("stimulus_id,class\n10,dog\n11\n", r"labels.csv:3: \['11'\]; expected 'stimulus_id,class'"),
    ("10,dog\nx11,cat\n", r"labels.csv:2: stimulus id 'x11' is not an integer"),
    ("stimulus_id,class\n", "no labels"),
    ("", "no labels"),
    ("10,caf\xe9\n".encode("latin-1"), "not a UTF-8 CSV file"),
])
def test_bad_csv_files_give_one_line(tmp_path, text, pattern):
    path = tmp_path / "labels.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InvalidInputError, match=pattern) as excinfo:
        load_class_labels(tmp_path, labels_file=path)
    _one_line(excinfo)


@pytest.mark.parametrize("content, pattern", [
    (b"\xff\xfe not text", "not a labels file"),
    (b"{not json", "not a labels file"),
    (b"[1, 2]", "not a labels file"),
    (json.dumps({"format": "something-else/1"}).encode(), "not a labels file"),
    (json.dumps({"format": LABELS_FORMAT, "classes": ["a"], "stimulus_ids": [1, 2], "labels": [0]}).encode(),
     "equal length"),
    (json.dumps({"format": LABELS_FORMAT, "classes": "a", "stimulus_ids": [1], "labels": [0]}).encode(),
     "equal length"),
    (json.dumps({"format": LABELS_FORMAT, "classes": ["a"], "stimulus_ids": [1], "labels": [1]}).encode(),
     "not an index into its 1 classes"),
    (json.dumps({"format": LABELS_FORMAT, "classes": ["a"], "stimulus_ids": [1], "labels": ["a"]}).encode(),
     "not an index"),
])
def test_bad_json_files_give_one_line(tmp_path, content, pattern):
    (tmp_path / LABELS_FILE).write_bytes(content)
    with pytest.raises(InvalidInputError, match=pattern) as excinfo:
        load_class_labels(tmp_path)
    _one_line(excinfo)


def test_missing_labels_are_one_line(tmp_path):
    with pytest.raises(MissingInputError, match="no such labels file") as excinfo:
        load_class_labels(tmp_path, labels_file=tmp_path / "absent.csv")
    _one_line(excinfo)
    with pytest.raises(InvalidInputError, match="no class labels") as excinfo:
        load_class_labels(tmp_path)  # no labels.json, no manifest
    _one_line(excinfo)
    (tmp_path / "manifest.json").write_text(json.dumps({"nsd_root": str(tmp_path / "not_simulated")}))
    with pytest.raises(InvalidInputError, match="no class labels"):
        load_class_labels(tmp_path)
    with pytest.raises(InvalidInputError, match="simulated NSD tree") as excinfo:
        load_class_labels(tmp_path, labels_file="scene:category")
    _one_line(excinfo)


# -- a simulated NSD tree ------------------------------------------------------------------------------------


def test_simulated_tree_labels_are_the_main_objects_category(simulated, tmp_path, monkeypatch):
    prepared, scenes, ids = simulated
    # The tree is recorded relative to the dataset: labels must not depend on the working directory.
    assert not json.loads((prepared / "manifest.json").read_text())["nsd_root"].startswith("/")
    monkeypatch.chdir(tmp_path)
    labels = load_class_labels(prepared)
    assert labels.source.endswith("scenes.jsonl (category)")
    names = [labels.names[c] for c in labels.of(ids)]
    assert names == [_main_object(scenes[i])["category"] for i in ids]
    # Ties in size exist among these scenes, so "leftmost" is exercised, and some scenes have several objects.
    assert any(len(scenes[i]["objects"]) > 1 for i in ids)
    assert any(sum(o["size"] == _main_object(scenes[i])["size"] for o in scenes[i]["objects"]) > 1
               for i in scenes)
    colour = load_class_labels(prepared, labels_file="scene:colour")
    assert [colour.names[c] for c in colour.of(ids)] == [_main_object(scenes[i])["colour"] for i in ids]
    background = load_class_labels(prepared, labels_file="scene:background")
    assert [background.names[c] for c in background.of(ids)] == [scenes[i]["background"] for i in ids]
    with pytest.raises(InvalidInputError, match="scene:category") as excinfo:
        load_class_labels(prepared, labels_file="scene:size")
    _one_line(excinfo)


def test_showing_includes_images_with_a_secondary_object_of_the_class(simulated):
    prepared, scenes, _ = simulated
    labels = load_class_labels(prepared)
    for wanted in (["dog"], ["tree", "person"]):
        main = {i for i, s in scenes.items() if _main_object(s)["category"] in wanted}
        anywhere = {i for i, s in scenes.items() if any(o["category"] in wanted for o in s["objects"])}
        assert anywhere > main  # some images show the class but not as their main object
        assert labels.showing(wanted) == anywhere
    assert labels.showing([]) == set()


def test_a_labels_file_wins_over_the_simulated_tree(simulated, tmp_path):
    prepared, _, ids = simulated
    csv = tmp_path / "mine.csv"
    csv.write_text("".join(f"{i},{'even' if i % 2 == 0 else 'odd'}\n" for i in ids))
    labels = load_class_labels(prepared, labels_file=csv)
    assert set(labels.names) == {"even", "odd"} and labels.present is None
    assert [labels.names[c] for c in labels.of(ids)] == ["even" if i % 2 == 0 else "odd" for i in ids]
