"""MindDiffuser's targets (c, z, structural CLIP features) in a feature store: values, resume, refusals."""

from __future__ import annotations

import os
import signal
import traceback

import numpy as np
import pytest
import torch

from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.errors import InvalidInputError
from brainmclip.features.clip_extractor import CLIP_MEAN, CLIP_STD
from brainmclip.features.clip_models import load_clip
from brainmclip.features.diffusion_features import encode_sd_text, encode_vae_latents
from brainmclip.features.feature_store import TARGETS, FeatureStore, open_feature_store
from brainmclip.features.minddiffuser_targets import (
    StructuralFeatures,
    extract_minddiffuser_targets,
    load_minddiffuser_targets,
)

pytest.importorskip("diffusers")

SHARD, BATCH = 8, 4


@pytest.fixture(scope="module")
def prepared(tiny_nsd, tmp_path_factory):
    base = tmp_path_factory.mktemp("prepared")
    return prepare_subject(tiny_nsd.root, 1, base / "subj01", PrepareOptions(sessions=(1,)), progress=False)


def _extract(paths, out, **kwargs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every process, so resumed shards match byte for byte
    try:
        return extract_minddiffuser_targets(paths, out, **{"sd": "mini", "structural_clip": "mini",
                                                           "shard_size": SHARD, "batch_size": BATCH,
                                                           "progress": False, **kwargs})
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    return _extract([prepared.root], tmp_path_factory.mktemp("md") / "store")


def _all_rows(prepared):
    ids, images, captions = [], [], []
    for samples in prepared.splits.values():
        for row, nsd_id in enumerate(samples.stimulus_ids.tolist()):
            if nsd_id not in ids:
                ids.append(nsd_id)
                images.append(np.asarray(samples.images[row]))
                captions.append(samples.captions[row])
    return np.array(ids), np.stack(images), captions


def _close16(stored, expected):
    """Stored float16 against a float32 reference: within float16's rounding of the values' scale."""
    expected = np.asarray(expected, np.float32)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3 * scale)


def test_targets_equal_independent_computations(prepared, reference):
    from brainmclip.generation.stable_diffusion import load_stable_diffusion

    ids, images, captions = _all_rows(prepared)
    assert reference.n_extracted == reference.n_requested == len(ids) == len(reference.store) == 18
    got = load_minddiffuser_targets(reference.store.root, ids)
    names = ["sd_text", "sd_latent", *(f"struct_{k:02d}" for k in (2, 4, 6, 8, 10, 12))]
    assert list(got) == names and all(v.dtype == np.float32 for v in got.values())

    pipe = load_stable_diffusion("mini")
    c = encode_sd_text(pipe.text_encoder, pipe.tokenizer, captions).numpy()
    z = encode_vae_latents(pipe.vae, images, size=64).numpy()  # mini-SD: UNet 16 x VAE factor 4
    assert got["sd_text"].shape == (18, 32, 64) and got["sd_latent"].shape == z.shape == (18, 4, 16, 16)
    _close16(got["sd_text"], c)
    _close16(got["sd_latent"], z)
    # On disk the latent is (n, C, H*W): each channel flattened row-major.
    raw = open_feature_store(reference.store.root).get(ids[:2], ["sd_latent"])["sd_latent"]
    assert raw.shape == (2, 4, 256)
    np.testing.assert_array_equal(raw, got["sd_latent"][:2].reshape(2, 4, 256))

    # Structural, by hand: CLIP normalisation in numpy (64 px images into the 64 px mini-CLIP need no
    # resize), the whole tower run, and "Linear-n" = the n-th MLP linear layer to run, counted by hooks.
    vision = load_clip("mini").vision
    x = (images.astype(np.float32) / 255 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    fired = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: fired.append(out.detach()))
             for name, m in vision.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." in name]
    try:
        with torch.no_grad():
            vision(pixel_values=pixels)
    finally:
        for h in hooks:
            h.remove()
    assert len(fired) == 2 * vision.config.num_hidden_layers
    for n in (2, 4, 6, 8, 10, 12):
        assert got[f"struct_{n:02d}"].shape == (18, 65, 64)
        _close16(got[f"struct_{n:02d}"], fired[n - 1].numpy())


def test_attention_out_convention_and_layer_checks():
    vision = load_clip("tiny").vision
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    feats = StructuralFeatures(vision, layers=(1, 2), convention="attention-out")
    assert feats.modules[2] == "vision_model.encoder.layers.1.self_attn.out_proj"
    got = feats(images)
    captured = {}
    for k in (1, 2):
        module = vision.vision_model.encoder.layers[k - 1].self_attn.out_proj
        module.register_forward_hook(lambda _m, _i, out, k=k: captured.__setitem__(k, out.detach()))
    with torch.no_grad():
        vision(pixel_values=feats.preprocess(images))
    for k in (1, 2):
        torch.testing.assert_close(got[k], captured[k])
    n = vision.config.num_hidden_layers
    assert StructuralFeatures(vision, (2 * n - 1,)).modules[2 * n - 1].endswith(f"layers.{n - 1}.mlp.fc1")
    for layers, convention in [((2 * n + 1,), "linear-index"), ((n + 1,), "attention-out"), ((0,), "linear-index"),
                               ((2, 2), "linear-index")]:
        with pytest.raises(InvalidInputError, match=r"structural layers .*; expected distinct") as err:
            StructuralFeatures(vision, layers, convention)
        assert "\n" not in str(err.value)
    with pytest.raises(InvalidInputError, match="convention"):
        StructuralFeatures(vision, (2,), "mlp")


