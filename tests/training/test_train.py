"""Training, resuming and predicting BrainMCLIP on the tiny simulated NSD."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from brainmclip.cli import main
from brainmclip.evaluation.retrieval import similarity_matrix, top1_n_way
from brainmclip.features import open_feature_store
from brainmclip.models.predictions import load_predictions
from brainmclip.training.checkpoint import load_checkpoint
from brainmclip.training.loop import train_brain_mclip


def test_train_predict_and_retrieve_above_chance(tiny_data, tmp_path, capsys):
    data, features = tiny_data
    run = tmp_path / "run"
    assert main(["-q", "train", "--data", str(data), "--features", str(features), "--config", "brain_mclip_tiny",
                 "--set", "train.epochs=16", "--set", "train.patience=16", "--out", str(run)]) == 0
    assert "BrainMCLIP run" in capsys.readouterr().out
    assert main(["-q", "predict", "--run", str(run), "--split", "test"]) == 0
    pred = load_predictions(run / "predictions_test")
    store = open_feature_store(features)
    targets = store.get(pred.stimulus_ids)
    fused = (targets["image_semantic"] + targets["image_detail"]) / 2
    sim = similarity_matrix(np.asarray(pred.image, np.float32), fused)
    # 181 training images are few: top-1 among 40 is noisy, so check where the true image ranks.
    # Chance puts it at the 50th percentile of the candidates.
    percentile = np.mean([(sim[i] < sim[i, i]).sum() / (len(sim) - 1) for i in range(len(sim))])
    assert percentile > 0.65
    # Better than the constant mean prediction on held-out images (R^2 over all target elements > 0).
    flat, truth = np.asarray(pred.image, np.float64).reshape(len(pred), -1), fused.reshape(len(pred), -1)
    r2 = 1 - ((flat - truth) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum()
    assert r2 > 0.2, r2
    assert top1_n_way(sim, n_way=len(pred), n_repeats=1)["image_retrieval"]["mean"] >= 1 / len(pred)
    assert pred.text.shape[1:] == (77, 32) and pred.manifest["method"] == "brain_mclip"
    state = load_checkpoint(run / "checkpoint_last.pt")  # weights-only load works
    assert state["config"]["model"]["hidden_dim"] == 128 and state["identities"]["features"]["format"]
    assert list((run / "tensorboard").glob("events.*"))


def test_target_means_weight_rows_like_training(tiny_data):
    from brainmclip.data.prepared import load_prepared
    from brainmclip.training.data import PairedSplit

    data, features = tiny_data
    store = open_feature_store(features)
    split = PairedSplit(load_prepared(data), "train", store)
    means = split.target_means(batch_size=7)  # several partial batches
    rows = store.get(split.stimulus_ids)  # one row per training row, repeats included
    for name, value in rows.items():
        np.testing.assert_allclose(means[name].numpy(), value.astype(np.float64).mean(0), rtol=0, atol=1e-6)


def test_resume_mid_epoch_gives_the_uninterrupted_result(tiny_data, tmp_path):
    data, features = tiny_data
    overrides = ["train.epochs=2", "train.checkpoint_every=1000", "model.hidden_dim=32"]
    full = train_brain_mclip(data, features, ["brain_mclip_tiny"], tmp_path / "full", overrides=overrides,
                             progress=False)
    part = train_brain_mclip(data, features, ["brain_mclip_tiny"], tmp_path / "part", overrides=overrides,
                             stop_after_steps=3, progress=False)
    assert not part.finished and part.steps == 3  # stopped inside epoch 0 (5 batches per epoch)
    resumed = train_brain_mclip(data, features, None, tmp_path / "part", resume=True, progress=False)
    assert resumed.steps == full.steps and resumed.finished
    a = load_checkpoint(tmp_path / "full" / "checkpoint_last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint_last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="--resume"):
        train_brain_mclip(data, features, ["brain_mclip_tiny"], tmp_path / "full", progress=False)


@pytest.mark.slow
def test_two_processes_train_together(tiny_data, tmp_path):
    data, features = tiny_data
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "brainmclip.cli", "-q", "train",
           "--data", str(data), "--features", str(features), "--config", "brain_mclip_tiny", "--set",
           "train.epochs=2", "--out", str(tmp_path / "ddp"), "--cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    state = load_checkpoint(tmp_path / "ddp" / "checkpoint_last.pt")
    # Each process takes its own 32 rows: a global batch of 64, so 3 steps per epoch over 181
    # training rows instead of 5 for one process.
    assert state["progress"]["finished"] and state["progress"]["step"] == 2 * 3


def test_killed_run_resumes_from_its_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    """A crash (no graceful stop) mid-epoch: resume from the periodic checkpoint, same final weights."""
    from brainmclip.training import data as data_module

    data, features = tiny_data
    overrides = ["train.epochs=2", "train.checkpoint_every=2", "model.hidden_dim=32"]
    full = train_brain_mclip(data, features, ["brain_mclip_tiny"], tmp_path / "full", overrides=overrides,
                             progress=False)
    real_fetch = data_module.PairedSplit.fetch
    calls = {"n": 0}

    def crashing(self, rows, targets=data_module.TARGETS):
        calls["n"] += 1
        if calls["n"] == 4:  # inside step 4 of epoch 0; the last checkpoint is at step 2
            raise KeyboardInterrupt
        return real_fetch(self, rows, targets)

    monkeypatch.setattr(data_module.PairedSplit, "fetch", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_brain_mclip(data, features, ["brain_mclip_tiny"], tmp_path / "crash", overrides=overrides,
                          progress=False)
    monkeypatch.setattr(data_module.PairedSplit, "fetch", real_fetch)
    assert load_checkpoint(tmp_path / "crash" / "checkpoint_last.pt")["progress"]["step"] == 2
    resumed = train_brain_mclip(data, features, None, tmp_path / "crash", resume=True, progress=False)
    assert resumed.steps == full.steps
    a = load_checkpoint(tmp_path / "full" / "checkpoint_last.pt")["model"]
    b = load_checkpoint(tmp_path / "crash" / "checkpoint_last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_single_trial_outputs_are_averaged_per_image():
    from brainmclip.training.predict import average_by_stimulus

    ids = np.array([7, 3, 7, 5, 3, 7])
    values = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
    out_ids, out = average_by_stimulus(ids, {"image": values})
    np.testing.assert_array_equal(out_ids, [7, 3, 5])  # order of first appearance
    np.testing.assert_allclose(out["image"][:, 0, 0], [(0 + 2 + 5) / 3, (1 + 4) / 2, 3])


def test_bf16_autocast_trains_to_the_float32_validation_loss(tiny_data, tmp_path):
    """GPU training runs under bf16 autocast; on CPU, 'bf16-always' runs the same autocast path."""
    data, features = tiny_data
    quick = ["train.epochs=6", "train.patience=6", "train.select_on=\"loss\""]
    fp32 = train_brain_mclip(data, features, ["brain_mclip_tiny"], tmp_path / "fp32", progress=False,
                             overrides=[*quick, "train.mixed_precision=\"no\""], cpu=True)
    bf16 = train_brain_mclip(data, features, ["brain_mclip_tiny"], tmp_path / "bf16", progress=False,
                             overrides=[*quick, "train.mixed_precision=\"bf16-always\""], cpu=True)
    assert bf16.best_val_loss == pytest.approx(fp32.best_val_loss, rel=0.02)
    # The run really trained under autocast: its weights differ from the float32 run's.
    a = torch.load(tmp_path / "fp32" / "checkpoint_last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "bf16" / "checkpoint_last.pt", weights_only=True)["model"]
    assert not torch.equal(a["image_head.proj.weight"], b["image_head.proj.weight"])
