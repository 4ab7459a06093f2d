"""Preset files: sparse, versioned JSON overrides of TrainingConfig's defaults.

A preset is `{"schema_version": N, "name": ..., "description": ..., <overrides>}`. Loading upgrades an
older file one schema version at a time (the MIGRATIONS registry), applies the overrides to the
defaults and validates; a key that does not exist is an error naming the closest valid key. Saving
writes only what differs from the defaults, and never a secret.

Shipped presets live in `<repo>/presets` and are read-only; user presets live in a user folder
(`$LATHE_PRESETS_DIR`, else `runs/.presets`). This module never imports torch.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.config import SCHEMA_VERSION, ConfigError, TrainingConfig, read_json_object, validate_config
from backend.config_keys import (  # noqa: F401  (re-exported: callers use backend.presets)
    PRESET_META_KEYS,
    UNKNOWN_SETTING,
    canonical_keys,
    closest_setting,
    implied_type,
    optimizer_classes,
    setting_paths,
    sparse_overrides,
    union_classes,
    union_sections,
    unknown_key_lines,
)

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "presets"
USER_DIR_ENV = "LATHE_PRESETS_DIR"


# ------------------------------------------------------------------------------------ merging, --set
def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return base with `over` applied recursively (dicts merge, everything else replaces).

    Switching the type of a discriminated section (network, optimizer) starts that section afresh from
    `over`: another type's fields do not carry over. A section without `type` has its implied one
    (a network is a lora), so `{"type": "lora"}` over an old network section keeps its fields.
    """
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            if k in union_sections() and "type" in v and v["type"] != out[k].get("type", implied_type(k)):
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


# ---------------------------------------------------------------------------------------- migrations
Migration = Callable[[dict[str, Any]], dict[str, Any]]
# MIGRATIONS[n] upgrades a version-n preset (or full config) dict to version n + 1.
MIGRATIONS: dict[int, Migration] = {}


def migration(from_version: int) -> Callable[[Migration], Migration]:
    """Decorator: register the function that upgrades data from `from_version` to `from_version + 1`."""

    def register(fn: Migration) -> Migration:
        if from_version in MIGRATIONS:
            raise ValueError(f"a migration from schema_version {from_version} is already registered")
        MIGRATIONS[from_version] = fn
        return fn

    return register


def migrate(
    data: dict[str, Any], *, migrations: dict[int, Migration] | None = None, current: int = SCHEMA_VERSION
) -> dict[str, Any]:
    """Upgrade a preset or config dict to schema `current`, one registered step at a time.

    A dict without schema_version is taken to be current (hand-written files); every file Lathe writes
    carries its version. Returns a new dict; the input is not modified.
    """
    steps = MIGRATIONS if migrations is None else migrations
    version = data.get("schema_version", current)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError([f"schema_version: must be a whole number of at least 1; got {version!r}"])
    if version > current:
        raise ConfigError(
            [f"schema_version: written by a newer Lathe (schema {version}); this one reads up to {current}"]
        )
    out = copy.deepcopy(data)
    while version < current:
        step = steps.get(version)
        if step is None:
            raise ConfigError([f"schema_version: no migration from version {version} to {version + 1}"])
        out = step(out)
        version += 1
        out["schema_version"] = version
    return out


# -------------------------------------------------------------------------------------------- resolve
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


def _validate_merged(merged: dict[str, Any]) -> TrainingConfig:
    unknown = unknown_key_lines(merged)
    try:
        cfg = validate_config(merged)
    except ConfigError as err:
        rest = [line for line in err.lines if not line.endswith(UNKNOWN_SETTING)]
        raise ConfigError(unknown + rest or err.lines) from None
    if unknown:
        raise ConfigError(unknown)
    return cfg


def resolve(data: dict[str, Any], sets: list[str] | None = None) -> TrainingConfig:
    """A full config or a sparse preset dict (plus --set items) -> a validated TrainingConfig.

    Older schema versions are migrated first; unknown keys are errors with a did-you-mean.
    """
    data = migrate(data)
    body = canonical_keys({k: v for k, v in data.items() if k not in PRESET_META_KEYS})
    merged = _apply_exclusive(deep_merge(TrainingConfig().model_dump(mode="json"), body), body)
    for item in sets or []:
        over = canonical_keys(apply_sets({}, [item]))
        merged = _apply_exclusive(deep_merge(merged, over), over)
    return _validate_merged(merged)


