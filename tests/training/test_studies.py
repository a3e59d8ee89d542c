"""Studies: a loss-weight sweep and an ablation table, end to end on the tiny simulated NSD."""

from __future__ import annotations

import csv
import json

import pytest

from brainmclip.analysis.common import find_analyses
from brainmclip.cli import main
from brainmclip.studies.sweep import grid_rows, parse_grid

QUICK = ["--set", "train.epochs=2", "--set", "model.hidden_dim=32"]


def test_grid_parsing_and_rows():
    grid = parse_grid(["loss.image.mse=1,10", "train.max_lr=0.001,fast"])
    assert grid == [("loss.image.mse", [1, 10]), ("train.max_lr", [0.001, "fast"])]
    rows = grid_rows(grid)
    assert len(rows) == 4 and rows[1].overrides == ("loss.image.mse=1", 'train.max_lr="fast"')
    assert rows[0].label == "image.mse=1 max_lr=0.001"
    with pytest.raises(ValueError, match="key.path=value"):
        parse_grid(["loss.image.mse"])


def test_sweep_trains_each_point_once_and_reports(tiny_data, tmp_path, capsys):
    data, features = tiny_data
    out = tmp_path / "sweep"
    args = ["-q", "sweep", "--data", str(data), "--features", str(features), "--out", str(out),
            "--grid", "loss.image.mse=1,100", *QUICK]
    assert main(args) == 0
    assert "image.mse=100" in capsys.readouterr().out
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["row"] for r in table] == ["image.mse=1", "image.mse=100"]
    for r in table:
        summary = json.loads(next((out / "rows").glob(f"{r['row']}/train_summary.json")).read_text())
        assert float(r["val_score"]) == pytest.approx(summary["val_score"])
        assert 0.0 <= float(r["val_score"]) <= 1.0 and summary["best_epoch"] in (0, 1)
        run = json.loads((out / "rows" / r["row"] / "run" / "run.json").read_text())
        assert run["config"]["loss"]["image"]["mse"] == float(r["row"].split("=")[1])
    # The weight moves the MSE term's share of the head gradient.
    assert float(table[1]["mse_share"]) > float(table[0]["mse_share"])
    (summary,) = find_analyses(out)
    assert summary["analysis"] == "sweep" and len(summary["table"]) == 2
    # Rerunning reads the finished rows back instead of training again.
    best = out / "rows" / "image.mse=1" / "run" / "model_best.safetensors"
    stamp = best.stat().st_mtime_ns
    assert main(args) == 0 and best.stat().st_mtime_ns == stamp


def test_ablation_table_3(tiny_data, tmp_path, capsys):
    data, features = tiny_data
    out = tmp_path / "ablate"
    assert main(["-q", "ablate", "--data", str(data), "--features", str(features), "--out", str(out), "--table", "3",
                 "--config", "brain_mclip_tiny", *QUICK, "--generator", "tiny", "--clip", "tiny", "--steps", "2",
                 "--allow-random-metric-nets", "--bootstrap", "50", "--metrics", "PixCorr,SSIM,CLIP"]) == 0
    printed = capsys.readouterr().out
    assert "Text Branch Only" in printed and "published" in printed
    folder = out / "table3"
    (summary,) = find_analyses(folder)
    labels = [(r["row"], r["source"]) for r in summary["table"]]
    assert labels[0] == ("Text Branch Only", "ours") and labels[1] == ("Text Branch Only", "published")
    assert len(labels) == 10 and (folder / "figure.png").stat().st_size > 10_000
    ours = {r["row"]: r for r in summary["table"] if r["source"] == "ours"}
    assert ours["Text Branch Only"]["p CLIP vs Ours"] != "" and ours[
        "Text + Image Semantic + Image Detail + Cross Reconstruction (Ours)"]["p PixCorr vs Ours"] == ""
    assert ours["Text Branch Only"]["InceptionV3"] == "" and "[" in ours["Text Branch Only"]["PixCorr"]
    published = [r for r in summary["table"] if r["source"] == "published"]
    assert published[0]["PixCorr"] == "0.065" and published[-1]["CLIP"] == "0.952"
    # The text-only row was reconstructed (from the text condition alone) and scored like the others.
    text_only = json.loads((out / "rows" / "text_only" / "subj01" / "evaluation" / "metrics.json").read_text())
    assert set(text_only["runs"][0]["metrics"]) >= {"PixCorr", "SSIM", "CLIP"}
    # The single-path rows were built with their one path.
    run = json.loads((out / "rows" / "text_image_detail" / "subj01" / "run" / "run.json").read_text())
    assert run["model_config"]["branches"] == ["text", "image_detail"]
