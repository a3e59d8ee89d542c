"""The wheel users get from ``pip install .``: it holds every data file and works without the source tree.

The wheel is built from a clean copy of ``src/``, ``pyproject.toml`` and ``README.md``: a build in the
checkout reuses ``build/`` and the ``SOURCES.txt`` of an earlier build, which would hide a file that
``[tool.setuptools.package-data]`` no longer matches. The installed copy is put first on ``PYTHONPATH``
of a fresh interpreter, ahead of the editable install, which then lists and loads every shipped config,
preset and miniature model and runs a one-epoch training on a tiny simulated subject.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "brainmclip"

# Runs in the fresh interpreter; argv: site folder, work folder. Prints one JSON line of what it found.
CHECK_INSTALLED = r"""
import json, sys
from importlib import resources
from pathlib import Path

site, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
import brainmclip

assert Path(brainmclip.__file__).resolve().is_relative_to(site), f"imported {brainmclip.__file__}, not the wheel"

from brainmclip.config import list_configs, load_config
from brainmclip.data.synthetic import PRESETS, list_presets
from brainmclip.features.clip_models import list_random_configs, load_clip, random_clip
from brainmclip.miniature import MINIATURE_MODELS, model_folder
from brainmclip.miniature.card import read_model_card
from brainmclip.miniature.clip import load_miniature_config
from brainmclip.models.brain_mclip import BrainMCLIPConfig

found = {"configs": list_configs(), "presets": list_presets(), "random_clips": list_random_configs()}
from brainmclip.models.registry import get_method

for name in found["configs"]:
    method = load_config(name).get("method", "brain_mclip")
    if method == "brain_mclip":  # ablation files hold only their switch: layered on the paper's config
        cfg = load_config(["brain_mclip", name])
        BrainMCLIPConfig.from_dict({**cfg["model"], "n_semantic_voxels": 8, "n_detail_voxels": 8, "embed_dim": 16})
    else:
        get_method(method).resolve_config([name])
assert set(PRESETS) == set(found["presets"])
for name in found["random_clips"]:
    assert random_clip(name).identity["config_sha256"]
found["miniature_configs"] = sorted(p.name[:-5] for p in resources.files("brainmclip.miniature").joinpath("configs")
                                    .iterdir() if p.name.endswith(".json"))
for name in found["miniature_configs"]:
    assert load_miniature_config(name)
for kind in MINIATURE_MODELS:
    folder = model_folder(kind)
    assert folder.resolve().is_relative_to(site), folder
    assert read_model_card(folder)["checksums"]
towers = load_clip("mini")
assert Path(towers.identity["folder"]).resolve().is_relative_to(site)
found["mini_clip_embed_dim"] = towers.embed_dim

from brainmclip.cli import main

sim, prep, feat, run = (str(work / n) for n in ("nsd", "prepared", "features", "run"))
assert main(["-q", "simulate", "--out", sim, "--preset", "tiny", "--subjects", "1"]) == 0
assert main(["-q", "prepare", "--nsd-root", sim, "--subject", "1", "--out", prep]) == 0
assert main(["-q", "extract", "--data", prep, "--model", "mini", "--out", feat]) == 0
assert main(["-q", "train", "--data", prep, "--features", feat, "--config", "brain_mclip_tiny",
             "--set", "train.epochs=1", "--out", run]) == 0
assert main(["-q", "predict", "--run", run, "--split", "test"]) == 0
found["run_files"] = sorted(p.name for p in Path(run).iterdir())
print(json.dumps(found))
"""


def _shipped_data_files() -> list[str]:
    """Every file under src/brainmclip that is neither Python source nor byte code, relative to the package."""
    return sorted(p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("wheel_source")
    shutil.copytree(PACKAGE, tree / "src" / "brainmclip", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    dist = tree / "dist"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
          str(tree)], env=env, timeout=300)
    (built,) = dist.glob("brainmclip-*.whl")
    return built


def test_wheel_holds_every_data_file(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = [name for name in _shipped_data_files() if name not in names]
    assert not missing, f"not in the wheel (extend [tool.setuptools.package-data]): {missing}"
    assert "brainmclip/models/configs/brain_mclip.json" in names  # the scan above found the package


def test_installed_wheel_loads_its_data_and_trains(wheel, tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "--target", str(site),
          str(wheel)], env=env, timeout=300)
    work = tmp_path / "work"
    work.mkdir()
    env = {**env, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    result = _run([sys.executable, "-c", CHECK_INSTALLED, str(site), str(work)], env=env, cwd=work, timeout=300)
    found = json.loads(result.stdout.strip().splitlines()[-1])

    from brainmclip.config import list_configs
    from brainmclip.data.synthetic import list_presets
    from brainmclip.features.clip_models import list_random_configs

    assert found["configs"] == list_configs()
    assert {"brain_mclip", "brain_mclip_tiny", "ablations/text_only"} <= set(found["configs"])
    assert found["presets"] == list_presets()
    assert found["random_clips"] == list_random_configs()
    assert found["miniature_configs"] == sorted(p.stem for p in (PACKAGE / "miniature" / "configs").glob("*.json"))
    assert found["mini_clip_embed_dim"] > 0
    assert {"run.json", "model_best.safetensors", "predictions_test"} <= set(found["run_files"])
