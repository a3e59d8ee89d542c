"""mini-CLIP's building blocks: the subset tokenizer, growing the vision tower, patch labels, the training command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from brainmclip.features.tokenizer import (
    build_subset_vocab,
    load_clip_tokenizer,
    save_tokenizer_files,
    tokenize,
)
from brainmclip.miniature.clip import (
    MiniClipConfig,
    build_mini_clip,
    grow_vision_tower,
    load_miniature_config,
    patch_labels,
)
from brainmclip.miniature.world import build_bank, caption_vocabulary


@pytest.fixture(scope="module")
def subset_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    vocab, merges = build_subset_vocab(caption_vocabulary(300))
    save_tokenizer_files(folder, vocab, merges, 32)
    return load_clip_tokenizer(folder, model_max_length=32), vocab


def test_subset_vocab_splits_captions_like_full_clip(subset_tokenizer):
    tokenizer, vocab = subset_tokenizer
    full = load_clip_tokenizer()
    assert len(vocab) < 1000
    captions = [c for caps in build_bank(40, stream="heldout", size=16).captions for c in caps]
    texts = captions + ["A photo of a zebra!", "a dog"]
    ids, eos = tokenize(tokenizer, texts, 32)
    full_ids, full_eos = tokenize(full, texts, 77)
    inverse = {i: t for t, i in vocab.items()}
    full_inverse = {i: t for t, i in full.get_vocab().items()}
    for k, text in enumerate(captions):
        mine = [inverse[i] for i in ids[k, :eos[k] + 1].tolist()]
        theirs = [full_inverse[i] for i in full_ids[k, :full_eos[k] + 1].tolist()]
        assert mine == theirs, text
    # words the subset does not know still tokenise, into smaller pieces
    zebra = [inverse[i] for i in ids[-2, :eos[-2] + 1].tolist()]
    assert "".join(zebra) == "<|startoftext|>a</w>photo</w>of</w>a</w>zebra</w>!</w><|endoftext|>"
    assert "zebra</w>" not in zebra and "photo</w>" not in zebra
    assert eos.max() < 32


def test_grown_tower_computes_the_same_function():
    cfg = MiniClipConfig.from_dict(load_miniature_config("clip"))
    vocab, _ = build_subset_vocab(["dog"])
    small = build_mini_clip(cfg, vocab, vision_layers=3).eval()
    with torch.no_grad():
        for p in small.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grown = grow_vision_tower(small, 12).eval()
    assert grown.config.vision_config.num_hidden_layers == 12
    x = torch.randn(3, 3, 64, 64)
    a = small.vision_model(pixel_values=x, output_hidden_states=True)
    b = grown.vision_model(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=1e-6)
    for k in range(1, 4):  # old block k's output is the grown model's layer 4k
        torch.testing.assert_close(a.hidden_states[k], b.hidden_states[4 * k], rtol=0, atol=1e-6)
    # the text tower is untouched
    ids = torch.tensor([[vocab["<|startoftext|>"], vocab["<|endoftext|>"]]])
    torch.testing.assert_close(small.get_text_features(input_ids=ids).pooler_output,
                               grown.get_text_features(input_ids=ids).pooler_output)
    with pytest.raises(ValueError, match="multiple"):
        grow_vision_tower(small, 10)


def test_patch_labels_hand_computed():
    maps = np.full((1, 16, 16), -1, np.int8)
    maps[0, 0:8, 0:8] = 4           # patch (0, 0): fully category 4
    maps[0, 0:2, 8:16] = 7          # patch (0, 1): 16 of 64 pixels = 25% of category 7
    maps[0, 8:9, 0:5] = 2           # patch (1, 0): 5 pixels = 7.8% -> background
    maps[0, 8:16, 8:12] = 1         # patch (1, 1): 32 pixels of 1 ...
    maps[0, 8:16, 12:16] = 3        # ... and 32 of 3: a tie goes to the lower category
    labels = patch_labels(maps, patch=8, min_cover=0.15)
    assert labels.tolist() == [[5, 8, 0, 2]]
    assert patch_labels(maps, patch=8, min_cover=0.3).tolist() == [[5, 0, 0, 2]]


@pytest.mark.slow
def test_training_command_runs_and_resumes(tmp_path):
    """A few steps of both stages through the CLI; the export loads as an ordinary CLIP folder with 24 blocks."""
    from brainmclip.cli import main
    from brainmclip.features.clip_models import load_clip

    stages = [{"vision_layers": 6, "steps": 2, "lr": 0.002, "warmup_steps": 1},
              {"vision_layers": 24, "steps": 2, "lr": 0.0005, "warmup_steps": 1}]
    args = ["-q", "miniature", "train", "clip", "--out", str(tmp_path / "clip"), "--set",
            f"train.stages={json.dumps(stages)}", "--set", "bank.n_scenes=200", "--set", "train.batch_size=16",
            "--quality-scenes", "20"]
    assert main(args) == 0
    folder = tmp_path / "clip" / "model"
    card = json.loads((folder / "model_card.json").read_text())
    assert card["seed"] == 0 and set(card["checksums"]) >= {"model.safetensors", "vocab.json", "merges.txt"}
    assert card["quality"]["heldout_scenes"] == 20 and "image_to_caption_top1_of_20" in card["quality"]
    towers = load_clip(str(folder))
    assert towers.n_vision_layers == 24 and towers.n_image_tokens == 65 and towers.context_length == 32
    # the rerun finds both stages finished and only exports again
    before = (tmp_path / "clip" / "checkpoints" / "clip-stage2.pt").stat().st_mtime_ns
    assert main(args) == 0
    assert (tmp_path / "clip" / "checkpoints" / "clip-stage2.pt").stat().st_mtime_ns == before
