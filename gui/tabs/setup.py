"""The Setup tab: one group per config section, fields generated from the config's metadata,
advanced fields folded away, Validate / Show command, and the saving preview."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from backend import launcher
from backend.config import TrainingConfig
from backend.config_keys import union_sections
from gui.family_fields import family_problems, visibility
from gui.fields import build_field, command_box
from gui.form import (
    GENERAL,
    FieldError,
    FormError,
    by_section,
    config_types,
    field_error,
    form_to_config,
    form_warnings,
)
from gui.page import Page
from gui.preview import saving_preview, train_command, worker_commands_text
from gui.runner import start_problems
from gui.schema import SECTION_OF, SECTIONS, FieldSpec, section_specs
from gui.tabs import presets

PER_ROW = 3
PREVIEW_TRIGGERS = ("saving.", "training.max_train_")


def _rows(page: Page, specs: list[FieldSpec], values: dict[str, Any], shown: dict[str, bool]) -> None:
    for i in range(0, len(specs), PER_ROW):
        with gr.Row(equal_height=False):
            for spec in specs[i:i + PER_ROW]:
                page.form.add(spec.key, build_field(spec, values[spec.key], shown.get(spec.key, True)))


def _fields(page: Page, specs: list[FieldSpec], values: dict[str, Any], shown: dict[str, bool]) -> None:
    basic = [s for s in specs if not s.advanced]
    advanced = [s for s in specs if s.advanced]
    _rows(page, basic, values, shown)
    if advanced:
        with gr.Accordion("Advanced", open=False, elem_classes=["lathe-advanced"]):
            _rows(page, advanced, values, shown)


def _union_section(page: Page, union: str, specs: list[FieldSpec], values: dict[str, Any],
                   shown: dict[str, bool]) -> None:
    """A discriminated section (network, optimizer): its type selector, then one column of fields per
    type, of which only the chosen type's is shown."""
    type_key = f"{union}.type"
    type_spec = next(s for s in specs if s.key == type_key)
    page.form.add(type_key, build_field(type_spec, values[type_key]))
    groups = {}
    for kind in type_spec.choices:
        with gr.Column(visible=values[type_key] == kind, elem_id=f"{union}-{kind}") as col:
            _fields(page, [s for s in specs if s.union == union and s.variant == kind], values, shown)
        groups[kind] = col
    page.share(f"{union}_groups", groups)
    type_box = page.form.components[type_key]
    type_box.change(lambda data: {col: gr.update(visible=data[type_box] == t) for t, col in groups.items()},
                    inputs={type_box}, outputs=list(groups.values()), show_progress="hidden")


def _section(page: Page, section: str, values: dict[str, Any], shown: dict[str, bool]) -> None:
    with gr.Accordion(section, open=True, elem_id=f"sec-{section}", elem_classes=["lathe-section"]):
        page.shared.setdefault("section_errors", {})[section] = gr.Markdown(
            "", visible=False, elem_id=f"err-{section}", elem_classes=["lathe-errors"])
        specs = section_specs(section)
        unions = [u for u in union_sections() if SECTION_OF[u] == section]
        selectors = {f"{u}.type" for u in unions}
        _fields(page, [s for s in specs if s.union is None and s.key not in selectors], values, shown)
        for union in unions:
            _union_section(page, union, specs, values, shown)
        if section == "Saving":
            page.share("saving_preview", gr.Markdown(_preview_text(values), elem_id="saving-preview",
                                                     elem_classes=["lathe-preview"]))


# ------------------------------------------------------------------------------------ messages
def _lines(items: Iterable[FieldError], icon: str) -> list[str]:
    return [f"{icon} **{e.label}**: {e.message}" if e.label else f"{icon} {e.message}" for e in items]


def message_updates(page: Page, errors: list[FieldError], warnings: list[FieldError], ok_text: str = "") -> dict:
    """Each section's error box (hidden when clean) and the summary above the sections."""
    errs, warns = by_section(errors), by_section(warnings)
    out: dict[Any, Any] = {}
    for section, box in page.component("section_errors").items():
        text = "\n\n".join(_lines(errs.get(section, []), "✖") + _lines(warns.get(section, []), "⚠"))
        out[box] = gr.update(value=text, visible=bool(text))
    general = _lines(errs.get(GENERAL, []), "✖")
    if errors:
        where = sorted({e.section for e in errors if e.section != GENERAL}, key=lambda s: (SECTIONS + (s,)).index(s))
        head = f"**{len(errors)} problem{'s' if len(errors) > 1 else ''}** to fix" + (
            f" in {', '.join(where)}" if where else "") + ": nothing was started."
        summary = "\n\n".join([head, *general, *(f"- {e}" for e in errors if e.section != GENERAL)])
    else:
        summary = ok_text
    out[page.component("setup_summary")] = gr.update(value=summary, visible=bool(summary))
    return out


