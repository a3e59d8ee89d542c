"""Training BrainCLIP: the exact large-batch step (gradient cache), run folders, resume, hold-out, configs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from brainmclip.config import list_configs, load_config
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import InvalidInputError, OutputInTheWayError
from brainmclip.features.clip_models import load_clip
from brainmclip.features.feature_store import open_feature_store
from brainmclip.losses.brainclip_objective import brainclip_loss
from brainmclip.models.brainclip import BrainCLIPConfig, BrainCLIPVAE, EmbeddingVAE, build_mapping
from brainmclip.models.predictions import load_predictions
from brainmclip.training import brainclip_fit
from brainmclip.training.brainclip_fit import (
    BEST_FILE,
    VAE_FILE,
    load_brainclip,
    resolve_brainclip_config,
    train_brainclip,
)
from brainmclip.training.predict import predict
from brainmclip.training.ridge_fit import DEFAULT_RIDGE_CONFIG, resolve_ridge_config

SMALL = ["train.epochs=3", "train.batch_size=32", "model.hidden_dim=16", "model.latent_dim=8", "vae.steps=20",
         "vae.batch_size=64"]


# ----------------------------------------------------------------------------- the gradient cache
BATCH, VOXELS, EMBED, LATENT = 32, 24, 10, 4


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    fmri = torch.randn(BATCH, VOXELS, generator=g)
    image = torch.nn.functional.normalize(torch.randn(BATCH, EMBED, generator=g), dim=-1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(BATCH, EMBED, generator=g), dim=-1)
    return fmri, image, text


def _model(mapping: str, dropout: float = 0.0):
    cfg = BrainCLIPConfig.from_dict({"mapping": mapping, "n_voxels": VOXELS, "embed_dim": EMBED, "hidden_dim": 12,
                                     "latent_dim": LATENT, "dropout": dropout})
    torch.manual_seed(0)
    model = build_mapping(cfg)
    if mapping == "vae":
        source = EmbeddingVAE(cfg)
        model.load_decoder({k[8:]: v for k, v in source.state_dict().items() if k.startswith("decoder.")})
    return model.train()


def _cfg(mapping: str, micro: int) -> dict:
    config = "brainclip_vae_vt" if mapping == "vae" else "brainclip_linear_vt"
    return resolve_brainclip_config([config], [f"train.micro_batch={micro}", f"model.latent_dim={LATENT}",
                                               "loss.kl_weight=0.1", "loss.temperature=0.1"])


def _stepped(mapping: str, micro: int, dropout: float = 0.0, torch_seed: int = 0):
    """Model after one ``_step`` with plain SGD (lr 1), so the update is minus the gradient itself."""
    model = _model(mapping, dropout)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    fmri, image, text = _batch()
    torch.manual_seed(torch_seed)
    loss = brainclip_fit._step(model, opt, fmri, image, text, _cfg(mapping, micro), torch.Generator().manual_seed(5))
    return model, loss


def _flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _plain_accumulation(mapping: str, micro: int) -> torch.Tensor:
    """Gradient of the mean of per-chunk losses: each chunk its own InfoNCE with in-chunk negatives only."""
    model = _model(mapping)
    fmri, image, text = _batch()
    noise = torch.randn(BATCH, LATENT, generator=torch.Generator().manual_seed(5)) if mapping == "vae" else None
    for start in range(0, BATCH, micro):
        c = slice(start, start + micro)
        out = model(fmri[c], None if noise is None else noise[c])
        loss = brainclip_loss(out.embedding, image[c], text[c], 0.5, 0.5, 0.1, out.mu, out.logvar, 0.1).total
        (loss * micro / BATCH).backward()
    return _flat_grads(model)


@pytest.mark.parametrize("mapping", ["linear", "vae"])
def test_micro_batches_give_the_full_batch_update(mapping):
    full, full_loss = _stepped(mapping, 0)
    cached, cached_loss = _stepped(mapping, 8)
    assert cached_loss == pytest.approx(full_loss, rel=1e-6)
    g_full, g_cached = _flat_grads(full), _flat_grads(cached)
    assert float(g_full.abs().max()) > 1e-3
    torch.testing.assert_close(g_cached, g_full, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_flat_params(cached), _flat_params(full), rtol=1e-5, atol=1e-7)
    if mapping == "vae":  # the frozen decoder did not move
        initial = _model("vae")
        torch.testing.assert_close(cached.decoder.state_dict(), initial.decoder.state_dict(), rtol=0, atol=0)
    # The test can tell: plain gradient accumulation over the same chunks gives another gradient.
    g_plain = _plain_accumulation(mapping, 8)
    assert float((g_plain - g_full).norm() / g_full.norm()) > 0.05


def test_micro_batches_replay_dropout_masks():
    """With input dropout the second (gradient) pass of each chunk must see the mask of its first pass."""
    model = _model("linear", dropout=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    fmri, image, text = _batch()
    cfg = _cfg("linear", 8)
    torch.manual_seed(11)
    brainclip_fit._step(model, opt, fmri, image, text, cfg, torch.Generator().manual_seed(5))
    cached = _flat_grads(model)
    # Reference: the chunks run once, with gradients, drawing their masks in the same order from the same seed.
    ref = _model("linear", dropout=0.3)
    torch.manual_seed(11)
    emb = torch.cat([ref(fmri[i:i + 8]).embedding for i in range(0, BATCH, 8)])
    brainclip_loss(emb, image, text, 0.5, 0.5, 0.1).total.backward()
    torch.testing.assert_close(cached, _flat_grads(ref), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- runs
def _weights(run) -> dict[str, torch.Tensor]:
    return load_brainclip(run).state_dict()


def _assert_same_weights(a, b, tol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=tol, msg=key)


@pytest.fixture(scope="module")
def vae_run(tiny_data, tmp_path_factory):
    """A 3-epoch BrainCLIP-VAE (V&T) run with the gradient cache on."""
    data, features = tiny_data
    out = tmp_path_factory.mktemp("brainclip") / "vae"
    result = train_brainclip(data, features, ["brainclip_vae_vt"], out, overrides=SMALL + ["train.micro_batch=16"],
                             progress=False)
    return out, result


def test_run_folder_and_predictions(vae_run, tiny_data):
    data, features = tiny_data
    out, result = vae_run
    assert result.finished and result.epochs_done == 3 and 1 <= result.best_epoch <= 3
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "brainclip" and run["complete"]
    # "clip" names a CLIP load_clip loads again: the very model the feature store was extracted with.
    assert load_clip(run["clip"]).identity == open_feature_store(features).manifest["settings"]["model"]
    assert run["config"]["model"] == {"mapping": "vae", "hidden_dim": 16, "latent_dim": 8, "dropout": 0.0}
    assert run["config"]["loss"]["alpha"] == run["config"]["loss"]["beta"] == 0.5
    assert set(run["identities"]) == {"data", "features"}
    assert [h["epoch"] for h in run["history"]] == [1, 2, 3] and run["best_epoch"] == result.best_epoch
    assert run["embedding_vae"]["bank_size"] > 0 and -1 <= run["embedding_vae"]["reconstruction_cosine"] <= 1
    model = load_brainclip(out)
    assert isinstance(model, BrainCLIPVAE) and not model.training
    assert model.config.embed_dim == 32 and model.config.n_voxels == load_prepared(data).voxels.group("all").size
    # Frozen decoder = the pre-trained embedding VAE's decoder, unchanged by training.
    from brainmclip.training.checkpoint import load_safetensors

    _, decoder = load_safetensors(out / VAE_FILE)
    torch.testing.assert_close(model.decoder.state_dict(), decoder, rtol=0, atol=0)
    pred_dir = predict(out, "test")
    pred = load_predictions(pred_dir)
    test = load_prepared(data).splits["test"]
    assert pred.method == "brainclip" and pred.manifest["clip"] == run["clip"]
    assert pred.image.shape == pred.text.shape == (len(np.unique(test.stimulus_ids)), 1, 32)
    np.testing.assert_array_equal(pred.image, pred.text)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(pred.image, np.float32), axis=-1), 1, atol=2e-3)
    # Independently: the model's posterior-mean embedding of the test fMRI, normalised (float16 on disk).
    betas = torch.from_numpy(np.array(test.betas, np.float32))
    with torch.no_grad():
        emb = model(betas).embedding.numpy()
    order = {int(i): r for r, i in enumerate(test.stimulus_ids.tolist())}
    want = emb[[order[int(i)] for i in pred.stimulus_ids]]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(pred.image[:, 0], np.float32), want, atol=1e-3)


def test_same_seed_gives_same_weights(vae_run, tiny_data, tmp_path):
    data, features = tiny_data
    out, _ = vae_run
    again = tmp_path / "again"
    train_brainclip(data, features, ["brainclip_vae_vt"], again, overrides=SMALL + ["train.micro_batch=16"],
                    progress=False)
    _assert_same_weights(out, again, 0)
    other = tmp_path / "other_seed"
    train_brainclip(data, features, ["brainclip_vae_vt"], other, overrides=SMALL + ["train.micro_batch=16",
                                                                                     "train.seed=1"], progress=False)
    assert not torch.equal(_weights(out)["encoder.0.weight"], _weights(other)["encoder.0.weight"])


def test_resume_equals_an_uninterrupted_run(vae_run, tiny_data, tmp_path):
    data, features = tiny_data
    out, _ = vae_run
    run = tmp_path / "resumed"
    first = train_brainclip(data, features, ["brainclip_vae_vt"], run, overrides=SMALL + ["train.micro_batch=16"],
                            stop_after_epochs=1, progress=False)
    assert not first.finished and first.epochs_done == 1
    assert json.loads((run / "run.json").read_text())["complete"] is False
    vae_file = run / VAE_FILE
    stamp, content = vae_file.stat().st_mtime_ns, vae_file.read_bytes()
    second = train_brainclip(data, features, None, run, resume=True, progress=False)
    assert second.finished and second.epochs_done == 3
    assert vae_file.stat().st_mtime_ns == stamp and vae_file.read_bytes() == content  # pre-trained once
    _assert_same_weights(out, run, 1e-6)
    a, b = (json.loads((d / "run.json").read_text()) for d in (out, run))
    assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]], rel=1e-6)
    assert a["best_epoch"] == b["best_epoch"] and b["complete"]


def test_resume_with_dropout_equals_an_uninterrupted_run(tiny_data, tmp_path):
    """Dropout draws from torch's global generator; a resumed run must draw what the uninterrupted one drew."""
    data, features = tiny_data
    overrides = ["train.epochs=2", "train.batch_size=64", "model.dropout=0.3", "train.micro_batch=16"]
    whole, run = tmp_path / "whole", tmp_path / "resumed"
    train_brainclip(data, features, ["brainclip_linear_v"], whole, overrides=overrides, progress=False)
    train_brainclip(data, features, ["brainclip_linear_v"], run, overrides=overrides, stop_after_epochs=1,
                    progress=False)
    torch.manual_seed(12345)  # whatever else ran in between in this process must not matter
    train_brainclip(data, features, None, run, resume=True, progress=False)
    _assert_same_weights(whole, run, 1e-6)


