"""Run settings are checked when the config is built, and a run folder is reused only when that is safe."""

from __future__ import annotations

import re

import pytest

from brainmclip.training.loop import TrainConfig, check_train_config, train_brain_mclip
from brainmclip.training.run_folder import clear_run_folder, differing_keys


@pytest.mark.parametrize("key, value, allowed", [
    ("epochs", 0, "integer >= 1"),
    ("epochs", "abc", "integer >= 1"),
    ("batch_size", -4, "integer >= 2"),
    ("batch_size", 1, "integer >= 2"),
    ("grad_accum", 0, "integer >= 1"),
    ("seed", 1.5, "integer >= 0"),
    ("seed", -1, "integer >= 0"),
    ("max_lr", float("nan"), "finite number > 0"),
    ("max_lr", 0, "finite number > 0"),
    ("weight_decay", float("inf"), "finite number >= 0"),
    ("pct_start", 1, "in (0, 1)"),
    ("lr_factor", 0, "in (0, 1)"),
    ("warmup_epochs", -1, "finite number >= 0"),
    ("max_steps", -1, "integer >= 0"),
    ("checkpoint_every", 0, "integer >= 1"),
    ("schedule", "cosine", "'plateau', 'onecycle'"),
    ("select_on", "best", "'score', 'loss'"),
])
def test_train_config_values_are_checked_when_built(key, value, allowed):
    with pytest.raises(ValueError, match=re.escape(f"train.{key}={value!r}: expected")) as caught:
        TrainConfig.from_dict({key: value})
    assert allowed in str(caught.value)


@pytest.mark.parametrize("cfg, message", [
    ({"train": 5}, "config section train=5"),
    ({"trian": {}}, "Unknown config sections ['trian']"),
    ({"method": "ridge"}, "needs 'brain_mclip'"),
    ({"data": {"semantic_group": 3}}, "data.semantic_group=3"),
    ({"data": {"voxels": "all"}}, "Unknown data config keys ['voxels']"),
    ({"model": {"hidden_dim": -1}}, "model.hidden_dim=-1"),
])
def test_a_run_config_is_checked_whole(cfg, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_train_config(cfg)


def test_differing_keys_name_dotted_paths():
    a = {"train": {"seed": 0, "epochs": 2}, "model": {"branches": ("text",)}}
    b = {"train": {"seed": 7, "epochs": 2}, "model": {"branches": ["text"]}, "loss": {"reconstruction": 1}}
    assert differing_keys(a, b) == ["loss.reconstruction", "train.seed"]


def test_clear_run_folder_deletes_only_what_training_wrote(tmp_path):
    for name in ("run.json", "train.log", "checkpoint_last.pt", ".checkpoint_last.pt.tmp-123", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_text("x")
    (tmp_path / "predictions_test").mkdir()
    (tmp_path / "predictions_test" / "manifest.json").write_text('{"format": "brainmclip-predictions/1"}')
    (tmp_path / "predictions_val").mkdir()  # not a prediction folder: no manifest
    assert clear_run_folder(tmp_path) == [".checkpoint_last.pt.tmp-123", "checkpoint_last.pt", "run.json",
                                          "tensorboard", "train.log"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "predictions_test", "predictions_val"]
    assert clear_run_folder(tmp_path, predictions=True) == ["predictions_test"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "predictions_val"]


def test_a_start_without_checkpoint_is_started_again(tiny_data, tmp_path, monkeypatch):
    """A run interrupted before its first checkpoint: the same call starts it again, another one is refused."""
    from brainmclip.training import data as data_module

    data, features = tiny_data
    overrides = ["train.epochs=1", "model.hidden_dim=32"]
    real = data_module.PairedSplit.fetch

    def interrupt(self, rows, targets=data_module.TARGETS):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_module.PairedSplit, "fetch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_brain_mclip(data, features, ["brain_mclip_tiny"], tmp_path / "run", overrides=overrides, progress=False)
    monkeypatch.setattr(data_module.PairedSplit, "fetch", real)
    assert (tmp_path / "run" / "run.json").is_file() and not (tmp_path / "run" / "checkpoint_last.pt").exists()
    with pytest.raises(FileExistsError, match=re.escape("differing: config.train.seed); pass --force")):
        train_brain_mclip(data, features, ["brain_mclip_tiny"], tmp_path / "run", overrides=[*overrides, "train.seed=4"],
                          progress=False)
    # resume=True without a checkpoint starts the run with the settings it was started with (config None is fine).
    result = train_brain_mclip(data, features, None, tmp_path / "run", resume=True, progress=False)
    assert result.finished and (tmp_path / "run" / "checkpoint_last.pt").is_file()
