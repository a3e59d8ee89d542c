"""Faults around `brainmclip train` and `predict`: impossible settings, unusable data, interrupted and concurrent runs.

A user's mistake stops with one line naming the setting or input and what is allowed, before
anything is written into --out; an interrupted run never leaves a folder that only hand-deleting
can unblock; two processes never write into one folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from faults import assert_one_line_error, tree_checksums

from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import OutputInTheWayError
from brainmclip.features.extract import extract_features
from brainmclip.training import data as data_module

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tiny_nsd, tmp_path_factory):
    """Subjects 1 and 2 prepared, one tiny-CLIP feature store for both."""
    base = tmp_path_factory.mktemp("training_faults")
    options = PrepareOptions()
    one = prepare_subject(tiny_nsd.root, 1, base / "subj01", options, progress=False)
    two = prepare_subject(tiny_nsd.root, 2, base / "subj02", options, progress=False)
    extract_features([one.root, two.root], base / "features", model="tiny", progress=False)
    return SimpleNamespace(nsd=tiny_nsd.root, data=one.root, other=two.root, features=base / "features", base=base)


def _train(inputs, out, *extra, data=None):
    """`brainmclip train` of a small BrainMCLIP (one epoch), or of ridge when ``extra`` says ``--method ridge``."""
    ridge = "ridge" in extra
    settings = [] if ridge else ["--config", "brain_mclip_tiny", "--set", "model.hidden_dim=32", "--set", "train.epochs=1"]
    return ["train", "--data", data or inputs.data, "--features", inputs.features, *settings, "--out", out, *extra]


# ------------------------------------------------------------------------------------ impossible settings

BAD_TRAIN_SETTINGS = [
    (["--set", "train.batch_size=-4"], ["train.batch_size=-4", "integer >= 2"]),
    (["--set", "model.hidden_dim=0"], ["model.hidden_dim=0", "integer >= 1"]),
    (["--set", "train.epochs=abc"], ["train.epochs='abc'", "integer >= 1"]),
    (["--set", "train.max_lr=nan"], ["train.max_lr='nan'", "finite number > 0"]),
    (["--set", "train.max_lr=NaN"], ["train.max_lr=nan", "finite number > 0"]),
    (["--set", "train.grad_accum=0"], ["train.grad_accum=0", "integer >= 1"]),
    (["--set", "train.seed=1.5"], ["train.seed=1.5", "integer >= 0"]),
    (["--set", "train.patience=true"], ["train.patience=True", "integer >= 1"]),
    (["--set", "train.lr_factor=1"], ["train.lr_factor=1", "(0, 1)"]),
    (["--set", "train.schedule=cosine"], ["train.schedule='cosine'", "plateau"]),
    (["--set", "model.dropout=1.5"], ["model.dropout=1.5", "[0, 1)"]),
    (["--set", "model.branches=\"text\""], ["model.branches='text'", "image_detail"]),
    (["--set", "loss.image.cka=-1"], ["loss.image.cka=-1", ">= 0"]),
    (["--set", "loss.reconstruction=\"x\""], ["loss.reconstruction='x'", "finite number"]),
    (["--config", "LIST_CONFIG"], ["list.json", "JSON list", "object"]),
    (["--config", "SECTION_CONFIG"], ["trian", "known"]),
    (["--stop-after-steps", "0"], ["stop_after_steps=0", "integer >= 1"]),
    (["--resume", "--force"], ["--resume", "--force"]),
    (["--method", "ridge", "--set", "ridge.n_folds=1"], ["ridge.n_folds=1", "integer >= 2"]),
    (["--method", "ridge", "--set", "ridge.alphas=[]"], ["ridge.alphas=[]", "non-empty list"]),
    (["--method", "ridge", "--resume"], ["--resume", "ridge"]),
]


@pytest.mark.parametrize("extra, words", BAD_TRAIN_SETTINGS, ids=[" ".join(e) for e, _ in BAD_TRAIN_SETTINGS])
def test_impossible_settings_stop_before_anything_is_written(cli, inputs, tmp_path, extra, words):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "section.json").write_text('{"trian": {"epochs": 2}}')
    extra = [{"LIST_CONFIG": str(tmp_path / "list.json"), "SECTION_CONFIG": str(tmp_path / "section.json")}.get(a, a)
             for a in extra]
    out = tmp_path / "runs" / "run"
    assert_one_line_error(*cli(_train(inputs, out, *extra)), *words)
    assert not (tmp_path / "runs").exists()


BAD_OPTIONS = [
    (["evaluate", "--recon", "RECON", "--out", "OUT", "--clip", "tiny", "--allow-random-metric-nets", "--bootstrap", "0"],
     ["--bootstrap 0", "at least 1"]),
    (["reconstruct", "--pred", "PRED", "--out", "OUT", "--generator", "tiny", "--clip", "tiny", "--steps", "1",
      "--size", "32", "--guidance-scale", "nan"], ["guidance_scale=nan", "finite"]),
    (["ablate", "--data", "DATA", "--features", "FEATURES", "--out", "OUT", "--bootstrap", "0"], ["--bootstrap 0"]),
    (["ablate", "--data", "DATA", "--features", "FEATURES", "--out", "OUT", "--set", "train.epochs=0"],
     ["train.epochs=0"]),
    (["sweep", "--data", "DATA", "--features", "FEATURES", "--out", "OUT", "--grid", "train.max_lr=0.001,-1"],
     ["train.max_lr=-1", "> 0"]),
]


@pytest.mark.parametrize("argv, words", BAD_OPTIONS, ids=[a[0] + " " + " ".join(a[-2:]) for a, _ in BAD_OPTIONS])
def test_impossible_options_of_other_commands(cli, inputs, reconstructed, tmp_path, argv, words):
    places = {"RECON": reconstructed, "PRED": reconstructed.parent / "predictions_test", "OUT": tmp_path / "out",
              "DATA": inputs.data, "FEATURES": inputs.features}
    assert_one_line_error(*cli([places.get(a, a) for a in argv]), *words)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ unusable data


def _no_val(inputs, tmp_path):
    return prepare_subject(inputs.nsd, 1, tmp_path / "no_val", PrepareOptions(images=False, val_size=0),
                           progress=False).root


def _nan_row(inputs, tmp_path):
    data = tmp_path / "nan_row"
    shutil.copytree(inputs.data, data)
    betas = np.load(data / "train" / "betas.npy")
    betas[3] = np.nan
    np.save(data / "train" / "betas.npy", betas)
    manifest = json.loads((data / "manifest.json").read_text())
    if "train/betas.npy" in manifest.get("checksums", {}):  # the NaN is in the data as prepared, not damage
        from brainmclip.integrity import file_checksum

        manifest["checksums"]["train/betas.npy"] = file_checksum(data / "train" / "betas.npy")
        (data / "manifest.json").write_text(json.dumps(manifest))
    return data


@pytest.mark.parametrize("make, method, words", [
    (_no_val, "brain_mclip", ["val split has 0 rows", "--val-size"]),
    (_nan_row, "brain_mclip", ["train split", "row 3", "NaN"]),
    (_nan_row, "ridge", ["train split", "row 3", "NaN"]),
], ids=["no validation rows", "NaN fMRI row", "NaN fMRI row, ridge"])
def test_unusable_data_stops_before_anything_is_written(cli, inputs, tmp_path, make, method, words):
    data = make(inputs, tmp_path)
    out = tmp_path / "run"
    assert_one_line_error(*cli(_train(inputs, out, "--method", method, data=data)), *words)
    assert not out.exists()


@pytest.fixture(scope="module")
def trained(inputs):
    from brainmclip.training.loop import train_brain_mclip

    run = inputs.base / "run"
    train_brain_mclip(inputs.data, inputs.features, ["brain_mclip_tiny"], run, progress=False,
                      overrides=["model.hidden_dim=32", "train.epochs=1"])
    return run


@pytest.fixture(scope="module")
def reconstructed(trained):
    """The trained run's test predictions (RUN/predictions_test), reconstructed small by the tiny generator."""
    from brainmclip.generation.reconstruct import ReconstructOptions, reconstruct
    from brainmclip.training.predict import predict

    options = ReconstructOptions(generator="tiny", clip="tiny", steps=1, size=32, batch_size=20)
    return reconstruct(predict(trained), trained / "reconstructions_test", options, progress=False).root


