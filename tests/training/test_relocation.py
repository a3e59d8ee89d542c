"""Runs, predictions and reconstructions keep finding each other after their folder tree moves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from brainmclip.generation import reconstruct as recon_module
from brainmclip.generation.reconstruct import ReconstructOptions, load_reconstructions, reconstruct
from brainmclip.models.predictions import load_predictions
from brainmclip.paths import record_path, resolve_path
from brainmclip.training.ground_truth import write_ground_truth_run
from brainmclip.training.loop import train_brain_mclip
from brainmclip.training.predict import predict

FAST = dict(generator="tiny", clip="tiny", steps=2, batch_size=8, samples=2)


def test_record_and_resolve(tmp_path):
    base = tmp_path / "runs" / "a"
    assert record_path(tmp_path / "data" / "prep", base) == "../../data/prep"
    assert record_path(base / "pred", base) == "pred"
    assert resolve_path("../../data/prep", base) == (tmp_path / "data" / "prep").resolve()
    # Absolute values (what older manifests hold) are used as they are.
    assert resolve_path(str(tmp_path / "elsewhere"), base) == tmp_path / "elsewhere"
    # A relative base is taken from the working directory, like any relative path.
    assert not Path(record_path("x/y", "x")).is_absolute()


def _tree(tiny_data, root: Path) -> tuple[Path, Path]:
    data, features = tiny_data
    shutil.copytree(data, root / "prepared")
    shutil.copytree(features, root / "features")
    return root / "prepared", root / "features"


def test_moved_tree_still_predicts_and_reconstructs(tiny_data, tmp_path, one_thread):
    data, features = _tree(tiny_data, tmp_path / "old" / "project")
    run = write_ground_truth_run(data, features, tmp_path / "old" / "project" / "runs" / "gt")
    pred = predict(run, "val")
    recon = reconstruct(pred, run / "reconstructions_val", ReconstructOptions(**FAST), progress=False)
    recorded = json.loads((run / "run.json").read_text())
    assert (recorded["data"], recorded["features"]) == ("../../prepared", "../../features")
    assert load_predictions(pred).manifest["run"] == ".."
    assert recon.manifest["settings"]["predictions"] == "../predictions_val"

    shutil.move(tmp_path / "old" / "project", tmp_path / "new")
    shutil.rmtree(tmp_path / "old")
    run = tmp_path / "new" / "runs" / "gt"
    moved_pred = run / "predictions_val"
    # predict finds the prepared dataset and the feature store through run.json.
    again = predict(run, "val", run / "predictions_again")
    assert (load_predictions(again).stimulus_ids == load_predictions(moved_pred).stimulus_ids).all()
    # reconstruction folders find their predictions, best-of-N finds the run's feature store.
    loaded = load_reconstructions(run / "reconstructions_val")
    assert len(loaded) == len(recon) and all(p.is_file() for p in loaded.paths)
    layers = recon_module._target_layers(load_predictions(moved_pred), moved_pred)
    assert layers["semantic_layer"] == json.loads((tmp_path / "new" / "features" / "manifest.json").read_text())[
        "settings"]["extractor"]["semantic_layer"]
    # The same reconstruction run, rerun in its new place, is recognised as the same settings: nothing to redo.
    before = {p.name: p.stat().st_mtime_ns for p in (run / "reconstructions_val").glob("*.png")}
    reconstruct(moved_pred, run / "reconstructions_val", ReconstructOptions(**FAST), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (run / "reconstructions_val").glob("*.png")} == before


def test_old_absolute_manifests_still_match(tiny_data, tmp_path, one_thread):
    data, features = _tree(tiny_data, tmp_path)
    run = write_ground_truth_run(data, features, tmp_path / "runs" / "gt")
    pred = predict(run, "val")
    out = run / "recon"
    reconstruct(pred, out, ReconstructOptions(**{**FAST, "samples": 1}), progress=False)
    # Rewrite the manifests the way older versions wrote them: absolute paths.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["settings"].update(predictions=str(pred.resolve()), predictions_manifest=str(run.resolve()))
    (out / "manifest.json").write_text(json.dumps(manifest))
    pred_manifest = json.loads((pred / "manifest.json").read_text())
    (pred / "manifest.json").write_text(json.dumps({**pred_manifest, "run": str(run.resolve())}))
    run_json = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**run_json, "data": str(data.resolve()),
                                              "features": str(features.resolve())}))
    assert len(load_reconstructions(out)) == len(load_predictions(pred))
    predict(run, "val", tmp_path / "pred_again")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    reconstruct(pred, out, ReconstructOptions(**{**FAST, "samples": 1}), progress=False)  # same settings: no error
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before


def test_moved_run_resumes(tiny_data, tmp_path):
    data, features = _tree(tiny_data, tmp_path / "a")
    first = train_brain_mclip(data, features, ["brain_mclip_tiny"], tmp_path / "a" / "run", stop_after_steps=2,
                              overrides=["train.epochs=1"], cpu=True, progress=False)
    assert not first.finished
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = tmp_path / "b"
    result = train_brain_mclip(moved / "prepared", moved / "features", ["brain_mclip_tiny"], moved / "run",
                               resume=True, cpu=True, progress=False)
    assert result.steps > first.steps
    recorded = json.loads((moved / "run" / "run.json").read_text())
    assert resolve_path(recorded["data"], moved / "run") == (moved / "prepared").resolve()
