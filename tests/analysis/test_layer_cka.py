"""The layer x layer CKA map: numerics against independent references, its summary, and the command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmclip.analysis.common import load_analysis
from brainmclip.analysis.layer_cka import cka_map, stimulus_images, summarise
from brainmclip.cli import main
from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.prepared import load_prepared
from brainmclip.losses.cka import linear_cka


@pytest.fixture(scope="module")
def tiny_prepared(tiny_nsd, tmp_path_factory):
    base = tmp_path_factory.mktemp("layer_cka")
    return [prepare_subject(tiny_nsd.root, s, base / f"subj{s}", PrepareOptions(), progress=False).root
            for s in (1, 2)]


def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA from its feature-space form ||Yc' Xc||_F^2 / (||Xc' Xc||_F ||Yc' Yc||_F) (no Gram matrices)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_cka_map_matches_references():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(30, 8))
    feats = np.stack([
        base @ rng.normal(size=(8, 12)) + 5.0,             # a linear map of the base, shifted
        base @ rng.normal(size=(8, 12)),                   # another linear map: high CKA with layer 1
        np.tanh(base @ rng.normal(size=(8, 12))) * 1e3,    # nonlinear and on a large scale
        rng.normal(size=(30, 12)),                         # unrelated
    ]).astype(np.float32)
    cka = cka_map(feats)
    assert cka.shape == (4, 4) and cka.dtype == np.float64
    np.testing.assert_array_equal(cka, cka.T)
    np.testing.assert_allclose(np.diag(cka), 1.0)
    for i, j in [(0, 1), (0, 2), (1, 3), (2, 3)]:
        x, y = feats[i].astype(np.float64), feats[j].astype(np.float64)
        assert cka[i, j] == pytest.approx(_reference_cka(x, y), abs=1e-10)
        assert cka[i, j] == pytest.approx(float(linear_cka(torch.from_numpy(x), torch.from_numpy(y))), abs=1e-10)
    assert cka[0, 1] > 0.5 > cka[0, 3]
    # Invariant to isotropic scaling, orthogonal transforms and feature offsets, as CKA should be.
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    moved = np.stack([feats[0], 7.0 * feats[0] @ q - 3.0]).astype(np.float64)
    assert cka_map(moved)[0, 1] == pytest.approx(1.0, abs=1e-9)


def test_summary_finds_the_shift():
    # Two blocks of layers: 1-20 alike (0.9), 21-24 alike (0.95), 0.4 between them.
    n = 24
    cka = np.full((n, n), 0.4)
    cka[:20, :20] = 0.9
    cka[20:, 20:] = 0.95
    np.fill_diagonal(cka, 1.0)
    s = summarise(cka, (11, 20))
    assert s["shift_layer"] == 21 and s["shift_cka"] == pytest.approx(0.4)
    assert s["within_window"] == pytest.approx(0.9) and s["window_vs_late"] == pytest.approx(0.4)
    assert s["within_late"] == pytest.approx(0.95) and s["late_shift_layer"] == 21
    assert len(s["neighbour_cka"]) == 23
    with pytest.raises(ValueError, match="window 11-24"):
        summarise(cka, (11, 24))


def test_stimulus_images_pool_subjects_once(tiny_prepared):
    datasets = [load_prepared(p) for p in tiny_prepared]
    ids, images = stimulus_images(datasets, "test")
    shared = set(datasets[0].test.stimulus_ids) & set(datasets[1].test.stimulus_ids)
    assert len(ids) == len(set(ids)) == len(set(datasets[0].test.stimulus_ids) | set(datasets[1].test.stimulus_ids))
    assert len(shared) == 40  # the test images are NSD's shared ones: pooling two subjects adds none
    row = int(np.flatnonzero(datasets[0].test.stimulus_ids == ids[3])[0])
    np.testing.assert_array_equal(images[3], datasets[0].test.images[row])
    ids, _ = stimulus_images(datasets, "train", n_images=10)
    assert len(ids) == 10


def test_command_writes_the_analysis(tiny_prepared, tmp_path, capsys):
    out = tmp_path / "cka"
    argv = ["-q", "analyze", "layer-cka", "--data", str(tiny_prepared[0]), "--data", str(tiny_prepared[1]),
            "--clip", "mini", "--out", str(out), "--n-images", "30"]
    assert main(argv) == 0
    assert "mean CKA within layers 11-20" in capsys.readouterr().out
    summary = load_analysis(out)
    assert summary["analysis"] == "layer_cka" and summary["settings"]["n_images"] == 30
    assert summary["settings"]["subjects"] == [1, 2] and len(summary["table"]) == 6
    assert "paper" in summary["caption"] and "miniature" in summary["caption"]
    with np.load(out / "layer_cka.npz") as data:
        cka = data["cka"]
        assert cka.shape == (24, 24) and len(data["stimulus_ids"]) == 30
    np.testing.assert_allclose(cka, cka.T)
    np.testing.assert_allclose(np.diag(cka), 1.0)
    assert ((cka > 0) & (cka <= 1 + 1e-9)).all()
    lines = (out / "layer_cka.csv").read_text().splitlines()
    assert len(lines) == 25 and lines[0].startswith("layer,layer_1,")
    assert (out / "figure.png").stat().st_size > 10_000


def test_command_errors(tiny_prepared, tmp_path, capsys):
    args = ["analyze", "layer-cka", "--clip", "mini", "--out", str(tmp_path / "o")]
    assert main([*args, "--data", str(tiny_prepared[0]), "--data", str(tmp_path / "missing")]) == 1
    assert "no such prepared dataset folder" in capsys.readouterr().err
    assert main([*args, "--data", str(tiny_prepared[0]), "--window", "11-24"]) == 1
    assert "window 11-24" in capsys.readouterr().err
    assert main([*args, "--data", str(tiny_prepared[0]), "--split", "holdout"]) == 1
    assert "Unknown split='holdout'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--data", str(tiny_prepared[0]), "--window", "eleven"])
    assert "expected FIRST-LAST" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_building_the_cli_stays_light():
    """The CLI imports every analysis to build its parser: that must not pull in torch or matplotlib."""
    import subprocess
    import sys

    code = ("import argparse, sys\n"
            "from brainmclip.analysis import clip_layers, layer_cka, rsa\n"
            "for m in (rsa, layer_cka):\n"
            "    m.add_arguments(argparse.ArgumentParser())\n"
            "print(sorted(n for n in ('torch', 'transformers', 'matplotlib') if n in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
