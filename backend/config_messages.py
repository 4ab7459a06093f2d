"""Plain-language messages for pydantic validation errors: `path: message` lines a person can act on.

Kept apart from backend.config so the model definitions stay one idea; nothing here imports them.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

OPTIMIZER_TYPES = ["AdamW", "AdamW8bit", "Prodigy", "DAdaptAdam", "DAdaptLion", "Lion", "Adafactor", "SGD"]
NETWORK_TYPES = ["lora", "locon", "loha", "lokr", "dora"]
UNION_TYPES = {"optimizer": OPTIMIZER_TYPES, "network": NETWORK_TYPES}  # sections whose `type` picks their fields


def format_validation_error(err: ValidationError, prefix: str = "") -> list[str]:
    """Turn a pydantic error into `path: message` lines that a person can act on."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # Drop the discriminator tag pydantic inserts into union paths (optimizer.Prodigy.d_coef).
        if len(loc) >= 2 and loc[1] in UNION_TYPES.get(loc[0], ()):
            loc = [loc[0], *loc[2:]]
        msg = _message(e, loc[0] if loc else "")
        # Cross-field validators name their field first ("save_last_n_epochs: needs ..."): join it to the path.
        m = re.match(r"^([a-z_][a-z0-9_.]*): (.*)$", msg, re.S)
        if m and e["type"] == "value_error":
            loc, msg = [*loc, *m.group(1).split(".")], m.group(2)
        path = prefix + ".".join(loc) if loc else (prefix.rstrip(".") or "config")
        lines.append(f"{path}: {msg}")
    return lines


def _message(e: dict[str, Any], section: str = "") -> str:
    kind, ctx, inp = e["type"], e.get("ctx") or {}, e.get("input")
    if kind == "extra_forbidden":
        return "unknown setting (not a field of this section)"
    if kind == "missing":
        return "required"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}; got {inp!r}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        what = "network type" if section == "network" else "optimizer"
        choices = ", ".join(UNION_TYPES.get(section, OPTIMIZER_TYPES))
        if kind == "union_tag_not_found":
            return f"say which {what} with 'type' (one of {choices})"
        return f"unknown {what} {ctx.get('tag')!r}; choose one of {choices}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of"):
        words = {
            "greater_than": "greater than",
            "greater_than_equal": "at least",
            "less_than": "less than",
            "less_than_equal": "at most",
            "multiple_of": "a multiple of",
        }[kind]
        bound = next(iter(ctx.values())) if ctx else "?"
        if isinstance(bound, float) and bound.is_integer() and abs(bound) < 1e15:
            bound = int(bound)
        return f"must be {words} {bound}; got {inp!r}"
    if kind.startswith(("int_", "float_", "bool_", "string_type", "list_type", "tuple_type", "dict_type", "model_type")):
        return f"{e['msg'].lower()}; got {_short(inp)}"
    msg = e["msg"]
    return msg.removeprefix("Value error, ")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
