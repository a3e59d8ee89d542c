"""Versatile Diffusion dual-guided generation with tiny random components (CPU, offline)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from diffusers.models.transformers.dual_transformer_2d import DualTransformer2DModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from brainmclip.generation import best_of_n, cosine_scorer, load_versatile_diffusion
from brainmclip.generation.versatile_diffusion import (
    MaskTolerantDualTransformer,
    VersatileDiffusionGenerator,
    tiny_components,
    tiny_versatile_diffusion,
)

D = 32
STEPS = 2
IMAGE_TOKENS, TEXT_TOKENS = 257, 77  # CLIP ViT-L/14's layout, as the tiny random CLIP keeps it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; several threads crawl when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vd():
    return tiny_versatile_diffusion(embed_dim=D, seed=0)


def embeddings(n: int, seed: int):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, IMAGE_TOKENS, D)).astype(np.float16)  # like load_predictions' memmaps
    text = rng.standard_normal((n, TEXT_TOKENS, D)).astype(np.float16)
    return image, text


def seeds(*values: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(v) for v in values]


def run(vd, image, text, gen_seeds, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return vd.generate(image, text, generator=seeds(*gen_seeds), **kw)


def test_output_count_dtype_and_size(vd):
    image, text = embeddings(3, 0)
    out = run(vd, image, text, (0, 1, 2))
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
    assert out.std() > 0
    out = run(vd, image[:1], text[:1], (0,), height=48, width=64)
    assert out.shape == (1, 48, 64, 3)


def test_same_seed_same_pixels_different_seed_differs(vd):
    image, text = embeddings(2, 1)
    first = run(vd, image, text, (5, 6))
    again = run(vd, image, text, (5, 6))
    other = run(vd, image, text, (7, 8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[1], other[1])


def test_predicted_embeddings_condition_the_output(vd):
    image_a, text = embeddings(1, 2)
    image_b, _ = embeddings(1, 3)
    a = run(vd, image_a, text, (0,))
    b = run(vd, image_b, text, (0,))
    assert not np.array_equal(a, b)


def test_text_weight_is_the_share_of_the_text_condition(vd):
    image, text = embeddings(1, 4)
    image_other, text_other = embeddings(1, 5)
    only_text = run(vd, image, text, (0,), text_weight=1.0)
    only_image = run(vd, image, text, (0,), text_weight=0.0)
    assert not np.array_equal(only_text, only_image)
    # text_weight=1: the image condition has no say; text_weight=0: the text condition has none
    np.testing.assert_array_equal(only_text, run(vd, image_other, text, (0,), text_weight=1.0))
    np.testing.assert_array_equal(only_image, run(vd, image, text_other, (0,), text_weight=0.0))
    assert not np.array_equal(only_text, run(vd, image, text_other, (0,), text_weight=1.0))
    # image-only predictions (no text) are allowed at text_weight=0
    np.testing.assert_array_equal(only_image[:, :, :, :], run(vd, image, None, (0,), text_weight=0.0,
                                                             uncond_text=text[0]))
    with pytest.raises(ValueError, match="text_weight"):
        run(vd, image, None, (0,), text_weight=0.4)


def test_supplied_unconditional_embeddings_are_used(vd):
    image, text = embeddings(1, 6)
    u_image, u_text = embeddings(1, 7)
    zeros = run(vd, image, text, (0,))
    supplied = run(vd, image, text, (0,), uncond_image=u_image[0], uncond_text=torch.from_numpy(u_text[0]))
    assert not np.array_equal(zeros, supplied)
    # without guidance the unconditional branch is not run at all
    np.testing.assert_array_equal(run(vd, image, text, (0,), guidance_scale=1.0),
                                  run(vd, image, text, (0,), guidance_scale=1.0, uncond_image=u_image[0]))


def test_init_images_path(vd):
    image, text = embeddings(2, 8)
    rng = np.random.default_rng(0)
    init_a = rng.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)  # resized to 32x32
    init_b = 255 - init_a
    noise_only = run(vd, image, text, (0, 1), num_inference_steps=4)
    from_a = run(vd, image, text, (0, 1), num_inference_steps=4, init_images=init_a, strength=0.5)
    from_a_again = run(vd, image, text, (0, 1), num_inference_steps=4, init_images=list(init_a), strength=0.5)
    from_b = run(vd, image, text, (0, 1), num_inference_steps=4, init_images=init_b, strength=0.5)
    assert from_a.shape == (2, 32, 32, 3) and from_a.dtype == np.uint8
    assert not np.array_equal(from_a, noise_only)
    assert not np.array_equal(from_a, from_b)
    np.testing.assert_array_equal(from_a, from_a_again)
    with pytest.raises(ValueError, match="strength"):
        run(vd, image, text, (0, 1), init_images=init_a, strength=0.0)
    with pytest.raises(ValueError, match="uint8"):
        run(vd, image, text, (0, 1), init_images=init_a.astype(np.float32), strength=0.5)


@pytest.mark.parametrize(("image_shape", "text_shape", "message"), [
    ((2, IMAGE_TOKENS, D + 1), (2, TEXT_TOKENS, D), rf"expected \(n, image tokens, {D}\)"),
    ((IMAGE_TOKENS, D), (2, TEXT_TOKENS, D), rf"expected \(n, image tokens, {D}\)"),
    ((2, IMAGE_TOKENS, D), (2, TEXT_TOKENS, D - 1), rf"expected \(2, text tokens, {D}\)"),
    ((2, IMAGE_TOKENS, D), (3, TEXT_TOKENS, D), rf"expected \(2, text tokens, {D}\)"),
])
def test_bad_shapes_raise_one_line_value_error(vd, image_shape, text_shape, message):
    with pytest.raises(ValueError, match=message) as info:
        vd.generate(np.zeros(image_shape, np.float32), np.zeros(text_shape, np.float32), num_inference_steps=1)
    assert "\n" not in str(info.value)


def test_other_bad_inputs(vd):
    image, text = embeddings(2, 9)
    with pytest.raises(ValueError, match="one per image"):
        vd.generate(image, text, generator=seeds(0), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"uncond_image.*expected \(257, 32\)"):
        vd.generate(image, text, uncond_image=np.zeros((256, D)), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"uncond_text.*expected \(77, 32\)"):
        vd.generate(image, text, uncond_text=np.zeros((32, D)), num_inference_steps=1)


@pytest.mark.parametrize(("image_tokens", "text_tokens"), [(65, 32), (257, 77), (5, 9)])
def test_token_counts_follow_the_embeddings_and_route_to_their_blocks(vd, image_tokens, text_tokens):
    """Any CLIP's token counts work; each condition reaches only its own transformer: at text share 0 the text
    embeddings change nothing, at text share 1 the image embeddings change nothing, in between both matter."""
    rng = np.random.default_rng(image_tokens)
    image = rng.standard_normal((2, image_tokens, D)).astype(np.float32)
    text = rng.standard_normal((2, text_tokens, D)).astype(np.float32)
    other_image = rng.standard_normal(image.shape).astype(np.float32)
    other_text = rng.standard_normal(text.shape).astype(np.float32)
    uncond = {"uncond_image": rng.standard_normal((image_tokens, D)), "uncond_text": rng.standard_normal((text_tokens, D))}

    def gen(img, txt, weight):
        return run(vd, img, txt, (3, 4), text_weight=weight, output_type="latent", **uncond)

    torch.testing.assert_close(gen(image, text, 0.0), gen(image, other_text, 0.0))
    assert not torch.allclose(gen(image, text, 0.0), gen(other_image, text, 0.0))
    torch.testing.assert_close(gen(image, text, 1.0), gen(other_image, text, 1.0))
    assert not torch.allclose(gen(image, text, 1.0), gen(image, other_text, 1.0))
    mixed = gen(image, text, 0.4)
    assert not torch.allclose(mixed, gen(image, other_text, 0.4)) and not torch.allclose(mixed, gen(other_image, text, 0.4))
    with pytest.raises(ValueError, match="multiple of 2"):
        vd.generate(image, text, height=33, num_inference_steps=1)


def test_best_of_n_matches_direct_cosine():
    rng = np.random.default_rng(0)
    candidates = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    projection = rng.standard_normal((8 * 8 * 3, 16))
    predicted_image = rng.standard_normal((IMAGE_TOKENS, 16))  # a predicted Ê_I; its CLS token is row 0

    def embed(images):
        return np.asarray(images, np.float64).reshape(len(images), -1) @ projection

    emb = embed(candidates)
    cls = predicted_image[0]
    direct = (emb @ cls) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(cls))
    assert best_of_n(candidates, cosine_scorer(embed, cls)) == int(np.argmax(direct))
    # a target equal to one candidate's (scaled) embedding picks that candidate
    assert best_of_n(candidates, cosine_scorer(embed, 3.0 * emb[4])) == 4
    assert best_of_n(list(candidates), lambda c: [0.1, 0.5, 0.2, 0.5, -1, 0]) == 1
    with pytest.raises(ValueError, match="scores"):
        best_of_n(candidates, lambda c: [1.0, 2.0])


def test_dual_transformer_encoder_attention_mask_workaround():
    torch.manual_seed(0)
    blocks = [Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4,
                                 cross_attention_dim=D) for _ in range(2)]
    hidden = torch.randn(1, 8, 4, 4)
    condition = torch.randn(1, TEXT_TOKENS + IMAGE_TOKENS, D)
    plain = DualTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4,
                                   cross_attention_dim=D)
    plain.transformers = torch.nn.ModuleList(blocks)
    # the call UNet2DConditionModel's cross-attention blocks make
    call = {"encoder_hidden_states": condition, "attention_mask": None, "cross_attention_kwargs": None,
            "encoder_attention_mask": None, "return_dict": False}
    if "encoder_attention_mask" not in inspect.signature(DualTransformer2DModel.forward).parameters:
        with pytest.raises(TypeError, match="encoder_attention_mask"):  # the diffusers fault worked around
            plain(hidden, **call)
    fixed = MaskTolerantDualTransformer(blocks[0], blocks[1])
    fixed.mix_ratio = plain.mix_ratio = 0.3
    with torch.no_grad():
        out = fixed(hidden, **call)[0]
        expected = plain(hidden, condition, return_dict=False)[0]
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        fixed(hidden, **{**call, "encoder_attention_mask": torch.ones(1, TEXT_TOKENS + IMAGE_TOKENS)})


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_single_condition_shortcut_equals_the_full_dual_forward(ratio):
    # at text share 0 or 1 only one block runs; the output must equal diffusers' mix of both residuals
    torch.manual_seed(0)
    blocks = [Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4,
                                 cross_attention_dim=D) for _ in range(2)]
    hidden = torch.randn(2, 8, 4, 4)
    condition = torch.randn(2, 5 + 7, D)
    fixed = MaskTolerantDualTransformer(blocks[0], blocks[1])
    fixed.condition_lengths = [5, 7]
    fixed.mix_ratio = ratio
    calls = []
    for block in blocks:
        block.register_forward_hook(lambda m, i, o: calls.append(m))
    with torch.no_grad():
        out = fixed(hidden, condition, return_dict=False)[0]
        assert calls == [blocks[0] if ratio == 0.0 else blocks[1]]
        expected = DualTransformer2DModel.forward(fixed, hidden, condition, return_dict=False)[0]
    torch.testing.assert_close(out, expected)


def test_conversion_moves_text_unet_blocks_into_image_unet():
    parts = tiny_components(embed_dim=D, seed=1)
    text_blocks = {name: m for name, m in parts["text_unet"].named_modules() if isinstance(m, Transformer2DModel)}
    gen = VersatileDiffusionGenerator(**parts)
    duals = {name: m for name, m in gen.image_unet.named_modules() if isinstance(m, MaskTolerantDualTransformer)}
    assert len(duals) == len(text_blocks) > 0 and gen.text_unet is None
    for name, dual in duals.items():
        assert dual.transformers[1] is text_blocks[name]
    # the UNet forward path through the dual blocks (with encoder_attention_mask=None) runs
    out = gen.image_unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=torch.randn(1, 334, D)).sample
    assert out.shape == (1, 4, 16, 16)


def test_load_versatile_diffusion_missing_parts(tmp_path):
    with pytest.raises(FileNotFoundError, match="image_unet") as info:
        load_versatile_diffusion(tmp_path)
    assert "\n" not in str(info.value)
    for name in ("image_unet", "text_unet", "scheduler"):
        (tmp_path / name).mkdir()
    for name in ("image_unet", "text_unet"):
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="vae/ is missing") as info:
        load_versatile_diffusion(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError, match="no weights") as info:
        load_versatile_diffusion(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_versatile_diffusion(tmp_path / "absent")


def test_load_versatile_diffusion_uncached_hub_id_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache") as info:
        load_versatile_diffusion("no-such-org/no-such-model", cache_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_load_versatile_diffusion_round_trip(tmp_path):
    parts = tiny_components(embed_dim=D, seed=2)
    for name, component in parts.items():
        component.save_pretrained(tmp_path / name)
    loaded = load_versatile_diffusion(tmp_path, device="cpu", dtype=torch.float32)
    direct = VersatileDiffusionGenerator(**parts)
    image, text = embeddings(1, 10)
    np.testing.assert_array_equal(run(loaded, image, text, (3,)), run(direct, image, text, (3,)))
