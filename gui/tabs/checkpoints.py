"""The Checkpoints tab: every run and version with its state; for the chosen version a table of its
checkpoints (refreshed live, so rotation is visible while a run goes); actions on one checkpoint:
Verify, copy the LoRA file's path, Delete (not while running), and one-click Resume with the
config diff shown first; for the chosen version, Load settings and Train further (gui/tabs/reuse.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from backend import checkpoints as C
from backend.runs import RunInfo
from gui.checkpoint_actions import HEADERS, checkpoint_rows, delete_checkpoint, verify
from gui.fields import command_box, reply
from gui.form import FormError, form_to_config
from gui.page import Page, dropdown_update, version_choices
from gui.preview import frozen_summary, resume_command, resume_preview
from gui.runner import ACTIVE_STATES, StartRefused, plan_for
from gui.tabs.reuse import ReuseCard
from gui.tabs.run import RunTab

RUN_HEADERS = ["Run", "Version", "State", "Step", "Started", "Reason", "Folder"]
SOURCES = [("the checkpoint's own settings", "checkpoint"), ("the Setup tab's settings", "setup")]
TICK_S = 2.0
STEPS_EVERY_S = 10.0  # the runs table redraws for a new step count at most this often (a state change: at once)


def run_rows(infos: list[RunInfo]) -> pd.DataFrame:
    rows = []
    for i in sorted(infos, key=lambda i: i.started_at or 0.0, reverse=True):
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(i.started_at)) if i.started_at else ""
        reason = " · ".join(r for r in (i.worker_of, i.reason) if r)  # a worker's checkpoints are on machine 0
        rows.append([i.run_name, i.version, i.state, f"{i.step}/{i.total_steps or '?'}", started, reason, i.path])
    return pd.DataFrame(rows, columns=RUN_HEADERS)


def _timer_update(active: bool) -> Any:
    def update() -> gr.Timer:
        return gr.Timer(active=active)
    return update


class CheckpointsTab:
    def __init__(self, page: Page, run_tab: RunTab):
        self.page, self.run_tab = page, run_tab
        self.c: dict[str, Any] = {}

    def build(self) -> None:
        c = self.c
        with gr.Tab("Checkpoints", id="checkpoints", elem_id="tab-checkpoints") as tab:
            self.page.tab_items["checkpoints"] = tab
            c["runs"] = gr.Dataframe(run_rows([]), label="Runs (click a row to show its checkpoints)",
                                     interactive=False, elem_id="runs-table", max_height=260, wrap=True,
                                     column_widths=["9%", "8%", "9%", "9%", "14%", "23%", "28%"])
            with gr.Row(equal_height=True):
                c["version"] = gr.Dropdown([], label="Version", elem_id="ckpt-version", scale=4, interactive=True)
                c["refresh"] = gr.Button("Refresh", elem_id="btn-ckpt-refresh", scale=1)
            c["table"] = gr.Dataframe(pd.DataFrame([], columns=HEADERS), interactive=False, elem_id="ckpt-table",
                                      label="Checkpoints (click a row to select it)", max_height=360)
            with gr.Row(equal_height=True):
                c["choice"] = gr.Dropdown([], label="Checkpoint", elem_id="ckpt-choice", scale=3, interactive=True)
                c["verify"] = gr.Button("Verify", elem_id="btn-verify", scale=1)
                c["copy"] = gr.Button("Copy LoRA path", elem_id="btn-export-path", scale=1)
                c["delete"] = gr.Button("Delete", variant="stop", elem_id="btn-ckpt-delete", scale=1)
            with gr.Row(visible=False, elem_id="delete-confirm") as c["confirm"]:
                gr.Markdown("**Delete this checkpoint and its LoRA file?** This cannot be undone.")
                c["delete_now"] = gr.Button("Delete now", variant="stop", elem_id="btn-ckpt-delete-now")
                c["delete_cancel"] = gr.Button("Cancel", elem_id="btn-ckpt-delete-cancel")
            c["path"] = gr.Textbox(label="LoRA file", visible=False, interactive=False, buttons=["copy"],
                                   elem_id="ckpt-export-path")
            c["result"] = gr.Markdown("", elem_id="ckpt-result")
            with gr.Column(variant="panel", elem_id="resume-box"):  # a card with room inside (a Group packs it tight)
                gr.Markdown("### Resume")
                c["source"] = gr.Radio(SOURCES, value="checkpoint", label="Resume with", elem_id="resume-source")
                c["plan"] = gr.Markdown("Choose a checkpoint to see what a resume would do.", elem_id="resume-plan")
                c["command"] = command_box("The same resume with the CLI", "resume-command")
                c["resume"] = gr.Button("Resume", variant="primary", elem_id="btn-resume", interactive=False)
                with gr.Accordion("What can never change on resume", open=False):
                    gr.Markdown(f"{frozen_summary()}.", elem_classes=["lathe-note"])
            self.reuse = ReuseCard(self.page, self.run_tab, c["version"])
            self.reuse.build()

    def build_hidden(self) -> None:
        self.c["state"] = gr.State({"sig": None, "rev": None})
        # Polls only while the tab is shown (every tick is a Gradio event, which costs the page).
        self.c["timer"] = gr.Timer(TICK_S, active=False)

    # ------------------------------------------------------------------------------ drawing
    def _versions(self, data: dict, force: bool = False) -> tuple[dict, str | None]:
        """(updates of the runs table and version list when the runs changed, the version to show)."""
        c = self.c
        infos = self.page.list_runs(fresh=force)
        sig = [(i.path, i.state) for i in infos]
        steps = [i.step for i in infos]
        state = dict(data.get(c["state"]) or {})
        wanted = data.get(c["version"])
        now = time.monotonic()
        steps_due = steps != state.get("steps") and now - state.get("steps_at", 0.0) >= STEPS_EVERY_S
        if not force and sig == state.get("sig") and not steps_due:
            return {}, self.page.inside(wanted)
        state.update(steps=steps, steps_at=now)
        choices = version_choices(infos)
        newest = choices[0][1] if choices else None
        if wanted is None or wanted == state.get("newest") or wanted not in {v for _, v in choices}:
            wanted = newest  # showing the newest version: keep showing the newest (a run just started)
        state.update(sig=sig, newest=newest)
        return {c["runs"]: run_rows(infos), c["version"]: dropdown_update(choices, wanted), c["state"]: state}, wanted

    def _table(self, version: str | None, selected: str | None, unless: list | None = None) -> dict:
        """The checkpoint table and choices of `version`; nothing when its rows are `unless`."""
        c = self.c
        if not version:
            return {c["table"]: pd.DataFrame([], columns=HEADERS), c["choice"]: gr.update(choices=[], value=None)}
        rows, cks = checkpoint_rows(version)
        if unless is not None and rows == unless:
            return {}
        choices = [(f"{ck['name']} ({ck['status']})", ck["path"]) for ck in reversed(cks)]
        return {c["table"]: pd.DataFrame(rows, columns=HEADERS), c["choice"]: dropdown_update(choices, selected)}

    def on_tick(self, data: dict) -> dict:
        """Redraw the runs when they change, and the shown version's table when its rows change (read
        from the folder while its run is going, so a rotated checkpoint disappears live)."""
        c = self.c
        out, version = self._versions(data)
        if version:
            view = self.page.views.get(version)
            view.poll(self.page.runner.proc(Path(version)))
            active = view.status.get("state") in ACTIVE_STATES
            state = dict(out.get(c["state"]) or data.get(c["state"]) or {})
            switched = version != data.get(c["version"])
            if active or switched or state.get("rev") != (version, view.revs["checkpoints"]):
                state["rev"] = (version, view.revs["checkpoints"])
                table = self._table(version, data.get(c["choice"]), unless=None if switched else state.get("rows"))
                if table:
                    state["rows"] = table[c["table"]].values.tolist()
                out.update(table)
                out[c["state"]] = state
        return reply(out)

    def on_version(self, data: dict) -> dict:
        return self._table(self.page.inside(data.get(self.c["version"])), None)

    def _checkpoint(self, data: dict) -> str | None:
        """The chosen checkpoint, only when it lies in the output folder."""
        return self.page.inside(data.get(self.c["choice"]))

    def on_refresh(self, data: dict) -> dict:
        out, version = self._versions(data, force=True)
        return {**out, **self._table(version, data.get(self.c["choice"]))}

    def on_run_row(self, data: dict, evt: gr.SelectData) -> dict:
        row = evt.row_value or []
        version = self.page.inside(row[-1]) if row else None
        return {self.c["version"]: gr.update(value=version), **self._table(version, None)}

    def on_ckpt_row(self, data: dict, evt: gr.SelectData) -> dict:
        row = evt.row_value or []
        version = data.get(self.c["version"])
        ckpt = self.page.inside(Path(version) / "checkpoints" / str(row[0])) if row and version else None
        if ckpt is None:
            return gr.skip()
        return {self.c["choice"]: gr.update(value=ckpt)}

    # ------------------------------------------------------------------------------ actions
    def _base(self, data: dict) -> tuple[Any, str | None]:
        """(base config or None, problem) for the chosen settings source."""
        if data.get(self.c["source"]) != "setup":
            return None, None
        try:
            return form_to_config(self.page.form.values(data)), None
        except FormError as e:
            return None, f"the Setup tab's settings have {len(e.errors)} problem(s): press Validate there to see them"

    def on_plan(self, data: dict) -> dict:
        """What a resume from the chosen checkpoint would change, or why it cannot start."""
        c = self.c
        ckpt = self._checkpoint(data)
        if not ckpt:
            return {c["plan"]: "Choose a checkpoint to see what a resume would do.", c["command"]: "",
                    c["resume"]: gr.update(interactive=False)}
        base, problem = self._base(data)
        if problem:
            return {c["plan"]: f"**Cannot resume:** {problem}.", c["command"]: "", c["resume"]: gr.update(interactive=False)}
        _, plan, problems = plan_for(Path(ckpt), base)
        if plan is None:
            text = "**Cannot resume:**\n" + "\n".join(f"- {p}" for p in problems)
            return {c["plan"]: text, c["command"]: "", c["resume"]: gr.update(interactive=False)}
        text = resume_preview(plan)
        extra = [p for p in problems if p not in plan.refused]
        if extra:
            text += "\n" + "\n".join(f"- {p}" for p in extra)
        return {c["plan"]: text, c["command"]: resume_command(ckpt, plan.changed),
                c["resume"]: gr.update(interactive=not problems)}

    def on_resume(self, data: dict, request: gr.Request | None = None) -> dict:
        c, page = self.c, self.page
        ckpt = self._checkpoint(data)
        base, problem = self._base(data)
        if not ckpt or problem:
            return {c["result"]: f"✖ Not resumed: {problem or 'choose a checkpoint first'}."}
        try:
            started = page.runner.resume(Path(ckpt), base)
        except StartRefused as e:
            return {c["result"]: "✖ **Not resumed**:\n" + "\n".join(f"- {line}" for line in e.lines)}
        out = self.run_tab.attach(str(started.version_dir), request)
        name = f"{started.version_dir.parent.name} / {started.version_dir.name}"
        out[self.run_tab.c["message"]] = f"Resumed from **{Path(ckpt).name}** as **{name}**."
        out[c["result"]] = f"Resumed from **{Path(ckpt).name}** as **{name}**: follow it in the Run tab."
        out[page.component("tabs")] = gr.Tabs(selected="run")
        return out

    def on_verify(self, data: dict) -> dict:
        ckpt = self._checkpoint(data)
        if not ckpt:
            return {self.c["result"]: "Choose a checkpoint first."}
        ok, text = verify(ckpt)
        head = "✔ **Valid**" if ok else "✖ **Not valid**"
        return {self.c["result"]: f"{head}: {Path(ckpt).name}\n\n```\n{text}\n```"}

    def on_export(self, data: dict) -> dict:
        ckpt = self._checkpoint(data)
        path = C.export_path(ckpt) if ckpt else None
        if path is None:
            return {self.c["path"]: gr.update(visible=False),
                    self.c["result"]: "This checkpoint has no LoRA file (it was removed or never written)."}
        return {self.c["path"]: gr.update(value=str(path), visible=True), self.c["result"]: ""}

    def on_delete(self, data: dict) -> dict:
        c = self.c
        ckpt = self._checkpoint(data)
        message = delete_checkpoint(ckpt) if ckpt else "Choose a checkpoint first."
        return {c["result"]: message, c["confirm"]: gr.update(visible=False),
                **self._table(self.page.inside(data.get(c["version"])), None)}

    # ------------------------------------------------------------------------------ wiring
    def wire(self, blocks: gr.Blocks) -> None:
        c, form = self.c, self.page.form
        picks = {c["version"], c["choice"], c["state"]}
        table_out = [c["table"], c["choice"]]
        versions_out = [c["runs"], c["version"], c["state"]]
        blocks.load(lambda data: self.on_refresh(data), inputs=picks, outputs=versions_out + table_out,
                    show_progress="hidden")
        c["timer"].tick(self.on_tick, inputs=picks, outputs=versions_out + table_out, show_progress="hidden",
                        concurrency_limit=None, queue=False)
        for tab_id, item in self.page.tab_items.items():
            item.select(_timer_update(tab_id == "checkpoints"), inputs=None, outputs=[c["timer"]], queue=False,
                        show_progress="hidden")
        c["refresh"].click(self.on_refresh, inputs=picks, outputs=versions_out + table_out)
        c["version"].input(self.on_version, inputs={c["version"]}, outputs=table_out)
        c["runs"].select(self.on_run_row, inputs=set(), outputs=[c["version"], *table_out])
        c["table"].select(self.on_ckpt_row, inputs={c["version"]}, outputs=[c["choice"]])
        plan_out = [c["plan"], c["command"], c["resume"]]
        gr.on([c["choice"].change, c["source"].change], self.on_plan, inputs=form.inputs | {c["choice"], c["source"]},
              outputs=plan_out, show_progress="hidden", trigger_mode="always_last")
        live = self.run_tab.live_outputs
        self.run_tab.streamed(c["resume"].click(self.on_resume, inputs=form.inputs | {c["choice"], c["source"]},
                                                outputs=[*live, c["result"], self.run_tab.c["message"],
                                                         self.page.component("tabs")]))
        self.reuse.wire()
        c["verify"].click(self.on_verify, inputs={c["choice"]}, outputs=[c["result"]])
        c["copy"].click(self.on_export, inputs={c["choice"]}, outputs=[c["path"], c["result"]])
        c["delete"].click(lambda data: {c["confirm"]: gr.update(visible=True)}, inputs=set(), outputs=[c["confirm"]])
        c["delete_cancel"].click(lambda data: {c["confirm"]: gr.update(visible=False)}, inputs=set(),
                                 outputs=[c["confirm"]])
        c["delete_now"].click(self.on_delete, inputs={c["choice"], c["version"]},
                              outputs=[c["result"], c["confirm"], *table_out])


def build(page: Page, run_tab: RunTab) -> CheckpointsTab:
    tab = CheckpointsTab(page, run_tab)
    tab.build()
    return tab
