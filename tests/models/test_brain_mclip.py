"""BrainMCLIP's modules, ablation switches and size."""

from __future__ import annotations

import re

import pytest
import torch

from brainmclip.cli import main
from brainmclip.config import list_configs, load_config
from brainmclip.losses.brain_mclip_objective import ObjectiveConfig, brain_mclip_objective
from brainmclip.models.brain_mclip import BrainMCLIP, BrainMCLIPConfig

ABLATIONS = [name for name in list_configs() if name.startswith("ablations/")]


def _batch(n=6, ns=11, nd=17, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"semantic": torch.randn(n, ns, generator=g), "detail": torch.randn(n, nd, generator=g),
            "image_semantic": torch.randn(n, 257, d, generator=g), "image_detail": torch.randn(n, 257, d, generator=g),
            "text": torch.randn(n, 77, d, generator=g)}


def _model(cfg: dict, ns=11, nd=17, d=8) -> BrainMCLIP:
    torch.manual_seed(0)
    return BrainMCLIP(BrainMCLIPConfig.from_dict({**cfg["model"], "hidden_dim": 16, "n_semantic_voxels": ns,
                                                  "n_detail_voxels": nd, "embed_dim": d}))


def test_full_model_outputs_and_cross_reconstruction():
    model = _model(load_config("brain_mclip_tiny"))
    b = _batch()
    out = model(b["semantic"], b["detail"])
    assert out.text.shape == (6, 77, 8) and out.image.shape == (6, 257, 8)
    torch.testing.assert_close(out.image, (out.image_semantic + out.image_detail) / 2)
    # The crossed decoders: the semantic code decodes into detail voxels and vice versa.
    assert {k: v[1] for k, v in out.reconstructions.items()} == {
        "text_self": "semantic", "image_semantic_self": "semantic", "image_detail_self": "detail",
        "cross_semantic_to_detail": "detail", "cross_detail_to_semantic": "semantic"}
    assert out.reconstructions["cross_semantic_to_detail"][0].shape == (6, 17)
    # Both image paths share one backbone and one decoder D_I.
    assert not hasattr(model, "image_semantic_head") and model.image_head.proj.out_features == 257 * 8


@pytest.mark.parametrize("head_rank", [0, 4])
def test_heads_start_at_the_target_mean(head_rank):
    model = _model({"model": {"head_rank": head_rank, "dropout": 0.0}})
    g = torch.Generator().manual_seed(1)
    means = {"text": torch.randn(77, 8, generator=g), "image_semantic": torch.randn(257, 8, generator=g),
             "image_detail": torch.randn(257, 8, generator=g)}
    model.start_at_mean(means)
    b = _batch(seed=2)
    out = model(b["semantic"], b["detail"])
    # Whatever the fMRI, the untrained model predicts the mean; the image head the mean of E_I.
    torch.testing.assert_close(out.text, means["text"].expand(6, 77, 8))
    torch.testing.assert_close(out.image, ((means["image_semantic"] + means["image_detail"]) / 2).expand(6, 257, 8))
    # ... and it still learns: the zeroed weights get gradients at once.
    loss, _ = brain_mclip_objective(out, b, b["semantic"], b["detail"], ObjectiveConfig())
    loss.backward()
    last = model.image_head.proj[-1] if head_rank else model.image_head.proj
    assert last.weight.grad.abs().sum() > 0 and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                                    if p.grad is not None)
    with pytest.raises(ValueError, match="head outputs"):
        model.text_head.start_at(torch.zeros(76, 8))


@pytest.mark.parametrize("branches,own", [(["text", "image_semantic"], "image_semantic"),
                                          (["text", "image_detail"], "image_detail")])
