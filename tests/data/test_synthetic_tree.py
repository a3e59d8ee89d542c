"""The simulated tree read back with independent readers (scipy.io, csv, json, h5py, nibabel)."""

from __future__ import annotations

import csv
import json

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from brainmclip.data import nsd_paths
from brainmclip.data.nsd_paths import ROI_LABELS
from brainmclip.data.synthetic import load_preset


@pytest.fixture(scope="module")
def design(tiny_nsd):
    mat = scipy.io.loadmat(nsd_paths.expdesign_path(tiny_nsd.root))
    return mat["masterordering"], mat["subjectim"], mat["sharedix"]


@pytest.fixture(scope="module")
def stim_info(tiny_nsd):
    with open(nsd_paths.stim_info_path(tiny_nsd.root), newline="") as f:
        return list(csv.DictReader(f))


def test_expdesign_has_nsd_shapes_and_rules(tiny_nsd, design):
    p = tiny_nsd.preset
    masterordering, subjectim, sharedix = design
    assert masterordering.shape == (1, 3 * p.n_images)
    assert subjectim.shape == (8, p.n_images)
    assert sharedix.shape == (1, p.n_shared)
    mo = masterordering.ravel().astype(int)
    # Every subject image is shown exactly three times.
    np.testing.assert_array_equal(np.bincount(mo)[1:], np.full(p.n_images, 3))
    # The shared block leads every subject's list and equals sharedix.
    for s in range(8):
        np.testing.assert_array_equal(subjectim[s, : p.n_shared], sharedix.ravel())
    # Non-shared images are unique to one subject, and the 1-based indices cover the NSD index exactly.
    own = subjectim[:, p.n_shared:].ravel()
    assert len(np.unique(own)) == own.size
    all_ids = np.union1d(own, sharedix.ravel())
    np.testing.assert_array_equal(all_ids, np.arange(1, p.n_total_images + 1))


def test_split_rule_gives_the_shared_images(tiny_nsd, design):
    """NSD's split rule: trial t is test iff masterordering[t] <= n_shared, and those trials show sharedix."""
    p = tiny_nsd.preset
    masterordering, subjectim, sharedix = design
    mo = masterordering.ravel().astype(int)
    for subject in (1, 2):
        shown = subjectim[subject - 1, mo - 1] - 1  # 0-based NSD id per trial
        is_test = mo <= p.n_shared
        assert set(shown[is_test]) == set(sharedix.ravel() - 1)
        assert not set(shown[~is_test]) & set(sharedix.ravel() - 1)
        # The "old" test set: trials of the first 37 of 40 sessions (scaled to the preset).
        n_old = round(37 / 40 * p.n_sessions) * p.trials_per_session
        old_test = set(shown[:n_old][is_test[:n_old]])
        assert 0.9 * p.n_shared <= len(old_test) <= p.n_shared
    # Subjects see the same test images but different training images.
    train = [set(subjectim[s, mo[mo > p.n_shared] - 1]) for s in (0, 1)]
    assert not train[0] & train[1]


def test_stim_info_csv_matches_design(tiny_nsd, design, stim_info):
    p = tiny_nsd.preset
    masterordering, subjectim, sharedix = design
    assert len(stim_info) == p.n_total_images
    header = list(stim_info[0])
    for column in ["cocoId", "cocoSplit", "nsdId", "shared1000", "subject1", "subject8", "subject1_rep0",
                   "subject8_rep2"]:
        assert column in header
    shared = {int(r["nsdId"]) for r in stim_info if r["shared1000"] == "True"}
    assert shared == set(sharedix.ravel() - 1)
    mo = masterordering.ravel().astype(int)
    rows = {int(r["nsdId"]): r for r in stim_info}
    for subject in (1, 5):
        for j in (0, p.n_shared, p.n_images - 1):  # a shared image, the first own image, the last
            nsd_id = int(subjectim[subject - 1, j]) - 1
            row = rows[nsd_id]
            assert row[f"subject{subject}"] == "1"
            reps = [int(row[f"subject{subject}_rep{r}"]) for r in range(3)]
            np.testing.assert_array_equal(reps, np.flatnonzero(mo == j + 1) + 1)
    assert len({r["cocoId"] for r in stim_info}) == p.n_total_images


def test_captions_cover_every_image_and_describe_it(tiny_nsd, stim_info):
    by_coco: dict[int, list[str]] = {}
    for split in ("train2017", "val2017"):
        doc = json.loads(nsd_paths.captions_path(tiny_nsd.root, split).read_text())
        ids = {im["id"] for im in doc["images"]}
        for ann in doc["annotations"]:
            assert ann["image_id"] in ids
            by_coco.setdefault(ann["image_id"], []).append(ann["caption"])
    for row in stim_info:
        assert 5 <= len(by_coco[int(row["cocoId"])]) <= 7
    scenes = [json.loads(line) for line in (tiny_nsd.root / "simulation/scenes.jsonl").read_text().splitlines()]
    coco = {int(r["nsdId"]): int(r["cocoId"]) for r in stim_info}
    for scene in scenes[:200]:
        text = " ".join(by_coco[coco[scene["nsd_id"]]]).lower()
        # Every category in the picture is named in at least one caption, or counted ("two dogs").
        for obj in scene["objects"]:
            plural = {"person": "people"}.get(obj["category"], obj["category"] + "s")
            assert obj["category"] in text or plural in text, (scene, text)