@dataclass(frozen=True)
class Checked:
    """What Validate found: the config (None when the form does not validate), the problems that keep
    it from starting (field errors, then the launch checks Start makes), and warnings."""

    cfg: TrainingConfig | None
    errors: list[FieldError]
    warnings: list[FieldError]


def check_form(values: dict[str, Any]) -> Checked:
    """The form's validation, then, for a valid config, `start_problems`: the very checks Start makes."""
    try:
        cfg = form_to_config(values)
    except FormError as e:
        return Checked(None, e.errors, [])
    chosen = config_types(cfg)
    problems = family_problems(cfg) + start_problems(cfg)
    return Checked(cfg, [field_error(line, chosen) for line in problems], form_warnings(cfg))


def checked_messages(page: Page, checked: Checked) -> dict:
    ok = "✔ **Valid.** Model, image folders, output folder, disk space and devices checked: ready to start."
    if checked.warnings:
        ok += " Warnings are shown next to their sections."
    return message_updates(page, checked.errors, checked.warnings, ok)


def validate_values(page: Page, values: dict[str, Any]) -> tuple[TrainingConfig | None, dict]:
    """(config or None, message updates): the config only when nothing keeps it from starting."""
    checked = check_form(values)
    return (None if checked.errors else checked.cfg), checked_messages(page, checked)


def _preview_text(values: dict[str, Any]) -> str:
    try:
        return "**What is kept:** " + saving_preview(form_to_config(values))
    except FormError:
        return "**What is kept:** fix the errors above to see which checkpoints will be kept."


# ------------------------------------------------------------------------------------ the tab
def build(page: Page) -> None:
    values, loaded = page.first_form()
    with gr.Tab("Setup", id="setup", elem_id="tab-setup") as tab:
        page.tab_items["setup"] = tab
        preset_parts = presets.build(page, loaded)
        with gr.Row(elem_classes=["lathe-actions"]):
            validate = gr.Button("Validate", elem_id="btn-validate")
            show = gr.Button("Show command", elem_id="btn-show-command")
            page.shared.setdefault("start_buttons", []).append(
                gr.Button("Start training", variant="primary", elem_id="btn-start-setup"))
        page.share("setup_summary", gr.Markdown("", visible=False, elem_id="setup-summary",
                                                elem_classes=["lathe-summary"]))
        command = command_box("The CLI command that reproduces this run", "command-preview", lines=12, visible=False)
        shown = visibility(values)  # the first form's family's fields (gui/family_fields.py)
        for section in SECTIONS:
            _section(page, section, values, shown)
    page.tabs["presets"] = presets.wire(page, preset_parts)
    _wire(page, validate, show, command)


def _wire(page: Page, validate: gr.Button, show: gr.Button, command: gr.Textbox) -> None:
    form = page.form
    outputs = [*page.component("section_errors").values(), page.component("setup_summary")]

    def on_validate(data: dict) -> dict:
        return validate_values(page, form.values(data))[1]

    validate.click(on_validate, inputs=form.inputs, outputs=outputs)

    def on_show(data: dict) -> dict:
        checked = check_form(form.values(data))
        messages, cfg = checked_messages(page, checked), checked.cfg
        if cfg is None:  # a valid config still shows its command when only the launch checks fail
            return {**messages, command: gr.update(visible=False)}
        full = launcher.absolutize(cfg)
        text = (f"# Reproduce with the CLI (from the Lathe folder):\n{train_command(full)}\n\n"
                f"# ...which launches (the version folder is chosen at start):\n{launcher.preview(cfg)}")
        others = worker_commands_text(full)
        if others:
            text += f"\n\n{others}"
        return {**messages, command: gr.update(value=text, visible=True)}

    show.click(on_show, inputs=form.inputs, outputs=[*outputs, command])
    _wire_family(page)
    preview = page.component("saving_preview")
    triggers = [c.change for k, c in form.components.items() if k.startswith(PREVIEW_TRIGGERS)]
    gr.on(triggers, lambda data: {preview: _preview_text(form.values(data))}, inputs=form.inputs,
          outputs=[preview], show_progress="hidden", trigger_mode="always_last")


def _wire_family(page: Page) -> None:
    """Picking the model family, or (auto) another base model, shows that family's fields only."""
    form = page.form
    family, model = form.components["model.family"], form.components["model.pretrained_model"]
    gr.on([family.change, model.change], form.on_family, inputs=form.family_inputs, outputs=form.family_outputs,
          show_progress="hidden", trigger_mode="always_last")
