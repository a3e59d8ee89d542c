"""`brainmclip evaluate` and `report` on the output of a real (tiny) chain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainmclip.cli import main
from brainmclip.data import nsd_paths


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The whole chain once (`brainmclip demo --tiny`), shared by the tests below."""
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["-q", "demo", "--tiny", "--out", str(out)]) == 0
    return out, printed.getvalue()


def test_demo_runs_every_stage(demo):
    tmp_path, printed = demo
    assert printed.startswith("brainmclip demo") and "subjects 1, 2" in printed
    assert nsd_paths.expdesign_path(tmp_path / "nsd").exists()
    assert (tmp_path / "prepared" / "subj01" / "manifest.json").exists()
    assert (tmp_path / "runs" / "subj02" / "brain_mclip" / "predictions_test").is_dir()
    assert len(list((tmp_path / "runs" / "subj01" / "ridge" / "reconstructions_test").glob("*.png"))) == 40


def test_demo_chain_evaluates_and_reports(demo):
    tmp_path, printed = demo
    # header, data line, one line per method (BrainMCLIP, GT-embedding upper bound, ridge), report path
    assert "report:" in printed and len(printed.strip().splitlines()) == 6 and "gt_embedding" in printed
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert {(r["subject"], r["method"]) for r in metrics["runs"]} == {
        (s, m) for s in (1, 2) for m in ("brain_mclip", "ridge", "gt_embedding")}
    for run in metrics["runs"]:
        assert len(run["metrics"]) == 8 and all(np.isfinite(v) for v in run["metrics"].values())
        # No metric network weights exist here: every network column must say so.
        assert set(run["uncalibrated"]) >= {"AlexNet(2)", "AlexNet(5)", "InceptionV3", "EffNet-B", "SwAV"}
        low, high = run["ci95"]["SSIM"]
        assert low <= run["metrics"]["SSIM"] <= high
        assert run["retrieval"]["image"]["top1_n_way"]["n_way"] == 40
        assert not run["reconstructions"].startswith("/") and not run["data"].startswith("/")  # relative to the folder
    assert metrics["paired_tests"]["subj01"] and metrics["published"]
    table = (tmp_path / "evaluation" / "metrics.md").read_text()
    assert "(published)" in table and "†" in table
    csv_rows = (tmp_path / "evaluation" / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].startswith("subject,method,PixCorr") and len(csv_rows) == 1 + 6 + 3
    html = (tmp_path / "report" / "index.html").read_text()
    assert "published" in html and "figures/" in html and "GT embedding (upper bound)" in html
    assert "mini-CLIP" in html  # the CLIP column names the network actually used
    # Rebuilding the report from the evaluation folder through the CLI works too.
    assert main(["-q", "report", "--eval", str(tmp_path / "evaluation"), "--out", str(tmp_path / "report2")]) == 0
    assert (tmp_path / "report2" / "index.html").exists()


def test_moved_runs_still_evaluate_and_report(demo, tmp_path):
    """Manifests record paths relative to themselves, so a whole tree can move (or be copied) elsewhere."""
    import shutil

    moved = tmp_path / "elsewhere" / "demo"
    shutil.copytree(demo[0], moved)
    from brainmclip.evaluation.evaluate import evaluate_reconstructions

    recon = moved / "runs" / "subj01" / "ridge" / "reconstructions_test"
    report = evaluate_reconstructions([recon], moved / "eval2", clip_model="mini", metrics=["PixCorr"], n_boot=20)
    entry = report["runs"][0]
    assert entry.retrieval["image"]["top1_n_way"]["n_way"] == 40  # predictions, run and features were found
    assert entry.scene_checks  # and the simulated NSD through the prepared dataset's relative nsd_root
    metrics = json.loads((moved / "eval2" / "metrics.json").read_text())
    assert metrics["runs"][0]["reconstructions"] == "../runs/subj01/ridge/reconstructions_test"
    assert main(["-q", "report", "--eval", str(moved / "evaluation"), "--out", str(moved / "report3")]) == 0
    page = (moved / "report3" / "index.html").read_text()
    assert "figures/subj01_grid.png" in page


def test_evaluate_refuses_missing_weights_without_the_flag(demo, tmp_path, capsys):
    recon = demo[0] / "runs" / "subj01" / "ridge" / "reconstructions_test"
    code = main(["-q", "evaluate", "--recon", str(recon), "--out", str(tmp_path / "e"), "--clip", "tiny"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "weights" in err.lower()
