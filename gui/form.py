"""Form values <-> TrainingConfig, and validation errors as messages a person can act on (pure).

A form is a plain mapping {field key: value} (keys from gui.schema). `form_to_config` is the one
step from what the page holds to a validated config: it parses each value by its kind, builds the
nested dict and lets pydantic validate it; every problem comes back as a FieldError naming the
section and the field's label. `config_to_form` is its inverse: every field is set, so loading a
config never leaves an old value behind.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backend.config import SCHEMA_VERSION, ConfigError, TrainingConfig, config_warnings, validate_config
from backend.config_keys import union_sections
from gui.schema import (
    SECTIONS,
    FieldSpec,
    chosen_types,
    field_specs,
    number_text,
    spec_for_path,
    specs_by_key,
)

Form = dict[str, Any]
GENERAL = "General"  # errors that belong to no single field


@dataclass(frozen=True)
class FieldError:
    """One problem, placed next to its section: `Network › Rank (network_dim): must be at least 1; got 0`."""

    section: str
    label: str
    message: str
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.section} › {self.label}: {self.message}" if self.label else f"{self.section}: {self.message}"


class FormError(Exception):
    def __init__(self, errors: list[FieldError]):
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


# ------------------------------------------------------------------------------------ config -> form
def _to_form_value(spec: FieldSpec, value: Any) -> Any:
    if spec.kind == "tristate":
        return "auto" if value is None else ("yes" if value else "no")
    if spec.kind == "lines":
        return "\n".join(value or [])
    if spec.kind == "table":
        return [[_cell(row.get(c)) for c in spec.columns] for row in value or []]
    if spec.kind == "pair":
        return ", ".join(_num(float(v)) for v in value)
    if spec.kind == "text":
        return "" if value is None else str(value)
    if spec.kind == "choice" and value is not None:
        return str(value)  # the choices are text (training.max_token_length's are numbers)
    if spec.as_text:
        return number_text(value)
    return value


def _cell(v: Any) -> str:
    """A table cell as the page shows it: text, '' for empty."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return _num(float(v)) if isinstance(v, float) else str(v)