def load_config_or_preset(path: str | Path, sets: list[str] | None = None) -> TrainingConfig:
    """Read a config or preset file and validate it; raises ConfigError with `path: message` lines."""
    return resolve(read_json_object(path), sets)


# -------------------------------------------------------------------------------------- secrets
_SECRET_KEY_RE = re.compile(r"(?:^|_)(?:token|api_?key|secret(?:_key)?|password|passwd|credentials?)$", re.I)
_SECRET_VALUE_RE = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}|\bsk-[A-Za-z0-9_-]{20,}|\bgh[pousr]_[A-Za-z0-9]{20,}|\bxox[abp]-[A-Za-z0-9-]{10,}"
    r"|://[^/\s:@]+:[^/\s@]+@"  # user:password@ in a URL
)


def looks_secret(value: Any) -> bool:
    """True for text (or a list of texts) that looks like a token, API key or URL with a password."""
    if isinstance(value, str):
        return bool(_SECRET_VALUE_RE.search(value))
    return isinstance(value, list) and any(looks_secret(v) for v in value)


def strip_secrets(data: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """Drop keys named like secrets (token, api_key, password...) and values that look like credentials.

    Returns the cleaned dict and the dotted paths that were removed.
    """
    out: dict[str, Any] = {}
    removed: list[str] = []
    for k, v in data.items():
        path = f"{prefix}{k}"
        if _SECRET_KEY_RE.search(k) or looks_secret(v):
            removed.append(path)
        elif isinstance(v, dict):
            out[k], sub = strip_secrets(v, f"{path}.")
            removed += sub
        else:
            out[k] = v
    return out, removed


def to_preset(cfg: TrainingConfig, name: str, description: str = "") -> tuple[dict[str, Any], list[str]]:
    """The preset dict for `cfg` (versioned, sparse, secrets removed) and the removed secret paths."""
    data = {"schema_version": SCHEMA_VERSION, "name": name, "description": description, **sparse_overrides(cfg)}
    return strip_secrets(data)


def write_preset_file(path: str | Path, data: dict[str, Any]) -> Path:
    """Write a preset dict as indented JSON, atomically (a crash leaves the old file or the new one)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


# ------------------------------------------------------------------------------------ names, storage
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,79}")
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def sanitize_preset_name(name: str) -> str:
    """Check a preset name and return it cleaned (trimmed, without .json); ConfigError if unsafe.

    A name is one file in the preset folder: no path separators, no '..', no hidden files.
    """
    clean = name.strip() if isinstance(name, str) else ""
    if clean.lower().endswith(".json"):
        clean = clean[:-5].rstrip()
    if not clean:
        problem = "is empty"
    elif "/" in clean or "\\" in clean:
        problem = "must not contain / or \\ (a preset is a single file, not a folder path)"
    elif ".." in clean:
        problem = "must not contain '..'"
    elif clean.startswith("."):
        problem = "must not start with '.' (hidden file)"
    elif not _NAME_RE.fullmatch(clean) or clean.endswith("."):
        problem = "may use 1-80 letters, digits, spaces and . _ - ( ) +, starting with a letter or digit"
    elif clean.split(".")[0].lower() in _WINDOWS_DEVICES:
        problem = "is a reserved device name on Windows"
    else:
        return clean
    raise ConfigError([f"preset name: {name!r} {problem}"])


def user_presets_dir(output_dir: str | Path = "runs") -> Path:
    """The user preset folder: $LATHE_PRESETS_DIR when set, else <output_dir>/.presets."""
    env = os.environ.get(USER_DIR_ENV)
    return Path(env) if env else Path(output_dir) / ".presets"


@dataclass(frozen=True)
class PresetInfo:
    name: str
    description: str
    source: str  # "shipped" or "user"
    path: Path
    error: str | None = None  # set when the file cannot be read


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: TrainingConfig
    source: str  # "shipped", "user" or "file"
    path: Path
    file_version: int  # the schema_version the file was written with (older files are migrated)


@dataclass(frozen=True)
class SavedPreset:
    path: Path
    removed_secrets: list[str]


class PresetExistsError(ConfigError):
    """Saving would replace an existing user preset; ask, then save again with overwrite=True."""


def _preset_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith(".") and p.is_file())


def list_presets(user_dir: Path | None = None, shipped_dir: Path = SHIPPED_DIR) -> list[PresetInfo]:
    """Shipped presets, then user presets, each sorted by name; unreadable files carry an error."""
    out = []
    for source, folder in (("shipped", shipped_dir), ("user", user_dir or user_presets_dir())):
        for path in _preset_files(folder):
            try:
                data = read_json_object(path)
                desc = data.get("description", "")
                out.append(PresetInfo(path.stem, desc if isinstance(desc, str) else "", source, path))
            except ConfigError as err:
                out.append(PresetInfo(path.stem, "", source, path, error="; ".join(err.lines)))
    return out


def find_preset(name: str, user_dir: Path | None = None, shipped_dir: Path = SHIPPED_DIR) -> tuple[Path, str]:
    """(path, source) of the preset called `name`: shipped presets first, then the user folder."""
    clean = sanitize_preset_name(name)
    for source, folder in (("shipped", shipped_dir), ("user", user_dir or user_presets_dir())):
        path = folder / f"{clean}.json"
        if path.is_file():
            return path, source
    names = [p.name for p in list_presets(user_dir, shipped_dir)]
    close = difflib.get_close_matches(clean, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; available: {', '.join(names) or 'none'}"
    raise ConfigError([f"preset {clean!r}: not found{hint}"])


def read_preset(path: str | Path, source: str = "file") -> Preset:
    """Load one preset file: migrate, apply to the defaults, validate."""
    p = Path(path)
    data = read_json_object(p)
    for key in PRESET_META_KEYS:
        if key in data and not isinstance(data[key], str):
            raise ConfigError([f"{key}: must be text; got {data[key]!r}"])
    version = data.get("schema_version", SCHEMA_VERSION)
    cfg = resolve(data)
    return Preset(data.get("name") or p.stem, data.get("description", ""), cfg, source, p, version)


def load_preset(name: str, user_dir: Path | None = None, shipped_dir: Path = SHIPPED_DIR) -> Preset:
    """Load a shipped or user preset by name."""
    path, source = find_preset(name, user_dir, shipped_dir)
    return read_preset(path, source)


def _check_not_shipped(clean: str, shipped_dir: Path) -> None:
    if clean.lower() in {p.stem.lower() for p in _preset_files(shipped_dir)}:
        raise ConfigError([f"preset name: {clean!r} is a shipped preset (read-only); choose another name"])


def save_preset(
    cfg: TrainingConfig,
    name: str,
    description: str = "",
    *,
    user_dir: Path | None = None,
    overwrite: bool = False,
    shipped_dir: Path = SHIPPED_DIR,
) -> SavedPreset:
    """Save `cfg` as a sparse user preset. Never replaces a shipped preset; replaces an existing user
    preset only with overwrite=True (PresetExistsError otherwise, so the caller can ask)."""
    clean = sanitize_preset_name(name)
    _check_not_shipped(clean, shipped_dir)
    folder = user_dir or user_presets_dir()
    path = folder / f"{clean}.json"
    if path.exists() and not overwrite:
        raise PresetExistsError([f"preset name: {clean!r} already exists in {folder}; overwrite it?"])
    data, removed = to_preset(cfg, clean, description)
    return SavedPreset(write_preset_file(path, data), removed)


def delete_preset(name: str, user_dir: Path | None = None, shipped_dir: Path = SHIPPED_DIR) -> Path:
    """Delete a user preset (shipped presets are read-only). Returns the deleted path."""
    clean = sanitize_preset_name(name)
    _check_not_shipped(clean, shipped_dir)
    path = (user_dir or user_presets_dir()) / f"{clean}.json"
    if not path.is_file():
        raise ConfigError([f"preset {clean!r}: not found in {path.parent}"])
    path.unlink()
    return path
