"""Run configs: JSON files merged in order, then ``--set key.path=value`` overrides.

A name without a path is looked up in ``brainmclip/models/configs/`` (``brain_mclip``,
``brain_mclip_tiny``, ``ablations/text_only`` ...). Later files override earlier ones key by
key, so an ablation file holds just its switch.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

from brainmclip.errors import InvalidInputError

__all__ = ["apply_overrides", "check_keys", "list_configs", "load_config", "merge"]


def check_keys(cls, d: dict, section: str) -> dict:
    """Return ``d`` if every key is a field of dataclass ``cls``; else one clear ValueError."""
    from dataclasses import fields

    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise InvalidInputError(f"Unknown {section} config keys {sorted(unknown)}; known: {sorted(names)}")
    return d


def _config_dir():
    return resources.files("brainmclip.models").joinpath("configs")


def list_configs() -> list[str]:
    names = []
    for entry in _config_dir().iterdir():
        if entry.name.endswith(".json"):
            names.append(entry.name[:-5])
        elif entry.is_dir():
            names += [f"{entry.name}/{e.name[:-5]}" for e in entry.iterdir() if e.name.endswith(".json")]
    return sorted(names)


def _read(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text()
    else:
        entry = _config_dir()
        for part in name_or_path.split("/"):
            entry = entry.joinpath(part if part.endswith(".json") or part != name_or_path.split("/")[-1]
                                   else f"{part}.json")
        if not entry.is_file():
            raise InvalidInputError(f"Unknown config={name_or_path!r}: no such file, and not one of {list_configs()}")
        text = entry.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"config {name_or_path!r} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    data.pop("description", None)
    return data


def merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``["train.epochs=3", "model.branches=[\\"text\\"]"]``: values parse as JSON, else as strings."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise InvalidInputError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise InvalidInputError(f"--set {item!r}: {part!r} is not a section of the config")
            node = node[part]
        if parts[-1] not in node:
            raise InvalidInputError(f"--set {item!r}: unknown key {key!r}; known here: {sorted(node)}")
        if isinstance(node[parts[-1]], dict) and not isinstance(value, dict):
            raise InvalidInputError(f"--set {item!r}: {key!r} is a section of the config, not a value; set one of its "
                             f"keys: {sorted(node[parts[-1]])}")
        node[parts[-1]] = value
    return config


def load_config(names: list[str] | str, overrides: list[str] | None = None) -> dict:
    names = [names] if isinstance(names, str) else list(names)
    config: dict = {}
    for name in names:
        config = merge(config, _read(name))
    return apply_overrides(config, overrides or [])
