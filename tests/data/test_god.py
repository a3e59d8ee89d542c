"""GOD: the BData reader/writer, prepare_god on a simulated GOD, the simulator's determinism, early errors.

BData files are built here with h5py directly in bdpy's layout (``dataset`` + ``metadata/{key,description,
value}``, or the older ``dataSet`` / ``metaData``), and the simulated GOD is read back with h5py and numpy
only, so the reference numbers owe nothing to brainmclip's reader.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image

from brainmclip.data.god import BData, BDataBuilder, god_image_name, god_stimulus_id, prepare_god, read_class_names
from brainmclip.data.labels import load_class_labels
from brainmclip.data.synthetic.god import TEST_CATEGORIES, TRAIN_CATEGORIES, WNIDS, make_synthetic_god
from brainmclip.errors import InvalidInputError, MissingInputError, OutputInTheWayError

ROIS = ("V1", "V2", "V3", "V4", "LOC", "FFA", "PPA", "LVC", "HVC", "VC")


def _hand_bdata(path, data, meta, names=("dataset", "metadata"), vlen=False):
    """A BData file written with h5py alone: ``meta`` is [(key, description, value row)]."""
    with h5py.File(path, "w") as f:
        f.create_dataset(names[0], data=np.asarray(data, np.float64))
        g = f.create_group(names[1])
        if vlen:
            kind = h5py.string_dtype()
            g.create_dataset("key", data=[m[0] for m in meta], dtype=kind)
            g.create_dataset("description", data=[m[1] for m in meta], dtype=kind)
        else:
            g.create_dataset("key", data=[m[0].encode() for m in meta])
            g.create_dataset("description", data=[m[1].encode() for m in meta])
        g.create_dataset("value", data=np.array([m[2] for m in meta], np.float64))


def _small_bdata():
    """5 samples: 4 voxels, DataType, a label; ROI_V1 marks voxels 0 and 2; voxel_x on the voxels."""
    nan = np.nan
    voxels = np.arange(20, dtype=float).reshape(5, 4) / 7
    data = np.column_stack([voxels, [1, 1, 2, 2, 3], [1518878.005958, 1518878.010042, 1443537.022563,
                                                      1443537.022563, 1443537.0]])
    meta = [("VoxelData", "1 = VoxelData", [1, 1, 1, 1, nan, nan]),
            ("DataType", "1 = DataType", [nan, nan, nan, nan, 1, nan]),
            ("stimulus_id", "1 = stimulus_id", [nan, nan, nan, nan, nan, 1]),
            ("ROI_V1", "1 = ROI V1", [1, 0, 1, 0, nan, nan]),
            ("voxel_x", "Voxel x coordinate", [-3, 0, 3, 6, nan, nan])]
    return data, meta


@pytest.mark.parametrize("names, vlen", [(("dataset", "metadata"), False), (("dataSet", "metaData"), True)])
def test_bdata_reader_reads_a_hand_built_file(tmp_path, names, vlen):
    data, meta = _small_bdata()
    path = tmp_path / "hand.h5"
    _hand_bdata(path, data, meta, names, vlen)
    with BData(path) as bd:
        assert bd.keys == [m[0] for m in meta] and bd.descriptions == [m[1] for m in meta]
        assert (bd.n_samples, bd.n_columns) == (5, 6)
        np.testing.assert_array_equal(bd.columns("VoxelData"), [0, 1, 2, 3])
        np.testing.assert_array_equal(bd.select("ROI_V1"), data[:, [0, 2]])
        np.testing.assert_array_equal(bd.select("stimulus_id")[:, 0], data[:, 5])
        np.testing.assert_array_equal(bd.metadata("voxel_x", where="VoxelData"), [-3, 0, 3, 6])
        assert np.isnan(bd.metadata("voxel_x")[4:]).all()
        np.testing.assert_array_equal(bd.read(1, 4, np.array([1, 3])), data[1:4][:, [1, 3]])
        assert bd.description("ROI_V1") == "1 = ROI V1"


def test_bdata_builder_writes_the_layout_bdpy_reads(tmp_path):
    data, meta = _small_bdata()
    hand = tmp_path / "hand.h5"
    _hand_bdata(hand, data, meta)
    ours = tmp_path / "ours.h5"
    b = BDataBuilder()
    b.add(data[:, :4], "VoxelData")
    b.add(data[:, 4], "DataType")
    b.add(data[:, 5], "stimulus_id")
    b.add_metadata("ROI_V1", [1, 0, 1, 0], "1 = ROI V1", where="VoxelData")
    b.add_metadata("voxel_x", [-3, 0, 3, 6], "Voxel x coordinate", where="VoxelData")
    b.save(ours)
    with h5py.File(hand, "r") as h, h5py.File(ours, "r") as o:
        assert set(o) == {"dataset", "metadata"} and set(o["metadata"]) == {"key", "description", "value"}
        np.testing.assert_array_equal(o["dataset"][()], h["dataset"][()])
        assert o["dataset"].dtype == np.float64
        assert list(o["metadata/key"][()]) == list(h["metadata/key"][()])  # bytes, as bdpy stores them
        assert list(o["metadata/description"][()]) == list(h["metadata/description"][()])
        np.testing.assert_array_equal(o["metadata/value"][()], h["metadata/value"][()])  # NaN where h has NaN


def test_labels_and_names():
    assert god_stimulus_id(1518878.005958) == 1518878005958
    assert god_image_name(1518878005958) == "n01518878_5958"
    assert god_image_name(god_stimulus_id(1443537.022563)) == "n01443537_22563"
    assert god_image_name(god_stimulus_id(90000009.000040)) == "n90000009_40"
    with pytest.raises(ValueError):
        god_stimulus_id(float("nan"))


def test_class_names_files(tmp_path):
    path = tmp_path / "names"
    for text in ("wnid,name\nn01518878,ostrich\nn01443537,goldfish\n",
                 'n01518878,"ostrich, Struthio camelus"\nn01443537\tgoldfish, Carassius auratus\n',
                 "n01518878 ostrich, Struthio camelus\nn01443537 goldfish\n"):
        path.write_text(text)
        assert read_class_names(path) == {"n01518878": "ostrich", "n01443537": "goldfish"}
    path.write_text("n01518878,ostrich\nostrich\n")
    with pytest.raises(InvalidInputError, match=":2:"):
        read_class_names(path)


# ---------------------------------------------------------------- the simulated GOD
@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return make_synthetic_god(tmp_path_factory.mktemp("god") / "sim", subjects=(1,), seed=3, preset="tiny",
                              progress=False)


def _raw(root):
    """Subject 1 read with h5py: voxel columns (float64), DataType, label, ROI rows, keys."""
    with h5py.File(root / "Subject1.h5", "r") as f:
        data = f["dataset"][()]
        keys = [k.decode() for k in f["metadata/key"][()]]
        values = f["metadata/value"][()]
    row = {k: values[i] for i, k in enumerate(keys)}
    vox = np.flatnonzero(row["VoxelData"] == 1)
    return {"voxels": data[:, vox], "datatype": data[:, np.flatnonzero(row["DataType"] == 1)[0]],
            "label": data[:, np.flatnonzero(row["stimulus_id"] == 1)[0]],
            "rois": {r: np.flatnonzero(row[f"ROI_{r}"][vox] == 1) for r in ROIS}}


def _label_id(label):
    wnid = int(label)
    return wnid * 1_000_000 + int(round((label - wnid) * 1e6))


def _averages(raw, datatype, ids):
    sel = raw["datatype"] == datatype
    labels = np.array([_label_id(v) for v in raw["label"][sel]])
    rows = np.flatnonzero(sel)
    return (np.stack([raw["voxels"][sel][labels == i].mean(0) for i in ids]),
            [rows[labels == i].tolist() for i in ids])


def test_prepare_god_on_the_simulated_god(sim, tmp_path):
    root = sim.root
    raw = _raw(root)
    prepared = prepare_god(root, 1, tmp_path / "none", normalize="none", progress=False)
    assert [len(prepared.splits[s]) for s in ("train", "val", "test")] == [40, 2, 6]
    assert prepared.train.images is None
    assert prepared.manifest["god"]["samples"] == {"train": 42, "test": 210, "imagery_skipped": 6, "other_skipped": 0}

    # test: one row per image, the numpy average of its 35 presentations; trial ids are those sample rows
    test = prepared.test
    expected, rows = _averages(raw, 2, test.stimulus_ids)
    np.testing.assert_allclose(test.betas, expected, rtol=1e-6, atol=1e-5)
    assert test.trial_ids.shape == (6, 35) and all(sorted(t) == r for t, r in zip(test.trial_ids.tolist(), rows,
                                                                                     strict=True))
    # train and val: the single presentation, in order of presentation; val is the last two images
    order = [_label_id(v) for v in raw["label"][raw["datatype"] == 1]]
    ids = np.concatenate([prepared.train.stimulus_ids, prepared.val.stimulus_ids])
    assert ids.tolist() == order
    np.testing.assert_allclose(np.concatenate([prepared.train.betas, prepared.val.betas]),
                               raw["voxels"][raw["datatype"] == 1], rtol=1e-6, atol=1e-5)
    assert (prepared.train.trial_ids[:, 0] == np.flatnonzero(raw["datatype"] == 1)[:40]).all()

    # voxel groups are the ROI columns; semantic = HVC, detail = LVC, all = VC
    groups = prepared.voxels.groups
    for roi in ROIS:
        np.testing.assert_array_equal(groups[roi], raw["rois"][roi])
    np.testing.assert_array_equal(groups["semantic"], raw["rois"]["HVC"])
    np.testing.assert_array_equal(groups["detail"], raw["rois"]["LVC"])
    np.testing.assert_array_equal(groups["all"], np.arange(raw["voxels"].shape[1]))

    # z-scored: (average - mean) / sd (ddof=1) over the train and val rows, computed here in numpy
    z = prepare_god(root, 1, tmp_path / "z", progress=False)
    fit = raw["voxels"][raw["datatype"] == 1]
    np.testing.assert_allclose(z.test.betas, (expected - fit.mean(0)) / fit.std(0, ddof=1), rtol=1e-5, atol=1e-4)


def test_prepare_god_images_labels_captions(sim, tmp_path):
    root = sim.root
    out = tmp_path / "prep"
    prepared = prepare_god(root / "Subject1.h5", 1, out, images=root / "images", class_names=root / "class_names.csv",
                           image_size=32, progress=False)
    scenes = {r["stimulus_id"]: r for r in map(json.loads, (root / "scenes.jsonl").read_text().splitlines())}
    labels = load_class_labels(out)
    classes = {}
    for split in ("train", "val", "test"):
        samples = prepared.splits[split]
        assert samples.images.shape == (len(samples), 32, 32, 3)
        for row, sid in enumerate(samples.stimulus_ids.tolist()):
            category = scenes[sid]["category"]
            assert samples.captions[row] == [f"a photo of a {category}."]
            assert labels.names[labels.of([sid])[0]] == category
            classes.setdefault(split, set()).add(category)
        name = god_image_name(samples.stimulus_ids[0])
        folder = "test" if split == "test" else "training"
        with Image.open(root / "images" / folder / f"{name}.JPEG") as img:
            reference = np.asarray(img.convert("RGB").resize((32, 32), Image.BICUBIC))
        np.testing.assert_array_equal(samples.images[0], reference)
    assert classes["test"] == set(TEST_CATEGORIES) and classes["train"] | classes["val"] <= set(TRAIN_CATEGORIES)
    assert not (classes["train"] | classes["val"]) & classes["test"]
    assert prepared.manifest["god"]["images"][str(prepared.test.stimulus_ids[0])] == \
        god_image_name(prepared.test.stimulus_ids[0])
    # same inputs and options: returned as it is; other options: refused unless forced
    stamp = (out / "manifest.json").stat().st_mtime_ns
    prepare_god(root / "Subject1.h5", 1, out, images=root / "images", class_names=root / "class_names.csv",
                image_size=32, progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(OutputInTheWayError):
        prepare_god(root, 1, out, progress=False)
    again = prepare_god(root, 1, out, val_size=0, force=True, progress=False)
    assert len(again.val) == 0 and again.train.images is None and not (out / "train" / "images.npy").exists()
    assert load_class_labels(out).names == tuple(WNIDS[c] for c in WNIDS)  # no class names: the WordNet ids


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(sim, tmp_path):
    again = make_synthetic_god(tmp_path / "again", subjects=(1,), seed=3, preset="tiny", progress=False)
    mine, theirs = _digests(again.root), _digests(sim.root)
    assert mine == theirs and "Subject1.h5" in mine and any(k.endswith(".JPEG") for k in mine)
    # an interrupted run (a subject file and an image not yet written) resumes to the same bytes
    (again.root / "Subject1.h5").unlink()
    sorted((again.root / "images" / "test").iterdir())[0].unlink()
    record = json.loads((again.root / "simulation.json").read_text())
    (again.root / "simulation.json").write_text(json.dumps({**record, "complete": False}))
    assert make_synthetic_god(again.root, subjects=(1,), seed=3, preset="tiny", progress=False).resumed
    assert _digests(again.root) == theirs
    other = make_synthetic_god(tmp_path / "other", subjects=(1,), seed=4, preset="tiny", progress=False)
    assert _digests(other.root)["Subject1.h5"] != mine["Subject1.h5"]
    with pytest.raises(OutputInTheWayError):
        make_synthetic_god(tmp_path / "other", subjects=(1,), seed=5, preset="tiny", progress=False)


def test_old_spelling_and_label_key(tmp_path):
    """A BData of the older form (dataSet/metaData, 'Label' over two columns, no ROIs): all voxels, no groups."""
    nan = np.nan
    rng = np.random.default_rng(0)
    train = [1518878.005958, 1518878.010042, 1621127.01902, 1621127.000001]
    test = [1443537.022563, 1677366.018182]
    labels = train + test * 3
    n = len(labels)
    data = np.column_stack([rng.normal(size=(n, 3)), [1] * 4 + [2] * 6, labels, np.arange(n)])
    meta = [("VoxelData", "", [1, 1, 1, nan, nan, nan]), ("DataType", "", [nan, nan, nan, 1, nan, nan]),
            ("Label", "", [nan, nan, nan, nan, 1, 1])]
    _hand_bdata(tmp_path / "Subject2.h5", data, meta, names=("dataSet", "metaData"))
    prepared = prepare_god(tmp_path, 2, tmp_path / "out", val_size=1, normalize="none", progress=False)
    assert prepared.manifest["god"]["label_key"] == "Label"
    assert prepared.test.stimulus_ids.tolist() == [1443537022563, 1677366018182]
    np.testing.assert_allclose(prepared.test.betas[0], data[[4, 6, 8], :3].mean(0), rtol=1e-6)
    assert prepared.val.stimulus_ids.tolist() == [1621127000001]
    assert sorted(prepared.voxels.groups) == ["all"]
    assert prepared.test.captions[0] == ["a photo of a n01443537."]


# ---------------------------------------------------------------- errors before any output
def test_errors_come_before_any_output(sim, tmp_path):
    root = sim.root
    out = tmp_path / "out"
    with pytest.raises(MissingInputError, match="Subject2.h5"):
        prepare_god(root, 2, out, progress=False)
    with pytest.raises(InvalidInputError, match="GOD subject"):
        prepare_god(root, 6, out, progress=False)
    not_bdata = tmp_path / "other.h5"
    with h5py.File(not_bdata, "w") as f:
        f.create_dataset("betas", data=np.zeros((3, 3)))
    with pytest.raises(InvalidInputError, match="BData"):
        prepare_god(not_bdata, 1, out, progress=False)
    not_h5 = tmp_path / "Subject1.h5"
    not_h5.write_bytes(b"not an hdf5 file")
    with pytest.raises(InvalidInputError, match="HDF5"):
        prepare_god(tmp_path, 1, out, progress=False)
    images = tmp_path / "images"
    shutil.copytree(root / "images", images)
    victim = sorted((images / "test").iterdir())[0]
    victim.unlink()
    with pytest.raises(MissingInputError, match=victim.stem):
        prepare_god(root, 1, out, images=images, progress=False)
    names = tmp_path / "names.csv"
    names.write_text("wnid,name\nn90000000,person\n")
    with pytest.raises(InvalidInputError, match="no name for 9 of the 10"):
        prepare_god(root, 1, out, class_names=names, progress=False)
    data, meta = _small_bdata()
    only_train = tmp_path / "train_only.h5"
    data[:, 4] = 1
    _hand_bdata(only_train, data, meta)
    with pytest.raises(InvalidInputError, match="no test samples"):
        prepare_god(only_train, 1, out, progress=False)
    assert not out.exists()
