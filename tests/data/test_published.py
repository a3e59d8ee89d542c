"""prepare_published: the three published formats, written here from the simulated NSD tree.

Each format is built in the test with numpy/nibabel/h5py/tarfile straight from the official
files (no brainmclip code), then read back and compared with an independent numpy
computation and, where the formats agree, with ``prepare_subject`` of the same tree.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from types import SimpleNamespace

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io
from PIL import Image

from brainmclip.cli import main
from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.prepared import load_prepared
from brainmclip.data.published import prepare_published

SPLITS = ("train", "val", "test")
VAL_FRACTION = 859 / 8859


# ---------------------------------------------------------------- the tree, read independently
def _first_appearance(ids):
    seen, out = set(), []
    for i in ids.tolist():
        if i not in seen:
            seen.add(i)
            out.append(i)
    return np.array(out, np.int64)


@pytest.fixture(scope="module")
def nsd(tiny_nsd):
    """Subject 1 of the tiny tree: raw int16-scale betas of every trial, the design, the stimuli."""
    root = tiny_nsd.root
    design = scipy.io.loadmat(root / "nsddata/experiments/nsd/nsd_expdesign.mat")
    mo = design["masterordering"].ravel().astype(int)  # 1-based
    subjectim = design["subjectim"].astype(int)
    n_shared = design["sharedix"].size
    T = len(mo) // 40
    mask = nib.load(root / "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz").get_fdata() > 0
    raw = []
    for s in range(1, 41):
        vol = nib.load(root / f"nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/"
                              f"betas_session{s:02d}.nii.gz").get_fdata()
        raw.append(vol[mask].T)  # (T, V), nsdgeneral in C order
    raw = np.concatenate(raw)
    trials = np.arange(len(raw))
    is_test = mo[trials] <= n_shared
    # Session normalisation: z-score each session with its train trials (sd with ddof=0).
    z = raw / 300.0
    for s in range(40):
        rows = slice(s * T, (s + 1) * T)
        train = ~is_test[rows]
        z[rows] = (z[rows] - z[rows][train].mean(0)) / z[rows][train].std(0)
    with h5py.File(root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", "r") as f:
        brick = f["imgBrick"][:]
    return SimpleNamespace(root=root, T=T, raw=raw, z=z, trials=trials, is_test=is_test, brick=brick,
                           nsd_ids=subjectim[0, mo[trials] - 1] - 1, n_voxels=int(mask.sum()))


def _splits(nsd, last_session, test):
    """Image ids of train/val/test (first appearance) over sessions 1..last_session."""
    used = nsd.trials < last_session * nsd.T
    train = _first_appearance(nsd.nsd_ids[used & ~nsd.is_test])
    n_val = round(len(train) * VAL_FRACTION)
    ids = {"train": train[: len(train) - n_val], "val": train[len(train) - n_val:],
           "test": _first_appearance(nsd.nsd_ids[used & nsd.is_test])}
    return ids if test else {"train": train, "test": ids["test"]}


def _trial_lists(nsd, ids, last_session):
    used = nsd.trials < last_session * nsd.T
    lists = [nsd.trials[used & (nsd.nsd_ids == i)] for i in ids]
    out = np.full((len(ids), max(len(t) for t in lists)), -1)
    for r, t in enumerate(lists):
        out[r, : len(t)] = t
    return out


def _zscore_with_non_test(splits):
    """Brain-Diffuser's normalisation: statistics of every non-test row (train and val), sd with ddof=1."""
    fit = np.concatenate([splits["train"], splits["val"]])
    mean, sd = fit.mean(0), fit.std(0, ddof=1)
    return {k: (v - mean) / sd for k, v in splits.items()}


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    return buffer.getvalue()


