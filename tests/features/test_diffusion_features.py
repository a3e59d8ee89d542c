"""SD text embeddings and VAE latents with tiny random components, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from brainmclip.features.diffusion_features import encode_sd_text, encode_vae_latents
from brainmclip.features.tokenizer import load_clip_tokenizer

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(4, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2,
                                   sample_size=32).eval()


def test_vae_latent_is_the_scaled_posterior_mean(tiny_vae):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    z = encode_vae_latents(tiny_vae, images, size=32)
    # Tiny VAE with two blocks halves the resolution once.
    assert z.shape == (2, 4, 16, 16)
    pil = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC)) for im in images])
    x = torch.tensor(pil).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        expected = tiny_vae.encode(x).latent_dist.mean * tiny_vae.config.scaling_factor
    # PIL and torchvision bicubic differ slightly; the latent follows the pixels closely.
    assert torch.nn.functional.cosine_similarity(z.flatten(1), expected.flatten(1)).min() > 0.99
    with pytest.raises(ValueError, match="uint8"):
        encode_vae_latents(tiny_vae, images.astype(np.float32))


def test_sd_text_embedding_averages_captions():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=77, vocab_size=49408)).eval()
    tokenizer = load_clip_tokenizer()
    got = encode_sd_text(encoder, tokenizer, [["a dog", "a red dog on grass"], ["a boat"]])
    assert got.shape == (2, 77, 16)

    def one(text):
        ids = torch.tensor([tokenizer(text, padding="max_length", max_length=77)["input_ids"]])
        with torch.no_grad():
            return encoder(input_ids=ids).last_hidden_state[0]

    torch.testing.assert_close(got[0], (one("a dog") + one("a red dog on grass")) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], one("a boat"), rtol=1e-5, atol=1e-5)
