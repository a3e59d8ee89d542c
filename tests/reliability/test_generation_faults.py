"""Faults around `brainmclip reconstruct` and `brainmclip report`: reused outputs, wrong --out, interruptions."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from faults import assert_one_line_error, tree_checksums

from brainmclip.generation import reconstruct as recon_module
from brainmclip.generation.reconstruct import ReconstructOptions, image_seed, reconstruct
from brainmclip.models.predictions import write_predictions

TINY = ["--generator", "tiny", "--clip", "tiny"]
IDS = np.array([11, 3, 42, 7, 19])


pytestmark = pytest.mark.usefixtures("one_thread")


def _predictions(path, seed=0, ids=IDS, run=None):
    rng = np.random.default_rng(seed)
    n = len(ids)
    arrays = {"image": rng.normal(size=(n, 257, 32)).astype(np.float32),
              "text": rng.normal(size=(n, 77, 32)).astype(np.float32)}
    manifest = {"method": "ridge", "subject": 1, "split": "test", **({"run": run} if run else {})}
    return write_predictions(path, ids, arrays, manifest)


def _pngs(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def _reconstruct(cli, pred, out, *extra):
    return cli(["reconstruct", "--pred", pred, "--out", out, *TINY, "--batch-size", "2", *extra])


# ------------------------------------------------------------------------------------------------ reconstruct


def test_changed_predictions_are_not_reused(cli, tmp_path):
    pred, out = tmp_path / "pred", tmp_path / "recon"
    _predictions(pred, seed=0)
    assert _reconstruct(cli, pred, out, "--steps", "3") == (0, "")
    first = tree_checksums(out)
    # The same values written again are the same predictions: nothing is made again.
    _predictions(pred, seed=0)
    assert _reconstruct(cli, pred, out, "--steps", "3") == (0, "")
    assert _pngs(out) == {k: v for k, v in first.items() if k.endswith(".png")}
    # Retrained and re-predicted into the same folder: the old images are not passed off as new ones.
    _predictions(pred, seed=1)
    code, err = _reconstruct(cli, pred, out, "--steps", "3")
    assert_one_line_error(code, err, str(out), "--force", "predictions")
    assert tree_checksums(out) == first
    assert _reconstruct(cli, pred, out, "--steps", "3", "--force") == (0, "")
    assert _reconstruct(cli, pred, tmp_path / "fresh", "--steps", "3") == (0, "")
    assert _pngs(out) == _pngs(tmp_path / "fresh") != {k: v for k, v in first.items() if k.endswith(".png")}


def test_force_with_other_settings_makes_every_image_again(cli, tmp_path):
    pred, out = _predictions(tmp_path / "pred"), tmp_path / "recon"
    assert _reconstruct(cli, pred, out, "--steps", "20") == (0, "")
    code, err = _reconstruct(cli, pred, out, "--steps", "3")
    assert_one_line_error(code, err, "--force", "steps")
    (out / "notes.txt").write_text("mine")
    assert _reconstruct(cli, pred, out, "--steps", "3", "--force") == (0, "")
    assert _reconstruct(cli, pred, tmp_path / "fresh", "--steps", "3") == (0, "")
    assert _pngs(out) == _pngs(tmp_path / "fresh")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["options"]["steps"] == 3 and manifest["complete"]
    assert (out / "notes.txt").read_text() == "mine"  # --force removes only what reconstruct wrote


def test_interrupted_batch_resumes_to_the_uninterrupted_images(tmp_path, monkeypatch):
    pred = _predictions(tmp_path / "pred")
    options = ReconstructOptions(generator="tiny", clip="tiny", steps=3, batch_size=2)
    reference = reconstruct(pred, tmp_path / "ref", options, progress=False)
    real = recon_module.Image.Image.save
    saved = {"n": 0}

    def killed_after_three(self, fp, *args, **kwargs):
        if saved["n"] == 3:  # the third PNG (first of the second batch) is on disk; the kill comes before the fourth
            raise KeyboardInterrupt
        saved["n"] += 1
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(recon_module.Image.Image, "save", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(pred, tmp_path / "run", options, progress=False)
    assert len(list((tmp_path / "run").glob("*.png"))) == 3
    monkeypatch.setattr(recon_module.Image.Image, "save", real)
    result = reconstruct(pred, tmp_path / "run", options, progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_images"] == len(IDS)
    assert sorted(manifest["images"]) == sorted(str(i) for i in IDS)  # every image, each once
    for nsd_id in IDS:
        assert manifest["images"][str(nsd_id)]["seed"] == image_seed(42, nsd_id, 0)
    assert _pngs(tmp_path / "run") == _pngs(reference.root)
    assert len(result) == len(IDS) and all(p.is_file() for p in result.paths)


def test_reconstruct_into_another_stages_folder_is_refused(cli, tmp_path):
    pred = _predictions(tmp_path / "pred")
    before = tree_checksums(pred)
    for force in ([], ["--force"]):
        code, err = _reconstruct(cli, pred, pred, *force)
        assert_one_line_error(code, err, "not a reconstruction manifest")
        assert tree_checksums(pred) == before


# ------------------------------------------------------------------------------------------------ report


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """A real evaluation folder of one tiny reconstruction (simulated NSD, PixCorr only): what report reads."""
    from brainmclip.data.prepare import PrepareOptions, prepare_subject
    from brainmclip.data.prepared import load_prepared
    from brainmclip.data.synthetic import make_synthetic_nsd
    from brainmclip.evaluation.evaluate import evaluate_reconstructions

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluation")
    nsd = make_synthetic_nsd(root / "nsd", preset="tiny", subjects=(1,), seed=7, progress=False)
    prepare_subject(nsd.root, 1, root / "prepared", PrepareOptions(), progress=False)
    (root / "run").mkdir()
    (root / "run" / "run.json").write_text(json.dumps({"data": "../prepared"}))
    ids = load_prepared(root / "prepared").test.stimulus_ids
    _predictions(root / "pred", ids=ids, run="../run")
    reconstruct(root / "pred", root / "recon", ReconstructOptions(generator="tiny", clip="tiny", steps=1,
                                                                  uncond="zeros", batch_size=64), progress=False)
    evaluate_reconstructions([root / "recon"], root / "eval", clip_model="tiny", metrics=["PixCorr"], n_boot=10)
    torch.set_num_threads(threads)
    return root / "eval"


def test_report_out_the_evaluation_folder_is_refused(cli, evaluation):
    before = tree_checksums(evaluation.parent)
    code, err = cli(["report", "--eval", evaluation, "--out", evaluation])
    assert_one_line_error(code, err, str(evaluation), "not a report")
    assert tree_checksums(evaluation.parent) == before
    assert sorted(p.name for p in evaluation.parent.iterdir()) == ["eval", "nsd", "pred", "prepared", "recon", "run"]


def test_report_out_an_existing_file_or_folder_is_refused(cli, evaluation, tmp_path):
    (tmp_path / "results.csv").write_text("keep")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<p>mine</p>")
    before = tree_checksums(tmp_path)
    for out in (tmp_path / "results.csv", tmp_path / "site"):
        code, err = cli(["report", "--eval", evaluation, "--out", out])
        assert_one_line_error(code, err, str(out))
        assert tree_checksums(tmp_path) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "site"]  # nothing renamed or added


def test_report_replaces_its_own_report(cli, evaluation, tmp_path):
    out = tmp_path / "report"
    out.mkdir()  # an empty folder may be used
    assert cli(["report", "--eval", evaluation, "--out", out, "--title", "Report A"]) == (0, "")
    assert "<title>Report A</title>" in (out / "index.html").read_text()
    assert cli(["report", "--eval", evaluation, "--out", out, "--title", "Report B"]) == (0, "")
    page = (out / "index.html").read_text()
    assert "<title>Report B</title>" in page and "Report A" not in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no hidden leftovers beside it



def _bad_predictions(path, what):
    ids = IDS.copy()
    image = np.random.default_rng(0).normal(size=(len(ids), 257, 32)).astype(np.float32)
    if what == "negative id":
        ids[1] = -1
    elif what == "repeated id":
        ids[3] = ids[0]
    return write_predictions(path, ids, {"image": image}, {"method": "ridge", "subject": 1, "split": "test"})


@pytest.mark.parametrize(("what", "words"), [
    ("negative id", ["stimulus_ids.npy", "-1"]),
    ("repeated id", ["stimulus_ids.npy", "repeated"]),
])
def test_impossible_ids_are_refused_before_any_image(cli, tmp_path, what, words):
    pred, out = tmp_path / "pred", tmp_path / "recon"
    _bad_predictions(pred, what)
    code, err = _reconstruct(cli, pred, out, "--steps", "2")
    assert_one_line_error(code, err, *words)
    assert not out.exists() or not list(out.glob("*.png"))


def test_non_finite_embeddings_never_become_images(tmp_path):
    """predict cannot write them, and reconstruct refuses them should they appear (e.g. written by other code)."""
    from types import SimpleNamespace

    from brainmclip.errors import InvalidInputError
    from brainmclip.generation.reconstruct import check_finite_predictions

    image = np.zeros((len(IDS), 4, 3), np.float32)
    image[2, 1, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN or inf; refusing"):
        write_predictions(tmp_path / "pred", IDS, {"image": image}, {"method": "ridge"})
    with pytest.raises(InvalidInputError, match=r"image\.npy: row 2 \(NSD id 42\) holds NaN or inf"):
        check_finite_predictions(SimpleNamespace(image=image, text=None, stimulus_ids=IDS), tmp_path)
    image[2, 1, 0] = 0.0
    check_finite_predictions(SimpleNamespace(image=image, text=np.ones((len(IDS), 2, 3)), stimulus_ids=IDS), tmp_path)


def test_more_ids_than_embedding_rows_is_refused(cli, tmp_path):
    pred, out = tmp_path / "pred", tmp_path / "recon"
    _bad_predictions(pred, "fine")
    np.save(pred / "stimulus_ids.npy", np.append(IDS, 99))  # as a hand-edited or mixed-up folder would hold
    manifest = json.loads((pred / "manifest.json").read_text())
    manifest.pop("checksums", None)  # a folder written before checksums were recorded
    (pred / "manifest.json").write_text(json.dumps(manifest))
    code, err = _reconstruct(cli, pred, out, "--steps", "2")
    assert_one_line_error(code, err, "image.npy", f"names {len(IDS) + 1} images")
