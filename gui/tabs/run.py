"""The Run tab: Start / Stop / Kill, and the followed run drawn live from its folder: state and
reason, progress with ETA, loss / learning-rate / Prodigy d curves, the latest samples, checkpoint
activity (saves and rotation), the resource monitor and the log tail.

Each browser session keeps {"version", "revs", ...} in a State; a Timer polls the shared RunView
and redraws only the parts whose revision changed. A page reload or a restarted app.py attaches to
the newest active run found in the output folder.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from backend import resources
from gui.display import progress_html, resources_markdown, state_banner
from gui.fields import command_box
from gui.form import field_error
from gui.live import RunView
from gui.page import Page, version_choices
from gui.runner import ACTIVE_STATES, StartRefused, launched_command, reproduce_command
from gui.tabs.setup import message_updates, validate_values

TICK_S = 1.0
SWITCH_CHECK_S = 3.0
RESOURCES_EVERY_S = 5.0
LOSS_SERIES = ("loss", "epoch mean loss", "validation loss")
LR_SERIES = ("learning rate",)
D_SERIES = ("Prodigy d",)


def new_state(version: str | None) -> dict[str, Any]:
    return {"version": version, "revs": {}, "runs_sig": None, "checked_at": 0.0, "res_at": 0.0}


def _frame(rows: list[tuple[float, float, str]], series: tuple[str, ...]) -> pd.DataFrame | None:
    """Curve rows with numeric dtypes, led by one empty (NaN) row per series; None while there are
    no points. The browser fixes a chart's colour scale and axis room when it first draws it (a later
    value only swaps the data), so the first draw must already have real points and every series."""
    if not rows:
        return None
    seeds = [(math.nan, math.nan, name) for name in series]
    df = pd.DataFrame(seeds + rows, columns=["step", "value", "series"])
    return df.astype({"step": "float64", "value": "float64", "series": "str"})


COLORS = {"loss": "#4f46e5", "epoch mean loss": "#f59e0b", "validation loss": "#16a34a", "learning rate": "#4f46e5",
          "Prodigy d": "#db2777"}
LABELS = {
    "plot-loss": "Loss (indigo: each step · amber: epoch mean · green: validation)",
    "plot-lr": "Learning rate (for Prodigy: the base rate its estimate d scales)",
    "plot-d": "Prodigy d, its step-size estimate (effective rate: learning rate × d)",
}


def _plot(title: str, elem: str, visible: bool = True) -> gr.LinePlot:
    """A live curve. Its colours are fixed: the colour scale is set when the browser first draws it."""
    return gr.LinePlot(None, x="step", y="value", color="series", title=title, elem_id=elem, height=300,
                       label=LABELS[elem], visible=visible, x_title="step", y_title="", color_map=COLORS,
                       color_title="")


class RunTab:
    """The Run tab's components and handlers (one instance per app)."""

    def __init__(self, page: Page):
        self.page = page
        self.c: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ layout
    def build(self) -> None:
        c, page = self.c, self.page
        with gr.Tab("Run", id="run", elem_id="tab-run"):
            c["choice"] = gr.Dropdown([], label="Showing run", elem_id="run-choice", interactive=True)
            c["banner"] = gr.HTML(state_banner(None), elem_id="run-banner")
            with gr.Row():
                page.shared.setdefault("start_buttons", []).append(
                    gr.Button("Start training", variant="primary", elem_id="btn-start"))
                c["stop"] = gr.Button("Stop (save and end)", elem_id="btn-stop", interactive=False)
                c["kill"] = gr.Button("Kill", variant="stop", elem_id="btn-kill", interactive=False)
            with gr.Row(visible=False, elem_id="kill-confirm") as c["confirm"]:
                gr.Markdown("**Kill the run now?** Nothing since its last checkpoint is saved.")
                c["kill_now"] = gr.Button("Kill now", variant="stop", elem_id="btn-kill-now")
                c["kill_cancel"] = gr.Button("Cancel", elem_id="btn-kill-cancel")
            c["message"] = page.share("run_message", gr.Markdown("", elem_id="run-message"))
            c["progress"] = gr.HTML(progress_html(None), elem_id="run-progress")
            with gr.Row():
                c["loss"] = _plot("Loss", "plot-loss")
                c["lr"] = _plot("Learning rate", "plot-lr")
                c["d"] = _plot("Prodigy d (its step-size estimate)", "plot-d", visible=False)
            with gr.Row():
                c["samples"] = gr.Gallery(label="Latest samples", columns=4, height=260, elem_id="run-samples",
                                          object_fit="contain")
                c["activity"] = gr.Textbox(label="Checkpoints saved and rotated", lines=10, max_lines=10,
                                           elem_id="run-activity", interactive=False, autoscroll=True)
            c["resources"] = gr.Markdown("", elem_id="run-resources", label="Resources")
            c["log"] = gr.Textbox(label="Log (train.log)", lines=14, max_lines=14, elem_id="run-log",
                                  interactive=False, autoscroll=True)
            with gr.Accordion("Command", open=True, elem_id="run-command-box"):
                c["reproduce"] = command_box("Reproduce this run with the CLI", "run-reproduce")
                c["launched"] = command_box("What was launched (command.txt)", "run-launched", lines=3)

    def build_hidden(self) -> None:
        """The session state and the timer: outside the tab bar (a non-tab child there breaks the tabs)."""
        self.c["follow"] = self.page.share("follow", gr.State(new_state(None)))
        self.c["timer"] = gr.Timer(TICK_S)

    @property
    def live_outputs(self) -> list[Any]:
        names = ("follow", "choice", "banner", "stop", "kill", "progress", "loss", "lr", "d", "samples", "activity",
                 "resources", "log", "reproduce", "launched")
        return [self.c[n] for n in names]

    # ------------------------------------------------------------------------------ drawing
    def render(self, state: dict[str, Any], force: bool = False) -> dict[Any, Any]:
        """Updates for the parts of the followed run that changed since this session drew them."""
        c, out = self.c, {}
        version = state.get("version")
        view = self.page.views.get(version) if version else None
        if view is not None:
            view.poll(self.page.runner.proc(Path(version)), force=force)
        revs = view.revs if view is not None else {}
        seen = {} if force else state.get("revs", {})
        changed = {p for p in ("status", "curves", "samples", "activity", "log") if force or revs.get(p) != seen.get(p)}
        run_state = view.status.get("state") if view is not None else None
        if not force and run_state != state.get("run_state"):
            out.update(self._choices(state, version, force=True, fresh=True))  # its label shows the state
        state["run_state"] = run_state
        if "status" in changed:
            active = view is not None and view.status.get("state") in ACTIVE_STATES
            out.update({c["banner"]: state_banner(view), c["progress"]: progress_html(view),
                        c["stop"]: gr.update(interactive=active), c["kill"]: gr.update(interactive=active)})
        if view is not None:
            out.update(self._parts(view, changed))
        if force:
            out[c["reproduce"]] = reproduce_command(Path(version)) if version else ""
            out[c["launched"]] = launched_command(Path(version)) if version else ""
        out.update(self._resources(view, state, force))
        state = {**state, "revs": dict(revs)}
        out[c["follow"]] = state
        return out

    def _parts(self, view: RunView, changed: set[str]) -> dict[Any, Any]:
        c, out = self.c, {}
        if "curves" in changed:
            out[c["loss"]] = _frame(view.curve_rows(LOSS_SERIES), LOSS_SERIES)
            out[c["lr"]] = _frame(view.curve_rows(LR_SERIES), LR_SERIES)
            has_d = bool(view.curves.get("Prodigy d"))
            out[c["d"]] = gr.update(value=_frame(view.curve_rows(D_SERIES), D_SERIES), visible=has_d)
        if "samples" in changed:
            out[c["samples"]] = [(s["path"], f"{Path(s['path']).parent.name} · {s.get('prompt', '')}")
                                 for s in view.latest_samples() if Path(str(s.get("path"))).is_file()]
        if "activity" in changed:
            out[c["activity"]] = "\n".join(view.activity[-200:])
        if "log" in changed:
            out[c["log"]] = view.log_text()
        return out

    def _resources(self, view: RunView | None, state: dict[str, Any], force: bool) -> dict[Any, Any]:
        now = time.monotonic()
        if not force and now - state.get("res_at", 0.0) < RESOURCES_EVERY_S:
            return {}
        state["res_at"] = now
        live = view is not None and view.status.get("state") in ACTIVE_STATES and view.resources
        snap = view.resources if live else resources.sample(self.page.output_dir)
        share = view.resources.get("data_wait_share") if live else None
        warnings = [w for w in (view.warnings if view else []) if "bottleneck" in w or "disk" in w]
        return {self.c["resources"]: resources_markdown(snap, share, warnings)}

    def attach(self, version: str | None) -> dict[Any, Any]:
        """Follow `version` from now on (its whole history is drawn)."""
        state = new_state(version)
        out = self.render(state, force=True)
        out.update(self._choices(out[self.c["follow"]], version, force=True, fresh=True))
        return out

    def _choices(self, state: dict[str, Any], version: str | None, force: bool = False,
                 fresh: bool = False) -> dict[Any, Any]:
        infos = self.page.list_runs(fresh=fresh)
        sig = [(i.path, i.state) for i in infos]
        if not force and sig == state.get("runs_sig"):
            return {}
        state["runs_sig"] = sig
        return {self.c["choice"]: gr.update(choices=version_choices(infos), value=version)}

    # ------------------------------------------------------------------------------ handlers
    def on_tick(self, data: dict) -> dict:
        state = dict(data[self.c["follow"]] or new_state(None))
        self.page.runner.reap()
        version = state.get("version")
        if time.monotonic() - state.get("checked_at", 0.0) > SWITCH_CHECK_S:
            state["checked_at"] = time.monotonic()
            newer = self._newer_active(version)
            if newer is not None:
                return self.attach(newer)
        out = self.render(state)
        out.update(self._choices(out[self.c["follow"]], version))
        return out

    def _newer_active(self, version: str | None) -> str | None:
        """An active run to switch to when the followed one is not active (e.g. started from a terminal)."""
        if version and self.page.views.get(version).status.get("state") in ACTIVE_STATES:
            return None
        current = self.page.runner.current() if version is None else None
        active = [i for i in self.page.list_runs() if i.state in ACTIVE_STATES and i.path != version]
        if active:
            return max(active, key=lambda i: i.started_at or 0.0).path
        return current.path if current is not None and version is None else None

    def on_load(self, data: dict) -> dict:
        current = self.page.runner.current()
        return self.attach(current.path if current else None)

    def on_choice(self, data: dict) -> dict:
        return self.attach(self.page.inside(data[self.c["choice"]]))

    def on_start(self, data: dict) -> dict:
        page, c = self.page, self.c
        cfg, messages = validate_values(page, page.form.values(data))
        if cfg is None:
            return {**messages, c["message"]: "✖ **Not started**: the settings have problems, listed in the Setup tab.",
                    page.component("tabs"): gr.Tabs(selected="setup")}
        try:
            started = page.runner.start(cfg)
        except StartRefused as e:
            errors = [field_error(line, cfg.optimizer.type) for line in e.lines]
            text = "✖ **Not started**:\n" + "\n".join(f"- {line}" for line in e.lines)
            return {**message_updates(page, errors, []), c["message"]: text}
        out = {**messages, **self.attach(str(started.version_dir)), page.component("tabs"): gr.Tabs(selected="run")}
        out[c["message"]] = f"Started **{started.version_dir.parent.name} / {started.version_dir.name}**."
        return out

    def on_stop(self, data: dict) -> dict:
        version = (data[self.c["follow"]] or {}).get("version")
        if not version:
            return {self.c["message"]: "No run to stop."}
        self.page.runner.stop(Path(version))
        return {self.c["message"]: "Stop requested: the trainer finishes its current step, saves a stop checkpoint "
                                   "and ends. Resume from that checkpoint in the Checkpoints tab."}

    def on_kill(self, data: dict) -> dict:
        version = (data[self.c["follow"]] or {}).get("version")
        if not version:
            return {self.c["message"]: "No run to kill.", self.c["confirm"]: gr.update(visible=False)}
        status = self.page.runner.kill(Path(version))
        return {self.c["message"]: f"Killed: {status.get('error') or status.get('state')}.",
                self.c["confirm"]: gr.update(visible=False)}

    # ------------------------------------------------------------------------------ wiring
    def wire(self, blocks: gr.Blocks) -> None:
        c, page = self.c, self.page
        live = self.live_outputs
        c["timer"].tick(self.on_tick, inputs={c["follow"]}, outputs=live, show_progress="hidden",
                        concurrency_limit=None, queue=False)
        blocks.load(self.on_load, inputs={c["follow"]}, outputs=live, show_progress="hidden")
        c["choice"].input(self.on_choice, inputs={c["choice"]}, outputs=live, show_progress="hidden")
        setup_outputs = [*page.component("section_errors").values(), page.component("setup_summary")]
        for button in page.component("start_buttons"):
            button.click(self.on_start, inputs=page.form.inputs, outputs=[*live, *setup_outputs, c["message"],
                                                                          page.component("tabs")])
        c["stop"].click(self.on_stop, inputs={c["follow"]}, outputs=[c["message"]])
        c["kill"].click(lambda data: {c["confirm"]: gr.update(visible=True)}, inputs=set(), outputs=[c["confirm"]])
        c["kill_cancel"].click(lambda data: {c["confirm"]: gr.update(visible=False)}, inputs=set(),
                               outputs=[c["confirm"]])
        c["kill_now"].click(self.on_kill, inputs={c["follow"]}, outputs=[c["message"], c["confirm"]])


def build(page: Page) -> RunTab:
    tab = RunTab(page)
    tab.build()
    return tab
