"""Gradio components built from the field specs (label, help text, choices, default: all from the
pydantic model), and the Form registry that turns handler mappings into form mappings and back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from gui.family_fields import family_specs, visibility
from gui.schema import FieldSpec

NUMBER_STEP = {"int": 1, "float": 0.01}


def elem_id(key: str) -> str:
    """The DOM id of a field: `f-optimizer-Prodigy-d_coef` for `optimizer.Prodigy.d_coef`."""
    return "f-" + key.replace(".", "-")


def build_field(spec: FieldSpec, value: Any, visible: bool = True) -> gr.components.Component:
    """One input component for a field, showing `value` (hidden, value kept, when not `visible`)."""
    common: dict[str, Any] = {"label": spec.label, "info": spec.help, "elem_id": elem_id(spec.key),
                              "interactive": True, "min_width": 220, "visible": visible}
    kind = spec.kind
    if kind in ("int", "float") and not spec.as_text:
        return gr.Number(value=value, step=NUMBER_STEP[kind], **common)
    if kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if kind in ("choice", "tristate"):
        return gr.Dropdown(choices=list(spec.choices), value=value, **common)
    if kind == "lines":
        return gr.Textbox(value=value, lines=3, max_lines=12, **common)
    if kind == "table":  # Dataframe has no info line: the help goes under it
        common.pop("info")
        table = gr.Dataframe(value=value or None, headers=list(spec.columns), datatype="str", type="array",
                             column_count=len(spec.columns), row_count=max(1, len(value or [])), wrap=True,
                             **common)
        gr.Markdown(spec.help, elem_classes=["lathe-help"])
        return table
    placeholder = "(empty: none)" if spec.optional else None
    return gr.Textbox(value=value, lines=1, max_lines=1, placeholder=placeholder, **common)


@dataclass
class Form:
    """The Setup form: field key -> component (and back)."""

    components: dict[str, gr.components.Component] = field(default_factory=dict)

    def add(self, key: str, component: gr.components.Component) -> None:
        self.components[key] = component

    @property
    def inputs(self) -> set[gr.components.Component]:
        return set(self.components.values())

    def values(self, data: Mapping[Any, Any]) -> dict[str, Any]:
        """The form mapping {key: value} out of a handler's {component: value} mapping."""
        return {key: data[c] for key, c in self.components.items() if c in data}

    def updates(self, values: Mapping[str, Any], keys: Iterable[str] | None = None) -> dict[Any, Any]:
        """{component: value} for a handler's return mapping."""
        wanted = values.keys() if keys is None else keys
        return {self.components[k]: values[k] for k in wanted if k in self.components and k in values}

    def shown(self, visible: Mapping[str, bool]) -> dict[Any, Any]:
        """{component: visibility update} for `visible` ({key: shown}, from gui.family_fields.visibility)."""
        return {self.components[k]: gr.update(visible=v) for k, v in visible.items() if k in self.components}

    @property
    def family_outputs(self) -> list[gr.components.Component]:
        """The components whose showing depends on the model family."""
        return [self.components[s.key] for s in family_specs() if s.key in self.components]

    @property
    def family_inputs(self) -> set[gr.components.Component]:
        """What the showing reads: the family, the base model (for auto) and the fields themselves."""
        return {self.components["model.family"], self.components["model.pretrained_model"], *self.family_outputs}

    def on_family(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        """The family's fields shown, the others hidden (values kept), for the form in `data`."""
        return self.shown(visibility(self.values(data)))

    def follow_family(self, event: Any) -> None:
        """After `event` (a load that sets the whole form) show the loaded family's fields, even where the
        load left the family and the base model as they were."""
        event.then(self.on_family, inputs=self.family_inputs, outputs=self.family_outputs, show_progress="hidden")


def command_box(label: str, elem_id: str, lines: int = 2, visible: bool = True) -> gr.Textbox:
    """A read-only, copyable box for a shell command."""
    return gr.Textbox("", label=label, lines=lines, max_lines=40, interactive=False, buttons=["copy"],
                      elem_id=elem_id, elem_classes=["lathe-command"], visible=visible)


def reply(updates: dict[Any, Any]) -> Any:
    """A handler's return mapping; an empty one becomes gr.skip() (Gradio reads {} as a missing value)."""
    return updates if updates else gr.skip()