def test_existing_run_is_refused_and_force_replaces_it(tiny_data, tmp_path):
    data, features = tiny_data
    out = tmp_path / "run"
    train_brainclip(data, features, ["brainclip_linear_v"], out, overrides=["train.epochs=1"], progress=False)
    predict(out, "val")
    before = (out / BEST_FILE).read_bytes()
    with pytest.raises(OutputInTheWayError) as info:
        train_brainclip(data, features, ["brainclip_linear_v"], out, overrides=["train.epochs=1"], progress=False)
    assert "\n" not in str(info.value) and "--force" in str(info.value) and "--resume" in str(info.value)
    assert (out / BEST_FILE).read_bytes() == before
    result = train_brainclip(data, features, ["brainclip_linear_t"], out, overrides=["train.epochs=2"], force=True,
                             progress=False)
    run = json.loads((out / "run.json").read_text())
    assert result.epochs_done == 2 and run["config"]["loss"]["alpha"] == 0 and run["config"]["loss"]["beta"] == 1
    assert [h["epoch"] for h in run["history"]] == [1, 2]
    assert not (out / "predictions_val").exists()  # stale predictions of the replaced run are gone


def _classes_in_scenes(nsd_root) -> dict[int, set[str]]:
    scenes = {}
    for line in (nsd_root / "simulation" / "scenes.jsonl").read_text().splitlines():
        scene = json.loads(line)
        scenes[scene["nsd_id"]] = {o["category"] for o in scene["objects"]}
    return scenes


