"""CLIP features against an independent computation written directly on transformers' CLIP modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor

from brainmclip.features import ClipFeatureExtractor, load_clip, module_outputs, random_clip
from brainmclip.features.tokenizer import load_clip_tokenizer


@pytest.fixture(scope="module")
def towers():
    return random_clip("tiny")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # Odd, non-square sizes exercise the shortest-side resize and the centre crop.
    return rng.integers(0, 256, (3, 150, 190, 3), dtype=np.uint8)


def reference_pixels(images):
    """CLIP preprocessing by transformers' own (PIL-based) image processor."""
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return torch.as_tensor(processor(list(images), return_tensors="np")["pixel_values"])


def reference_layer(towers, pixels, k):
    """VD's formula for block k: post_layernorm -> visual_projection -> / ||projected CLS||."""
    with torch.no_grad():
        out = towers.vision(pixel_values=pixels, output_hidden_states=True)
        tokens = towers.vision.visual_projection(towers.vision.vision_model.post_layernorm(out.hidden_states[k]))
        return tokens / torch.linalg.vector_norm(tokens[:, 0], dim=-1)[:, None, None]


def test_preprocessing_matches_the_clip_image_processor(towers):
    rng = np.random.default_rng(1)
    # Square images (NSD's are 425 x 425): resize only, no crop ambiguity.
    square = rng.integers(0, 256, (2, 150, 150, 3), dtype=np.uint8)
    ours = ClipFeatureExtractor(towers).preprocess(square)
    ref = reference_pixels(square)
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    # torchvision's antialiased bicubic differs from PIL's by rounding only.
    assert (ours - ref).abs().mean() < 0.02
    # Non-square: the centre crop of an odd margin may sit one pixel apart (torchvision rounds,
    # transformers floors), so compare a smooth image.
    y, x = np.mgrid[0:150, 0:190]
    smooth = np.stack([x * 255 / 190, y * 255 / 150, (x + y) * 255 / 340], -1).astype(np.uint8)[None]
    assert (ClipFeatureExtractor(towers).preprocess(smooth) - reference_pixels(smooth)).abs().mean() < 0.03
    with pytest.raises(ValueError, match="uint8"):
        ClipFeatureExtractor(towers).preprocess(square.astype(np.float32) / 255)


@pytest.mark.parametrize("merge", ["project-then-average", "average-then-project"])
def test_image_embeddings_follow_the_vd_formula(towers, images, merge):
    extractor = ClipFeatureExtractor(towers, detail_layers=range(11, 21), semantic_layer=24, merge=merge)
    got = extractor.encode_images(images)
    pixels = extractor.preprocess(images)
    semantic = reference_layer(towers, pixels, 24)
    if merge == "project-then-average":
        detail = torch.stack([reference_layer(towers, pixels, k) for k in range(11, 21)]).mean(0)
    else:
        with torch.no_grad():
            hidden = towers.vision(pixel_values=pixels, output_hidden_states=True).hidden_states
            mean = torch.stack([hidden[k] for k in range(11, 21)]).mean(0)
            tokens = towers.vision.visual_projection(towers.vision.vision_model.post_layernorm(mean))
            detail = tokens / tokens[:, :1].norm(dim=-1, keepdim=True)
    assert got["image_semantic"].shape == (3, 257, 32)
    torch.testing.assert_close(got["image_semantic"], semantic, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["image_detail"], detail, rtol=1e-5, atol=1e-5)
    # The last layer is CLIP's own output: the projected pooled CLS of HF equals token 0 before normalising.
    with torch.no_grad():
        pooled = towers.vision(pixel_values=pixels).image_embeds
    torch.testing.assert_close(extractor.image_embeds(images), pooled)
    torch.testing.assert_close(got["image_semantic"][:, 0], pooled / pooled.norm(dim=-1, keepdim=True),
                               rtol=1e-5, atol=1e-5)


def test_the_two_merge_orders_differ(towers, images):
    a = ClipFeatureExtractor(towers, merge="project-then-average").encode_images(images)["image_detail"]
    b = ClipFeatureExtractor(towers, merge="average-then-project").encode_images(images)["image_detail"]
    assert (a - b).abs().max() > 1e-3


def test_text_tokens_and_caption_average(towers):
    extractor = ClipFeatureExtractor(towers)
    captions = [["A red dog on the grass.", "a dog"], ["Two boats by the sea."]]
    got = extractor.encode_captions(captions)
    tokenizer = load_clip_tokenizer()
    rows = []
    for caps in captions:
        per_caption = []
        for text in caps:
            ids = torch.tensor([tokenizer(text, padding="max_length", max_length=77, truncation=True)["input_ids"]])
            with torch.no_grad():
                out = towers.text(input_ids=ids)
                tokens = towers.text.text_projection(out.last_hidden_state)
                # HF's text_embeds is the projected EOS token: VD divides every token by its norm.
                per_caption.append(tokens / out.text_embeds.norm(dim=-1, keepdim=True)[:, None])
        rows.append(torch.cat(per_caption).mean(0))
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 77, 32)
    with pytest.raises(ValueError, match="no caption"):
        extractor.encode_captions([["x"], []])


def test_layer_and_merge_validation(towers):
    with pytest.raises(ValueError, match="outside 1..24"):
        ClipFeatureExtractor(towers, detail_layers=range(20, 26))
    with pytest.raises(ValueError, match="merge"):
        ClipFeatureExtractor(towers, merge="sideways")


def test_module_outputs_capture_named_layers(towers, images):
    extractor = ClipFeatureExtractor(towers)
    name = "vision_model.encoder.layers.1.self_attn.out_proj"
    with module_outputs(towers.vision, [name]) as captured:
        towers.vision(pixel_values=extractor.preprocess(images))
    assert captured[name].shape == (3, 257, 32)
    with pytest.raises(ValueError, match="Unknown module"), module_outputs(towers.vision, ["no.such.layer"]):
        pass


def test_missing_real_weights_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14.*not found.*cache"):
        load_clip("openai/clip-vit-large-patch14")
    (tmp_path / "clip").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip(str(tmp_path / "clip"))


def test_real_loading_path_works_on_a_saved_model(towers, tmp_path, images):
    """The local-folder path of load_clip, exercised with a saved random model (no real weights here)."""
    folder = tmp_path / "clip"
    towers.vision.save_pretrained(folder)
    towers.text.save_pretrained(folder / "text")
    # A real CLIP folder holds one config for both towers; mimic it with the full CLIPModel layout.
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=towers.text.config.to_dict(), vision_config=towers.vision.config.to_dict(),
                        projection_dim=32)
    model = CLIPModel(config)
    model.vision_model.load_state_dict(towers.vision.vision_model.state_dict())
    model.visual_projection.load_state_dict(towers.vision.visual_projection.state_dict())
    model.text_model.load_state_dict(towers.text.text_model.state_dict())
    model.text_projection.load_state_dict(towers.text.text_projection.state_dict())
    full = tmp_path / "full"
    model.save_pretrained(full)
    towers.tokenizer.save_pretrained(full)
    loaded = load_clip(str(full))
    a = ClipFeatureExtractor(loaded).encode(images[:1], [["a dog"]])
    b = ClipFeatureExtractor(towers).encode(images[:1], [["a dog"]])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    assert loaded.identity["source"] == "local folder"
