"""Import kohya_ss GUI config files (the JSON its Save button writes) as Lathe presets.

Every key of a kohya file is listed: in `mapped` (with the Lathe setting it became) or in `unmapped`
(with the reason: unsupported feature, GUI-only setting, not applicable, secret). Values stored as
strings ("1", "True") are coerced. A config for something Lathe does not train (DyLoRA, (IA)^3, OFT,
DreamBooth, Lumina...) is refused with a plain reason; LoRA, LoCon, LoHa, LoKr and DoRA become the
matching network.type; a Flux.1 or SD3 config becomes model.family flux or sd3 with a plain LoRA
(backend.kohya_flow). A setting that would change training but has no Lathe equivalent is a warning
naming the value; a value Lathe cannot use (a typo in optimizer_args, a number out of range) is an
error. Nothing here raises on bad input. Never imports torch.

This module is the engine and the public API; backend.kohya_rules holds one mapping function per
topic (the network section in backend.kohya_network) and backend.kohya_keys the key tables and value
coercion.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend import kohya_rules as rules
from backend.config import ConfigError, TrainingConfig, config_warnings
from backend.kohya_args import parse_additional
from backend.kohya_keys import SECRET, UNKNOWN, is_set, reason_for, show
from backend.presets import SHIPPED_DIR, looks_secret, read_json_object, resolve, to_preset, write_preset_file

NOT_SUPPORTED = ("unsupported feature", "unknown", "not imported")  # reasons of keys whose setting is lost


@dataclass
class KohyaImport:
    """The outcome of one import; `preset` is the sparse Lathe preset ({} unless `ok`)."""

    preset: dict[str, Any] = field(default_factory=dict)
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (kohya key, "lathe.path = value (note)")
    unmapped: list[tuple[str, str]] = field(default_factory=list)  # (kohya key, reason)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refused: str | None = None
    config: TrainingConfig | None = None

    @property
    def ok(self) -> bool:
        return self.refused is None and not self.errors

    def not_supported(self) -> list[tuple[str, str]]:
        """The keys Lathe has no equivalent for (unsupported features, unknown keys, bad values)."""
        return [(k, r) for k, r in self.unmapped if r.startswith(NOT_SUPPORTED)]

    def not_needed(self) -> list[tuple[str, str]]:
        """The keys that change nothing in Lathe (not applicable, GUI-only, secrets), with why."""
        return [(k, r) for k, r in self.unmapped if not r.startswith(NOT_SUPPORTED)]

    def report(self, title: str = "kohya_ss import") -> list[str]:
        """Readable lines: the verdict, errors and warnings, then every key in one of three groups:
        applied (with its value), not needed (with why) and not supported (with why)."""
        verdict = "imported" if self.ok else "refused" if self.refused else "not imported (fix the errors below)"
        lines = [f"{title}: {verdict}"]
        if self.refused:
            lines.append(f"Refused: {self.refused}")
        for head, items in (
            ("Errors", self.errors),
            ("Warnings", self.warnings),
            ("Applied", [f"{k} -> {target}" for k, target in self.mapped]),
            ("Not needed", [f"{k}: {reason}" for k, reason in self.not_needed()]),
            ("Not supported", [f"{k}: {reason}" for k, reason in self.not_supported()]),
        ):
            if items:
                lines += [f"{head} ({len(items)}):", *(f"  {item}" for item in items)]
        return lines


# ------------------------------------------------------------------------------------------- mapper
class Mapper:
    """Collects the Lathe overrides and the report while the handlers walk the kohya keys."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.out: dict[str, Any] = {}
        self.sources: dict[str, str] = {}  # Lathe path -> kohya key, to name the kohya key in errors
        self.res = KohyaImport()
        self.done: set[str] = set()
        self.from_args: set[str] = set()  # keys given in additional_parameters (backend.kohya_args)

    def get(self, key: str, conv: Callable[[Any], Any]) -> Any:
        """The converted value (None when absent or empty); a value that does not convert is an error."""
        if key not in self.data or key in self.done:
            return None
        try:
            return conv(self.data[key])
        except ValueError as e:
            self.done.add(key)
            self.res.errors.append(f"{key}: {e}")
            return None

    def put(self, key: str, path: str, value: Any, note: str = "") -> None:
        self.set(path, value)
        self.sources.setdefault(path, key)
        self.mapped(key, f"{path} = {'unset' if value is None else json.dumps(value)}" + (f" ({note})" if note else ""))

    def set(self, path: str, value: Any) -> None:
        node = self.out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def mapped(self, key: str, text: str) -> None:
        self.done.add(key)
        self.res.mapped.append((key, text))

    def skip(self, key: str, reason: str, warn: bool = False) -> None:
        if key in self.data and key not in self.done:
            self.done.add(key)
            self.res.unmapped.append((key, reason))
            if warn:
                value = "(hidden: it looks like a secret)" if looks_secret(self.data[key]) else show(self.data[key])
                self.warn(f"{key}: {reason}; the value {value} is not imported")

    def warn(self, message: str) -> None:
        self.res.warnings.append(message)

    def error(self, message: str) -> None:
        self.res.errors.append(message)


