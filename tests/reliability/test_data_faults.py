"""Damaged files: NSD inputs that are cut or corrupt, and intermediate files of every stage.

Each case damages one file and runs the next command that reads it: it must stop with one line
naming the file (never a traceback, never wrong numbers with exit 0), and commit nothing.
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib

import pytest
from faults import assert_one_line_error, tree_checksums

from brainmclip.data import nsd_paths
from brainmclip.data.synthetic import make_synthetic_nsd

PREPARED_OUTPUTS = ("manifest.json", "voxels.npz", "train", "val", "test")


# ---------------------------------------------------------------- ways to damage a file
def replace(path, data: bytes) -> None:
    """Write ``data`` as ``path`` without touching what a symbolic link there points to."""
    path.unlink()
    path.write_bytes(data)


def truncate(path) -> None:
    data = path.read_bytes()
    replace(path, data[: len(data) // 2])


def flip(path, at: int | None = None) -> None:
    """Invert one byte: at ``at``, else in the middle."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    replace(path, bytes(data))


def empty(path) -> None:
    replace(path, b"")


def flip_gzip_silently(path) -> None:
    """Flip one bit of the compressed payload where deflate still decodes to the full length.

    Only gzip's CRC-32 trailer can tell such a file from the original: this is the damage a reader
    that stops after the last volume it needs lets through.
    """
    data = path.read_bytes()
    assert data[:4] == b"\x1f\x8b\x08\x00", "expected a gzip member without optional header fields"
    original = gzip.decompress(data)
    for at in range(len(data) // 2, len(data) - 8):
        damaged = bytearray(data)
        damaged[at] ^= 0x01
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate: no CRC check
        try:
            out = inflate.decompress(bytes(damaged[10:]))
        except zlib.error:
            continue
        if inflate.eof and len(out) == len(original) and out[:352] == original[:352] and out != original:
            replace(path, bytes(damaged))
            return
    raise AssertionError(f"{path}: found no silently decodable bit flip")


# ---------------------------------------------------------------- 1. NSD inputs
@pytest.fixture(scope="module")
def nsd_three_sessions(tmp_path_factory):
    root = tmp_path_factory.mktemp("nsd3")
    make_synthetic_nsd(root, "tiny", subjects=[1], seed=3, sessions=3, progress=False)
    return root


@pytest.fixture
def nsd_copy(nsd_three_sessions, tmp_path):
    """A copy made of symbolic links: damage a file by replacing its link, the shared tree stays intact."""
    root = tmp_path / "nsd"
    shutil.copytree(nsd_three_sessions, root, copy_function=os.symlink)
    return root


def _betas(root, session=2):
    return nsd_paths.betas_path(root, 1, session)


def _cut_gzip_trailer(path):
    replace(path, path.read_bytes()[:-6])  # every volume is there; the CRC and length are not


def _cut_csv_row(path):
    text = path.read_bytes()
    replace(path, text[: text.rindex(b"\n", 0, len(text) // 2) + 20])  # ends inside a row


def _cut_csv_at_line(path):
    lines = path.read_bytes().splitlines(keepends=True)
    replace(path, b"".join(lines[: len(lines) // 3]))


INPUT_FAULTS = [
    # (case, file, damage, words the error must hold besides the file name)
    ("betas-bit-flip", _betas, flip_gzip_silently, ["CRC check failed", "re-download"]),
    ("betas-no-trailer", _betas, _cut_gzip_trailer, ["truncated"]),
    ("betas-truncated", _betas, truncate, ["truncated"]),
    ("roi-bit-flip", lambda r: nsd_paths.roi_path(r, 1, "floc-faces"), flip_gzip_silently, ["CRC check failed"]),
    ("roi-missing", lambda r: nsd_paths.roi_path(r, 1, "prf-visualrois"), lambda p: p.unlink(), ["missing"]),
    ("stim-info-cut-in-a-row", nsd_paths.stim_info_path, _cut_csv_row, ["truncated"]),
    ("stim-info-cut-at-a-line", nsd_paths.stim_info_path, _cut_csv_at_line, ["truncated"]),
    ("stimuli-truncated", nsd_paths.stimuli_path, truncate, ["HDF5"]),
    ("stimuli-bad-superblock", nsd_paths.stimuli_path, lambda p: flip(p, 2), ["HDF5"]),
]


@pytest.mark.parametrize("case, target, damage, words", INPUT_FAULTS, ids=[c[0] for c in INPUT_FAULTS])
def test_damaged_nsd_input_stops_prepare(cli, nsd_copy, tmp_path, case, target, damage, words):
    path = target(nsd_copy)
    damage(path)
    out = tmp_path / "prepared"
    code, err = cli(["prepare", "--nsd-root", nsd_copy, "--subject", 1, "--out", out, "--sessions", "1-3"])
    assert_one_line_error(code, err, path.name, *words)
    assert str(path) in err
    assert not [name for name in PREPARED_OUTPUTS if (out / name).exists()], tree_checksums(out)


# ---------------------------------------------------------------- 2. intermediate files
@pytest.fixture(scope="module")
def chain(nsd_three_sessions, tmp_path_factory):
    """prepare -> extract -> train (1 epoch) -> predict on the three-session tree, made once."""
    from brainmclip.cli import main

    base = tmp_path_factory.mktemp("chain")
    prepared, features, run = base / "prepared", base / "features", base / "run"
    for args in (["prepare", "--nsd-root", nsd_three_sessions, "--subject", 1, "--out", prepared, "--sessions", "1-3"],
                 ["extract", "--data", prepared, "--out", features, "--model", "tiny", "--shard-size", 16],
                 ["train", "--data", prepared, "--features", features, "--config", "brain_mclip_tiny",
                  "--set", "train.epochs=1", "--out", run],
                 ["predict", "--run", run, "--split", "test"]):
        assert main(["-q", *map(str, args)]) == 0, args
    return base


@pytest.fixture
def work(chain, tmp_path):
    """A private copy of the chain's outputs, free to damage."""
    shutil.copytree(chain, tmp_path / "w")
    return tmp_path / "w"


def _first_shard(features) -> str:
    return sorted(p.name for p in (features / "shards").iterdir() if p.name.startswith("shard_"))[0]


def _next_command(reader: str, w) -> list:
    return {
        "extract": ["extract", "--data", w / "prepared", "--out", w / "features2", "--model", "tiny"],
        "train": ["train", "--data", w / "prepared", "--features", w / "features", "--config", "brain_mclip_tiny",
                  "--set", "train.epochs=1", "--out", w / "run2"],
        "resume": ["train", "--data", w / "prepared", "--features", w / "features", "--out", w / "run", "--resume"],
        "predict": ["predict", "--run", w / "run", "--out", w / "predictions2"],
        "reconstruct": ["reconstruct", "--pred", w / "run" / "predictions_test", "--out", w / "reconstructions",
                        "--generator", "tiny", "--clip", "tiny", "--steps", 1],
    }[reader]


SHARD = "features/shards/{shard}"
INTERMEDIATE_FAULTS = [
    # (stage that wrote it, file, damage, command that reads it next)
    ("prepare", "prepared/train/betas.npy", truncate, "extract"),
    ("prepare", "prepared/train/betas.npy", flip, "train"),
    ("prepare", "prepared/test/images.npy", truncate, "extract"),
    ("prepare", "prepared/val/images.npy", flip, "extract"),
    ("prepare", "prepared/voxels.npz", truncate, "extract"),
    ("prepare", "prepared/voxels.npz", flip, "train"),
    ("prepare", "prepared/val/captions.json", truncate, "extract"),
    ("prepare", "prepared/train/stimulus_ids.npy", empty, "extract"),
    ("prepare", "prepared/test/trial_ids.npy", flip, "extract"),
    ("prepare", "prepared/manifest.json", truncate, "extract"),
    ("extract", f"{SHARD}/image_semantic.npy", truncate, "train"),
    ("extract", f"{SHARD}/image_detail.npy", flip, "train"),
    ("extract", f"{SHARD}/ids.npy", empty, "train"),
    ("extract", f"{SHARD}/text.npy", flip, "train"),
    ("extract", "features/manifest.json", truncate, "train"),
    ("train", "run/checkpoint_last.pt", truncate, "resume"),
    ("train", "run/checkpoint_last.pt", flip, "resume"),
    ("train", "run/checkpoint_last.pt", empty, "resume"),
    ("train", "run/model_best.safetensors", truncate, "predict"),
    ("train", "run/model_best.safetensors", lambda p: flip(p, 12), "predict"),
    ("train", "run/model_best.safetensors", empty, "predict"),
    ("predict", "run/predictions_test/image.npy", truncate, "reconstruct"),
    ("predict", "run/predictions_test/text.npy", flip, "reconstruct"),
    ("predict", "run/predictions_test/stimulus_ids.npy", flip, "reconstruct"),
    ("predict", "run/predictions_test/manifest.json", empty, "reconstruct"),
]


def _case_id(case) -> str:
    stage, name, damage, reader = case
    how = damage.__name__ if damage.__name__ != "<lambda>" else "flip"
    return f"{stage}:{name.rsplit('/', 1)[-1]}:{how}:{reader}"


@pytest.mark.parametrize("stage, name, damage, reader", INTERMEDIATE_FAULTS,
                         ids=[_case_id(c) for c in INTERMEDIATE_FAULTS])
def test_damaged_intermediate_stops_the_next_command(cli, work, stage, name, damage, reader):
    path = work / name.format(shard=_first_shard(work / "features"))
    damage(path)
    code, err = cli(_next_command(reader, work))
    assert_one_line_error(code, err, str(path), "corrupt", f"brainmclip {stage}")  # names the stage to rerun


@pytest.mark.parametrize("damage, name", [(truncate, "image_detail.npy"), (flip, "text.npy"), (empty, "ids.npy")],
                         ids=["truncated-targets", "flipped-targets", "empty-ids"])
def test_extract_repairs_a_damaged_shard(cli, chain, tmp_path, damage, name):
    """Rerunning extract finds the damaged shard, computes it again, and the store equals an undamaged one."""
    reference = chain / "features"
    store = tmp_path / "features"
    shutil.copytree(reference, store)
    shards = sorted(p for p in (store / "shards").iterdir() if p.name.startswith("shard_"))
    assert len(shards) > 2
    damage(shards[1] / name)
    code, err = cli(["extract", "--data", chain / "prepared", "--out", store, "--model", "tiny", "--shard-size", 16])
    assert code == 0, err
    assert tree_checksums(store) == tree_checksums(reference)
    # The next reader takes the repaired store.
    code, err = cli(["train", "--data", chain / "prepared", "--features", store, "--config", "brain_mclip_tiny",
                     "--set", "train.epochs=1", "--out", tmp_path / "run"])
    assert code == 0, err
