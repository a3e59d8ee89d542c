"""The decoders ``brainmclip train`` and ``predict`` know, one entry per method.

An entry names the method's trainer, the function that turns a trained run into prediction arrays, the
options its trainer takes, and its default config. The CLI and :func:`brainmclip.training.predict.predict`
go through this table only, so a new method is one entry here plus its own modules; an option a method
does not take is refused rather than ignored.

Trainers are called as ``train(data, features, out, config=..., overrides=..., resume=..., force=...,
stop_after_steps=..., cpu=..., progress=...)`` with only the options of :attr:`DecoderMethod.options`
(plus ``force`` and ``progress``, which every method takes) and return an object with ``summary()``.
``outputs(run_dir, run, prepared, split)`` returns ``{array name: (n, tokens, D)}`` in the shared
prediction format (see :mod:`brainmclip.models.predictions`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from brainmclip.errors import InvalidInputError

__all__ = ["DecoderMethod", "METHODS", "OPTIONS", "get_method", "method_names"]

#: Options a trainer may take, as ``train`` flags spell them.
OPTIONS = {"config": "--config", "overrides": "--set", "resume": "--resume", "stop_after_steps": "--stop-after-steps",
           "cpu": "--cpu"}


@dataclass(frozen=True)
class DecoderMethod:
    name: str
    description: str
    train: Callable
    outputs: Callable
    options: frozenset[str]
    default_config: tuple[str, ...] = ()
    resolve_config: Callable | None = None  # (config names or dict, overrides) -> the checked config

    def check_options(self, given: dict) -> None:
        """Refuse options this method does not take; ``given`` maps option names to the values passed."""
        unused = [OPTIONS[k] for k, v in given.items() if k not in self.options and v not in (None, False, [], ())]
        if unused:
            takes = ", ".join(OPTIONS[k] for k in OPTIONS if k in self.options) or "none of them"
            raise InvalidInputError(f"{', '.join(unused)} do(es) not apply to --method {self.name} (it takes "
                                    f"{takes})")


def _paired(prepared, split: str, run: dict, store=None):
    from brainmclip.training.data import PairedSplit

    cfg = run["config"].get("data", {})
    return PairedSplit(prepared, split, store, cfg.get("semantic_group", "semantic"), cfg.get("detail_group", "detail"))


# -- BrainMCLIP ----------------------------------------------------------------------------
def _train_brain_mclip(data, features, out, config=None, overrides=None, resume=False, force=False,
                       stop_after_steps=None, cpu=False, progress=True):
    from brainmclip.training.loop import train_brain_mclip

    # With --resume a config is only needed when --out holds no run yet; then it has to be named.
    config = config or (None if resume else ["brain_mclip"])
    return train_brain_mclip(data, features, config, out, resume=resume, overrides=overrides,
                             stop_after_steps=stop_after_steps, cpu=cpu, progress=progress, force=force)


def _brain_mclip_outputs(run_dir: Path, run: dict, prepared, split: str):
    from brainmclip.training.predict import brain_mclip_outputs

    return brain_mclip_outputs(run_dir, run, _paired(prepared, split, run))


def _brain_mclip_config(config, overrides=None) -> dict:
    from brainmclip.config import load_config
    from brainmclip.training.loop import check_train_config

    cfg = load_config(config or ["brain_mclip"], overrides or [])
    check_train_config(cfg)
    return cfg


# -- ridge -------------------------------------------------------------------------------
def _train_ridge(data, features, out, config=None, overrides=None, force=False, progress=True):
    from brainmclip.training.ridge_fit import train_ridge

    return train_ridge(data, features, out, config=config, overrides=overrides, progress=progress, force=force)


def _ridge_config(config, overrides=None) -> dict:
    from brainmclip.training.ridge_fit import resolve_ridge_config

    return resolve_ridge_config(config, overrides)


def _ridge_outputs(run_dir: Path, run: dict, prepared, split: str):
    from brainmclip.training.ridge_fit import ridge_outputs

    return ridge_outputs(run_dir, _paired(prepared, split, run))


# -- ground truth ------------------------------------------------------------------------
class _Written:
    def __init__(self, run: Path):
        self.run = run

    def summary(self) -> str:
        return (f"ground-truth run at {self.run} (nothing to fit; brainmclip predict --run writes the test images' own "
                "targets)")


def _train_ground_truth(data, features, out, force=False, progress=True):
    from brainmclip.training.ground_truth import write_ground_truth_run

    return _Written(write_ground_truth_run(data, features, out, force=force))


def _ground_truth_outputs(run_dir: Path, run: dict, prepared, split: str):
    from brainmclip.training.ground_truth import ground_truth_outputs

    return ground_truth_outputs(run, _paired(prepared, split, run), run_dir)


# -- BrainCLIP ---------------------------------------------------------------------------
def _train_brainclip(data, features, out, config=None, overrides=None, resume=False, force=False, progress=True):
    from brainmclip.training.brainclip_fit import train_brainclip

    return train_brainclip(data, features, config, out, overrides=overrides, resume=resume, force=force,
                           progress=progress)


def _brainclip_config(config, overrides=None) -> dict:
    from brainmclip.training.brainclip_fit import resolve_brainclip_config

    return resolve_brainclip_config(config, overrides)


def _brainclip_outputs(run_dir: Path, run: dict, prepared, split: str):
    from brainmclip.training.brainclip_fit import brainclip_outputs

    return brainclip_outputs(run_dir, run, prepared, split)


# -- MindDiffuser ------------------------------------------------------------------------
def _train_minddiffuser(data, features, out, config=None, overrides=None, force=False, progress=True):
    from brainmclip.training.minddiffuser_fit import train_minddiffuser

    return train_minddiffuser(data, features, out, config=config, overrides=overrides, force=force, progress=progress)


def _minddiffuser_config(config, overrides=None) -> dict:
    from brainmclip.training.minddiffuser_fit import resolve_minddiffuser_config

    return resolve_minddiffuser_config(config, overrides)


def _minddiffuser_outputs(run_dir: Path, run: dict, prepared, split: str):
    from brainmclip.training.minddiffuser_fit import minddiffuser_outputs

    return minddiffuser_outputs(run_dir, run, prepared, split)


METHODS: dict[str, DecoderMethod] = {m.name: m for m in (
    DecoderMethod("brain_mclip", "BrainMCLIP: fMRI to CLIP's intermediate and final vision layers and text tokens",
                  _train_brain_mclip, _brain_mclip_outputs,
                  frozenset({"config", "overrides", "resume", "stop_after_steps", "cpu"}), ("brain_mclip",),
                  _brain_mclip_config),
    DecoderMethod("brainclip", "BrainCLIP: a linear or VAE mapping aligned contrastively with CLIP image/text "
                  "embeddings", _train_brainclip, _brainclip_outputs,
                  frozenset({"config", "overrides", "resume"}), ("brainclip_linear_v",), _brainclip_config),
    DecoderMethod("ridge", "ridge regression to the same CLIP targets, alpha by cross-validation", _train_ridge,
                  _ridge_outputs, frozenset({"config", "overrides"}), ("ridge",), _ridge_config),
    DecoderMethod("minddiffuser", "MindDiffuser: voxel-selected ridge to SD's text embedding, VAE latent and CLIP "
                  "structural features (needs a store from extract-minddiffuser)", _train_minddiffuser,
                  _minddiffuser_outputs, frozenset({"config", "overrides"}), ("minddiffuser",), _minddiffuser_config),
    DecoderMethod("gt_embedding", "no fitting: the test images' own CLIP targets (the upper bound)",
                  _train_ground_truth, _ground_truth_outputs, frozenset()),
)}


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> DecoderMethod:
    if name not in METHODS:
        raise InvalidInputError(f"Unknown method {name!r}; choose from {method_names()}")
    return METHODS[name]