def test_predict_from_another_subjects_data_names_both(cli, inputs, trained, tmp_path):
    ours, theirs = load_prepared(inputs.data, images=False).voxels, load_prepared(inputs.other, images=False).voxels
    assert len(ours.group("semantic")) != len(theirs.group("semantic"))
    code, err = cli(["predict", "--run", trained, "--data", inputs.other, "--out", tmp_path / "pred"])
    assert_one_line_error(code, err, str(trained), str(inputs.other), "subject 1", "subject 2",
                          f"{len(ours.group('semantic'))} semantic", f"{len(theirs.group('semantic'))} and")
    assert not (tmp_path / "pred").exists()


# ------------------------------------------------------------------------------------------ interruptions


@pytest.fixture
def interrupted(cli, inputs, tmp_path, monkeypatch):
    """A run stopped by Ctrl-C in its first step: run.json, train.log and tensorboard/, no checkpoint."""
    real = data_module.PairedSplit.fetch

    def interrupt(self, rows, targets=data_module.TARGETS):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(data_module.PairedSplit, "fetch", interrupt)
    code, err = cli(_train(inputs, out))
    monkeypatch.setattr(data_module.PairedSplit, "fetch", real)
    assert code == 130 and "--resume" in err, err
    assert (out / "run.json").is_file() and not (out / "checkpoint_last.pt").exists()
    return out


