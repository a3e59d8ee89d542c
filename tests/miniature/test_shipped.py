"""The shipped miniature models: they load by name like real weights, match their model cards, and meet the quality
bars (fixed seeds, held-out scenes that no training and no simulated NSD uses)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from brainmclip.features.clip_models import load_clip
from brainmclip.generation.stable_diffusion import load_stable_diffusion
from brainmclip.generation.versatile_diffusion import load_versatile_diffusion
from brainmclip.miniature import MINIATURE_MODELS, model_folder, quality

MAX_SHIPPED_BYTES = 20 * 2**20


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


def test_cards_match_the_files_and_the_size_budget():
    total = 0
    for kind in MINIATURE_MODELS:
        folder = model_folder(kind)
        card = json.loads((folder / "model_card.json").read_text())
        assert card["command"].startswith("brainmclip miniature train") and card["seed"] == 0
        assert card["code_version"]["brainmclip"] and card["quality"]
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                       and p.name not in ("model_card.json", "README.md"))
        assert files == sorted(card["checksums"]), kind
        for name, digest in card["checksums"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, f"{kind}/{name}"
        weights = [p for p in folder.rglob("*.safetensors")]
        assert weights, kind
        from safetensors import safe_open

        for path in weights:
            with safe_open(path, "pt") as f:
                dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
                assert dtypes == {"F16"}, (path, dtypes)
        total += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= MAX_SHIPPED_BYTES, f"{total / 2**20:.1f} MB shipped"


def test_load_by_name_with_the_real_loaders():
    towers = load_clip("mini")
    assert towers.n_vision_layers == 24 and towers.n_image_tokens == 65 and towers.context_length == 32
    assert towers.embed_dim == 64 and next(towers.vision.parameters()).dtype == torch.float32
    # the same folder given as a path loads the same weights (what a user with a copy of the folder does)
    again = load_clip(str(model_folder("clip")))
    torch.testing.assert_close(again.vision.visual_projection.weight, towers.vision.visual_projection.weight)
    vd = load_versatile_diffusion("mini")
    assert vd.embed_dim == towers.embed_dim
    sd = load_stable_diffusion("mini")
    assert sd.unet.config.cross_attention_dim == towers.text.config.hidden_size


@pytest.mark.slow
def test_mini_clip_quality_bars():
    result = quality.clip_quality("mini", n=500, n_probe=900)
    assert result["zero_shot_category_accuracy"] >= 0.90, result
    assert result["image_to_caption_top1_of_100"] >= 0.50, result
    probes = result["layer_probes"]
    # a hierarchy: category is read out far better late than early; position and colour are there from the start
    assert probes[24]["category"] > probes[1]["category"] + 0.4, probes
    # (600 fitting scenes here: colour at layer 4 is 0.47, chance 0.1; the card's 1,000-scene probes give 0.57)
    assert probes[1]["x"] > 0.25 and probes[4]["colour"] > 0.4, probes


@pytest.fixture(scope="module")
def vd_result():
    return quality.vd_quality("mini", "mini", n=100)


@pytest.mark.slow
def test_mini_vd_draws_what_the_embeddings_say(vd_result):
    # What the shipped mini-VD reaches from ground-truth embeddings (right background and colours, object shapes
    # mostly not): a wrong normalisation, swapped conditions or a broken scheduler drop 2-way towards 50% and PixCorr
    # towards 0.
    assert vd_result["clip_two_way"] >= 0.75, vd_result
    assert vd_result["pixcorr"] >= 0.45, vd_result


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not reached yet: the shipped mini-VD gets 2-way 0.83, category 0.15, PixCorr "
                   "0.66 from ground-truth embeddings; object shapes need a larger or longer-trained UNet")
def test_mini_vd_meets_the_quality_bars(vd_result):
    assert vd_result["clip_two_way"] >= 0.95, vd_result
    assert vd_result["category_agreement"] >= 0.80, vd_result
    assert vd_result["pixcorr"] >= 0.30, vd_result


@pytest.mark.slow
def test_mini_sd_draws_the_caption():
    # Text-only generation: the image matches its caption's scene (background, colours) far above chance (2-way 50%);
    # the shipped model reaches 2-way 0.83, PixCorr 0.61 (object shapes, like mini-VD's, mostly not: category 0.25).
    result = quality.sd_quality("mini", "mini", n=100)
    assert result["clip_two_way"] >= 0.75, result
    assert result["pixcorr"] >= 0.4, result


def test_mini_vd_rejects_embeddings_of_another_clip():
    vd = load_versatile_diffusion("mini")
    with pytest.raises(ValueError, match="expected"):
        vd.generate(np.zeros((1, 65, 32), np.float32), np.zeros((1, 32, 32), np.float32), num_inference_steps=1)