def _num(v: float) -> str:
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _get(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        node = node[part]
    return node


def config_types(cfg: TrainingConfig) -> dict[str, str]:
    """The type of each discriminated section of `cfg`: {"network": "lora", "optimizer": "AdamW"}."""
    return {s: getattr(cfg, s).type for s in union_sections()}


def config_to_form(cfg: TrainingConfig) -> Form:
    """Every form field's value for `cfg`. The fields of the types not chosen (another network type,
    another optimizer) get their own defaults."""
    data = cfg.model_dump(mode="python")
    chosen = config_types(cfg)
    out: Form = {}
    for spec in field_specs():
        if not spec.applies(chosen):
            out[spec.key] = spec.default
        else:
            out[spec.key] = _to_form_value(spec, _get(data, spec.path))
    return out


def default_form() -> Form:
    return config_to_form(TrainingConfig())


# ------------------------------------------------------------------------------------ form -> config
class _Bad(ValueError):
    pass


def _parse_number(spec: FieldSpec, value: Any) -> int | float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if spec.optional:
            return None
        raise _Bad("required: enter a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _Bad(f"must be a number; got {value!r}") from None
    if not math.isfinite(number):
        raise _Bad(f"must be a finite number; got {value!r}")
    if spec.kind == "int":
        if not number.is_integer():
            raise _Bad(f"must be a whole number; got {_num(number)}")
        return int(number)
    return number


def _parse_pair(value: Any) -> list[float]:
    parts = [p for p in re.split(r"[,\s]+", str(value or "").strip().strip("()[]")) if p]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 2:
        raise _Bad(f"must be two numbers separated by a comma, e.g. 0.9, 0.999; got {value!r}")
    return numbers


TRISTATE = {"auto": None, "yes": True, "no": False}


def _parse_tristate(value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if not isinstance(value, str) or value not in TRISTATE:
        raise _Bad(f"must be auto, yes or no; got {value!r}")
    return TRISTATE[value]


def table_rows(value: Any) -> list[list[Any]]:
    """A table's rows from what the page sends: a list of rows, {"data": rows}, or a DataFrame."""
    if value is None or value == "":
        return []
    if hasattr(value, "values") and hasattr(value, "columns"):  # a pandas DataFrame
        value = value.values.tolist()
    if isinstance(value, dict):
        value = value.get("data") or []
    if not isinstance(value, list) or not all(isinstance(r, (list, tuple)) for r in value):
        raise _Bad("must be a table: a list of rows")
    return [list(r) for r in value]


def _parse_table(spec: FieldSpec, value: Any) -> list[dict[str, Any]]:
    """Rows as dicts of their filled cells (blank cells take the row model's default; blank rows go)."""
    out = []
    for row in table_rows(value):
        cells = ["" if c is None or (isinstance(c, float) and math.isnan(c)) else c for c in row]
        if len(cells) > len(spec.columns):
            raise _Bad(f"a row has {len(cells)} cells; the columns are {', '.join(spec.columns)}")
        filled = {c: (v.strip() if isinstance(v, str) else v) for c, v in zip(spec.columns, cells, strict=False)}
        filled = {c: v for c, v in filled.items() if v != ""}
        if filled:
            out.append(filled)
    return out


def parse_value(spec: FieldSpec, value: Any) -> Any:
    """One form value as the config wants it; raises ValueError with a plain message."""
    kind = spec.kind
    if kind in ("int", "float"):
        return _parse_number(spec, value)
    if kind == "bool":
        return bool(value)
    if kind == "tristate":
        return _parse_tristate(value)
    if kind == "lines":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if kind == "table":
        return _parse_table(spec, value)
    if kind == "pair":
        return _parse_pair(value)
    text = "" if value is None else str(value).strip()
    return None if spec.optional and not text else text


def _put(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def field_error(line: str, chosen: Mapping[str, str] | None = None) -> FieldError:
    """A validation line `path: message` as a FieldError naming the section and the field's label;
    `chosen` gives the type of each discriminated section ({"network": "loha"}; default types otherwise),
    so `network.conv_rank: ...` lands next to the loha network's field."""
    path, sep, message = line.partition(": ")
    if not sep or not re.fullmatch(r"[a-z_][A-Za-z0-9_.]*", path):
        return FieldError(GENERAL, "", line)
    spec = spec_for_path(path, chosen)
    if spec is None:
        return FieldError(GENERAL, path, message)
    return FieldError(spec.section, spec.label, message, spec.key)


def form_to_config(values: Mapping[str, Any]) -> TrainingConfig:
    """The validated config for a form; FormError listing every problem otherwise.

    Missing keys take the field's default, so a partial mapping is a valid input.
    """
    chosen = chosen_types(values)
    data: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    errors: list[FieldError] = []
    for spec in field_specs():
        if not spec.applies(chosen):
            continue
        try:
            value = parse_value(spec, values.get(spec.key, spec.default))
        except ValueError as e:
            errors.append(FieldError(spec.section, spec.label, str(e), spec.key))
            value = parse_value(spec, spec.default)  # so the other fields are still checked
        _put(data, spec.path, value)
    try:
        cfg = validate_config(data)
    except ConfigError as e:
        bad = {err.key for err in errors}
        errors += [fe for fe in (field_error(line, chosen) for line in e.lines) if fe.key is None or fe.key not in bad]
    if errors:
        raise FormError(errors)
    return cfg


def form_warnings(cfg: TrainingConfig) -> list[FieldError]:
    """Allowed but probably mistaken settings, placed like errors."""
    return [field_error(line, config_types(cfg)) for line in config_warnings(cfg)]


def by_section(errors: list[FieldError]) -> dict[str, list[FieldError]]:
    """Errors grouped by Setup section (every section present, General last)."""
    out: dict[str, list[FieldError]] = {s: [] for s in (*SECTIONS, GENERAL)}
    for e in errors:
        out.setdefault(e.section, []).append(e)
    return out


# --------------------------------------------------------------------------------- what a load changed
def _show(spec: FieldSpec, value: Any) -> str:
    if spec.kind == "table":
        rows = _parse_table(spec, value) if value else []
        return ", ".join(str(r.get(spec.columns[0], "?")) for r in rows) if rows else "(none)"
    if spec.kind == "lines":
        items = [x for x in str(value or "").splitlines() if x.strip()]
        return ", ".join(items) if items else "(empty)"
    if value is None or value == "":
        return "(empty)"
    if isinstance(value, float):
        return _num(value)
    return str(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return (a if a is not None else "") == (b if b is not None else "")


def _same_rows(spec: FieldSpec, a: Any, b: Any) -> bool:
    try:
        rows = [[{k: str(v) for k, v in r.items()} for r in _parse_table(spec, x)] for x in (a, b)]
    except ValueError:
        return a == b
    return rows[0] == rows[1]


def form_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`Section › Label: old → new` for every field a load changed (only the fields of the new network
    type and optimizer)."""
    chosen, before = chosen_types(new), chosen_types(old)
    by_key = specs_by_key()
    lines = []
    for spec in field_specs():
        if not spec.applies(chosen):
            continue
        # Compare with what the old form used: its own type's field of the same setting (lora's rank for
        # a lora -> loha load), else this type's field (a setting the old type did not have).
        was = f"{spec.union}.{before.get(spec.union)}.{spec.path.partition('.')[2]}" if spec.union else spec.key
        was = was if was in by_key else spec.key
        a, b = old.get(was, by_key[was].default), new.get(spec.key, spec.default)
        same = _same_rows(spec, a, b) if spec.kind == "table" else _same(a, b)
        if not same:
            lines.append(f"{spec.title}: {_show(spec, a)} → {_show(spec, b)}")
    return lines
