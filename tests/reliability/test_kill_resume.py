"""kill -9 in the middle of each long stage, then the same command again: the result is the uninterrupted one.

Each stage runs as ``brainmclip`` in a subprocess with ``BRAINMCLIP_CRASH_AT=<point>:<k>``, which
SIGKILLs it right after its k-th unit of work is on disk (see :func:`brainmclip.atomic.crash_point`).
The rerun must finish, and its folder must hold the same files, byte for byte, as a run that was
never interrupted; only logs, TensorBoard events and per-call fields (time taken, images made) may differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

# The stages are imported here, once, so that the forked children of _brainmclip start at once.
import brainmclip.generation.reconstruct  # noqa: F401
import brainmclip.training.loop  # noqa: F401
from brainmclip.atomic import LOCK_FILE
from brainmclip.cli import main
from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.features.extract import extract_features
from brainmclip.models.predictions import write_predictions

# Fields that describe one call rather than the result: its wall-clock time, and how many
# images reconstruct made in it (a resumed call makes only the missing ones).
PER_CALL_KEYS = {"seconds", "elapsed", "new_images"}


def _brainmclip(args, crash: str | None = None) -> tuple[int, str]:
    """``brainmclip -q ARGS`` in a child process: (return code as subprocess gives it, stderr).

    The child is forked from this process, which has torch and the stages imported already: a
    fresh interpreter would spend seconds importing them for every run. It is still a process
    of its own, so SIGKILL ends it without any cleanup, exactly as it would end the CLI.
    """
    with tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            code = 70
            try:
                os.dup2(err.fileno(), 2)
                os.environ.pop("BRAINMCLIP_CRASH_AT", None)
                if crash:
                    os.environ["BRAINMCLIP_CRASH_AT"] = crash
                torch.set_num_threads(1)
                code = main(["-q", *map(str, args)])
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), err.read().decode()


def _ok(args) -> None:
    code, err = _brainmclip(args)
    assert code == 0, err


def _killed_then_rerun(args, crash: str, rerun_args=None) -> None:
    code, err = _brainmclip(args, crash)
    assert code == -signal.SIGKILL, (code, err)
    _ok(rerun_args or args)


def _without_per_call(value):
    if isinstance(value, dict):
        return {k: _without_per_call(v) for k, v in value.items() if k not in PER_CALL_KEYS}
    if isinstance(value, list):
        return [_without_per_call(v) for v in value]
    return value


def _canonical(value) -> bytes:
    """Bytes that are equal exactly when two loaded checkpoints are (tensors bit for bit, other values by repr).

    Pickle's byte stream depends on which equal strings happen to be one object, so the files
    themselves are not compared."""
    if isinstance(value, dict):
        return b"{" + b",".join(repr(k).encode() + b":" + _canonical(v) for k, v in sorted(value.items(), key=str)) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(_canonical(v) for v in value) + b"]"
    if isinstance(value, torch.Tensor):
        raw = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return f"{value.dtype}{tuple(value.shape)}".encode() + raw
    return repr(value).encode()


def _safetensors_bytes(path: Path) -> bytes:
    """Every tensor's dtype, shape and bytes and the metadata, in name order.

    safetensors writes the metadata in the order of a Rust HashMap, which varies from process
    to process, so the file bytes of two identical models differ."""
    with safe_open(path, "pt") as f:
        names = f.keys()
        return _canonical({"metadata": f.metadata(), "tensors": {k: f.get_tensor(k) for k in names}})


def _contents(folder: Path) -> dict[str, str]:
    """relative path -> digest of every output file; JSON without its per-call fields, logs and events left out."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (not path.is_file() or path.name == LOCK_FILE or path.suffix == ".log" or "tensorboard" in rel.parts
                or path.name.startswith("events.out.tfevents")):
            continue
        if path.suffix == ".safetensors":
            data = _safetensors_bytes(path)
        elif path.suffix == ".pt":
            data = _canonical(torch.load(path, map_location="cpu", weights_only=False))
        elif path.suffix == ".json":
            data = json.dumps(_without_per_call(json.loads(path.read_text())), sort_keys=True).encode()
        else:
            data = path.read_bytes()
        found[str(rel)] = hashlib.sha256(data).hexdigest()
    return found


