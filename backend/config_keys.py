"""TrainingConfig's keys as data: the discriminated sections (network, optimizer: their `type` picks
their fields), every setting path, the closest valid key to a typo, and the sparse difference of a
config from the defaults. Used by backend.presets and the GUI's schema; never imports torch."""

from __future__ import annotations

import difflib
import json
import re
import types
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AliasChoices, BaseModel, Discriminator

from backend.config import TrainingConfig

PRESET_META_KEYS = ("name", "description")  # preset-file keys that are not settings
UNKNOWN_SETTING = "unknown setting (not a field of this section)"  # config.py's wording for extra keys


# ------------------------------------------------------------------------------ discriminated sections
def _union_members(ann: Any) -> list[type[BaseModel]]:
    """The classes of a discriminated union annotation (each a model with a Literal `type`); [] otherwise."""
    if get_origin(ann) not in (Union, types.UnionType):
        return []
    members = []
    for arg in get_args(ann):
        if get_origin(arg) is Annotated:  # Annotated[LoRANetwork, Tag("lora")]
            arg = get_args(arg)[0]
        kind = arg.model_fields.get("type") if isinstance(arg, type) and issubclass(arg, BaseModel) else None
        if kind is None or get_origin(kind.annotation) is not Literal:
            return []
        members.append(arg)
    return members


@cache
def union_sections() -> dict[str, dict[str, type[BaseModel]]]:
    """Every section of TrainingConfig whose `type` picks its fields: {section: {type name: class}}, in
    schema order (network, optimizer). The type name is the default of each class's `type` field."""
    out = {}
    for name, info in TrainingConfig.model_fields.items():
        if members := _union_members(info.annotation):
            out[name] = {cls.model_fields["type"].default: cls for cls in members}
    return out


def union_classes(section: str) -> dict[str, type[BaseModel]]:
    """Type name -> config class of a discriminated section ({} for any other section)."""
    return union_sections().get(section, {})


def optimizer_classes() -> dict[str, type[BaseModel]]:
    """Optimizer type name -> its config class."""
    return union_classes("optimizer")


@cache
def default_type(section: str) -> str:
    """The type of a discriminated section in the default config (network: lora, optimizer: AdamW)."""
    return getattr(TrainingConfig(), section).type


@cache
def implied_type(section: str) -> str | None:
    """The type a section written without `type` is read as (network: lora), or None where the section
    must say its type (optimizer): read from the union's discriminator."""
    for meta in TrainingConfig.model_fields[section].metadata:
        if isinstance(meta, Discriminator) and callable(meta.discriminator):
            return meta.discriminator({})
    return None


def section_type(section: str, value: dict[str, Any]) -> Any:
    """The type a discriminated section's dict asks for (its `type`, else the implied or default one)."""
    return value.get("type", implied_type(section) or default_type(section))


def _aliases(cls: type[BaseModel]) -> dict[str, str]:
    """Other names a section accepts for its fields: {alias: field name} (network: init_weights)."""
    out = {}
    for name, info in cls.model_fields.items():
        alias = info.validation_alias
        for choice in alias.choices if isinstance(alias, AliasChoices) else [alias]:
            if isinstance(choice, str) and choice != name:
                out[choice] = name
    return out


def _input_names(cls: type[BaseModel]) -> set[str]:
    """The keys a section accepts: its field names and their aliases."""
    return set(cls.model_fields) | set(_aliases(cls))


def _class_of(section: str, value: dict[str, Any]) -> type[BaseModel] | None:
    """The config class a section's dict is read as (a discriminated one by its type); None if unknown."""
    if classes := union_classes(section):
        kind = section_type(section, value)
        return classes.get(kind) if isinstance(kind, str) else None  # a bad type: validation says so
    return _section_class(TrainingConfig, section) if section in TrainingConfig.model_fields else None


