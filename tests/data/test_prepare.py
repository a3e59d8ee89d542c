"""prepare_subject against an independent numpy computation over the raw NIfTI volumes."""

from __future__ import annotations

import gzip
import json
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from brainmclip.cli import main
from brainmclip.data import nsd_official, nsd_paths
from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.prepared import load_prepared
from brainmclip.data.synthetic import make_synthetic_nsd


# ---------------------------------------------------------------- independent reference
def reference(root, subject, sessions, normalize="session", single_trial=False, val_fraction=859 / 8859, val_size=None):
    """What prepare should produce, computed directly with nibabel + numpy (no brainmclip code)."""
    design = scipy.io.loadmat(root / "nsddata/experiments/nsd/nsd_expdesign.mat")
    mo = design["masterordering"].ravel().astype(int)  # 1-based
    subjectim = design["subjectim"].astype(int)
    n_shared = design["sharedix"].size
    mask = nib.load(root / f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi/nsdgeneral.nii.gz").get_fdata() > 0
    T = len(mo) // 40
    betas, trials = [], []
    for s in sessions:
        vol = nib.load(root / f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR/"
                              f"betas_session{s:02d}.nii.gz").get_fdata()
        x = vol[mask].T / 300.0  # (T, V), C-order voxels
        t = np.arange((s - 1) * T, s * T)
        if normalize == "session":
            train = mo[t] > n_shared
            x = (x - x[train].mean(0)) / x[train].std(0)
        betas.append(x)
        trials.append(t)
    betas, trials = np.concatenate(betas), np.concatenate(trials)
    nsd = subjectim[subject - 1, mo[trials] - 1] - 1
    test = mo[trials] <= n_shared
    order = {}
    for name, sel in (("train", ~test), ("test", test)):
        seen = []
        for i in nsd[sel]:
            if i not in seen:
                seen.append(i)
        order[name] = np.array(seen)
    n_val = round(len(order["train"]) * val_fraction) if val_size is None else val_size
    split_ids = {"train": order["train"][: len(order["train"]) - n_val],
                 "val": order["train"][len(order["train"]) - n_val:], "test": order["test"]}
    out = {}
    for name, ids in split_ids.items():
        if single_trial:
            rows = np.flatnonzero(np.isin(nsd, ids))
            out[name] = (betas[rows], nsd[rows], trials[rows][:, None])
        else:
            x = np.stack([betas[nsd == i].mean(0) for i in ids])
            reps = [trials[nsd == i] for i in ids]
            tid = np.full((len(ids), max(map(len, reps))), -1)
            for r, ts in enumerate(reps):
                tid[r, : len(ts)] = ts
            out[name] = (x, ids, tid)
    if normalize == "brain-diffuser":  # statistics of every non-test row: train and val
        fit = np.concatenate([out["train"][0], out["val"][0]])
        mean, sd = fit.mean(0), fit.std(0, ddof=1)
        out = {k: ((x - mean) / sd, i, t) for k, (x, i, t) in out.items()}
    return out


@pytest.fixture(scope="module")
def prepared_default(tiny_nsd, tmp_path_factory):
    return prepare_subject(tiny_nsd.root, 1, tmp_path_factory.mktemp("prep") / "subj01", progress=False)


def _compare(prepared, expected):
    for split, (x, ids, tid) in expected.items():
        samples = prepared.splits[split]
        np.testing.assert_array_equal(samples.stimulus_ids, ids)
        np.testing.assert_array_equal(samples.trial_ids, tid)
        np.testing.assert_allclose(samples.betas, x, rtol=1e-5, atol=1e-5)


def test_default_matches_numpy_reference(tiny_nsd, prepared_default):
    _compare(prepared_default, reference(tiny_nsd.root, 1, range(1, 38)))
    p = prepared_default
    assert p.manifest["test_set"] == "old" and p.manifest["sessions"] == list(range(1, 38))
    assert isinstance(p.train.betas, np.memmap)
    # Every shared image is seen in the first 37 sessions of the tiny design; none leaks into train.
    assert len(p.test) == tiny_nsd.preset.n_shared
    assert not set(p.test.stimulus_ids) & set(p.train.stimulus_ids) | set(p.val.stimulus_ids) & set(p.test.stimulus_ids)
    # Repeats: most images were shown 3 times, some fewer within 37 sessions.
    assert set(np.unique(p.train.n_repeats)) <= {1, 2, 3} and (p.train.n_repeats == 3).mean() > 0.7


@pytest.mark.parametrize("normalize", ["brain-diffuser", "none"])
def test_other_normalisations_match_reference(tiny_nsd, tmp_path, normalize):
    prepared = prepare_subject(tiny_nsd.root, 1, tmp_path, PrepareOptions(normalize=normalize, images=False),
                               progress=False)
    _compare(prepared, reference(tiny_nsd.root, 1, range(1, 38), normalize=normalize))
    assert prepared.test.images is None


def test_single_trial_and_new_test_set(tiny_nsd, tmp_path):
    options = PrepareOptions(test_set="new", single_trial=True, images=False)
    prepared = prepare_subject(tiny_nsd.root, 2, tmp_path, options, progress=False)
    expected = reference(tiny_nsd.root, 2, range(1, 41), single_trial=True)
    _compare(prepared, expected)
    assert prepared.single_trial and prepared.manifest["sessions"] == list(range(1, 41))
    # All shared images, all three repeats, in the new test set.
    assert len(np.unique(prepared.test.stimulus_ids)) == tiny_nsd.preset.n_shared
    assert len(prepared.test) == 3 * tiny_nsd.preset.n_shared


def test_val_size_and_explicit_sessions(tiny_nsd, tmp_path):
    options = PrepareOptions(sessions=(1, 2, 3, 4, 5), val_size=7, images=False)
    prepared = prepare_subject(tiny_nsd.root, 1, tmp_path, options, progress=False)
    _compare(prepared, reference(tiny_nsd.root, 1, range(1, 6), val_size=7))
    assert len(prepared.val) == 7 and "custom" in prepared.manifest["test_set"]


def test_voxels_are_nsdgeneral_in_c_order_with_roi_labels(tiny_nsd, prepared_default):
    root = tiny_nsd.root
    labels = {roi: nib.load(nsd_paths.roi_path(root, 1, roi)).get_fdata().astype(int) for roi in nsd_paths.ROI_NAMES}
    mask = labels["nsdgeneral"] > 0
    voxels = prepared_default.voxels
    np.testing.assert_array_equal(voxels.voxel_ijk, np.argwhere(mask))
    for roi, volume in labels.items():
        np.testing.assert_array_equal(voxels.roi_labels[roi], np.clip(volume[mask], 0, None))
    low = labels["prf-visualrois"][mask] > 0
    high = np.any([labels[r][mask] > 0 for r in nsd_paths.HIGH_LEVEL_ROIS], axis=0)
    np.testing.assert_array_equal(voxels.group("semantic"), np.flatnonzero(high))
    np.testing.assert_array_equal(voxels.group("detail"), np.flatnonzero(low | high))
    np.testing.assert_array_equal(voxels.group("low_level"), np.flatnonzero(low))
    assert len(voxels.group("all")) == mask.sum() == tiny_nsd.preset.nsdgeneral_counts[0]


def test_detail_can_be_all_nsdgeneral(tiny_nsd, tmp_path):
    prepared = prepare_subject(tiny_nsd.root, 1, tmp_path, PrepareOptions(detail_voxels="nsdgeneral", images=False,
                                                                          sessions=(1,)), progress=False)
    np.testing.assert_array_equal(prepared.voxels.group("detail"), np.arange(prepared.voxels.n_voxels))


def test_captions_and_images_follow_the_stimulus_ids(tiny_nsd, prepared_default):
    root = tiny_nsd.root
    import csv

    with open(nsd_paths.stim_info_path(root), newline="") as f:
        coco = {int(r["nsdId"]): int(r["cocoId"]) for r in csv.DictReader(f)}
    captions = {}
    for split in ("train2017", "val2017"):
        for ann in json.loads(nsd_paths.captions_path(root, split).read_text())["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
    with h5py.File(nsd_paths.stimuli_path(root), "r") as f:
        brick = f["imgBrick"][:]
    for samples in prepared_default.splits.values():
        for i in (0, len(samples) // 2, len(samples) - 1):
            nsd_id = int(samples.stimulus_ids[i])
            assert samples.captions[i] == captions[coco[nsd_id]]
            np.testing.assert_array_equal(samples.images[i], brick[nsd_id])


def test_rerun_is_a_no_op_and_other_options_are_refused(tiny_nsd, tmp_path):
    options = PrepareOptions(sessions=(1, 2), images=False)
    prepare_subject(tiny_nsd.root, 1, tmp_path, options, progress=False)
    stamp = (tmp_path / "manifest.json").stat().st_mtime_ns
    again = prepare_subject(tiny_nsd.root, 1, tmp_path, options, progress=False)
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == stamp and len(again.train) > 0
    with pytest.raises(FileExistsError, match="--force"):
        prepare_subject(tiny_nsd.root, 1, tmp_path, PrepareOptions(sessions=(1, 2, 3), images=False), progress=False)
    forced = prepare_subject(tiny_nsd.root, 1, tmp_path, PrepareOptions(sessions=(1, 2, 3), images=False),
                             force=True, progress=False)
    assert forced.manifest["sessions"] == [1, 2, 3]


_REAL_SESSION_READ = nsd_official._NiftiGzSession.read  # taken before any test patches it


def _count_session_reads(monkeypatch) -> list[str]:
    """The names of the betas files read from now on, in order, by the real reader (replacing an earlier patch)."""
    names: list[str] = []

    def counting(self, voxel_ijk):
        names.append(self.path.name)
        return _REAL_SESSION_READ(self, voxel_ijk)

    monkeypatch.setattr(nsd_official._NiftiGzSession, "read", counting)
    return names


def test_interrupted_run_resumes_per_session(tiny_nsd, tmp_path, monkeypatch):
    options = PrepareOptions(sessions=tuple(range(1, 9)), images=False)
    real_read = nsd_official._NiftiGzSession.read

    def dying(self, voxel_ijk):
        if self.path.name == "betas_session05.nii.gz":
            raise KeyboardInterrupt
        return real_read(self, voxel_ijk)

    monkeypatch.setattr(nsd_official._NiftiGzSession, "read", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare_subject(tiny_nsd.root, 1, tmp_path, options, progress=False)
    done = sorted(int(p.stem[-2:]) for p in (tmp_path / ".work").glob("session_*.npy"))
    # Two sessions are read at once, so a neighbour of session 5 may have finished too.
    assert {1, 2, 3, 4} <= set(done) and 5 not in done
    with pytest.raises(FileNotFoundError):
        load_prepared(tmp_path)  # nothing that looks complete
    read_sessions = _count_session_reads(monkeypatch)
    resumed = prepare_subject(tiny_nsd.root, 1, tmp_path, options, progress=False)
    assert sorted(read_sessions) == [f"betas_session{s:02d}.nii.gz" for s in range(1, 9) if s not in done]
    _compare(resumed, reference(tiny_nsd.root, 1, range(1, 9)))
    assert not (tmp_path / ".work").exists()


def test_resume_reads_a_damaged_session_again(tiny_nsd, tmp_path, monkeypatch):
    """A kept session result that was cut short is not reused: that session is read again."""

    options = PrepareOptions(sessions=(1, 2, 3), images=False)
    first = prepare_subject(tiny_nsd.root, 1, tmp_path, options, keep_work=True, progress=False)
    expected = {split: np.array(s.betas) for split, s in first.splits.items()}
    (tmp_path / "manifest.json").unlink()  # the dataset reads as unfinished: the next run resumes
    cut = tmp_path / ".work" / "session_02.npy"
    cut.write_bytes(cut.read_bytes()[:-100])
    read_sessions = _count_session_reads(monkeypatch)
    resumed = prepare_subject(tiny_nsd.root, 1, tmp_path, options, progress=False)
    assert read_sessions == ["betas_session02.nii.gz"]
    for split, betas in expected.items():
        np.testing.assert_array_equal(resumed.splits[split].betas, betas)


def test_hdf5_betas_variant_gives_the_same_dataset(tmp_path):
    root = tmp_path / "nsd"
    make_synthetic_nsd(root, "tiny", subjects=[1], seed=2, sessions=3, progress=False)
    expected = prepare_subject(root, 1, tmp_path / "a", PrepareOptions(sessions=(1, 2, 3), images=False),
                               progress=False)
    for s in (1, 2, 3):
        nifti = nsd_paths.betas_path(root, 1, s)
        data = np.asarray(nib.load(nifti).dataobj)  # (X, Y, Z, T)
        with h5py.File(nsd_paths.betas_path(root, 1, s, suffix=".hdf5"), "w") as f:
            f["betas"] = np.ascontiguousarray(data.transpose(3, 2, 1, 0))  # (T, Z, Y, X)
        nifti.unlink()
    from_hdf5 = prepare_subject(root, 1, tmp_path / "b", PrepareOptions(sessions=(1, 2, 3), images=False),
                                progress=False)
    for split in ("train", "val", "test"):
        np.testing.assert_allclose(from_hdf5.splits[split].betas, expected.splits[split].betas, atol=1e-6)


# ---------------------------------------------------------------- bad input
@pytest.fixture
def small_tree(tmp_path):
    root = tmp_path / "nsd"
    make_synthetic_nsd(root, "tiny", subjects=[1], seed=3, sessions=2, progress=False)
    return root


def _fails(capsys, root, out, *extra):
    code = main(["-q", "prepare", "--nsd-root", str(root), "--subject", "1", "--out", str(out), "--sessions", "1-2",
                 "--no-images", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err.count("\n") == 0, err
    assert not (out / "manifest.json").exists()
    return err


def test_missing_sessions(small_tree, tmp_path, capsys):
    code = main(["-q", "prepare", "--nsd-root", str(small_tree), "--subject", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0
    assert "betas_session03" in err and "found sessions 1-2" in err and "--sessions" in err


def test_subject_out_of_range(small_tree, tmp_path, capsys):
    assert main(["-q", "prepare", "--nsd-root", str(small_tree), "--subject", "9", "--out", str(tmp_path / "o")]) == 1
    assert "subject=9" in capsys.readouterr().err


def test_roi_on_another_grid(small_tree, tmp_path, capsys):
    path = nsd_paths.roi_path(small_tree, 1, "floc-faces")
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.int16), np.eye(4)), path)
    err = _fails(capsys, small_tree, tmp_path / "o")
    assert "floc-faces.nii.gz" in err and "grid" in err


def test_expdesign_that_does_not_match_the_betas(small_tree, tmp_path, capsys):
    path = nsd_paths.expdesign_path(small_tree)
    mat = scipy.io.loadmat(path)
    mat["masterordering"] = mat["masterordering"][:, : 40 * 17]  # 17 trials per session instead of 18
    scipy.io.savemat(path, {k: mat[k] for k in ("masterordering", "subjectim", "sharedix")})
    err = _fails(capsys, small_tree, tmp_path / "o")
    assert "betas_session01.nii.gz" in err and "18 trials" in err and "expects 17" in err


def _rewrite_session(root, session, edit, dtype=None):
    path = nsd_paths.betas_path(root, 1, session)
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    data = edit(data.astype(dtype) if dtype else data)
    nib.save(nib.Nifti1Image(data, img.affine), path)


def test_nan_voxels(small_tree, tmp_path, capsys):
    i, j, k = np.argwhere(nib.load(nsd_paths.roi_path(small_tree, 1, "nsdgeneral")).get_fdata() > 0)[5]

    def put_nan(d):
        d[i, j, k, 3] = np.nan
        return d

    _rewrite_session(small_tree, 2, put_nan, np.float32)
    err = _fails(capsys, small_tree, tmp_path / "o")
    assert "betas_session02.nii.gz" in err and "NaN" in err and f"{i},{j},{k}" in err


def test_all_zero_voxels(small_tree, tmp_path, capsys):
    ijk = np.argwhere(nib.load(nsd_paths.roi_path(small_tree, 1, "nsdgeneral")).get_fdata() > 0)[:3]

    def zero(d):
        d[ijk[:, 0], ijk[:, 1], ijk[:, 2], :] = 0
        return d

    _rewrite_session(small_tree, 1, zero)
    err = _fails(capsys, small_tree, tmp_path / "o")
    assert "betas_session01.nii.gz" in err and "3 nsdgeneral voxels are all zero" in err


def test_truncated_nifti(small_tree, tmp_path, capsys):
    path = nsd_paths.betas_path(small_tree, 1, 2)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    err = _fails(capsys, small_tree, tmp_path / "o")
    assert "betas_session02.nii.gz" in err and "truncated" in err
    # Also a cut in the compressed stream itself.
    path.write_bytes(gzip.compress(raw)[:5000])
    err = _fails(capsys, small_tree, tmp_path / "o2")
    assert "betas_session02.nii.gz" in err


def test_missing_stimuli_file_names_the_option(small_tree, tmp_path, capsys):
    nsd_paths.stimuli_path(small_tree).unlink()
    code = main(["-q", "prepare", "--nsd-root", str(small_tree), "--subject", "1", "--out", str(tmp_path / "o"),
                 "--sessions", "1-2"])
    err = capsys.readouterr().err
    assert code == 1 and "nsd_stimuli.hdf5" in err and "--no-images" in err


def test_cli_prepare_prints_a_summary(small_tree, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["-q", "prepare", "--nsd-root", str(small_tree), "--subject", "1", "--out", str(out),
                 "--sessions", "1-2", "--normalize", "brain-diffuser"]) == 0
    printed = capsys.readouterr().out
    assert "prepared subject 1" in printed and "brain-diffuser" in printed and "sessions: 1-2" in printed
    shutil.rmtree(out)


# ---------------------------------------------------------------- Brain-Diffuser normalisation
def assert_zscored_with_non_test_rows(zscored, raw):
    """``zscored`` is ``raw`` z-scored per voxel with the mean and sd (ddof=1) of train and val together."""
    fit = np.concatenate([raw.train.betas, raw.val.betas]).astype(np.float64)
    mean, sd = fit.mean(0), fit.std(0, ddof=1)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(zscored.splits[split].stimulus_ids, raw.splits[split].stimulus_ids)
        expected = (raw.splits[split].betas.astype(np.float64) - mean) / sd
        np.testing.assert_allclose(zscored.splits[split].betas, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("single_trial", [False, True])
def test_brain_diffuser_statistics_use_every_non_test_row(tiny_nsd, tmp_path, single_trial):
    """Brain-Diffuser z-scores with all its non-test images (it has no validation split): our train + val."""
    options = dict(sessions=tuple(range(1, 13)), images=False, single_trial=single_trial, val_size=40)
    raw = prepare_subject(tiny_nsd.root, 1, tmp_path / "none", PrepareOptions(normalize="none", **options),
                          progress=False)
    zscored = prepare_subject(tiny_nsd.root, 1, tmp_path / "bd", PrepareOptions(normalize="brain-diffuser", **options),
                              progress=False)
    assert len(raw.val) >= 40
    assert_zscored_with_non_test_rows(zscored, raw)


# ---------------------------------------------------------------- every input checked before the first session
def _replace(path, data: bytes):
    path.unlink()
    path.write_bytes(data)


@pytest.mark.parametrize("case, error, words", [
    ("coco-captions", FileNotFoundError, ["captions_val2017.json", "missing"]),
    ("stim-info", FileNotFoundError, ["nsd_stim_info_merged.csv", "missing"]),
    ("captions-file", FileNotFoundError, ["curated.npy", "missing"]),
    ("captions-file-garbage", ValueError, ["curated.npy", "not a readable .npy"]),
    ("stimuli-garbage", ValueError, ["nsd_stimuli.hdf5", "HDF5"]),
    ("late-betas", FileNotFoundError, ["betas_session30", "missing"]),
    ("roi", FileNotFoundError, ["floc-words.nii.gz", "missing"]),
    ("design", ValueError, ["nsd_expdesign.mat", "session 41"]),
])
def test_inputs_are_checked_before_the_first_session(linked_tree, tmp_path, monkeypatch, case, error, words):
    root = linked_tree
    kwargs = {"sessions": tuple(range(1, 38))}
    if case == "coco-captions":
        nsd_paths.captions_path(root, "val2017").unlink()
    elif case == "stim-info":
        nsd_paths.stim_info_path(root).unlink()
    elif case == "captions-file":
        kwargs["captions_file"] = str(tmp_path / "curated.npy")
    elif case == "captions-file-garbage":
        (tmp_path / "curated.npy").write_bytes(b"not numpy at all")
        kwargs["captions_file"] = str(tmp_path / "curated.npy")
    elif case == "stimuli-garbage":
        _replace(nsd_paths.stimuli_path(root), b"not an HDF5 file")
    elif case == "late-betas":
        nsd_paths.betas_path(root, 1, 30).unlink()
    elif case == "roi":
        nsd_paths.roi_path(root, 1, "floc-words").unlink()
    elif case == "design":
        # Betas for a 41st session exist, but NSD's design plans 40.
        nsd_paths.betas_path(root, 1, 41).symlink_to(nsd_paths.betas_path(root, 1, 40).resolve())
        kwargs["sessions"] = (40, 41)
    read = []
    monkeypatch.setattr(nsd_official._NiftiGzSession, "read", lambda self, ijk: read.append(self.path) or 1 / 0)
    out = tmp_path / "o"
    with pytest.raises(error) as excinfo:
        prepare_subject(root, 1, out, PrepareOptions(**kwargs), progress=False)
    text = str(excinfo.value)
    assert "\n" not in text and all(w in text for w in words), text
    assert read == [] and not out.exists()
