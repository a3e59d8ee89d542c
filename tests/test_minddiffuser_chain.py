"""MindDiffuser end to end through the command line on the tiny simulated NSD, in the miniature world.

prepare -> extract-minddiffuser (mini-SD, mini-CLIP) -> train --method minddiffuser -> predict ->
reconstruct-minddiffuser (Stage 1 alone and Stage 1 + 2, on the first images) -> refine (the plug-in, over the
Stage 1 images) -> evaluate (rows under their own names, paired tests on the images both hold) -> report.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainmclip.cli import main
from brainmclip.generation.reconstruct import load_reconstructions

pytest.importorskip("diffusers")

FAST = ["--steps", "6", "--strength", "0.5", "--batch-size", "2"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one torch thread is faster and steadier."""


def _ok(*argv) -> None:
    args = ["-q", *map(str, argv)]
    assert main(args) == 0, args


def test_minddiffuser_chain(tiny_nsd, tmp_path):
    prepared, store, run = tmp_path / "prepared", tmp_path / "store", tmp_path / "run"
    _ok("prepare", "--nsd-root", tiny_nsd.root, "--subject", 1, "--out", prepared)
    _ok("extract-minddiffuser", "--data", prepared, "--sd", "mini", "--structural-clip", "mini", "--layers", "2",
        "--out", store)
    _ok("train", "--method", "minddiffuser", "--data", prepared, "--features", store, "--out", run,
        "--set", "ridge.n_folds=2", "--set", "ridge.alphas=[100,10000]")
    assert (run / "structural_masks.npz").is_file()
    _ok("predict", "--run", run)
    pred = run / "predictions_test"
    stage1, stage2, refined = tmp_path / "stage1", tmp_path / "stage2", tmp_path / "refined"
    _ok("reconstruct-minddiffuser", "--pred", pred, "--out", stage1, "--stage2-steps", "0", "--limit", "6", *FAST)
    _ok("reconstruct-minddiffuser", "--pred", pred, "--out", stage2, "--stage2-steps", "2", "--limit", "4", *FAST)
    _ok("refine", "--recon", stage1, "--pred", pred, "--out", refined, "--stage2-steps", "1", "--limit", "4", *FAST)
    every = load_reconstructions(stage1).stimulus_ids
    assert len(every) == 6 and load_reconstructions(stage2).stimulus_ids.tolist() == every[:4].tolist()
    manifest = json.loads((stage2 / "manifest.json").read_text())
    losses = [(r["structural_loss_start"], r["structural_loss_final"]) for r in manifest["images"].values()]
    assert len(losses) == 4 and all(np.isfinite(losses).all(1))

    _ok("evaluate", "--recon", stage1, stage2, refined, "--clip", "mini", "--allow-random-metric-nets",
        "--bootstrap", "50", "--out", tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = {r["method"]: r["n_images"] for r in metrics["runs"]}
    assert rows == {"minddiffuser_stage1": len(every), "minddiffuser": 4, "minddiffuser_stage1+MindDiffuser": 4}
    tests = metrics["paired_tests"]["subj01"]
    assert tests and all(t["n_images"] == 4 for t in tests)
    assert "Paired Wilcoxon" in (tmp_path / "eval" / "metrics.md").read_text()
    _ok("report", "--eval", tmp_path / "eval", "--out", tmp_path / "report")
    html = (tmp_path / "report" / "index.html").read_text()
    assert "MindDiffuser (Stage 1 only) + MindDiffuser" in html and "first 4 of the test images" in html

    # --common-images scores every row on the images all of them hold
    _ok("evaluate", "--recon", stage1, stage2, "--clip", "mini", "--allow-random-metric-nets", "--bootstrap", "20",
        "--common-images", "--out", tmp_path / "eval_common")
    common = json.loads((tmp_path / "eval_common" / "metrics.json").read_text())
    assert [r["n_images"] for r in common["runs"]] == [4, 4]

    # Two folders of one method and subject cannot both be rows: one line, exit 1, nothing written.
    assert main(["-q", "evaluate", "--recon", str(stage2), str(stage2), "--clip", "mini", "--allow-random-metric-nets",
                 "--out", str(tmp_path / "eval2")]) == 1
    assert not (tmp_path / "eval2" / "metrics.json").exists()