@pytest.mark.parametrize("extra, expected", [
    ([], 0),
    (["--resume"], 0),
    (["--set", "train.seed=3"], ["holds the start of another run", "train.seed", "--force"]),
    (["--set", "train.seed=3", "--force"], 0),
], ids=["same command", "with --resume", "other settings", "other settings with --force"])
def test_run_interrupted_before_its_first_checkpoint_is_not_stuck(cli, inputs, interrupted, extra, expected):
    code, err = cli(_train(inputs, interrupted, *extra))
    if expected == 0:
        assert (code, err) == (0, "")
        assert (interrupted / "checkpoint_last.pt").is_file()
    else:
        assert_one_line_error(code, err, *expected)


def test_force_deletes_only_what_train_wrote(cli, inputs, tmp_path):
    out = tmp_path / "run"
    assert cli(_train(inputs, out)) == (0, "")
    assert cli(["predict", "--run", out]) == (0, "")
    (out / "notes.txt").write_text("mine")
    (out / "tensorboard" / "mine.txt").write_text("mine too")
    assert_one_line_error(*cli(_train(inputs, out)), "--resume", "--force")
    assert cli(_train(inputs, out, "--set", "train.seed=5", "--force")) == (0, "")
    assert (out / "notes.txt").read_text() == "mine" and (out / "tensorboard" / "mine.txt").is_file()
    assert not (out / "predictions_test").exists()  # predictions of the replaced weights
    assert len(list((out / "tensorboard").glob("events.*"))) == 1


def test_a_damaged_checkpoint_names_force_and_force_starts_again(cli, inputs, tmp_path):
    """The error's advice works: after a damaged checkpoint, train --force starts the run afresh."""
    out = tmp_path / "run"
    assert cli(_train(inputs, out)) == (0, "")
    checkpoint = out / "checkpoint_last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-200])
    assert_one_line_error(*cli(_train(inputs, out, "--resume")), "checkpoint_last.pt", "--force")
    assert cli(_train(inputs, out, "--force")) == (0, "")
    assert cli(["predict", "--run", out]) == (0, "")


