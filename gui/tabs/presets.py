"""The presets panel at the top of the Setup tab: load a shipped or user preset, save the form as a
preset, delete a user preset, download and upload preset JSON, import a kohya_ss config.

Every load sets every field (defaults for what the preset does not set) and says what changed."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from backend.config import ConfigError
from backend.kohya import load_kohya_file
from backend.presets import (
    PresetExistsError,
    delete_preset,
    list_presets,
    load_preset,
    read_preset,
    save_preset,
    to_preset,
    write_preset_file,
)
from gui.form import FormError, form_changes, form_to_config
from gui.page import Page

MAX_CHANGES_LISTED = 25


def preset_choices(page: Page) -> list[tuple[str, str]]:
    return [(f"{p.name} ({p.source})" + (" — unreadable" if p.error else ""), p.name)
            for p in list_presets(page.presets_dir)]


def changes_text(title: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    """'Loaded preset demo: 3 settings changed' and the list."""
    changes = form_changes(old, new)
    if not changes:
        return f"{title}: no setting changed."
    shown = [f"- {c}" for c in changes[:MAX_CHANGES_LISTED]]
    if len(changes) > MAX_CHANGES_LISTED:
        shown.append(f"- … and {len(changes) - MAX_CHANGES_LISTED} more")
    return f"{title}: {len(changes)} setting{'s' if len(changes) > 1 else ''} changed.\n" + "\n".join(shown)


def build(page: Page, loaded: str) -> dict[str, Any]:
    """The panel's components; call wire() once the form's fields exist."""
    with gr.Accordion("Presets", open=True, elem_id="presets"):
        with gr.Row(equal_height=True):
            choice = gr.Dropdown(preset_choices(page), value="demo", label="Preset", elem_id="preset-choice",
                                 scale=3, interactive=True)
            load = gr.Button("Load", elem_id="btn-preset-load", scale=1)
            delete = gr.Button("Delete", elem_id="btn-preset-delete", scale=1)
        with gr.Row(equal_height=True):
            name = gr.Textbox(label="Save the current settings as", placeholder="my-preset", elem_id="preset-name",
                              scale=3)
            overwrite = gr.Checkbox(label="Replace if it exists", value=False, elem_id="preset-overwrite", scale=1)
            save = gr.Button("Save as", elem_id="btn-preset-save", scale=1)
        with gr.Row(equal_height=True):
            download = gr.Button("Download JSON", elem_id="btn-preset-download")
            upload = gr.UploadButton("Upload JSON", file_types=[".json"], elem_id="btn-preset-upload")
            kohya = gr.UploadButton("Import kohya_ss config", file_types=[".json"], elem_id="btn-kohya-import")
        file_out = gr.File(label="Preset file", visible=False, elem_id="preset-file", interactive=False)
        status = gr.Markdown(loaded, elem_id="preset-status", elem_classes=["lathe-status"])
        report = gr.Textbox(label="kohya_ss import report", visible=False, lines=12, max_lines=30,
                            elem_id="kohya-report", interactive=False, buttons=["copy"])
    return {"choice": choice, "name": name, "overwrite": overwrite, "status": status, "report": report,
            "file": file_out, "load": load, "upload": upload, "kohya": kohya, "save": save, "delete": delete,
            "download": download}


class PresetsPanel:
    """The panel's handlers: each takes one mapping {component: value} and returns one mapping."""

    def __init__(self, page: Page, parts: dict[str, Any]):
        self.page, self.p = page, parts

    def _finish(self, out: dict, report_text: str | None = None) -> dict:
        out[self.p["status"]] = out.pop("__status__")
        out[self.p["report"]] = gr.update(value=report_text or "", visible=bool(report_text))
        return out

    def on_load(self, data: dict) -> dict:
        page, status = self.page, self.p["status"]
        try:
            preset = load_preset(data.get(self.p["choice"]) or "", page.presets_dir)
        except ConfigError as e:
            return {status: "✖ " + "; ".join(e.lines)}
        return self._finish(_apply(page, data, page.form_values_for(preset.config), f"Loaded preset **{preset.name}**"))

    def on_upload(self, data: dict) -> dict:
        page, status, path = self.page, self.p["status"], data.get(self.p["upload"])
        if not path:
            return {status: "✖ No file was uploaded."}
        try:
            preset = read_preset(path, "file")
        except ConfigError as e:
            return {status: f"✖ {Path(path).name} did not load:\n" + "\n".join(f"- {x}" for x in e.lines)}
        return self._finish(_apply(page, data, page.form_values_for(preset.config), f"Loaded **{Path(path).name}**"))

    def on_kohya(self, data: dict) -> dict:
        page, status, path = self.page, self.p["status"], data.get(self.p["kohya"])
        if not path:
            return {status: "✖ No file was uploaded."}
        try:
            result = load_kohya_file(path)
        except ConfigError as e:
            return {status: "✖ " + "; ".join(e.lines)}
        lines = result.report(f"kohya_ss import of {Path(path).name}")
        if not result.ok or result.config is None:
            why = result.refused or f"{len(result.errors)} error(s), listed in the report"
            return self._finish({"__status__": f"✖ Not imported: {why}"}, "\n".join(lines))
        title = (f"Imported kohya_ss config **{Path(path).name}** ({len(result.mapped)} settings imported, "
                 f"{len(result.unmapped)} not imported: see the report)")
        return self._finish(_apply(page, data, page.form_values_for(result.config), title), "\n".join(lines))

    def on_save(self, data: dict) -> dict:
        page, p = self.page, self.p
        status, choice = p["status"], p["choice"]
        try:
            cfg = form_to_config(page.form.values(data))
            saved = save_preset(cfg, data.get(p["name"]) or "", user_dir=page.presets_dir,
                                overwrite=bool(data.get(p["overwrite"])))
        except PresetExistsError as e:
            return {status: f"⚠ {e.lines[0]} Tick “Replace if it exists” and save again."}
        except FormError as e:
            return {status: f"✖ Not saved: {len(e.errors)} problem(s); press Validate to see them."}
        except ConfigError as e:
            return {status: "✖ " + "; ".join(e.lines)}
        note = f" (left out, looked like secrets: {', '.join(saved.removed_secrets)})" if saved.removed_secrets else ""
        return {status: f"✔ Saved preset **{saved.path.stem}** to {saved.path}{note}.",
                choice: gr.update(choices=preset_choices(page), value=saved.path.stem)}

    def on_delete(self, data: dict) -> dict:
        page, status, choice = self.page, self.p["status"], self.p["choice"]
        try:
            path = delete_preset(data.get(choice) or "", page.presets_dir)
        except ConfigError as e:
            return {status: "✖ " + "; ".join(e.lines)}
        return {status: f"Deleted preset **{path.stem}**.", choice: gr.update(choices=preset_choices(page), value="demo")}

    def on_download(self, data: dict) -> dict:
        status, file_out = self.p["status"], self.p["file"]
        try:
            cfg = form_to_config(self.page.form.values(data))
        except FormError as e:
            return {status: f"✖ {len(e.errors)} problem(s) to fix first; press Validate to see them.",
                    file_out: gr.update(visible=False)}
        preset, _ = to_preset(cfg, cfg.run_name, "Saved from the Lathe GUI.")
        path = Path(tempfile.mkdtemp(prefix="lathe-preset-")) / f"{cfg.run_name}.json"
        write_preset_file(path, preset)
        return {status: f"Preset file **{path.name}** is ready below.", file_out: gr.update(value=str(path), visible=True)}


def _apply(page: Page, data: dict, cfg_values: dict[str, Any], title: str) -> dict:
    form = page.form
    return {**form.updates(cfg_values), "__status__": changes_text(title, form.values(data), cfg_values)}


def wire(page: Page, parts: dict[str, Any]) -> PresetsPanel:
    panel = PresetsPanel(page, parts)
    form, p = page.form, parts
    loaded_out = [*form.components.values(), p["status"], p["report"]]
    p["load"].click(panel.on_load, inputs=form.inputs | {p["choice"]}, outputs=loaded_out)
    p["upload"].upload(panel.on_upload, inputs=form.inputs | {p["upload"]}, outputs=loaded_out)
    p["kohya"].upload(panel.on_kohya, inputs=form.inputs | {p["kohya"]}, outputs=loaded_out)
    p["save"].click(panel.on_save, inputs=form.inputs | {p["name"], p["overwrite"]}, outputs=[p["status"], p["choice"]])
    p["delete"].click(panel.on_delete, inputs={p["choice"]}, outputs=[p["status"], p["choice"]])
    p["download"].click(panel.on_download, inputs=form.inputs, outputs=[p["status"], p["file"]])
    return panel
