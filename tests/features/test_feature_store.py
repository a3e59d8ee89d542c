"""The feature store and `brainmclip extract`: once per NSD id, resumable, consistent, multi-process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from brainmclip.cli import main
from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.features import ClipFeatureExtractor, FeatureStore, open_feature_store, random_clip
from brainmclip.features.extract import extract_features


@pytest.fixture(scope="module")
def prepared_pair(tiny_nsd, tmp_path_factory):
    """Two subjects (sessions 1-3 keep it small); they share the test images."""
    base = tmp_path_factory.mktemp("prepared")
    options = PrepareOptions(sessions=(1, 2, 3))
    return [prepare_subject(tiny_nsd.root, s, base / f"subj{s:02d}", options, progress=False) for s in (1, 2)]


def _all_ids(prepared):
    return np.unique(np.concatenate([s.stimulus_ids for p in prepared for s in p.splits.values()]))


def test_store_roundtrip_and_refusals(tmp_path):
    settings = {"model": {"model": "x"}, "embed_dim": 4}
    store = FeatureStore.create(tmp_path / "s", settings)
    rng = np.random.default_rng(0)
    arrays = {"image_detail": rng.normal(size=(3, 5, 4)), "image_semantic": rng.normal(size=(3, 5, 4)),
              "text": rng.normal(size=(3, 2, 4))}
    store.write_shard(np.array([7, 3, 11]), arrays)
    reopened = open_feature_store(tmp_path / "s")
    got = reopened.get([11, 7])
    np.testing.assert_allclose(got["text"], arrays["text"][[2, 0]], rtol=1e-3, atol=1e-3)  # stored as float16
    assert got["image_detail"].dtype == np.float32 and len(reopened) == 3 and 3 in reopened
    with pytest.raises(ValueError, match="NSD id 5"):
        reopened.get([5])
    with pytest.raises(ValueError, match="other settings.*embed_dim"):
        FeatureStore.create(tmp_path / "s", {**settings, "embed_dim": 8})
    with pytest.raises(ValueError, match="non-finite"):
        bad = dict(arrays, text=np.full((3, 2, 4), np.nan))
        store.write_shard(np.array([1, 2, 4]), bad)
    # A half-written shard (a crash before the rename) is invisible and removed on the next run.
    (tmp_path / "s" / "shards" / ".shard_000001.tmp-123").mkdir()
    assert len(open_feature_store(tmp_path / "s")) == 3
    assert store.remove_stale_shards() == 1


def test_damaged_shards_are_refused_and_removed(tmp_path):
    """A shard is checked against its .npy header (always) and its recorded checksum (once finish ran)."""
    store = FeatureStore.create(tmp_path / "s", {"model": {"model": "x"}})
    rng = np.random.default_rng(0)
    for ids in ([1, 2], [5, 6], [9, 10]):
        store.write_shard(np.array(ids), {t: rng.normal(size=(2, 3, 4)) for t in ("image_detail", "image_semantic",
                                                                                    "text")})
    # Before finish, no checksums exist: a cut file still fails on its header's size.
    cut = tmp_path / "s" / "shards" / "shard_000005" / "text.npy"
    cut.write_bytes(cut.read_bytes()[:-8])
    with pytest.raises(ValueError, match="shard_000005/text.npy: truncated or corrupt.*brainmclip extract"):
        open_feature_store(tmp_path / "s").get([6])
    # After finish, flipped bytes fail on the recorded checksum.
    reopened = open_feature_store(tmp_path / "s")
    assert reopened.remove_damaged_shards() == 1 and len(reopened) == 4
    reopened.finish()
    assert sorted(reopened.manifest["checksums"]) == [f"shards/shard_{i:06d}/{f}" for i in (1, 9) for f in
                                                      ("ids.npy", "image_detail.npy", "image_semantic.npy", "text.npy")]
    flipped = tmp_path / "s" / "shards" / "shard_000009" / "image_detail.npy"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard_000009/image_detail.npy: truncated or corrupt.*checksum"):
        open_feature_store(tmp_path / "s").get([10, 1])
    assert open_feature_store(tmp_path / "s").get([1, 2])["text"].shape == (2, 3, 4)  # other shards stay readable


def test_extract_stores_each_image_once_and_matches_the_extractor(prepared_pair, tmp_path):
    paths = [p.root for p in prepared_pair]
    result = extract_features(paths, tmp_path / "store", model="tiny", batch_size=8, shard_size=64, progress=False)
    ids = _all_ids(prepared_pair)
    assert result.n_extracted == len(ids) == len(result.store)
    shared = set(prepared_pair[0].test.stimulus_ids) & set(prepared_pair[1].test.stimulus_ids)
    assert len(shared) > 0 and len(ids) < sum(len(s) for p in prepared_pair for s in p.splits.values())
    # Spot-check rows against a direct computation on the prepared images and captions.
    samples = prepared_pair[1].test
    rows = [0, len(samples) - 1]
    direct = ClipFeatureExtractor(random_clip("tiny")).encode(np.asarray(samples.images[rows]),
                                                             [samples.captions[r] for r in rows])
    stored = open_feature_store(tmp_path / "store").get(samples.stimulus_ids[rows])
    for key, value in direct.items():
        np.testing.assert_allclose(stored[key], value.numpy(), rtol=2e-3, atol=2e-3)
    manifest = open_feature_store(tmp_path / "store").manifest
    assert manifest["n_images"] == len(ids)
    assert manifest["settings"]["extractor"]["detail_layers"] == list(range(11, 21))
    assert manifest["settings"]["model"]["model"] == "random:tiny"


def test_interrupted_extraction_resumes_with_what_is_missing(prepared_pair, tmp_path, monkeypatch):
    paths = [prepared_pair[0].root]
    reference = extract_features(paths, tmp_path / "ref", model="tiny", shard_size=16, progress=False)
    assert reference.n_requested > 40
    real = FeatureStore.write_shard
    calls = {"n": 0}

    def dying(self, ids, arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, ids, arrays)

    monkeypatch.setattr(FeatureStore, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_features(paths, tmp_path / "run", model="tiny", shard_size=16, progress=False)
    assert len(open_feature_store(tmp_path / "run")) == 16
    monkeypatch.setattr(FeatureStore, "write_shard", real)
    resumed = extract_features(paths, tmp_path / "run", model="tiny", shard_size=16, progress=False)
    assert resumed.n_extracted == reference.n_requested - 16
    ids = reference.store.stored_ids()
    a, b = open_feature_store(tmp_path / "ref").get(ids), open_feature_store(tmp_path / "run").get(ids)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    again = extract_features(paths, tmp_path / "run", model="tiny", shard_size=16, progress=False)
    assert again.n_extracted == 0


def test_other_settings_are_refused(prepared_pair, tmp_path, capsys):
    paths = [str(prepared_pair[0].root)]
    assert main(["-q", "extract", "--data", *paths, "--model", "tiny", "--out", str(tmp_path / "s")]) == 0
    assert "CLIP feature store" in capsys.readouterr().out
    assert main(["-q", "extract", "--data", *paths, "--model", "tiny", "--out", str(tmp_path / "s"),
                 "--layers", "10-20"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other settings" in err and "extractor" in err


def test_unknown_real_model_is_a_one_line_error(prepared_pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = main(["-q", "extract", "--data", str(prepared_pair[0].root), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "openai/clip-vit-large-patch14" in err and "cache" in err


@pytest.mark.slow
def test_two_processes_split_the_work_and_agree_with_one(prepared_pair, tmp_path):
    """torchrun starts two gloo processes on the CPU that accelerate picks up, as a multi-GPU extraction would."""
    paths = [str(prepared_pair[0].root)]
    single = extract_features(paths, tmp_path / "one", model="tiny", shard_size=16, progress=False)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29531", "-m", "brainmclip.cli", "extract",
           "--data", *paths, "--model", "tiny", "--out", str(tmp_path / "two"), "--shard-size", "16", "--cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stderr
    assert "process 0 computed CLIP features" in log and "process 1 computed CLIP features" in log
    two = open_feature_store(tmp_path / "two")
    np.testing.assert_array_equal(two.stored_ids(), single.store.stored_ids())
    assert two.manifest["n_images"] == single.n_requested
    ids = two.stored_ids()
    a, b = single.store.get(ids), two.get(ids)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=2e-3)
    torch.testing.assert_close(torch.tensor(len(ids)), torch.tensor(single.n_requested))
