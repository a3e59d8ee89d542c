"""Run configs: JSON files merged in order, then ``--set key.path=value`` overrides.

A name without a path is looked up in ``brainmclip/models/configs/`` (``brain_mclip``,
``brain_mclip_tiny``, ``ablations/text_only`` ...). Later files override earlier ones key by
key, so an ablation file holds just its switch.
"""

from __future__ import annotations

import copy
import json
import math
from importlib import resources
from pathlib import Path

from brainmclip.errors import InvalidInputError

__all__ = ["CONFIG_SECTIONS", "apply_overrides", "check_bool", "check_choice", "check_float", "check_int",
           "check_keys", "check_sections", "list_configs", "load_config", "merge"]

# The top-level keys of a run config.
CONFIG_SECTIONS = ("method", "data", "model", "loss", "train", "ridge")


def check_keys(cls, d: dict, section: str) -> dict:
    """Return ``d`` if it is a dict whose every key is a field of dataclass ``cls``; else one clear ValueError."""
    from dataclasses import fields

    if not isinstance(d, dict):
        raise InvalidInputError(f"config section {section}={d!r}: expected an object of keys (a JSON {{...}})")
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise InvalidInputError(f"Unknown {section} config keys {sorted(unknown)}; known: {sorted(names)}")
    return d


def check_sections(config: dict, sections=CONFIG_SECTIONS) -> dict:
    """Return ``config`` if its top-level keys are among ``sections``; else one clear error naming the others."""
    unknown = set(config) - set(sections)
    if unknown:
        raise InvalidInputError(f"Unknown config sections {sorted(unknown)}; known: {sorted(sections)}")
    return config


def _allowed(minimum, maximum, low_open: bool = False, high_open: bool = False) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if low_open else '['}{minimum}, {maximum}{')' if high_open else ']'}"
    if minimum is not None:
        return f" {'>' if low_open else '>='} {minimum}"
    if maximum is not None:
        return f" {'<' if high_open else '<='} {maximum}"
    return ""


def check_int(key: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` if it is an integer (not a bool, not 2.0) within the bounds; else an error naming ``key``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InvalidInputError(f"{key}={value!r}: expected an integer{_allowed(minimum, maximum)}")
    return value


def check_float(key: str, value, minimum: float | None = None, maximum: float | None = None, low_open: bool = False,
                high_open: bool = False) -> float:
    """``value`` if it is a finite number within the bounds (``*_open``: the bound itself is excluded)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if low_open else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if high_open else value <= maximum
    if not ok:
        allowed = _allowed(minimum, maximum, low_open, high_open)
        raise InvalidInputError(f"{key}={value!r}: expected a finite number{allowed}")
    return value


def check_choice(key: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidInputError(f"{key}={value!r}: expected one of {list(choices)}")
    return value


def check_bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{key}={value!r}: expected true or false")
    return value


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
    if not isinstance(data, dict):
        raise InvalidInputError(f"config {name_or_path!r} holds a JSON {type(data).__name__}; expected an object "
                                "{\"model\": {...}, \"train\": {...}, ...}")
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
