"""gt-layers: reconstructions from ground-truth CLIP conditions of single layers, ranges and the fused embedding."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from brainmclip.analysis.gt_layers import (
    Condition,
    build_conditions,
    condition_embeddings,
    parse_layer_ranges,
)
from brainmclip.cli import main
from brainmclip.data.prepare import PrepareOptions, prepare_subject


@pytest.fixture(scope="module")
def prepared(tiny_nsd, tmp_path_factory):
    out = tmp_path_factory.mktemp("gt_layers") / "prepared"
    return prepare_subject(tiny_nsd.root, 1, out, PrepareOptions(), progress=False).root


def test_parse_layer_ranges():
    assert parse_layer_ranges("11-20, 21-24") == [tuple(range(11, 21)), (21, 22, 23, 24)]
    assert parse_layer_ranges("12,1,12", single=True) == [(12,), (1,)]  # order kept, duplicates dropped
    assert parse_layer_ranges("7-7") == [(7,)]
    for bad in ("20-11", "0-3", "a-b", "5-", "1-2-3", "", " , "):
        with pytest.raises(ValueError, match="--ranges"):
            parse_layer_ranges(bad)
    with pytest.raises(ValueError, match="not valid"):
        parse_layer_ranges("11-20", "--layers", single=True)
    with pytest.raises(ValueError, match="past layer 24"):
        parse_layer_ranges("21-25", n_layers=24)


def _reference_condition(towers, hidden, layers):
    """Independent of the extractor: HF hidden states -> post_layernorm -> projection -> / CLS norm, averaged."""
    vision = towers.vision
    with torch.no_grad():
        tokens = [vision.visual_projection(vision.vision_model.post_layernorm(hidden[k])) for k in layers]
        return torch.stack([t / t[:, :1].norm(dim=-1, keepdim=True) for t in tokens]).mean(0).numpy()


def test_conditions_are_built_like_the_feature_store():
    from brainmclip.features.clip_extractor import ClipFeatureExtractor
    from brainmclip.features.clip_models import load_clip

    towers = load_clip("tiny")
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    pixels = ClipFeatureExtractor(towers).preprocess(images)
    with torch.no_grad():
        hidden = towers.vision.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    conditions = build_conditions([(3,)], [tuple(range(11, 21))], tuple(range(11, 21)), last=24)
    assert [c.label for c in conditions] == ["layer 3", "layers 11-20", "fused (11-20 + 24)"]
    single, ranged, fused = (condition_embeddings(towers, images, c) for c in conditions)
    np.testing.assert_allclose(single, _reference_condition(towers, hidden, [3]), atol=1e-5)
    np.testing.assert_allclose(ranged, _reference_condition(towers, hidden, range(11, 21)), atol=1e-5)
    semantic = _reference_condition(towers, hidden, [24])
    np.testing.assert_allclose(fused, (ranged + semantic) / 2, atol=1e-5)
    # CLS token of every layer's condition has unit norm (VD's normalisation)
    np.testing.assert_allclose(np.linalg.norm(single[:, 0], axis=-1), 1.0, atol=1e-5)
    # the other merge order averages hidden states first, which is a different condition
    other = condition_embeddings(towers, images, Condition("r", "r", tuple(range(11, 21))), "average-then-project")
    assert not np.allclose(other, ranged, atol=1e-3)


def test_end_to_end_with_the_miniature_models(prepared, tmp_path, capsys, fails):
    """The command with mini-CLIP and mini-VD on three test images, two steps; then a resumed rerun."""
    from PIL import Image

    from brainmclip.data.prepared import load_prepared
    from brainmclip.evaluation.image_metrics import evaluate_images

    out = tmp_path / "gt"
    argv = ["analyze", "gt-layers", "--data", str(prepared), "--clip", "mini", "--generator", "mini", "--out",
            str(out), "--layers", "24", "--ranges", "11-20", "--n-images", "3", "--show", "2", "--steps", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 conditions x 3 test images" in printed and "fused (11-20 + 24)" in printed

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["analysis"] == "gt_layers" and manifest["complete"] is True
    assert [r["condition"] for r in manifest["table"]] == ["layer 24", "layers 11-20", "fused (11-20 + 24)"]
    assert "Miniature world" in manifest["caption"]
    folders = sorted(p.name for p in (out / "images").iterdir() if p.is_dir())
    assert folders == ["fused11-20+24", "layer24", "layers11-20"]
    test = load_prepared(prepared).test
    ids = test.stimulus_ids[:3]
    pngs = {f: [out / "images" / f / f"nsd{int(i):05d}.png" for i in ids] for f in folders}
    assert all(p.is_file() for paths in pngs.values() for p in paths)
    with Image.open(out / "figure.png") as fig:
        assert fig.size[0] > 200 and fig.size[1] > 350  # 4 rows (truth + 3 conditions) of 2 images

    # the csv holds what the project's metric code gives for these PNGs and true images
    rows = {r["condition"]: r for r in csv.DictReader((out / "metrics.csv").open())}
    recon = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs["layer24"]])
    truth = np.stack([np.asarray(test.images[r]) for r in range(3)])
    ref = evaluate_images(recon, truth, metrics=("PixCorr", "SSIM", "CLIP"), clip_model="mini")
    assert float(rows["layer 24"]["PixCorr"]) == pytest.approx(ref.values["PixCorr"], abs=1e-4)
    assert float(rows["layer 24"]["SSIM"]) == pytest.approx(ref.values["SSIM"], abs=1e-4)
    assert float(rows["layer 24"]["CLIP 2-way (%)"]) == pytest.approx(100 * ref.values["CLIP"], abs=0.05)
    for r in rows.values():
        # 3 images: each recon wins 0, 1 or 2 of its 2 comparisons, so the mean is a multiple of 1/6
        assert float(r["CLIP 2-way (%)"]) == pytest.approx(100 / 6 * round(float(r["CLIP 2-way (%)"]) * 6 / 100), abs=0.05)

    # a rerun reuses every PNG and gives the same table
    stamps = {p: p.stat().st_mtime_ns for paths in pngs.values() for p in paths}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "manifest.json").read_text())["table"] == manifest["table"]
    # other settings must not mix with these images
    fails([*argv[:-1], "3"], "other settings .*steps")


def test_clear_errors(prepared, tmp_path, capsys, fails):
    base = ["analyze", "gt-layers", "--data", str(prepared), "--out", str(tmp_path / "o"), "--clip", "tiny",
            "--generator", "tiny"]
    fails([*base, "--ranges", "20-11"], "--ranges: '20-11' is not valid")
    fails([*base, "--layers", "30"], "--layers: '30' goes past layer 24")
    fails([*base, "--n-images", "1"], "at least 2 images")
    fails([*base, "--layers", "", "--ranges", "", "--fused", ""], "all empty")
    fails([*base[:3], str(tmp_path / "missing"), *base[4:]], "missing")
    # a generator made for another CLIP width fails before any image is made
    fails([*base[:-1], "mini", "--layers", "1", "--ranges", "", "--fused", "", "--n-images", "2"],
          "width 64 but the CLIP embeds in 32")
    assert not list((tmp_path / "o" / "images").glob("*/*.png"))
