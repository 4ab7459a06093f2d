"""The presets panel at the top of the Setup tab: load a shipped or user preset, save the form as a
preset, delete a user preset, download and upload preset JSON, import a kohya_ss config.

Every load sets every field (defaults for what the preset does not set) and says what changed. The
preset list is read from disk on every page load and after every action, so a preset saved in one
browser tab (or by another user of the same output folder) is listed in the others."""

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
    sanitize_preset_name,
    save_preset,
    to_preset,
    write_preset_file,
)
from gui.form import FormError, form_changes, form_to_config
from gui.page import FIRST_PRESET, Page

MAX_CHANGES_LISTED = 25
# After the file is written, click the hidden download button: one click of "Download JSON" downloads.
CLICK_DOWNLOAD_JS = """() => {
  const el = document.getElementById("preset-file");
  const button = el && (el.tagName === "BUTTON" ? el : el.querySelector("button"));
  if (button) button.click();
}"""


def preset_choices(page: Page) -> list[tuple[str, str]]:
    return [(f"{p.name} ({p.source})" + (" — unreadable" if p.error else ""), p.name)
            for p in list_presets(page.presets_dir)]


def choices_update(page: Page, value: str | None = None) -> Any:
    """The dropdown as the preset folders hold it now, keeping `value` chosen when it is still there."""
    choices = preset_choices(page)
    names = [v for _, v in choices]
    keep = value if value in names else FIRST_PRESET if FIRST_PRESET in names else (names[0] if names else None)
    return gr.update(choices=choices, value=keep)


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
            # Hidden: clicked by CLICK_DOWNLOAD_JS once on_download has written the file.
            file_out = gr.DownloadButton("Download", visible="hidden", elem_id="preset-file")
            upload = gr.UploadButton("Upload JSON", file_types=[".json"], elem_id="btn-preset-upload")
            kohya = gr.UploadButton("Import kohya_ss config", file_types=[".json"], elem_id="btn-kohya-import")
        loaded_name = gr.State(FIRST_PRESET)  # what the form was last loaded from or saved as: the download's name
        status = gr.Markdown(loaded, elem_id="preset-status", elem_classes=["lathe-status"])
        report = gr.Textbox(label="kohya_ss import report", visible=False, lines=12, max_lines=30,
                            elem_id="kohya-report", interactive=False, buttons=["copy"])
    return {"choice": choice, "name": name, "overwrite": overwrite, "status": status, "report": report,
            "file": file_out, "load": load, "upload": upload, "kohya": kohya, "save": save, "delete": delete,
            "download": download, "loaded": loaded_name}


