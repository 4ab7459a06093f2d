"""The Checkpoints tab's "Reuse this run" card: load the chosen version's settings into Setup, or
train a finished run further (N more epochs or steps), through the resume preflight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from gui.fields import command_box
from gui.page import Page
from gui.preview import resume_command, resume_preview
from gui.reuse import ReuseError, further, run_settings
from gui.runner import StartRefused, plan_for
from gui.tabs.presets import changes_text
from gui.tabs.run import RunTab

UNITS = ["epochs", "steps"]
CHOOSE = "Choose a version (the Runs table or the Version list) to reuse it."


class ReuseCard:
    def __init__(self, page: Page, run_tab: RunTab, version: Any):
        self.page, self.run_tab, self.version = page, run_tab, version
        self.c: dict[str, Any] = {}

    def build(self) -> None:
        c = self.c
        with gr.Column(variant="panel", elem_id="reuse-box"):
            gr.Markdown("### Reuse this run")
            with gr.Row(equal_height=True):
                c["load"] = gr.Button("Load its settings into Setup", elem_id="btn-load-settings")
            with gr.Row(equal_height=True):
                c["more"] = gr.Number(1, label="Train further by", precision=0, minimum=1, elem_id="reuse-more",
                                      scale=1)
                c["unit"] = gr.Radio(UNITS, value="epochs", label="Unit", elem_id="reuse-unit", scale=1)
                c["go"] = gr.Button("Train further", variant="primary", elem_id="btn-train-further",
                                    interactive=False, scale=1)
            c["plan"] = gr.Markdown(CHOOSE, elem_id="reuse-plan")
            c["command"] = command_box("The same with the CLI", "reuse-command")
            c["result"] = gr.Markdown("", elem_id="reuse-result")

    def _version(self, data: dict) -> str | None:
        return self.page.inside(data.get(self.version))

    def _further(self, data: dict) -> tuple[Path | None, Any, list[str], str, str]:
        """(checkpoint, config, problems, plan text, CLI command) of training the chosen version further."""
        version = self._version(data)
        if not version:
            return None, None, [CHOOSE], CHOOSE, ""
        try:
            more = int(data.get(self.c["more"]) or 0)
            ckpt, longer = further(version, more, data.get(self.c["unit"]) or "epochs")
        except (ReuseError, ValueError, TypeError) as e:
            return None, None, [str(e)], f"**Cannot train further:** {e}.", ""
        cfg, plan, problems = plan_for(ckpt, longer)
        if plan is None or cfg is None:
            return None, None, problems, "**Cannot train further:**\n" + "\n".join(f"- {p}" for p in problems), ""
        text = resume_preview(plan)
        extra = [p for p in problems if p not in plan.refused]
        if extra:
            text += "\n" + "\n".join(f"- {p}" for p in extra)
        return ckpt, cfg, problems, text, resume_command(ckpt, plan.changed)

    def on_plan(self, data: dict) -> dict:
        c = self.c
        ckpt, _, problems, text, command = self._further(data)
        return {c["plan"]: text, c["command"]: command, c["go"]: gr.update(interactive=ckpt is not None and not problems)}

    def on_go(self, data: dict, request: gr.Request | None = None) -> dict:
        c, page = self.c, self.page
        ckpt, cfg, problems, _, _ = self._further(data)
        if ckpt is None or cfg is None or problems:
            return {c["result"]: "✖ **Not started**:\n" + "\n".join(f"- {p}" for p in problems)}
        try:
            started = page.runner.start(cfg)
        except StartRefused as e:
            return {c["result"]: "✖ **Not started**:\n" + "\n".join(f"- {line}" for line in e.lines)}
        out = self.run_tab.attach(str(started.version_dir), request)
        name = f"{started.version_dir.parent.name} / {started.version_dir.name}"
        message = f"Training further from **{ckpt.name}** as **{name}**."
        out[self.run_tab.c["message"]] = message
        out[c["result"]] = message + " Follow it in the Run tab."
        out[page.component("tabs")] = gr.Tabs(selected="run")
        return out

    def on_load(self, data: dict) -> dict:
        page, c = self.page, self.c
        version = self._version(data)
        if not version:
            return {c["result"]: CHOOSE}
        try:
            cfg = run_settings(version)
        except ReuseError as e:
            return {c["result"]: f"✖ Not loaded: {e}."}
        values = page.form_values_for(cfg)
        name = f"{Path(version).parent.name} / {Path(version).name}"
        status = page.tabs["presets"].p["status"]
        return {**page.form.updates(values), status: changes_text(f"Loaded the settings of **{name}**",
                                                                  page.form.values(data), values),
                c["result"]: f"Loaded the settings of **{name}** into Setup.", page.component("tabs"): gr.Tabs(selected="setup")}

    def wire(self) -> None:
        c, form, page = self.c, self.page.form, self.page
        picks = {self.version, c["more"], c["unit"]}
        gr.on([self.version.change, c["more"].change, c["unit"].change], self.on_plan, inputs=picks,
              outputs=[c["plan"], c["command"], c["go"]], show_progress="hidden", trigger_mode="always_last")
        live = self.run_tab.live_outputs
        self.run_tab.streamed(c["go"].click(self.on_go, inputs=picks, outputs=[
            *live, c["result"], self.run_tab.c["message"], page.component("tabs")]))
        status = page.tabs["presets"].p["status"]
        form.follow_family(c["load"].click(self.on_load, inputs=form.inputs | {self.version},
                                           outputs=[*form.components.values(), status, c["result"], page.component("tabs")]))