def _assert_same(resumed: Path, reference: Path) -> None:
    got, want = _contents(resumed), _contents(reference)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []


@pytest.fixture(scope="module")
def inputs(tiny_nsd, tmp_path_factory):
    """A prepared tiny subject, its tiny-CLIP features, and predictions for reconstruct."""
    base = tmp_path_factory.mktemp("kill_inputs")
    prepared = prepare_subject(tiny_nsd.root, 1, base / "prepared", PrepareOptions(), progress=False)
    extract_features([prepared.root], base / "features", model="tiny", progress=False)
    ids = np.array([11, 3, 42, 7, 19])
    rng = np.random.default_rng(0)
    arrays = {"image": rng.normal(size=(len(ids), 257, 32)).astype(np.float32),
              "text": rng.normal(size=(len(ids), 77, 32)).astype(np.float32)}
    write_predictions(base / "pred", ids, arrays, {"method": "ridge", "subject": 1, "split": "test"})
    return {"nsd": tiny_nsd.root, "prepared": prepared.root, "features": base / "features", "pred": base / "pred"}


# Reference runs, one per stage, shared by that stage's crash points.
@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    made: dict[str, Path] = {}

    def get(stage: str, make):
        if stage not in made:
            made[stage] = tmp_path_factory.mktemp(f"reference_{stage}") / "out"
            make(made[stage])
        return made[stage]
    return get


def _prepare_args(inputs, out):
    return ["prepare", "--nsd-root", inputs["nsd"], "--subject", 1, "--out", out]


@pytest.mark.parametrize("crash", ["prepare-session:1", "prepare-session:2", "prepare-commit:1"])
def test_prepare_killed_resumes_to_the_same_dataset(inputs, reference, tmp_path, crash):
    ref = reference("prepare", lambda out: _ok(_prepare_args(inputs, out)))
    out = tmp_path / "out"
    _killed_then_rerun(_prepare_args(inputs, out), crash)
    _assert_same(out, ref)


def _extract_args(inputs, out):
    return ["extract", "--data", inputs["prepared"], "--model", "tiny", "--out", out, "--shard-size", 8, "--cpu"]


@pytest.mark.parametrize("crash", ["extract-shard:1", "extract-shard:2"])
def test_extract_killed_resumes_to_the_same_features(inputs, reference, tmp_path, crash):
    ref = reference("extract", lambda out: _ok(_extract_args(inputs, out)))
    out = tmp_path / "out"
    _killed_then_rerun(_extract_args(inputs, out), crash)
    _assert_same(out, ref)


def _train_args(inputs, out):
    return ["train", "--data", inputs["prepared"], "--features", inputs["features"], "--config", "brain_mclip_tiny",
            "--set", "train.epochs=2", "--set", "train.checkpoint_every=1", "--out", out, "--cpu"]


def _train_and_predict(inputs, out, crash=None):
    """Two epochs of 6 steps, a checkpoint after every step and at each epoch end (the 7th, after model_best)."""
    args = _train_args(inputs, out)
    if crash:
        _killed_then_rerun(args, crash, [*args, "--resume"])
    else:
        _ok(args)
    _ok(["predict", "--run", out, "--split", "test", "--out", out / "pred_test"])


@pytest.mark.parametrize("crash", ["train-checkpoint:1", "train-checkpoint:7"])
def test_train_killed_resumes_to_the_same_weights_and_predictions(inputs, reference, tmp_path, crash):
    ref = reference("train", lambda out: _train_and_predict(inputs, out))
    out = tmp_path / "out"
    _train_and_predict(inputs, out, crash)
    _assert_same(out, ref)


def _reconstruct_args(inputs, out):
    return ["reconstruct", "--pred", inputs["pred"], "--out", out, "--generator", "tiny", "--clip", "tiny",
            "--steps", 3, "--batch-size", 2]


@pytest.mark.parametrize("crash", ["reconstruct-image:1", "reconstruct-image:3"])
def test_reconstruct_killed_resumes_to_the_same_images(inputs, reference, tmp_path, crash):
    ref = reference("reconstruct", lambda out: _ok(_reconstruct_args(inputs, out)))
    out = tmp_path / "out"
    _killed_then_rerun(_reconstruct_args(inputs, out), crash)
    _assert_same(out, ref)
