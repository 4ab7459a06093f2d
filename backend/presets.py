"""Preset files: sparse JSON overrides of TrainingConfig's defaults.

(Minimal core for the engine; the full preset library, migrations and kohya import build on it.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from backend.config import ConfigError, TrainingConfig, validate_config

PRESET_META_KEYS = ("name", "description")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return base with `over` applied recursively (dicts merge, everything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            # Switching optimizer type starts that section afresh: another type's fields do not carry over.
            if k == "optimizer" and "type" in v and v["type"] != out[k].get("type"):
                out[k] = dict(v)
            else:
                out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(item: str) -> tuple[list[str], Any]:
    """Parse one `--set a.b.c=VALUE`; VALUE is JSON when it parses as JSON, else a plain string."""
    if "=" not in item:
        raise ConfigError([f"--set {item}: expected PATH=VALUE, e.g. saving.save_last_n_epochs=2"])
    path, raw = item.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError([f"--set {item}: empty path"])
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return keys, value


def apply_sets(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply `--set` items to a config dict (returns a new dict)."""
    for item in sets:
        keys, value = parse_set(item)
        over: dict[str, Any] = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            over = {k: over}
        data = deep_merge(data, over)
    return data


def read_json_object(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{p}: file not found"]) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError([f"{p}: not readable JSON ({e})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: expected a JSON object at the top level"])
    return data


# Pairs where setting one clears the other: a sparse "max_train_steps: 500" means "train by steps".
EXCLUSIVE = {("training", "max_train_steps"): ("training", "max_train_epochs"),
             ("training", "max_train_epochs"): ("training", "max_train_steps")}


def _apply_exclusive(merged: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for (sec, key), (osec, okey) in EXCLUSIVE.items():
        given = over.get(sec, {}) if isinstance(over.get(sec), dict) else {}
        other = over.get(osec, {}) if isinstance(over.get(osec), dict) else {}
        if given.get(key) is not None and okey not in other and isinstance(merged.get(osec), dict):
            merged[osec] = {**merged[osec], okey: None}
    return merged


def resolve(data: dict[str, Any], sets: list[str] | None = None) -> TrainingConfig:
    """A full config or a sparse preset dict (plus --set items) -> a validated TrainingConfig."""
    body = {k: v for k, v in data.items() if k not in PRESET_META_KEYS}
    merged = _apply_exclusive(deep_merge(TrainingConfig().model_dump(mode="json"), body), body)
    for item in sets or []:
        over = apply_sets({}, [item])
        merged = _apply_exclusive(deep_merge(merged, over), over)
    return validate_config(merged)


def load_config_or_preset(path: str | Path, sets: list[str] | None = None) -> TrainingConfig:
    """Read a config or preset file and validate it; raises ConfigError with `path: message` lines."""
    return resolve(read_json_object(path), sets)