def _jpeg(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write_tar(path, members):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


# ---------------------------------------------------------------- reference datasets from prepare_subject
@pytest.fixture(scope="module")
def prepared(nsd, tmp_path_factory):
    """prepare_subject of the same tree with the options each published format corresponds to."""
    cache = {}

    def get(normalize, test_set="old", single_trial=False):
        key = (normalize, test_set, single_trial)
        if key not in cache:
            out = tmp_path_factory.mktemp("prepared")
            options = PrepareOptions(normalize=normalize, test_set=test_set, single_trial=single_trial, images=False)
            cache[key] = prepare_subject(nsd.root, 1, out, options, progress=False)
        return cache[key]

    return get


def _same_rows(a, b, atol=1e-5):
    for split in SPLITS:
        x, y = a.splits[split], b.splits[split]
        np.testing.assert_array_equal(x.stimulus_ids, y.stimulus_ids)
        np.testing.assert_array_equal(x.trial_ids, y.trial_ids)
        np.testing.assert_allclose(x.betas, y.betas, rtol=0, atol=atol)


def _manifest_is_complete(p, source):
    m = p.manifest
    for key in ("subject", "source", "options", "test_set", "sessions", "n_voxels", "voxel_groups", "shapes",
                "images", "inputs", "code_version"):
        assert key in m, key
    assert m["source"] == source and m["subject"] == 1 and m["complete"]
    assert set(m["options"]) >= {"normalize", "single_trial", "val_size", "detail_voxels", "images"}
    assert m["shapes"] == {s: [len(p.splits[s]), p.voxels.n_voxels] for s in SPLITS}
    for identity in m["inputs"].values():
        assert identity["bytes"] > 0 and len(identity.get("sha256", "")) == 64
    for split in SPLITS:
        assert p.splits[split].betas.dtype == np.float32


# ---------------------------------------------------------------- Brain-Diffuser
def write_brain_diffuser(folder, nsd, stim_dtype=np.float64, captions=True):
    """processed_data/subj01 as Brain-Diffuser writes it: raw int16-scale averages of sessions 1-37."""
    sub = folder / "subj01"
    sub.mkdir(parents=True)
    used = nsd.trials < 37 * nsd.T
    for split, ids in _splits(nsd, 37, test=False).items():
        fmri = np.stack([nsd.raw[used & (nsd.nsd_ids == i)].mean(0) for i in ids])
        np.save(sub / f"nsd_{split}_fmriavg_nsdgeneral_sub1.npy", fmri)
        np.save(sub / f"nsd_{split}_stim_sub1.npy", nsd.brick[ids].astype(stim_dtype))
        if captions:
            caps = np.array([[f"image {i} caption {c}" if c < 4 else " " for c in range(5)] for i in ids])
            np.save(sub / f"nsd_{split}_cap_sub1.npy", caps)
    return sub


@pytest.fixture(scope="module")
def bd_dir(nsd, tmp_path_factory):
    return write_brain_diffuser(tmp_path_factory.mktemp("bd") / "processed_data", nsd)


def test_brain_diffuser_matches_prepare_subject(nsd, bd_dir, prepared, tmp_path):
    p = prepare_published("brain-diffuser", bd_dir, 1, tmp_path / "o", nsd_root=nsd.root, normalize="brain-diffuser")
    _same_rows(p, prepared("brain-diffuser"))
    # The independent computation: average, /300, z-score with train and val together.
    ids = _splits(nsd, 37, test=True)
    used = nsd.trials < 37 * nsd.T
    expected = _zscore_with_non_test({s: np.stack([nsd.raw[used & (nsd.nsd_ids == i)].mean(0) for i in v]) / 300
                                   for s, v in ids.items()})
    for split in SPLITS:
        np.testing.assert_allclose(p.splits[split].betas, expected[split], atol=1e-5)
        np.testing.assert_array_equal(p.splits[split].stimulus_ids, ids[split])
        np.testing.assert_array_equal(p.splits[split].trial_ids, _trial_lists(nsd, ids[split], 37))
        # Images: float64 0-255 stored as uint8; captions from the cap files, blanks dropped.
        assert p.splits[split].images.dtype == np.uint8
        np.testing.assert_array_equal(p.splits[split].images, nsd.brick[ids[split]])
        assert p.splits[split].captions[0] == [f"image {ids[split][0]} caption {c}" for c in range(4)]
    # Voxels and groups as prepare_subject builds them from the ROI files.
    reference = prepared("brain-diffuser")
    assert p.voxels.groups.keys() == reference.voxels.groups.keys()
    for name, cols in reference.voxels.groups.items():
        np.testing.assert_array_equal(p.voxels.group(name), cols)
    np.testing.assert_array_equal(p.voxels.voxel_ijk, reference.voxels.voxel_ijk)
    _manifest_is_complete(p, "brain-diffuser")
    assert p.manifest["sessions"] == list(range(1, 38)) and "Brain-Diffuser" in p.manifest["test_set"]
    assert p.manifest["n_voxels"] == nsd.n_voxels == 314


def test_brain_diffuser_none_without_nsd_root(nsd, bd_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="brainmclip.prepare")
    # --input may be processed_data (the parent) as well as processed_data/subj01.
    p = prepare_published("brain-diffuser", bd_dir.parent, 1, tmp_path / "o", normalize="none", val_size=10)
    train = np.load(bd_dir / "nsd_train_fmriavg_nsdgeneral_sub1.npy") / 300
    test = np.load(bd_dir / "nsd_test_fmriavg_nsdgeneral_sub1.npy") / 300
    np.testing.assert_allclose(p.train.betas, train[:-10], atol=1e-6)
    np.testing.assert_allclose(p.val.betas, train[-10:], atol=1e-6)
    np.testing.assert_allclose(p.test.betas, test, atol=1e-6)
    for samples in p.splits.values():
        assert (samples.stimulus_ids == -1).all() and samples.trial_ids.shape == (len(samples), 1)
        assert (samples.trial_ids == -1).all()
    # Only the 'all' group without the ROI files; asking for another names the fix.
    assert set(p.voxels.groups) == {"all"} and p.voxels.grid_shape is None
    with pytest.raises(ValueError, match="nsd-root"):
        p.voxels.group("semantic")
    text = caplog.text
    assert "low_level/high_level/semantic/detail" in text and "--nsd-root" in text
    assert "NSD ids" in text


def test_brain_diffuser_uint8_stimuli_and_missing_captions(nsd, tmp_path, caplog):
    folder = write_brain_diffuser(tmp_path / "processed_data", nsd, stim_dtype=np.uint8, captions=False)
    p = prepare_published("brain-diffuser", folder, 1, tmp_path / "o", nsd_root=nsd.root)
    ids = _splits(nsd, 37, test=True)
    np.testing.assert_array_equal(p.val.images, nsd.brick[ids["val"]])
    # Without cap files the NSD root's COCO captions are used (ids recovered from the design).
    assert all(len(c) >= 5 for c in p.test.captions)
    # Without cap files and without an NSD root, captions are empty and a warning says so.
    caplog.set_level(logging.WARNING, logger="brainmclip.prepare")
    bare = prepare_published("brain-diffuser", folder, 1, tmp_path / "o2", images=False)
    assert all(c == [] for c in bare.train.captions) and bare.train.images is None
    assert "nsd_train_cap_sub1.npy" in caplog.text


def _break(folder, name, array):
    np.save(folder / name, array)


@pytest.mark.parametrize("case, error, words", [
    ("missing", FileNotFoundError, ["nsd_train_fmriavg_nsdgeneral_sub1.npy", "missing"]),
    ("not-2d", ValueError, ["nsd_train_fmriavg_nsdgeneral_sub1.npy", "2-D"]),
    ("voxels", ValueError, ["nsd_test_fmriavg_nsdgeneral_sub1.npy", "voxels"]),
    ("stim-rows", ValueError, ["nsd_test_stim_sub1.npy", "one image per row"]),
    ("stim-range", ValueError, ["nsd_train_stim_sub1.npy", "0-255"]),
    ("design-rows", ValueError, ["nsd_train_fmriavg_nsdgeneral_sub1.npy", "nsd_expdesign.mat", "200 train images"]),
    ("session", ValueError, ["session", "brain-diffuser", "none"]),
    ("garbage", ValueError, ["nsd_test_fmriavg_nsdgeneral_sub1.npy", "not a readable .npy"]),
    ("nan", ValueError, ["nsd_test_fmriavg_nsdgeneral_sub1.npy", "row 3", "NaN"]),
])
def test_brain_diffuser_errors(nsd, tmp_path, case, error, words):
    folder = tmp_path / "subj01"
    folder.mkdir()
    V = nsd.n_voxels
    for split, n in (("train", 30), ("test", 8)):
        _break(folder, f"nsd_{split}_fmriavg_nsdgeneral_sub1.npy", np.ones((n, V)) * np.arange(n)[:, None])
        _break(folder, f"nsd_{split}_stim_sub1.npy", np.full((n, 4, 4, 3), 100.0))
    normalize = "none"
    if case == "missing":
        (folder / "nsd_train_fmriavg_nsdgeneral_sub1.npy").unlink()
    elif case == "not-2d":
        _break(folder, "nsd_train_fmriavg_nsdgeneral_sub1.npy", np.ones((30, V, 1)))
    elif case == "voxels":
        _break(folder, "nsd_test_fmriavg_nsdgeneral_sub1.npy", np.ones((8, V - 1)))
    elif case == "stim-rows":
        _break(folder, "nsd_test_stim_sub1.npy", np.ones((7, 4, 4, 3)))
    elif case == "stim-range":
        _break(folder, "nsd_train_stim_sub1.npy", np.full((30, 4, 4, 3), 300.0))
    elif case == "session":
        normalize = "session"
    elif case == "garbage":
        (folder / "nsd_test_fmriavg_nsdgeneral_sub1.npy").write_bytes(b"not numpy")
    elif case == "nan":
        betas = np.ones((8, V))
        betas[3, 7] = np.nan
        _break(folder, "nsd_test_fmriavg_nsdgeneral_sub1.npy", betas)
    root = nsd.root if case == "design-rows" else None
    out = tmp_path / "o"
    with pytest.raises(error) as excinfo:
        prepare_published("brain-diffuser", folder, 1, out, nsd_root=root, normalize=normalize)
    text = _one_line(excinfo)
    for word in words:
        assert word in text, text
    assert not (out / "manifest.json").exists()
    assert not (out / ".staging").exists() and not (out / ".work").exists()


def test_unknown_format_and_roi_files_of_another_size(nsd, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown format='nsd-official'; choose from \['brain-diffuser'"):
        prepare_published("nsd-official", tmp_path, 1, tmp_path / "o")
    with pytest.raises(ValueError, match="old test set only"):
        prepare_published("brain-diffuser", tmp_path, 1, tmp_path / "o", test_set="new")
    # An NSD root holding only the ROI files: voxel groups, but no design (ids stay -1).
    root = tmp_path / "nsd"
    roi_dir = root / "nsddata/ppdata/subj01/func1pt8mm"
    roi_dir.mkdir(parents=True)
    (roi_dir / "roi").symlink_to(nsd.root / "nsddata/ppdata/subj01/func1pt8mm/roi")
    folder = tmp_path / "subj01"
    folder.mkdir()
    for split in ("train", "test"):
        np.save(folder / f"nsd_{split}_fmriavg_nsdgeneral_sub1.npy", np.random.default_rng(0).normal(size=(20, 314)))
    p = prepare_published("brain-diffuser", folder, 1, tmp_path / "o2", nsd_root=root, images=False, val_size=2)
    assert p.voxels.n_voxels == 314 and "semantic" in p.voxels.groups and (p.train.stimulus_ids == -1).all()
    for split in ("train", "test"):
        np.save(folder / f"nsd_{split}_fmriavg_nsdgeneral_sub1.npy", np.ones((20, 300)))
    with pytest.raises(ValueError) as excinfo:
        prepare_published("brain-diffuser", folder, 1, tmp_path / "o3", nsd_root=root, images=False)
    text = _one_line(excinfo)
    assert "300 voxels" in text and "nsdgeneral.nii.gz" in text and "314" in text


def test_rerun_is_a_no_op_other_content_is_refused(nsd, bd_dir, tmp_path):
    out = tmp_path / "o"
    first = prepare_published("brain-diffuser", bd_dir, 1, out, images=False)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = prepare_published("brain-diffuser", bd_dir, 1, out, images=False)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert again.manifest == first.manifest
    with pytest.raises(FileExistsError, match="--force"):
        prepare_published("brain-diffuser", bd_dir, 1, out, images=False, normalize="brain-diffuser")
    forced = prepare_published("brain-diffuser", bd_dir, 1, out, images=False, normalize="brain-diffuser", force=True)
    assert forced.manifest["options"]["normalize"] == "brain-diffuser"
    # Zero mean over every non-test row (train and val), not over train alone.
    assert abs(float(np.mean(np.concatenate([forced.train.betas, forced.val.betas])))) < 1e-4
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_published("brain-diffuser", bd_dir, 1, foreign, images=False)


def test_cli_prepare_brain_diffuser(nsd, bd_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["-q", "prepare", "--format", "brain-diffuser", "--input", str(bd_dir), "--subject", "1",
                 "--out", str(out), "--nsd-root", str(nsd.root), "--normalize", "none"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "source: brain-diffuser" in printed and "semantic" in printed
    assert load_prepared(out).manifest["source"] == "brain-diffuser"
    code = main(["-q", "prepare", "--format", "brain-diffuser", "--input", str(bd_dir), "--subject", "1",
                 "--out", str(tmp_path / "o2"), "--normalize", "session"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "normalize='session'" in err


# ---------------------------------------------------------------- MindEye1
def write_mindeye1(folder, nsd):
    """webdataset_avg_split as MindEye1 publishes it, from session-normalised sessions 1-37."""
    used = nsd.trials < 37 * nsd.T
    splits = _splits(nsd, 37, test=False)
    n_me_val = 25  # MindEye1's own val shard: the last train images
    parts = {"train": splits["train"][:-n_me_val], "val": splits["train"][-n_me_val:], "test": splits["test"]}
    members = {}
    count = 0
    for split, ids in parts.items():
        samples = []
        for i in ids:
            sel = used & (nsd.nsd_ids == i)
            repeats = np.full((3, nsd.n_voxels), np.nan, np.float32)
            repeats[: sel.sum()] = nsd.z[sel]
            key = f"sample{count:09d}"
            count += 1
            samples.append([(f"{key}.jpg", _jpeg(nsd.brick[i])),
                            (f"{key}.nsdgeneral.npy", _npy(repeats)),
                            (f"{key}.coco73k.npy", _npy(np.array([i]))),
                            (f"{key}.trial.npy", _npy(nsd.trials[sel])),
                            (f"{key}.num_uniques.npy", _npy(np.array(1)))])
        members[split] = samples
    # Train samples in two shards, written out of key order (the reader sorts by key).
    train = members["train"]
    _write_tar(folder / "train/train_subj01_0.tar", [m for s in train[1::2][::-1] for m in s])
    _write_tar(folder / "train/train_subj01_1.tar", [m for s in train[0::2] for m in s])
    (folder / "train/train_subj02_0.tar").write_bytes(b"another subject's shard, never opened")
    _write_tar(folder / "val/val_subj01_0.tar", [m for s in members["val"] for m in s])
    _write_tar(folder / "test/test_subj01_0.tar", [m for s in members["test"] for m in s])
    return parts


@pytest.fixture(scope="module")
def me1_dir(nsd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("me1") / "webdataset_avg_split"
    write_mindeye1(folder, nsd)
    return folder


def test_mindeye1_matches_session_normalised_prepare(nsd, me1_dir, prepared, tmp_path):
    p = prepare_published("mindeye1", me1_dir, 1, tmp_path / "o", nsd_root=nsd.root)
    reference = prepared("session")
    _same_rows(p, reference)
    # Independently: the mean of the available (non-NaN) repeats of each image.
    ids = _splits(nsd, 37, test=True)
    used = nsd.trials < 37 * nsd.T
    for split in SPLITS:
        expected = np.stack([nsd.z[used & (nsd.nsd_ids == i)].mean(0) for i in ids[split]])
        np.testing.assert_allclose(p.splits[split].betas, expected, atol=1e-5)
        assert p.splits[split].captions == reference.splits[split].captions
        # Images: the decoded JPEGs, 64 x 64 x 3 uint8.
        for r in (0, len(ids[split]) - 1):
            decoded = np.asarray(Image.open(io.BytesIO(_jpeg(nsd.brick[ids[split][r]]))).convert("RGB"))
            np.testing.assert_array_equal(p.splits[split].images[r], decoded)
    # Some images have fewer than 3 repeats in sessions 1-37: their NaN rows were skipped.
    assert (p.train.n_repeats < 3).any() and np.isfinite(p.train.betas).all()
    _manifest_is_complete(p, "mindeye1")
    assert "MindEye1" in p.manifest["test_set"] and p.manifest["trials_per_session"] == nsd.T
    assert p.manifest["sessions"] == list(range(1, 38))


def test_mindeye1_brain_diffuser_normalisation_without_nsd_root(nsd, me1_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="brainmclip.prepare")
    p = prepare_published("mindeye1", me1_dir, 1, tmp_path / "o", normalize="brain-diffuser", images=False)
    ids = _splits(nsd, 37, test=True)
    used = nsd.trials < 37 * nsd.T
    expected = _zscore_with_non_test({s: np.stack([nsd.z[used & (nsd.nsd_ids == i)].mean(0) for i in v])
                                   for s, v in ids.items()})
    for split in SPLITS:
        np.testing.assert_allclose(p.splits[split].betas, expected[split], atol=1e-5)
        np.testing.assert_array_equal(p.splits[split].stimulus_ids, ids[split])
        assert p.splits[split].images is None
    assert set(p.voxels.groups) == {"all"}
    assert "no captions" in caplog.text and "--nsd-root" in caplog.text


def _me1_sample(key, repeats, nsd_id=5, trial=(1,)):
    return [(f"{key}.jpg", _jpeg(np.zeros((8, 8, 3), np.uint8))), (f"{key}.nsdgeneral.npy", _npy(repeats)),
            (f"{key}.coco73k.npy", _npy(np.array(nsd_id))), (f"{key}.trial.npy", _npy(np.array(trial)))]


def _tiny_me1(folder, train_repeats, V=6):
    rng = np.random.default_rng(1)
    train = [_me1_sample(f"s{k:03d}", rng.normal(size=(3, V)).astype(np.float32), nsd_id=10 + k, trial=(k,))
             for k in range(12)]
    train[3] = _me1_sample("s003", train_repeats, nsd_id=13, trial=(3, 40))
    _write_tar(folder / "train/0.tar", [m for s in train for m in s])
    _write_tar(folder / "test/0.tar", _me1_sample("t000", rng.normal(size=(3, V)), nsd_id=1, trial=(99,)))


def test_mindeye1_averages_available_repeats(tmp_path):
    repeats = np.array([[1, 2, 3, 4, 5, 6], [np.nan] * 6, [3, 4, 5, 6, 7, 8]], np.float32)
    _tiny_me1(tmp_path / "in", repeats)
    p = prepare_published("mindeye1", tmp_path / "in", 1, tmp_path / "o", val_size=2)
    np.testing.assert_allclose(p.train.betas[3], [2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(p.train.trial_ids[3], [3, 40])
    np.testing.assert_array_equal(p.train.trial_ids[0], [0, -1])
    assert len(p.train) == 10 and len(p.val) == 2 and list(p.val.stimulus_ids) == [20, 21]
    assert p.test.images.shape == (1, 8, 8, 3) and p.test.images.dtype == np.uint8
    assert p.test.captions == [[]]
    # The community caption file in the input folder gives captions by NSD id.
    curated = np.array([[f"nsd {i} a", f" nsd {i} b ", ""] for i in range(30)])
    np.save(tmp_path / "in" / "COCO_73k_annots_curated.npy", curated)
    p = prepare_published("mindeye1", tmp_path / "in", 1, tmp_path / "o2", val_size=2, images=False)
    assert p.test.captions == [["nsd 1 a", "nsd 1 b"]] and p.val.captions[1] == ["nsd 21 a", "nsd 21 b"]
    assert "COCO_73k_annots_curated.npy" in p.manifest["inputs"]


@pytest.mark.parametrize("repeats, words", [
    (np.full((3, 6), np.nan, np.float32), ["s003", "all 3 repeats", "NaN"]),
    (np.ones((2, 6), np.float32), ["s003", "nsdgeneral.npy", "(3, 6)"]),
    (np.array([[1, np.nan, 1, 1, 1, 1]] * 3, np.float32), ["s003", "NaN or inf inside an available repeat"]),
])
def test_mindeye1_bad_repeats(tmp_path, repeats, words):
    _tiny_me1(tmp_path / "in", repeats)
    with pytest.raises(ValueError) as excinfo:
        prepare_published("mindeye1", tmp_path / "in", 1, tmp_path / "o")
    text = _one_line(excinfo)
    assert all(w in text for w in words), text


def test_mindeye1_missing_shards_and_members(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        prepare_published("mindeye1", tmp_path, 1, tmp_path / "o")
    assert "train" in _one_line(excinfo) and ".tar" in str(excinfo.value)
    folder = tmp_path / "in"
    _write_tar(folder / "train/0.tar", _me1_sample("s0", np.ones((3, 4)))[1:])  # no jpg
    _write_tar(folder / "test/0.tar", _me1_sample("t0", np.ones((3, 4)), nsd_id=1))
    with pytest.raises(ValueError) as excinfo:
        prepare_published("mindeye1", folder, 1, tmp_path / "o", val_size=0)
    assert "0.tar" in _one_line(excinfo) and "'jpg'" in str(excinfo.value)
    with pytest.raises(ValueError, match="no voxel|not possible"):
        prepare_published("mindeye1", folder, 1, tmp_path / "o", normalize="session")


# ---------------------------------------------------------------- MindEye2
def write_mindeye2(folder, nsd, coco_images=None):
    """betas_all_subj01_fp32_renorm.hdf5 + wds/subj01/{train,test,new_test}, from session-normalised betas."""
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "betas_all_subj01_fp32_renorm.hdf5", "w") as f:
        f.create_dataset("betas", data=nsd.z.astype(np.float32), chunks=(16, nsd.n_voxels))
    if coco_images is not None:
        with h5py.File(folder / "coco_images_224_float16.hdf5", "w") as f:
            f["images"] = coco_images

    def sample(t):
        behav = np.full((1, 17), -1.0)
        behav[0, 0], behav[0, 5], behav[0, 16] = nsd.nsd_ids[t], t, float(nsd.is_test[t])
        key = f"sample{t:06d}"
        return [(f"{key}.behav.npy", _npy(behav)), (f"{key}.past_behav.npy", _npy(np.full((16, 17), -1.0)))]

    wds = folder / "wds/subj01"
    for s in range(40):  # one train shard per session, samples in reverse order
        trials = [t for t in range(s * nsd.T, (s + 1) * nsd.T) if not nsd.is_test[t]][::-1]
        _write_tar(wds / f"train/{s}.tar", [m for t in trials for m in sample(t)])
    old = [t for t in nsd.trials if nsd.is_test[t] and t < 37 * nsd.T]
    _write_tar(wds / "test/0.tar", [m for t in old for m in sample(t)])
    _write_tar(wds / "new_test/0.tar", [m for t in nsd.trials[nsd.is_test] for m in sample(t)])


@pytest.fixture(scope="module")
def me2(nsd, tmp_path_factory):
    images = np.random.default_rng(3).random((len(nsd.brick), 3, 8, 8)).astype(np.float16)
    folder = tmp_path_factory.mktemp("me2") / "mindeye2"
    write_mindeye2(folder, nsd, coco_images=images)
    return SimpleNamespace(folder=folder, images=images)


def test_mindeye2_new_test_set_matches_prepare(nsd, me2, prepared, tmp_path):
    p = prepare_published("mindeye2", me2.folder, 1, tmp_path / "o", nsd_root=nsd.root)
    reference = prepared("session", "new")
    _same_rows(p, reference)
    # Independently: the mean of every trial of each image over all 40 sessions.
    ids = _splits(nsd, 40, test=True)
    for split in SPLITS:
        expected = np.stack([nsd.z[nsd.nsd_ids == i].mean(0) for i in ids[split]])
        np.testing.assert_allclose(p.splits[split].betas, expected, atol=1e-5)
        np.testing.assert_array_equal(p.splits[split].trial_ids, _trial_lists(nsd, ids[split], 40))
        assert p.splits[split].captions == reference.splits[split].captions
        # Images: float16 in [0, 1], (n, 3, H, W) -> uint8 (n, H, W, 3) = round(x * 255).
        x = me2.images[ids[split]].astype(np.float64)
        np.testing.assert_array_equal(p.splits[split].images, np.rint(x * 255).astype(np.uint8).transpose(0, 2, 3, 1))
    assert (p.train.n_repeats == 3).all() and (p.test.n_repeats == 3).all()
    _manifest_is_complete(p, "mindeye2")
    assert p.manifest["test_set"].startswith("new") and p.manifest["sessions"] == list(range(1, 41))
    assert p.manifest["options"]["test_set"] == "new" and p.manifest["images"] is True


def test_mindeye2_old_test_set_and_nsd_images(nsd, me2, prepared, tmp_path):
    folder = tmp_path / "mindeye2"
    folder.mkdir()
    for path in me2.folder.iterdir():
        if path.name != "coco_images_224_float16.hdf5":
            (folder / path.name).symlink_to(path)
    p = prepare_published("mindeye2", folder, 1, tmp_path / "o", nsd_root=nsd.root, test_set="old")
    reference = prepared("session", "old").test
    np.testing.assert_array_equal(p.test.stimulus_ids, reference.stimulus_ids)
    np.testing.assert_array_equal(p.test.trial_ids, reference.trial_ids)
    np.testing.assert_allclose(p.test.betas, reference.betas, atol=1e-5)
    assert p.manifest["test_set"].startswith("old")
    # Without MindEye2's image file, the NSD stimuli are copied.
    np.testing.assert_array_equal(p.test.images, nsd.brick[p.test.stimulus_ids])
    np.testing.assert_array_equal(p.train.images[:5], nsd.brick[p.train.stimulus_ids[:5]])


def test_mindeye2_single_trial_and_no_images(nsd, me2, prepared, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="brainmclip.prepare")
    folder = tmp_path / "mindeye2"
    folder.mkdir()
    for path in me2.folder.iterdir():
        if path.name != "coco_images_224_float16.hdf5":
            (folder / path.name).symlink_to(path)
    p = prepare_published("mindeye2", folder, 1, tmp_path / "o", single_trial=True, normalize="brain-diffuser")
    reference = prepared("session", "new", single_trial=True)
    for split in SPLITS:
        np.testing.assert_array_equal(p.splits[split].stimulus_ids, reference.splits[split].stimulus_ids)
        np.testing.assert_array_equal(p.splits[split].trial_ids, reference.splits[split].trial_ids)
    expected = _zscore_with_non_test({s: nsd.z[reference.splits[s].trial_ids[:, 0]] for s in SPLITS})
    for split in SPLITS:
        np.testing.assert_allclose(p.splits[split].betas, expected[split], atol=1e-5)
        assert p.splits[split].images is None
    assert p.single_trial and p.manifest["images"] is False
    assert "no images" in caplog.text and set(p.voxels.groups) == {"all"}


def _tiny_me2(folder, behav_shape=(1, 17), rows=30):
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "betas_all_subj01_fp32_renorm.hdf5", "w") as f:
        f["betas"] = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)

    def sample(t, image):
        behav = np.full(behav_shape, -1.0)
        behav.flat[0], behav.flat[5] = image, t
        return [(f"s{t:04d}.behav.npy", _npy(behav))]

    # Image 7 at trials 2 and 9 (averaged), image 3 at trial 5, test image 1 at trials 20 and 25.
    train = ((9, 7), (5, 3), (2, 7), (11, 8))
    _write_tar(folder / "wds/subj01/train/0.tar", [m for t, i in train for m in sample(t, i)])
    _write_tar(folder / "wds/subj01/new_test/0.tar", [m for t, i in ((25, 1), (20, 1)) for m in sample(t, i)])
    _write_tar(folder / "wds/subj01/test/0.tar", [m for m in sample(20, 1)])


def test_mindeye2_averages_rows_of_the_same_image(tmp_path):
    _tiny_me2(tmp_path / "in")
    betas = np.arange(120, dtype=np.float32).reshape(30, 4)
    p = prepare_published("mindeye2", tmp_path / "in", 1, tmp_path / "o", val_size=1)
    # Trials sorted: 2 (img 7), 5 (img 3), 9 (img 7), 11 (img 8) -> rows 7, 3 | val: 8.
    np.testing.assert_array_equal(p.train.stimulus_ids, [7, 3])
    np.testing.assert_array_equal(p.train.trial_ids, [[2, 9], [5, -1]])
    np.testing.assert_allclose(p.train.betas, [(betas[2] + betas[9]) / 2, betas[5]])
    np.testing.assert_array_equal(p.val.stimulus_ids, [8])
    np.testing.assert_allclose(p.test.betas, [(betas[20] + betas[25]) / 2])
    old = prepare_published("mindeye2", tmp_path / "in", 1, tmp_path / "o2", val_size=1, test_set="old")
    np.testing.assert_array_equal(old.test.trial_ids, [[20]])
    np.testing.assert_allclose(old.test.betas, betas[[20]])
    assert old.manifest["test_set"].startswith("old (1 images)")


@pytest.mark.parametrize("case, error, words", [
    ("behav", ValueError, ["behav.npy", "(1, 17)", "0.tar"]),
    ("rows", ValueError, ["betas_all_subj01_fp32_renorm.hdf5", "trial 25"]),
    ("missing", FileNotFoundError, ["betas_all_subj01_fp32_renorm.hdf5", "missing"]),
    ("session", ValueError, ["session-normalised", "none"]),
    ("test-set", ValueError, ["test_set", "old"]),
])
def test_mindeye2_errors(tmp_path, case, error, words):
    folder = tmp_path / "in"
    _tiny_me2(folder, behav_shape=(1, 16) if case == "behav" else (1, 17), rows=20 if case == "rows" else 30)
    kwargs = {"val_size": 1}
    if case == "missing":
        (folder / "betas_all_subj01_fp32_renorm.hdf5").unlink()
    elif case == "session":
        kwargs["normalize"] = "session"
    elif case == "test-set":
        kwargs["test_set"] = "newest"
    with pytest.raises(error) as excinfo:
        prepare_published("mindeye2", folder, 1, tmp_path / "o", **kwargs)
    text = _one_line(excinfo)
    assert all(w in text for w in words), text


def test_manifest_options_are_json(nsd, me2, tmp_path):
    p = prepare_published("mindeye2", me2.folder, 1, tmp_path / "o", val_size=5, detail_voxels="nsdgeneral",
                          images=False)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["options"] == {"normalize": "none", "single_trial": False, "val_size": 5,
                                   "detail_voxels": "nsdgeneral", "images": False, "test_set": "new"}
    # fMRI-Detail as all nsdgeneral voxels needs no ROI file.
    assert set(p.voxels.groups) == {"all", "detail"} and len(p.val) == 5


# ---------------------------------------------------------------- shared behaviour of the three formats
@pytest.mark.parametrize("fmt", ["brain-diffuser", "mindeye1", "mindeye2"])
def test_brain_diffuser_normalisation_uses_every_non_test_row(fmt, request, tmp_path):
    """z-scored with the mean and sd (ddof=1) of train and val together, as Brain-Diffuser's scripts do."""
    folder = {"brain-diffuser": lambda: request.getfixturevalue("bd_dir"),
              "mindeye1": lambda: request.getfixturevalue("me1_dir"),
              "mindeye2": lambda: request.getfixturevalue("me2").folder}[fmt]()
    raw = prepare_published(fmt, folder, 1, tmp_path / "none", images=False, val_size=30)
    zscored = prepare_published(fmt, folder, 1, tmp_path / "bd", images=False, val_size=30, normalize="brain-diffuser")
    fit = np.concatenate([raw.train.betas, raw.val.betas]).astype(np.float64)
    mean, sd = fit.mean(0), fit.std(0, ddof=1)
    assert len(raw.val) == 30
    for split in SPLITS:
        expected = (raw.splits[split].betas.astype(np.float64) - mean) / sd
        np.testing.assert_allclose(zscored.splits[split].betas, expected, rtol=1e-5, atol=1e-6)


def test_brain_diffuser_normalisation_needs_two_rows_and_varying_voxels(tmp_path):
    folder = tmp_path / "subj01"
    folder.mkdir()
    betas = np.random.default_rng(0).normal(size=(6, 5))
    betas[:, 2] = 7.0
    np.save(folder / "nsd_train_fmriavg_nsdgeneral_sub1.npy", betas)
    np.save(folder / "nsd_test_fmriavg_nsdgeneral_sub1.npy", betas[:2])
    with pytest.raises(ValueError) as excinfo:
        prepare_published("brain-diffuser", folder, 1, tmp_path / "o", images=False, normalize="brain-diffuser")
    text = _one_line(excinfo)
    assert "1 voxels are constant" in text and "nsd_train_fmriavg_nsdgeneral_sub1.npy" in text, text
    np.save(folder / "nsd_train_fmriavg_nsdgeneral_sub1.npy", betas[:1])
    with pytest.raises(ValueError) as excinfo:
        prepare_published("brain-diffuser", folder, 1, tmp_path / "o", images=False, normalize="brain-diffuser",
                          val_size=0)
    assert "1 non-test rows" in _one_line(excinfo)


@pytest.mark.parametrize("case, error, words", [
    ("mindeye1-coco", FileNotFoundError, ["captions_val2017.json", "missing"]),
    ("mindeye2-coco", FileNotFoundError, ["captions_val2017.json", "missing"]),
    ("brain-diffuser-coco", FileNotFoundError, ["captions_val2017.json", "missing"]),
    ("mindeye2-stimuli", ValueError, ["nsd_stimuli.hdf5", "HDF5"]),
    ("mindeye1-curated", ValueError, ["COCO_73k_annots_curated.npy", "not a readable .npy"]),
])
def test_inputs_are_checked_before_the_first_shard(nsd, me1_dir, me2, linked_tree, tmp_path, monkeypatch, case,
                                                   error, words):
    """Captions and stimuli are checked before any shard is opened or any betas are copied."""
    fmt = case.rsplit("-", 1)[0]
    root = linked_tree
    if case.endswith("-coco"):
        (root / "nsddata_stimuli/stimuli/nsd/annotations/captions_val2017.json").unlink()
    if case == "mindeye2-stimuli":
        stimuli = root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
        stimuli.unlink()
        stimuli.write_bytes(b"not an HDF5 file")
    folder = tmp_path / "in"
    if fmt == "brain-diffuser":
        folder = write_brain_diffuser(folder, nsd, captions=False)
    else:  # links to the shared inputs, without MindEye2's own image file
        folder.mkdir()
        source = me1_dir if fmt == "mindeye1" else me2.folder
        for path in source.iterdir():
            if path.name != "coco_images_224_float16.hdf5":
                (folder / path.name).symlink_to(path)
    if case == "mindeye1-curated":
        (folder / "COCO_73k_annots_curated.npy").write_bytes(b"not numpy")
        root = None
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    out = tmp_path / "o"
    with pytest.raises(error) as excinfo:
        prepare_published(fmt, folder, 1, out, nsd_root=root)
    text = _one_line(excinfo)
    assert all(w in text for w in words), text
    assert opened == [] and not out.exists()