def test_single_path_ablations_start_at_their_own_target(branches, own):
    model = _model({"model": {"branches": branches, "dropout": 0.0}})
    g = torch.Generator().manual_seed(1)
    means = {"text": torch.randn(77, 8, generator=g), "image_semantic": torch.randn(257, 8, generator=g),
             "image_detail": 5 + torch.randn(257, 8, generator=g)}
    model.start_at_mean(means)
    b = _batch(seed=2)
    out = model(b["semantic"], b["detail"])
    torch.testing.assert_close(out.image, means[own].expand(6, 257, 8))
    # The objective judges the path against the same target: at the target itself the image MSE is 0.
    b[own] = out.image.detach().clone()
    _, parts = brain_mclip_objective(out, b, b["semantic"], b["detail"], ObjectiveConfig())
    assert parts["image/mse"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_each_ablation_is_one_switch_that_builds_and_learns(ablation):
    cfg = load_config(["brain_mclip_tiny", ablation])
    base = load_config("brain_mclip_tiny")
    changed = {k for k in cfg if cfg[k] != base[k]}
    # One section changes; the paper's own loss (MSE + CKA + Sims) is the default, so it changes none.
    assert changed <= {"model", "loss"} and len(changed) == (0 if ablation.endswith("mse_cka_sims") else 1)
    model = _model(cfg)
    loss_cfg = ObjectiveConfig.from_dict(cfg["loss"])
    b = _batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        out = model(b["semantic"], b["detail"])
        loss, parts = brain_mclip_objective(out, b, b["semantic"], b["detail"], loss_cfg)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    if ablation.endswith("text_only"):
        assert out.image is None and "reconstruction/cross_semantic_to_detail" not in parts
    if ablation.endswith("no_cross_reconstruction"):
        assert "reconstruction/cross_detail_to_semantic" not in parts and out.image is not None
    if ablation.endswith("loss_mse_infonce"):
        assert "image/infonce" in parts and "image/cka" not in parts


def test_default_size_matches_the_paper_within_20_percent(capsys):
    # nsd simulated preset, subject 1: 3,086 floc voxels (F_S) and 8,747 prf+floc voxels (F_D).
    assert main(["info", "--semantic-voxels", "3086", "--detail-voxels", "8747"]) == 0
    text = capsys.readouterr().out
    total = int(next(line for line in text.splitlines() if line.strip().startswith("total")).split()[1].replace(",", ""))
    assert 0.8 * 0.73e9 <= total <= 1.2 * 0.73e9
    # The count printed equals the parameters of the built model (independent count by hand):
    h, ns, nd, d = 2560, 3086, 8747, 768
    enc = lambda i: i * h + h + 2 * h  # noqa: E731 - Linear + LayerNorm
    dec = lambda o: h * o + o  # noqa: E731
    block = h * h + h + 2 * h
    by_hand = (enc(ns) + dec(ns) + 2 * block + h * 77 * d + 77 * d  # text branch
               + enc(ns) + dec(ns) + enc(nd) + dec(nd) + 2 * block + h * 257 * d + 257 * d)  # image branch
    assert total == by_hand


def test_low_memory_presets_are_smaller(capsys):
    sizes = {}
    for preset in ("brain_mclip_24gb", "brain_mclip_48gb"):
        main(["info", "--semantic-voxels", "3086", "--detail-voxels", "8747", "--config", "brain_mclip",
              "--config", preset])
        text = capsys.readouterr().out
        sizes[preset] = int(next(line for line in text.splitlines() if "total" in line).split()[1].replace(",", ""))
    assert sizes["brain_mclip_24gb"] < sizes["brain_mclip_48gb"] < 0.73e9


def test_config_errors():
    with pytest.raises(ValueError, match="branches"):
        BrainMCLIPConfig(branches=["audio"])
    with pytest.raises(ValueError, match="Unknown config"):
        load_config("no_such_config")
    with pytest.raises(ValueError, match="unknown key"):
        load_config("brain_mclip", ["train.epochz=3"])


@pytest.mark.parametrize("key, value, allowed", [
    ("hidden_dim", 0, "integer >= 1"),
    ("hidden_dim", 2.5, "integer >= 1"),
    ("embed_dim", True, "integer >= 1"),
    ("head_rank", -1, "integer >= 0"),
    ("dropout", float("nan"), "[0, 1)"),
    ("dropout", 1.0, "[0, 1)"),
    ("cross_reconstruction", "yes", "true or false"),
    ("branches", "text", "non-empty list"),
    ("branches", [], "non-empty list"),
])
def test_model_config_values_are_checked_when_built(key, value, allowed):
    with pytest.raises(ValueError, match=re.escape(f"model.{key}={value!r}: expected")) as caught:
        BrainMCLIPConfig.from_dict({key: value})
    assert allowed in str(caught.value)


@pytest.mark.parametrize("loss, message", [
    ({"reconstruction": float("inf")}, "loss.reconstruction=inf: expected a finite number >= 0"),
    ({"image_parts": "1"}, "loss.image_parts='1'"),
    ({"text": {"mse": "big"}}, "loss.text.mse='big': expected a finite number >= 0"),
    ({"image": {"temperature": 0}}, "loss.image.temperature=0: expected a finite number > 0"),
    ({"image": {"token_level_cka": 1}}, "loss.image.token_level_cka=1: expected true or false"),
    ({"image": {"msee": 1}}, "Unknown loss.image config keys ['msee']"),
    ({"text": [1]}, "config section loss.text=[1]"),
])
def test_loss_config_values_are_checked_when_built(loss, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ObjectiveConfig.from_dict(loss)


def test_config_files_must_hold_an_object(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list; expected an object"):
        load_config(str(tmp_path / "list.json"))