def test_resume_with_nothing_to_resume_says_what_to_do(cli, inputs, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data", inputs.data, "--features", inputs.features, "--out", out, "--resume"]
    assert_one_line_error(*cli(argv), "nothing to resume", "without --resume", "--config")
    assert not out.exists()
    # Named config: the run starts (a job script that always passes --resume works from the first submission).
    assert cli(argv + ["--config", "brain_mclip_tiny", "--set", "model.hidden_dim=32", "--set", "train.epochs=1"]) \
        == (0, "")


@pytest.mark.parametrize("argv, target, words", [
    (["train", "--data", "D", "--features", "F", "--out", "O"], "brainmclip.training.loop.train_brain_mclip",
     ["rerun it with --resume added"]),
    (["train", "--data", "D", "--features", "F", "--out", "O", "--resume"], "brainmclip.training.loop.train_brain_mclip",
     ["rerun the same command to continue"]),
    (["train", "--method", "ridge", "--data", "D", "--features", "F", "--out", "O"],
     "brainmclip.training.ridge_fit.train_ridge", ["rerun the same command to start it again"]),
    (["predict", "--run", "O"], "brainmclip.training.predict.predict", ["rerun the same command to start it again"]),
    (["prepare", "--nsd-root", "D", "--subject", "1", "--out", "O"], "brainmclip.data.prepare.prepare_subject",
     ["rerun the same command to resume"]),
], ids=["train", "train --resume", "train ridge", "predict", "prepare"])
def test_interrupt_message_says_what_continues_this_command(cli, monkeypatch, argv, target, words):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupt)
    code, err = cli(argv)
    assert code == 130 and err.count("\n") == 0 and "interrupted" in err, err
    for word in words:
        assert word in err, err


# ------------------------------------------------------------------------------------------ concurrency

HOLDER = """
import sys
from brainmclip.atomic import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held(tmp_path):
    """``held(folder)``: another process holds the output lock of ``folder`` until the test ends; returns its pid."""
    holders = []

    def hold(folder) -> int:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        holders.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc.pid

    yield hold
    for proc in holders:
        proc.stdin.close()
        proc.wait(timeout=60)


@pytest.mark.parametrize("command", ["train", "train ridge", "prepare", "predict"])
def test_a_second_writer_into_one_folder_is_refused(cli, inputs, trained, tmp_path, held, command):
    out = tmp_path / "out"
    argv = {"train": _train(inputs, out),
            "train ridge": _train(inputs, out, "--method", "ridge"),
            "prepare": ["prepare", "--nsd-root", inputs.nsd, "--subject", "1", "--no-images", "--out", out],
            "predict": ["predict", "--run", trained, "--out", out]}[command]
    pid = held(out)
    before = tree_checksums(out)
    assert_one_line_error(*cli(argv), str(out), "another brainmclip process", f"pid {pid}", "--out")
    assert tree_checksums(out) == before


def test_output_lock_is_released_and_leaves_nothing(tmp_path):
    from brainmclip.atomic import LOCK_FILE, output_lock

    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), output_lock(out):
        assert (out / LOCK_FILE).is_file()
        raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()  # created for the lock only, removed again
    with output_lock(out), output_lock(out):  # a stage calling another on the same folder
        (out / "file").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["file"]
    (out / LOCK_FILE).write_text("12345\n")  # left by a killed process: not held, taken over
    with output_lock(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["file"]


def test_output_lock_refuses_a_held_folder(tmp_path, held):
    from brainmclip.atomic import output_lock

    pid = held(tmp_path / "out")
    with pytest.raises(OutputInTheWayError, match=f"pid {pid}"), output_lock(tmp_path / "out"):
        pass