# ------------------------------------------------------------------------------------------ the rest
def _report_rest(m: Mapper) -> None:
    """Every key no handler imported goes to `unmapped` with its reason; active features warn."""
    listed = {k for k, _ in m.res.mapped} | {k for k, _ in m.res.unmapped}
    for key, value in m.data.items():
        if key in listed:
            continue
        if key in m.done:  # its value did not convert: the error says why
            m.res.unmapped.append((key, "not imported: its value is invalid (see the errors)"))
            continue
        reason, warn = reason_for(key)
        if key in m.from_args and reason == UNKNOWN:
            reason, warn = "unsupported feature: an sd-scripts argument this importer does not carry", True
        if reason == SECRET:
            m.skip(key, reason)
            if is_set(key, value):
                m.warn(f"{key}: a secret; it is never copied into a preset")
        else:
            m.skip(key, reason, warn and is_set(key, value))


def _mark_args(m: Mapper) -> None:
    """Name the keys that came from additional_parameters as such in the report."""
    def mark(key: str, text: str) -> str:
        return f"{text} (from additional_parameters)" if key in m.from_args else text
    m.res.mapped = [(k, mark(k, t)) for k, t in m.res.mapped]
    m.res.unmapped = [(k, mark(k, r)) for k, r in m.res.unmapped]


def _kohya_line(line: str, sources: dict[str, str]) -> str:
    """Name the kohya key in a Lathe validation line: `key: message (Lathe's path)`."""
    path, _, message = line.partition(": ")
    probe = path
    while probe:
        if probe in sources:
            return f"{sources[probe]}: {message} (Lathe's {path})"
        probe = probe.rpartition(".")[0]
    return line


def _finish(m: Mapper, name: str, description: str) -> None:
    if m.res.refused or m.res.errors:
        return
    try:
        cfg = resolve(m.out)
    except ConfigError as err:
        m.res.errors += [_kohya_line(line, m.sources) for line in err.lines]
        return
    m.res.config = cfg
    m.res.preset, removed = to_preset(cfg, name, description)
    m.res.warnings += [f"Lathe: {w}" for w in config_warnings(cfg)]
    m.res.warnings += [f"{path}: looks like a secret; not written into the preset" for path in removed]


def import_kohya(data: dict[str, Any], source_name: str = "", base_dir: Path | None = None) -> KohyaImport:
    """Convert one kohya_ss GUI config (a parsed JSON object) into a Lathe preset and a report.
    `base_dir` is where a relative dataset_config path is looked for (the config file's folder)."""
    if not isinstance(data, dict):
        return KohyaImport(refused=f"expected a JSON object of kohya_ss settings; got {type(data).__name__}")
    extra, arg_errors = parse_additional(data.get("additional_parameters"))
    m = Mapper({**data, **extra})  # on sd-scripts' command line the extra arguments come last and win
    m.from_args = set(extra)
    m.res.errors += arg_errors
    if extra:
        m.mapped("additional_parameters", f"{len(extra)} sd-scripts argument(s), each imported under its own name "
                 "(marked 'from additional_parameters'), over the file's key of the same name")
    elif not arg_errors:
        m.skip("additional_parameters", "not applicable: empty in the kohya file")
    else:
        m.done.add("additional_parameters")
    m.res.refused = rules.refusal(m)
    rules.map_network(m)
    family = rules.map_model(m)
    rules.map_dataset(m, base_dir)
    rules.map_duration(m)
    otype = rules.map_optimizer(m)
    rules.map_learning_rates(m, family)
    rules.map_flow(m, family)
    rules.map_scheduler(m, otype)
    rules.map_noise(m)
    rules.map_saving(m)
    rules.map_sampling(m)
    rules.map_names(m)
    rules.map_simple(m)
    rules.check_combinations(m, family)
    _report_rest(m)
    _mark_args(m)
    comment = data.get("training_comment") if isinstance(data.get("training_comment"), str) else ""
    name = str(m.out.get("run_name") or Path(source_name).stem or "kohya-import")
    description = f"Imported from the kohya_ss config {source_name or 'file'}." + (
        f" Training comment: {comment.strip()}" if comment.strip() else "")
    _finish(m, name, description)
    if not m.res.ok:
        m.res.preset, m.res.config = {}, None
    return m.res


def load_kohya_file(path: str | Path) -> KohyaImport:
    """Read and convert a kohya_ss config file; ConfigError when it is not readable JSON."""
    p = Path(path)
    return import_kohya(read_json_object(p), p.name, p.parent)


def import_kohya_file(src: str | Path, dst: str | Path) -> int:
    """CLI: convert a kohya_ss config into a Lathe preset file, printing a report.

    Returns the exit code: 0 when the preset was written, 1 otherwise (refused, errors, unreadable).
    """
    src_p, dst_p = Path(src), Path(dst)
    try:
        result = load_kohya_file(src_p)
    except ConfigError as err:
        print("\n".join(err.lines), file=sys.stderr)
        return 1
    print("\n".join(result.report(f"kohya_ss import of {src_p}")))
    if not result.ok:
        print(f"Nothing written to {dst_p}.", file=sys.stderr)
        return 1
    if dst_p.resolve().parent == SHIPPED_DIR.resolve():
        print(f"{dst_p}: the shipped preset folder is read-only; write the preset elsewhere", file=sys.stderr)
        return 1
    try:
        write_preset_file(dst_p, result.preset)
    except OSError as e:
        print(f"{dst_p}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 1
    print(f"Wrote {dst_p}")
    return 0
