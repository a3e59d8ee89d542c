"""BrainCLIP's mapping networks against hand computations in numpy (float64) with the modules' own weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import erf

from brainmclip.errors import InvalidInputError
from brainmclip.models.brainclip import (
    BrainCLIPConfig,
    BrainCLIPLinear,
    BrainCLIPVAE,
    EmbeddingVAE,
    build_mapping,
)

N, VOXELS, EMBED, HIDDEN, LATENT = 6, 20, 12, 10, 4


def _config(mapping: str = "linear", dropout: float = 0.0) -> BrainCLIPConfig:
    return BrainCLIPConfig.from_dict({"mapping": mapping, "n_voxels": VOXELS, "embed_dim": EMBED,
                                      "hidden_dim": HIDDEN, "latent_dim": LATENT, "dropout": dropout})


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU, torch's default."""
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _linear(layer: torch.nn.Linear, x: np.ndarray) -> np.ndarray:
    return x @ _np(layer.weight).T + _np(layer.bias)


def _mlp(seq: torch.nn.Sequential, x: np.ndarray) -> np.ndarray:
    """Linear -> GELU -> Linear, by hand."""
    return _linear(seq[2], _gelu(_linear(seq[0], x)))


def _fmri(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, VOXELS, generator=torch.Generator().manual_seed(seed))


def test_output_shapes():
    torch.manual_seed(0)
    x = _fmri()
    lin = build_mapping(_config("linear"))
    vae = build_mapping(_config("vae"))
    assert isinstance(lin, BrainCLIPLinear) and isinstance(vae, BrainCLIPVAE)
    out = lin(x)
    assert out.embedding.shape == (N, EMBED) and out.mu is None and out.logvar is None
    for model in (vae, vae.eval()):
        out = model(x)
        assert out.embedding.shape == (N, EMBED)
        assert out.mu.shape == out.logvar.shape == (N, LATENT)
    emb = EmbeddingVAE(_config("vae"))(torch.randn(N, EMBED))
    assert emb.embedding.shape == (N, EMBED) and emb.mu.shape == (N, LATENT)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_linear_is_x_wt_plus_b(dropout):
    torch.manual_seed(1)
    model = BrainCLIPLinear(_config("linear", dropout)).eval()  # eval: dropout is the identity
    x = _fmri(1)
    want = _np(x) @ _np(model.linear.weight).T + _np(model.linear.bias)
    np.testing.assert_allclose(_np(model(x).embedding), want, rtol=1e-6, atol=1e-6)


def test_linear_dropout_acts_in_training_only():
    torch.manual_seed(2)
    model = BrainCLIPLinear(_config("linear", 0.5))
    x = _fmri(2)
    train_out = model.train()(x).embedding
    eval_out = model.eval()(x).embedding
    assert not torch.allclose(train_out, eval_out)


def test_vae_eval_is_deterministic_and_decodes_the_posterior_mean():
    torch.manual_seed(3)
    model = BrainCLIPVAE(_config("vae", dropout=0.3)).eval()
    x = _fmri(3)
    a, b = model(x), model(x, noise=torch.randn(N, LATENT))  # noise is ignored in eval
    torch.testing.assert_close(a.embedding, b.embedding, rtol=0, atol=0)
    head = _mlp(model.encoder, _np(x))
    mu, logvar = head[:, :LATENT], head[:, LATENT:]
    np.testing.assert_allclose(_np(a.mu), mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(a.logvar), logvar, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(a.embedding), _mlp(model.decoder, mu), rtol=1e-5, atol=1e-6)


def test_vae_training_reparameterises_with_the_given_noise():
    torch.manual_seed(4)
    model = BrainCLIPVAE(_config("vae")).train()
    x = _fmri(4)
    noise = torch.randn(N, LATENT, generator=torch.Generator().manual_seed(40))
    out = model(x, noise=noise)
    head = _mlp(model.encoder, _np(x))
    mu, logvar = head[:, :LATENT], head[:, LATENT:]
    z = mu + _np(noise) * np.exp(logvar / 2)
    np.testing.assert_allclose(_np(out.embedding), _mlp(model.decoder, z), rtol=1e-5, atol=1e-6)
    # Without noise given it samples: two calls differ, and neither is the posterior mean's decoding.
    first, second = model(x).embedding, model(x).embedding
    assert not torch.allclose(first, second)
    assert not np.allclose(_np(first), _mlp(model.decoder, mu), atol=1e-4)


def test_embedding_vae_uses_mu_in_eval_and_noise_in_training():
    torch.manual_seed(5)
    vae = EmbeddingVAE(_config("vae"))
    e = torch.nn.functional.normalize(torch.randn(N, EMBED), dim=-1)
    head = _mlp(vae.encoder, _np(e))
    mu, logvar = head[:, :LATENT], head[:, LATENT:]
    np.testing.assert_allclose(_np(vae.eval()(e).embedding), _mlp(vae.decoder, mu), rtol=1e-5, atol=1e-6)
    noise = torch.randn(N, LATENT)
    z = mu + _np(noise) * np.exp(logvar / 2)
    np.testing.assert_allclose(_np(vae.train()(e, noise).embedding), _mlp(vae.decoder, z), rtol=1e-5, atol=1e-6)


def test_load_decoder_copies_and_freezes_the_decoder():
    torch.manual_seed(6)
    source = EmbeddingVAE(_config("vae"))
    state = {k[len("decoder."):]: v.clone() for k, v in source.state_dict().items() if k.startswith("decoder.")}
    model = BrainCLIPVAE(_config("vae"))
    model.load_decoder(state)
    for name, value in model.decoder.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    assert all(not p.requires_grad for p in model.decoder.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())
    model.train()
    assert model.training and model.encoder.training and not model.decoder.training
    model.train(True)
    assert not any(m.training for m in model.decoder.modules())
    out = model(_fmri(6), noise=torch.randn(N, LATENT))
    (out.embedding.square().sum() + out.mu.sum()).backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("encoder.") for n in trainable)


def test_config_round_trip():
    cfg = _config("vae", 0.25)
    assert BrainCLIPConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict() == {"mapping": "vae", "n_voxels": VOXELS, "embed_dim": EMBED, "hidden_dim": HIDDEN,
                             "latent_dim": LATENT, "dropout": 0.25}


@pytest.mark.parametrize(("change", "named"), [
    ({"mapping": "mlp"}, "model.mapping"),
    ({"dropout": 1.0}, "model.dropout"),
    ({"dropout": -0.1}, "model.dropout"),
    ({"hidden_dim": 0}, "model.hidden_dim"),
    ({"latent_dim": 2.5}, "model.latent_dim"),
    ({"n_voxels": True}, "model.n_voxels"),
    ({"width": 3}, "width"),
])
def test_bad_config_is_one_line_error_naming_the_key(change, named):
    base = {"mapping": "linear", "n_voxels": VOXELS, "embed_dim": EMBED}
    with pytest.raises(InvalidInputError) as info:
        BrainCLIPConfig.from_dict({**base, **change})
    message = str(info.value)
    assert "\n" not in message and named in message, message