def test_holdout_classes_leave_training(tiny_data, tiny_nsd, tmp_path, monkeypatch):
    data, features = tiny_data
    kept = {}
    real_split = brainclip_fit._split

    def spy(prepared, name, *args, **kwargs):
        kept[name] = split = real_split(prepared, name, *args, **kwargs)
        return split

    monkeypatch.setattr(brainclip_fit, "_split", spy)
    held = ["dog", "car"]
    out = tmp_path / "holdout"
    train_brainclip(data, features, ["brainclip_linear_v"], out,
                    overrides=["train.epochs=1", f"data.holdout_classes={json.dumps(held)}"], progress=False)
    scenes = _classes_in_scenes(tiny_nsd.root)
    prepared = load_prepared(data)
    for name in ("train", "val"):
        ids = prepared.splits[name].stimulus_ids.tolist()
        want = [i for i in ids if not scenes[i] & set(held)]
        assert 0 < len(want) < len(ids)
        assert kept[name].ids.tolist() == want
        np.testing.assert_array_equal(np.asarray(prepared.splits[name].stimulus_ids)[kept[name].rows], want)
    showing = sum(1 for classes in scenes.values() if classes & set(held))
    assert json.loads((out / "run.json").read_text())["holdout_stimuli"] == showing
    with pytest.raises(InvalidInputError, match="unicorn"):
        train_brainclip(data, features, ["brainclip_linear_v"], tmp_path / "bad",
                        overrides=["train.epochs=1", 'data.holdout_classes=["unicorn"]'], progress=False)