class PresetsPanel:
    """The panel's handlers: each takes one mapping {component: value} and returns one mapping."""

    def __init__(self, page: Page, parts: dict[str, Any]):
        self.page, self.p = page, parts

    def _finish(self, data: dict, out: dict, loaded: str | None = None, report_text: str | None = None) -> dict:
        """The reply of a load: status, report, the preset list as it is now, and the loaded name."""
        p = self.p
        out[p["status"]] = out.pop("__status__")
        out[p["report"]] = gr.update(value=report_text or "", visible=bool(report_text))
        out[p["choice"]] = choices_update(self.page, data.get(p["choice"]))
        if loaded is not None:
            out[p["loaded"]] = loaded
        return out

    def on_page_load(self, data: dict) -> dict:
        """Each page load lists the presets on disk now (not those there when app.py started)."""
        return {self.p["choice"]: choices_update(self.page, data.get(self.p["choice"]))}

    def on_load(self, data: dict) -> dict:
        page = self.page
        try:
            preset = load_preset(data.get(self.p["choice"]) or "", page.presets_dir)
        except ConfigError as e:
            return self._finish(data, {"__status__": "✖ " + "; ".join(e.lines)})
        return self._finish(data, _apply(page, data, page.form_values_for(preset.config),
                                         f"Loaded preset **{preset.name}**"), preset.name)

    def on_upload(self, data: dict) -> dict:
        page, status, path = self.page, self.p["status"], data.get(self.p["upload"])
        if not path:
            return {status: "✖ No file was uploaded."}
        try:
            preset = read_preset(path, "file")
        except ConfigError as e:
            return {status: f"✖ {Path(path).name} did not load:\n" + "\n".join(f"- {x}" for x in e.lines)}
        return self._finish(data, _apply(page, data, page.form_values_for(preset.config), f"Loaded **{Path(path).name}**"),
                            preset.name)

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
            return self._finish(data, {"__status__": f"✖ Not imported: {why}"}, report_text="\n".join(lines))
        title = (f"Imported kohya_ss config **{Path(path).name}** ({len(result.mapped)} settings imported, "
                 f"{len(result.unmapped)} not imported: see the report)")
        return self._finish(data, _apply(page, data, page.form_values_for(result.config), title), Path(path).stem,
                            "\n".join(lines))

    def on_save(self, data: dict) -> dict:
        page, p = self.page, self.p
        status, choice = p["status"], p["choice"]
        try:
            cfg = form_to_config(page.form.values(data))
            saved = save_preset(cfg, data.get(p["name"]) or "", user_dir=page.presets_dir,
                                overwrite=bool(data.get(p["overwrite"])))
        except PresetExistsError as e:
            return {status: f"⚠ {e.lines[0]} Tick “Replace if it exists” and save again.",
                    choice: choices_update(page, data.get(choice))}
        except FormError as e:
            return {status: f"✖ Not saved: {len(e.errors)} problem(s); press Validate to see them."}
        except ConfigError as e:
            return {status: "✖ " + "; ".join(e.lines)}
        note = f" (left out, looked like secrets: {', '.join(saved.removed_secrets)})" if saved.removed_secrets else ""
        return {status: f"✔ Saved preset **{saved.path.stem}** to {saved.path}{note}.",
                choice: choices_update(page, saved.path.stem), p["loaded"]: saved.path.stem}

    def on_delete(self, data: dict) -> dict:
        page, status, choice = self.page, self.p["status"], self.p["choice"]
        try:
            path = delete_preset(data.get(choice) or "", page.presets_dir)
        except ConfigError as e:
            return {status: "✖ " + "; ".join(e.lines), choice: choices_update(page, data.get(choice))}
        return {status: f"Deleted preset **{path.stem}**.", choice: choices_update(page, FIRST_PRESET)}

    def on_download(self, data: dict) -> dict:
        """The form as a preset file named after the preset it was loaded from or saved as (the run
        name when that is no preset name); the hidden download button then hands it to the browser."""
        status, file_out = self.p["status"], self.p["file"]
        try:
            cfg = form_to_config(self.page.form.values(data))
        except FormError as e:
            return {status: f"✖ {len(e.errors)} problem(s) to fix first; press Validate to see them.",
                    file_out: gr.update(value=None)}
        try:
            name = sanitize_preset_name(data.get(self.p["loaded"]) or cfg.run_name)
        except ConfigError:
            name = cfg.run_name
        preset, _ = to_preset(cfg, name, "Saved from the Lathe GUI.")
        path = Path(tempfile.mkdtemp(prefix="lathe-preset-")) / f"{name}.json"
        write_preset_file(path, preset)
        return {status: f"Downloaded the settings as **{path.name}**.", file_out: gr.update(value=str(path))}


def _apply(page: Page, data: dict, cfg_values: dict[str, Any], title: str) -> dict:
    form = page.form
    return {**form.updates(cfg_values), "__status__": changes_text(title, form.values(data), cfg_values)}


def wire(page: Page, parts: dict[str, Any]) -> PresetsPanel:
    panel = PresetsPanel(page, parts)
    form, p = page.form, parts
    loaded_out = [*form.components.values(), p["status"], p["report"], p["choice"], p["loaded"]]
    with_choice = form.inputs | {p["choice"]}
    form.follow_family(p["load"].click(panel.on_load, inputs=with_choice, outputs=loaded_out))
    form.follow_family(p["upload"].upload(panel.on_upload, inputs=with_choice | {p["upload"]}, outputs=loaded_out))
    form.follow_family(p["kohya"].upload(panel.on_kohya, inputs=with_choice | {p["kohya"]}, outputs=loaded_out))
    p["save"].click(panel.on_save, inputs=with_choice | {p["name"], p["overwrite"]},
                    outputs=[p["status"], p["choice"], p["loaded"]])
    p["delete"].click(panel.on_delete, inputs={p["choice"]}, outputs=[p["status"], p["choice"]])
    p["download"].click(panel.on_download, inputs=form.inputs | {p["loaded"]}, outputs=[p["status"], p["file"]]
                        ).then(None, js=CLICK_DOWNLOAD_JS)
    return panel


def wire_page_load(panel: PresetsPanel, blocks: gr.Blocks) -> None:
    """List the presets on disk whenever a page (re)loads."""
    choice = panel.p["choice"]
    blocks.load(panel.on_page_load, inputs={choice}, outputs=[choice], show_progress="hidden")
