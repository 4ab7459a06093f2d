"""TrainingConfig's keys as data: every setting path, the closest valid key to a typo, and the
sparse difference of a config from the defaults. Used by backend.presets; never imports torch."""

from __future__ import annotations

import difflib
import json
import re
from functools import cache
from typing import Any, get_args

from pydantic import BaseModel

from backend.config import TrainingConfig

PRESET_META_KEYS = ("name", "description")  # preset-file keys that are not settings
UNKNOWN_SETTING = "unknown setting (not a field of this section)"  # config.py's wording for extra keys


# ------------------------------------------------------------------------------ unknown keys, did-you-mean
def optimizer_classes() -> dict[str, type[BaseModel]]:
    """Optimizer type name -> its config class, read from TrainingConfig's optimizer union."""
    union = TrainingConfig.model_fields["optimizer"].annotation
    return {cls.model_fields["type"].default: cls for cls in get_args(union)}


def _section_class(cls: type[BaseModel], name: str) -> type[BaseModel] | None:
    ann = cls.model_fields[name].annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


@cache
def setting_paths() -> tuple[str, ...]:
    """Every dotted setting path (optimizer fields of every optimizer type included), in schema order."""
    paths: list[str] = []
    for name in TrainingConfig.model_fields:
        if name == "optimizer":
            fields = dict.fromkeys(f for c in optimizer_classes().values() for f in c.model_fields)
            paths += [f"optimizer.{f}" for f in fields]
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


def _unknown_message(cls: type[BaseModel], prefix: str, key: str) -> str:
    if prefix == "optimizer.":
        owners = [t for t, c in optimizer_classes().items() if key in c.model_fields]
        if owners:
            kind = cls.model_fields["type"].default
            return f"not a setting of the {kind} optimizer; it belongs to {' and '.join(owners)} (set optimizer.type)"
    guess = closest_setting(key, list(cls.model_fields), prefix)
    return f"unknown setting; did you mean {guess}?" if guess else UNKNOWN_SETTING


def shown_key(key: str) -> str:
    """A key as it can be shown in `path: message`: plain names as they are, anything else quoted."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]{1,80}", key) else json.dumps(key[:60])


def unknown_key_lines(data: dict[str, Any], cls: type[BaseModel] = TrainingConfig, prefix: str = "") -> list[str]:
    """`path: message` lines for keys that are no setting, each with the closest valid key."""
    lines: list[str] = []
    for key, value in data.items():
        if not prefix and key in PRESET_META_KEYS:
            continue
        if key not in cls.model_fields:
            lines.append(f"{prefix}{shown_key(key)}: {_unknown_message(cls, prefix, key)}")
            continue
        if not isinstance(value, dict):
            continue
        if cls is TrainingConfig and key == "optimizer":
            kind = value.get("type", "AdamW")
            sub = optimizer_classes().get(kind) if isinstance(kind, str) else None  # bad type: validation says so
        else:
            sub = _section_class(cls, key)
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
    if full["optimizer"]["type"] != defaults["optimizer"]["type"]:
        # A new optimizer type starts from that type's defaults (see deep_merge), so diff against those.
        own = type(cfg.optimizer)().model_dump(mode="json")
        out["optimizer"] = {"type": full["optimizer"]["type"], **_diff(full["optimizer"], own)}
    training = out.get("training", {})
    if training.get("max_train_steps") is not None and training.get("max_train_epochs", 0) is None:
        del training["max_train_epochs"]  # implied: a max_train_steps override clears the epoch count
    return out