def test_stimuli_hdf5(tiny_nsd, design):
    p = tiny_nsd.preset
    subjectim = design[1].astype(int)
    with h5py.File(nsd_paths.stimuli_path(tiny_nsd.root), "r") as f:
        brick = f["imgBrick"]
        assert brick.shape == (p.n_total_images, p.image_size, p.image_size, 3)
        assert brick.dtype == np.uint8
        seen = np.sort(subjectim[0, :20] - 1)
        images = brick[seen]
        unseen = np.setdiff1d(np.arange(p.n_total_images), np.concatenate([subjectim[0], subjectim[1]]) - 1)
        blank = brick[int(unseen[0])]
    assert all(im.std() > 5 for im in images)  # real pictures, not blanks
    assert len({im.tobytes() for im in images}) == len(images)
    # Images of subjects that were not simulated are left unwritten (zeros), by design.
    assert not blank.any()


@pytest.mark.parametrize("subject", [1, 2])
def test_roi_volumes_follow_nsd_conventions(tiny_nsd, subject):
    p = tiny_nsd.preset
    root = tiny_nsd.root
    shape = p.grid_shapes[subject - 1]
    brain = nib.load(nsd_paths.brainmask_path(root, subject)).get_fdata() > 0
    rois = {}
    for roi, labels in ROI_LABELS.items():
        img = nib.load(nsd_paths.roi_path(root, subject, roi))
        data = np.asarray(img.dataobj)
        assert data.shape == shape
        np.testing.assert_allclose(img.header.get_zooms(), (1.8, 1.8, 1.8))
        assert set(np.unique(data)) <= {-1, 0, *labels}
        np.testing.assert_array_equal(data == -1, ~brain)  # -1 exactly outside the brain
        rois[roi] = data
        ctab = nsd_paths.roi_ctab_path(root, subject, roi).read_text().split("\n")
        assert [line.split()[1] for line in ctab[1:] if line] == list(labels.values())
    nsdgeneral = rois["nsdgeneral"] > 0
    assert nsdgeneral.sum() == p.nsdgeneral_counts[subject - 1]
    assert np.all(nsdgeneral <= brain)
    low = rois["prf-visualrois"] > 0
    assert np.all(low <= nsdgeneral) and low.sum() > 0.2 * nsdgeneral.sum()
    floc = [rois[r] > 0 for r in ("floc-bodies", "floc-faces", "floc-places", "floc-words")]
    high = np.logical_or.reduce(floc)
    assert (high & nsdgeneral).sum() > 0.1 * nsdgeneral.sum()
    assert (high & ~nsdgeneral).any(), "floc ROIs should spill past nsdgeneral, as in NSD"
    assert not (high & low).any()
    # Every sub-label is used (e.g. FFA-1 and FFA-2 both exist).
    for roi in ("prf-visualrois", "floc-faces"):
        assert set(np.unique(rois[roi][rois[roi] > 0])) == set(ROI_LABELS[roi])


def test_betas_are_int16_sessions_on_the_subject_grid(tiny_nsd):
    p = tiny_nsd.preset
    root = tiny_nsd.root
    for subject in (1, 2):
        files = sorted(nsd_paths.betas_dir(root, subject).glob("betas_session*.nii.gz"))
        assert len(files) == p.sessions_for_subject(subject) == 40
        img = nib.load(files[0])
        assert img.shape == (*p.grid_shapes[subject - 1], p.trials_per_session)
        assert img.get_data_dtype() == np.int16
        np.testing.assert_allclose(img.affine[:3, :3], np.diag([1.8] * 3))
        data = np.asarray(img.dataobj)
        brain = nib.load(nsd_paths.brainmask_path(root, subject)).get_fdata() > 0
        assert not data[~brain].any()
        inside = data[brain] / 300.0
        # Percent signal change of a plausible size, not clipped at the int16 limits.
        assert 0.5 < inside.std() < 10 and np.abs(data).max() < 32767
        ncsnr = nib.load(nsd_paths.ncsnr_path(root, subject)).get_fdata()
        nsdgeneral = nib.load(nsd_paths.roi_path(root, subject, "nsdgeneral")).get_fdata() > 0
        assert 0.2 <= ncsnr[nsdgeneral].mean() <= 0.6 and not ncsnr[~nsdgeneral].any()


def test_subjects_with_fewer_sessions(tmp_path):
    """Subjects 3, 4, 6, 8 stopped early in NSD (32, 30, 32, 30 of 40 sessions)."""
    from brainmclip.data.synthetic import make_synthetic_nsd

    p = load_preset("tiny")
    assert [p.sessions_for_subject(s) for s in range(1, 9)] == [40, 40, 32, 30, 40, 32, 40, 30]
    result = make_synthetic_nsd(tmp_path, "tiny", subjects=[4], seed=1, sessions=31, progress=False)
    assert result.sessions == {4: 30}
    assert len(list(nsd_paths.betas_dir(tmp_path, 4).glob("betas_session*.nii.gz"))) == 30