def canonical_keys(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with every alias renamed to its field name (network.init_weights -> network.network_weights),
    so merging it into the defaults leaves one key per setting. A setting given under both names is left
    for unknown_key_lines to report."""
    out = dict(data)
    for section, value in data.items():
        cls = _class_of(section, value) if isinstance(value, dict) else None
        renames = {a: f for a, f in _aliases(cls).items() if a in value and f not in value} if cls else {}
        if renames:
            out[section] = {renames.get(k, k): v for k, v in value.items()}
    return out


# ------------------------------------------------------------------------------ unknown keys, did-you-mean
def _section_class(cls: type[BaseModel], name: str) -> type[BaseModel] | None:
    ann = cls.model_fields[name].annotation if name in cls.model_fields else None  # an alias is no section
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


@cache
def setting_paths() -> tuple[str, ...]:
    """Every dotted setting path (the fields of every type of a discriminated section included), in schema order."""
    paths: list[str] = []
    for name in TrainingConfig.model_fields:
        if classes := union_classes(name):
            fields = dict.fromkeys(f for c in classes.values() for f in c.model_fields)
            paths += [f"{name}.{f}" for f in fields]
        elif (sub := _section_class(TrainingConfig, name)) is not None:
            paths += [f"{name}.{f}" for f in sub.model_fields]
        else:
            paths.append(name)
    return tuple(paths)


def closest_setting(key: str, siblings: list[str] | None = None, prefix: str = "") -> str | None:
    """The valid setting path closest to `key`: a sibling first, else any setting with a similar name."""
    leaf = key.rsplit(".", 1)[-1]
    if siblings:
        close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.7)
        if close:
            return prefix + close[0]
    paths = setting_paths()
    if key in paths:
        return key
    leaves = {}
    for p in paths:
        leaves.setdefault(p.rsplit(".", 1)[-1], p)
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[close[0]] if close else None


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _unknown_message(cls: type[BaseModel], prefix: str, key: str) -> str:
    section = prefix.removesuffix(".")
    owners = [t for t, c in union_classes(section).items() if key in _input_names(c)]
    if owners:
        kind = cls.model_fields["type"].default
        return f"not a setting of the {kind} {section}; it belongs to {_names(owners)} (set {section}.type)"
    guess = closest_setting(key, list(cls.model_fields), prefix)
    return f"unknown setting; did you mean {guess}?" if guess else UNKNOWN_SETTING


def shown_key(key: str) -> str:
    """A key as it can be shown in `path: message`: plain names as they are, anything else quoted."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]{1,80}", key) else json.dumps(key[:60])


def unknown_key_lines(data: dict[str, Any], cls: type[BaseModel] = TrainingConfig, prefix: str = "") -> list[str]:
    """`path: message` lines for keys that are no setting, each with the closest valid key."""
    lines: list[str] = []
    aliases = _aliases(cls)
    for key, value in data.items():
        if not prefix and key in PRESET_META_KEYS:
            continue
        if key in aliases:
            if aliases[key] in data:
                lines.append(f"{prefix}{key}: another name for {prefix}{aliases[key]}, which is set too; keep one")
            continue
        if key not in cls.model_fields:
            lines.append(f"{prefix}{shown_key(key)}: {_unknown_message(cls, prefix, key)}")
            continue
        if not isinstance(value, dict):
            continue
        sub = _class_of(key, value) if cls is TrainingConfig else _section_class(cls, key)
        if sub is not None:
            lines += unknown_key_lines(value, sub, f"{prefix}{key}.")
    return lines


# ------------------------------------------------------------------------------------- sparse form
def _diff(value: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in value.items():
        d = default.get(k)
        if isinstance(v, dict) and isinstance(d, dict):
            if sub := _diff(v, d):
                out[k] = sub
        elif k not in default or v != d:
            out[k] = v
    return out


def sparse_overrides(cfg: TrainingConfig) -> dict[str, Any]:
    """Only what differs from the defaults; `resolve` of the result gives `cfg` back."""
    full = cfg.model_dump(mode="json")
    defaults = TrainingConfig().model_dump(mode="json")
    out = _diff(full, defaults)
    out.pop("schema_version", None)
    for section in union_sections():
        if full[section]["type"] != defaults[section]["type"]:
            # Another type starts from that type's defaults (see deep_merge), so diff against those.
            own = type(getattr(cfg, section))().model_dump(mode="json")
            out[section] = {"type": full[section]["type"], **_diff(full[section], own)}
    training = out.get("training", {})
    if training.get("max_train_steps") is not None and training.get("max_train_epochs", 0) is None:
        del training["max_train_epochs"]  # implied: a max_train_steps override clears the epoch count
    return out