def _killed_child(function) -> int:
    """Run ``function`` in a forked child; the signal that ended it (0 when it exited)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 70
        try:
            function()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def _shard_bytes(root):
    shards = root / "shards"
    return {f"{d.name}/{f.name}": f.read_bytes() for d in sorted(shards.iterdir()) for f in sorted(d.iterdir())}


def test_killed_extraction_resumes_with_the_missing_shards_only(prepared, reference, tmp_path, monkeypatch):
    out = tmp_path / "store"

    def crash_after_first_shard():
        os.environ["BRAINMCLIP_CRASH_AT"] = "minddiffuser-shard:1"
        _extract([prepared.root], out)

    assert _killed_child(crash_after_first_shard) == signal.SIGKILL
    assert len(list((out / "shards").iterdir())) == 1 and len(open_feature_store(out)) == SHARD
    written = []
    real = FeatureStore.write_shard
    monkeypatch.setattr(FeatureStore, "write_shard", lambda self, ids, arrays: written.append(len(ids))
                        or real(self, ids, arrays))
    resumed = _extract([prepared.root], out)
    assert resumed.n_extracted == 18 - SHARD and written == [8, 2]
    assert _shard_bytes(out) == _shard_bytes(reference.store.root)
    assert open_feature_store(out).manifest["checksums"] == open_feature_store(reference.store.root).manifest["checksums"]
    assert _extract([prepared.root], out).n_extracted == 0 and written == [8, 2]


def test_a_store_made_otherwise_is_refused_in_one_line(prepared, reference, tmp_path):
    with pytest.raises(InvalidInputError, match=r"other settings \(differing: structural, targets\)") as err:
        _extract([prepared.root], reference.store.root, layers=(2, 4))
    assert "\n" not in str(err.value)
    clip_store = FeatureStore.create(tmp_path / "clip", {"model": {"model": "x"}, "embed_dim": 4})
    assert clip_store.targets == TARGETS and "targets" not in clip_store.manifest["settings"]
    with pytest.raises(InvalidInputError, match="other settings") as err:
        _extract([prepared.root], tmp_path / "clip")
    assert "\n" not in str(err.value)
    with pytest.raises(InvalidInputError, match="not a MindDiffuser target store") as err:
        load_minddiffuser_targets(tmp_path / "clip", [1])
    assert "\n" not in str(err.value)


def test_store_with_named_targets(tmp_path):
    """A store's targets come from its settings: writing, reading, checks and repair hints follow them."""
    settings = {"command": "extract-minddiffuser", "targets": ["a", "b"]}
    store = FeatureStore.create(tmp_path / "s", settings)
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(3, 2, 5)), "b": rng.normal(size=(3, 4, 1))}
    store.write_shard(np.array([4, 2, 9]), arrays)
    with pytest.raises(InvalidInputError, match=r"expected \['a', 'b'\]"):
        store.write_shard(np.array([1]), {"a": arrays["a"][:1]})
    with pytest.raises(InvalidInputError, match="float16's range"):
        store.write_shard(np.array([1, 3, 5]), dict(arrays, b=np.full((3, 4, 1), 1e6)))
    store.finish()
    reopened = open_feature_store(tmp_path / "s")
    got = reopened.get([9, 4])
    assert list(got) == ["a", "b"]
    np.testing.assert_allclose(got["b"], arrays["b"][[2, 0]], rtol=1e-3)
    assert reopened.get([2], token=1)["a"].shape == (1, 5)
    with pytest.raises(InvalidInputError, match=r"Unknown target='text'; choose from \['a', 'b'\]"):
        reopened.get([2], ["text"])
    with pytest.raises(InvalidInputError, match="brainmclip extract-minddiffuser on the prepared"):
        reopened.get([7])
    cut = tmp_path / "s" / "shards" / "shard_000002" / "b.npy"
    cut.write_bytes(cut.read_bytes()[:-4])
    with pytest.raises(InvalidInputError, match="b.npy: truncated or corrupt.*brainmclip extract-minddiffuser"):
        open_feature_store(tmp_path / "s").get([2])
    assert open_feature_store(tmp_path / "s").remove_damaged_shards() == 1
    with pytest.raises(InvalidInputError, match="targets"):
        FeatureStore.create(tmp_path / "t", {"targets": ["a", "a"]})