# ----------------------------------------------------------------------------- configs
BRAINCLIP_CONFIGS = [n for n in list_configs() if n.startswith("brainclip_")]


def test_every_brainclip_config_is_listed_and_valid():
    assert sorted(BRAINCLIP_CONFIGS) == sorted(f"brainclip_{m}_{s}" for m in ("linear", "vae") for s in ("v", "t", "vt"))
    for name in BRAINCLIP_CONFIGS:
        cfg = resolve_brainclip_config([name])
        mapping, supervision = name.split("_")[1:]
        assert cfg["model"]["mapping"] == mapping
        assert (cfg["loss"]["alpha"] > 0) == ("v" in supervision) and (cfg["loss"]["beta"] > 0) == ("t" in supervision)


def test_every_ridge_config_is_valid():
    for name, targets in (("ridge", "tokens"), ("ridge_clip_v", "clip_image"), ("ridge_clip_t", "clip_text")):
        assert resolve_ridge_config([name])["ridge"]["targets"] == targets
    np.testing.assert_allclose(DEFAULT_RIDGE_CONFIG["ridge"]["alphas"], np.logspace(1, 6, 8), rtol=1e-12)
    assert load_config("ridge")["ridge"]["alphas"] == DEFAULT_RIDGE_CONFIG["ridge"]["alphas"]


@pytest.mark.parametrize(("overrides", "named"), [
    (['loss.gamma=1'], "gamma"),
    (['loss.temperature=0'], "loss.temperature"),
    (['loss.alpha=0', 'loss.beta=0'], "loss.alpha"),
    (['train.micro_batch=-1'], "train.micro_batch"),
    (['train.batch_size=1'], "train.batch_size"),
    (['train.betas=[0.9]'], "train.betas"),
    (['model.mapping="mlp"'], "model.mapping"),
    (['model.dropout=1.0'], "model.dropout"),
    (['model.hidden_dim=0'], "model.hidden_dim"),
    (['vae.bank="scenes:x"'], "vae.bank"),
    (['vae.steps=0'], "vae.steps"),
    (['data.holdout_classes="dog"'], "data.holdout_classes"),
])
def test_bad_brainclip_values_are_one_line_errors(overrides, named):
    with pytest.raises(InvalidInputError) as info:
        resolve_brainclip_config(["brainclip_vae_v"], overrides)
    assert "\n" not in str(info.value) and named in str(info.value), str(info.value)


@pytest.mark.parametrize(("config", "named"), [
    ({"method": "brainclip", "train": {"epochz": 3}}, "epochz"),
    ({"method": "brainclip", "model": {"width": 3}}, "width"),
    ({"method": "brainclip", "optim": {}}, "optim"),
    ({"method": "ridge"}, "method"),
])
def test_unknown_brainclip_keys_are_one_line_errors(config, named):
    with pytest.raises(InvalidInputError) as info:
        resolve_brainclip_config(config)
    assert "\n" not in str(info.value) and named in str(info.value), str(info.value)


@pytest.mark.parametrize(("config", "overrides", "named"), [
    ({"ridge": {"target": "clip_image"}}, [], "target"),
    ({"method": "brainclip"}, [], "method"),
    (None, ["ridge.targets=pooled"], "ridge.targets"),
    (None, ["ridge.n_folds=1"], "ridge.n_folds"),
    (None, ["ridge.alphas=[]"], "ridge.alphas"),
])
def test_bad_ridge_configs_are_one_line_errors(tmp_path, config, overrides, named):
    path = None
    if config is not None:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(config))
    with pytest.raises(InvalidInputError) as info:
        resolve_ridge_config([str(path)] if path else None, overrides)
    assert "\n" not in str(info.value) and named in str(info.value), str(info.value)


def test_resolving_does_not_change_the_defaults():
    before = copy.deepcopy(brainclip_fit.DEFAULT_BRAINCLIP_CONFIG), copy.deepcopy(DEFAULT_RIDGE_CONFIG)
    resolve_brainclip_config(["brainclip_vae_vt"], ["train.epochs=2"])
    resolve_ridge_config(["ridge_clip_v"], ["ridge.n_folds=3"])
    assert before == (brainclip_fit.DEFAULT_BRAINCLIP_CONFIG, DEFAULT_RIDGE_CONFIG)
