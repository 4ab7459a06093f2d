"""The Run tab: Start / Stop / Kill, and the followed run drawn live from its folder: state and
reason, progress with ETA, loss / learning-rate / Prodigy d curves, the latest samples, checkpoint
activity (saves and rotation), the resource monitor and the log tail.

Each browser session keeps {"version", "revs", ...} in a State. Two channels bring a run to the page,
because every Gradio event message costs the browser tens of milliseconds on a page this size (its
front end refreshes the loading state of every component per message):

* The progress bar has its own channel: a script in the page long-polls `live_progress` (a Gradio
  server function: a plain HTTP call, no event) for the version its bar shows, and the answer comes
  as soon as the bar's HTML differs (within LIVE_S of a step event), or after LONG_POLL_S.
* Everything else comes from a server-side stream (an async generator pushed over Gradio's event
  stream): it looks every STREAM_S and sends only what changed, the banner and the buttons at once,
  the curves, log and progress at most every SLOW_S while the run goes (all at once at its end).

One stream runs per session: attaching to a run starts a new one and retires the old (a token per
session). A slow Timer is the watchdog: when a session's stream has stopped beating (a dropped
connection, a sleeping laptop), it starts a new one. A page reload or a restarted app.py attaches
to the newest active run found in the output folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import anyio.to_thread
import gradio as gr
import pandas as pd

from backend import resources
from gui.display import progress_html, resources_markdown, state_banner
from gui.fields import command_box
from gui.form import config_types, field_error
from gui.live import RunView
from gui.page import Page, version_choices
from gui.runner import ACTIVE_STATES, StartRefused, launched_command, reproduce_command
from gui.streams import LIVE_JS, Streams, same_as_sent, session_of
from gui.tabs.setup import message_updates, validate_values
from gui.tabs.tensorboard_card import TensorBoardCard

STREAM_S = 0.5  # how often a session's stream looks for news
SLOW_S = 2.0  # while a run goes, the curves, the log and the progress (by the stream) at most this often
LIVE_S = 0.05  # how often the progress channel looks for a new step
LONG_POLL_S = 10.0  # the progress channel answers at the latest after this, changed or not
WATCHDOG_S = 10.0  # the Timer that restarts a stream which stopped beating
SWITCH_CHECK_S = 3.0
RESOURCES_EVERY_S = 5.0
LOSS_SERIES = ("loss", "epoch mean loss", "validation loss")
LR_SERIES = ("learning rate",)
D_SERIES = ("Prodigy d",)


def new_state(version: str | None) -> dict[str, Any]:
    return {"version": version, "revs": {}, "slow_at": -math.inf, "runs_sig": None, "checked_at": 0.0, "res_at": 0.0,
            "stream": None}


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
        self.streams = Streams()

    # ------------------------------------------------------------------------------ layout
    def build(self) -> None:
        c, page = self.c, self.page
        with gr.Tab("Run", id="run", elem_id="tab-run") as tab:
            page.tab_items["run"] = tab
            c["choice"] = gr.Dropdown([], label="Showing run", elem_id="run-choice", interactive=True)
            c["banner"] = gr.HTML(state_banner(None), elem_id="run-banner")
            with gr.Row():
                c["start"] = gr.Button("Start training", variant="primary", elem_id="btn-start")
                page.shared.setdefault("start_buttons", []).append(c["start"])
                c["stop"] = gr.Button("Stop (save and end)", elem_id="btn-stop", interactive=False)
                c["kill"] = gr.Button("Kill", variant="stop", elem_id="btn-kill", interactive=False)
            with gr.Row(visible=False, elem_id="kill-confirm") as c["confirm"]:
                gr.Markdown("**Kill the run now?** Nothing since its last checkpoint is saved.")
                c["kill_now"] = gr.Button("Kill now", variant="stop", elem_id="btn-kill-now")
                c["kill_cancel"] = gr.Button("Cancel", elem_id="btn-kill-cancel")
            c["message"] = page.share("run_message", gr.Markdown("", elem_id="run-message"))
            async def live_progress(query: Any) -> dict[str, str] | None:  # Gradio marks it: a plain function
                return await self.live_progress(query)

            c["progress"] = gr.HTML(progress_html(None), elem_id="run-progress", js_on_load=LIVE_JS,
                                    server_functions=[live_progress])
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
            self.tensorboard = TensorBoardCard(page, c["choice"])
            self.tensorboard.build()

    def build_hidden(self) -> None:
        """The session state and the timer: outside the tab bar (a non-tab child there breaks the tabs)."""
        self.c["follow"] = self.page.share("follow", gr.State(new_state(None)))
        self.c["timer"] = gr.Timer(WATCHDOG_S)
        # Where Gradio would show the stream's "processing" status (it runs as long as the page is open).
        self.c["streaming"] = gr.HTML("", visible=False, elem_id="run-stream-status")

    @property
    def live_outputs(self) -> list[Any]:
        names = ("follow", "choice", "banner", "start", "stop", "kill", "progress", "loss", "lr", "d", "samples", "activity",
                 "resources", "log", "reproduce", "launched")
        return [self.c[n] for n in names]

    # ------------------------------------------------------------------------------ drawing
    def render(self, state: dict[str, Any], force: bool = False) -> dict[Any, Any]:
        """Updates for the parts of the followed run that changed since this session drew them, less
        what the page already shows. While the run goes, the curves, the log and the progress are
        drawn at most every SLOW_S (a part held back is drawn at a later call); the rest at once."""
        c, out = self.c, {}
        version = state.get("version")
        view = self.page.views.get(version) if version else None
        if view is not None:
            view.poll(self.page.runner.proc(Path(version)), force=force)
        revs = view.revs if view is not None else {}
        seen = {} if force else dict(state.get("revs", {}))
        run_state = view.status.get("state") if view is not None else None
        going = run_state in ACTIVE_STATES
        now = time.monotonic()
        ended = run_state != state.get("run_state")
        slow_due = force or ended or not going or now - state.get("slow_at", -math.inf) >= SLOW_S
        slow_at = state.get("slow_at", -math.inf)
        changed = set()
        for part in ("status", "curves", "samples", "activity", "log", "progress"):
            rev = revs.get("status" if part == "progress" else part)
            if not force and rev == seen.get(part):
                continue
            if part in ("curves", "log", "progress") and not slow_due:
                continue  # drawn a moment ago: a later look draws it
            changed.add(part)
            seen[part] = rev
        if changed & {"curves", "log", "progress"}:
            slow_at = now
        if not force and ended:
            out.update(self._choices(state, version, force=True, fresh=True))  # its label shows the state
        state["run_state"] = run_state
        if "status" in changed:
            # While a run goes, Stop is the highlighted action, not Start.
            out.update({c["banner"]: state_banner(view), c["kill"]: gr.update(interactive=going),
                        c["stop"]: gr.update(interactive=going, variant="primary" if going else "secondary"),
                        c["start"]: gr.update(variant="secondary" if going else "primary")})
        if "progress" in changed:
            out[c["progress"]] = progress_html(view)
        if view is not None:
            out.update(self._parts(view, changed))
        if force:
            out[c["reproduce"]] = reproduce_command(Path(version)) if version else ""
            out[c["launched"]] = launched_command(Path(version)) if version else ""
        out.update(self._resources(view, state, force))
        sent = {} if force else dict(state.get("sent", {}))
        out = {k: v for k, v in out.items() if force or not same_as_sent(sent, k, v)}
        state = {**state, "revs": seen, "slow_at": slow_at, "sent": sent}
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

    def attach(self, version: str | None, request: gr.Request | None = None,
               token: int | None = None) -> dict[Any, Any]:
        """Follow `version` from now on (its whole history is drawn). With no `token`, the session's
        stream that runs after this (wired with .then) takes over and the one before it ends; a
        stream that switches runs itself passes its own token."""
        state = new_state(version)
        state["stream"] = token if token is not None else self.streams.claim(session_of(request))
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
    def on_tick(self, data: dict, request: gr.Request | None = None) -> dict:
        """One look at the followed run: what changed, or a switch to a newer active run."""
        state = dict(data[self.c["follow"]] or new_state(None))
        self.page.runner.reap()
        version = state.get("version")
        if time.monotonic() - state.get("checked_at", 0.0) > SWITCH_CHECK_S:
            state["checked_at"] = time.monotonic()
            newer = self._newer_active(version)
            if newer is not None:
                return self.attach(newer, request, token=state.get("stream"))
        out = self.render(state)
        out.update(self._choices(out[self.c["follow"]], version))
        return out

    async def stream(self, data: dict, request: gr.Request | None = None):
        """This session's live updates: look every STREAM_S, send only what changed, end when another
        stream of the session took over (or the page went away: Gradio then stops asking)."""
        state = dict(data[self.c["follow"]] or new_state(None))
        session, token = session_of(request), state.get("stream")
        if session is None or token is None or not self.streams.enter(session, token):
            yield {self.c["follow"]: gr.skip()}  # an event that yields nothing would clear its outputs in the page
            return
        yield {self.c["follow"]: gr.skip()}  # at once: while an event has sent nothing, the page times it every frame
        while self.streams.beat(session, token):
            out = await anyio.to_thread.run_sync(self.on_tick, {self.c["follow"]: state}, request)
            new_state_ = out.pop(self.c["follow"])
            if not self.streams.beat(session, token):
                return
            if out or new_state_.get("version") != state.get("version"):
                out[self.c["follow"]] = new_state_
                yield out
            state = new_state_
            await asyncio.sleep(STREAM_S)

    async def live_progress(self, query: Any) -> dict[str, str] | None:
        """The progress channel: the progress bar of `query["version"]` (a folder inside the output
        folder, else None) as soon as it differs from the one the page has (`query["key"]`), or
        after LONG_POLL_S. A plain HTTP call behind the login, no Gradio event."""
        query = query if isinstance(query, dict) else {}
        version = self.page.inside(query.get("version"))
        if not version or not Path(version, "status.json").is_file():
            return None
        key, deadline = str(query.get("key") or ""), time.monotonic() + LONG_POLL_S
        while True:
            bar = await anyio.to_thread.run_sync(self._progress_now, version)
            if bar["key"] != key or time.monotonic() >= deadline:
                return bar
            await asyncio.sleep(LIVE_S)

    def _progress_now(self, version: str) -> dict[str, str]:
        view = self.page.views.get(version)
        view.poll(self.page.runner.proc(Path(version)))
        bar = progress_html(view)
        return {"html": bar, "key": hashlib.sha1(bar.encode()).hexdigest()[:16]}

    def on_watch(self, data: dict, request: gr.Request | None = None) -> dict:
        """The watchdog: when this session's stream stopped, a new token (the .then stream starts)."""
        if not self.streams.stalled(session_of(request)):
            return {}
        state = dict(data[self.c["follow"]] or new_state(None))
        state["stream"] = self.streams.claim(session_of(request))
        return {self.c["follow"]: state}

    def on_unload(self, request: gr.Request) -> None:
        self.streams.forget(session_of(request))

    def _newer_active(self, version: str | None) -> str | None:
        """An active run to switch to when the followed one is not active (e.g. started from a terminal)."""
        if version and self.page.views.get(version).status.get("state") in ACTIVE_STATES:
            return None
        current = self.page.runner.current() if version is None else None
        active = [i for i in self.page.list_runs() if i.state in ACTIVE_STATES and i.path != version]
        if active:
            return max(active, key=lambda i: i.started_at or 0.0).path
        return current.path if current is not None and version is None else None

    def on_load(self, data: dict, request: gr.Request | None = None) -> dict:
        """A page (re)load follows the run to show, and opens the Run tab when that run is going."""
        current = self.page.runner.current()
        out = self.attach(current.path if current else None, request)
        if current is not None and current.state in ACTIVE_STATES:
            out[self.page.component("tabs")] = gr.Tabs(selected="run")
        return out

    def on_choice(self, data: dict, request: gr.Request | None = None) -> dict:
        return self.attach(self.page.inside(data[self.c["choice"]]), request)

    def on_start(self, data: dict, request: gr.Request | None = None) -> dict:
        page, c = self.page, self.c
        cfg, messages = validate_values(page, page.form.values(data))
        if cfg is None:
            return {**messages, c["message"]: "✖ **Not started**: the settings have problems, listed in the Setup tab.",
                    page.component("tabs"): gr.Tabs(selected="setup")}
        try:
            started = page.runner.start(cfg)
        except StartRefused as e:
            errors = [field_error(line, config_types(cfg)) for line in e.lines]
            text = "✖ **Not started**:\n" + "\n".join(f"- {line}" for line in e.lines)
            return {**message_updates(page, errors, []), c["message"]: text}
        out = {**messages, **self.attach(str(started.version_dir), request), page.component("tabs"): gr.Tabs(selected="run")}
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
    def streamed(self, event: Any) -> Any:
        """Chain this session's stream after `event` (one that attached, so it claimed a new token)."""
        return event.then(self.stream, inputs={self.c["follow"]}, outputs=self.live_outputs, show_progress="hidden",
                          show_progress_on=[self.c["streaming"]], concurrency_limit=None, queue=True)

    def wire(self, blocks: gr.Blocks) -> None:
        c, page = self.c, self.page
        live = self.live_outputs
        self.streamed(c["timer"].tick(self.on_watch, inputs={c["follow"]}, outputs=[c["follow"]],
                                      show_progress="hidden", concurrency_limit=None, queue=False))
        self.streamed(blocks.load(self.on_load, inputs={c["follow"]}, outputs=[*live, page.component("tabs")],
                                  show_progress="hidden"))
        blocks.unload(self.on_unload)
        self.streamed(c["choice"].input(self.on_choice, inputs={c["choice"]}, outputs=live, show_progress="hidden"))
        setup_outputs = [*page.component("section_errors").values(), page.component("setup_summary")]
        for button in page.component("start_buttons"):
            self.streamed(button.click(self.on_start, inputs=page.form.inputs,
                                       outputs=[*live, *setup_outputs, c["message"], page.component("tabs")]))
        c["stop"].click(self.on_stop, inputs={c["follow"]}, outputs=[c["message"]])
        c["kill"].click(lambda data: {c["confirm"]: gr.update(visible=True)}, inputs=set(), outputs=[c["confirm"]])
        c["kill_cancel"].click(lambda data: {c["confirm"]: gr.update(visible=False)}, inputs=set(),
                               outputs=[c["confirm"]])
        c["kill_now"].click(self.on_kill, inputs={c["follow"]}, outputs=[c["message"], c["confirm"]])
        self.tensorboard.wire()


def build(page: Page) -> RunTab:
    tab = RunTab(page)
    tab.build()
    return tab
