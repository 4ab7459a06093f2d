"""The Queue tab: add the Setup tab's settings to the output folder's run queue, see the entries,
reorder, remove, pause and resume it, and choose whether a failure stops it. The app's queue
worker (gui/queue_worker.py) starts the entries one after another; the CLI (`python -m backend
queue ...`) edits the same queue.json."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr
import pandas as pd

from backend import run_queue
from backend.run_queue import QueueError, QueueRefused
from gui.fields import reply
from gui.form import FormError, form_to_config
from gui.page import Page

HEADERS = ["#", "Id", "State", "Run name", "Added", "Version", "Reason"]
TICK_S = 2.0


def queue_rows(q: run_queue.Queue) -> pd.DataFrame:
    order = {e.id: i for i, e in enumerate(q.queued(), 1)}
    rows = []
    for e in q.entries:
        added = time.strftime("%m-%d %H:%M", time.localtime(e.added_at))
        version = "/".join(e.version_dir.rstrip("/").split("/")[-2:]) if e.version_dir else ""
        rows.append([order.get(e.id, ""), e.id, e.state, e.label, added, version, e.reason or ""])
    return pd.DataFrame(rows, columns=HEADERS)


def _timer_update(timer: Any, active: bool) -> Any:
    def update(data: dict) -> dict:
        return {timer: gr.Timer(active=active)}
    return update


class QueueTab:
    def __init__(self, page: Page):
        self.page = page
        self.c: dict[str, Any] = {}

    def build(self) -> None:
        c = self.c
        with gr.Tab("Queue", id="queue", elem_id="tab-queue") as tab:
            self.page.tab_items["queue"] = tab
            c["summary"] = gr.Markdown("", elem_id="queue-summary")
            with gr.Row(equal_height=True):
                c["add"] = gr.Button("Add the Setup tab's settings to the queue", variant="primary",
                                     elem_id="btn-queue-add")
                c["pause"] = gr.Button("Pause the queue", elem_id="btn-queue-pause")
                c["resume"] = gr.Button("Resume the queue", elem_id="btn-queue-resume")
                c["stop_on_failure"] = gr.Checkbox(label="A failed run pauses the queue", value=False,
                                                   elem_id="queue-stop-on-failure")
            c["table"] = gr.Dataframe(pd.DataFrame([], columns=HEADERS), interactive=False, elem_id="queue-table",
                                      label="Entries (# is the start order)", wrap=True)
            with gr.Row(equal_height=True):
                c["entry"] = gr.Dropdown([], label="Queued entry", elem_id="queue-entry", scale=3, interactive=True)
                c["up"] = gr.Button("Move up", elem_id="btn-queue-up", scale=1)
                c["down"] = gr.Button("Move down", elem_id="btn-queue-down", scale=1)
                c["remove"] = gr.Button("Remove", variant="stop", elem_id="btn-queue-remove", scale=1)
                c["clear"] = gr.Button("Clear finished", elem_id="btn-queue-clear", scale=1)
            c["result"] = gr.Markdown("", elem_id="queue-result")
            c["events"] = gr.Textbox(label="Queue events (this app)", lines=6, max_lines=6, interactive=False,
                                     elem_id="queue-events", autoscroll=True)
        c["timer"] = gr.Timer(TICK_S, active=False)

    @property
    def out(self) -> Any:
        return self.page.output_dir

    def _view(self, selected: str | None = None) -> dict:
        c = self.c
        try:
            q = run_queue.load(self.out)
        except QueueError as e:
            return {c["summary"]: f"✖ {e}"}
        queued = q.queued()
        state = "**paused**" + (f" ({q.paused_reason})" if q.paused_reason else "") if q.paused else "**active**"
        running = q.running()
        now = f"; running **{running.label}**" if running else ""
        worker = self.page.queue_worker
        problem = f"\n\n✖ The queue worker: {worker.error}" if worker is not None and worker.error else ""
        choices = [(f"{i}. {e.label} ({e.id})", e.id) for i, e in enumerate(queued, 1)]
        keep = selected if selected in {v for _, v in choices} else (choices[0][1] if choices else None)
        events = "\n".join(worker.events) if worker is not None else ""
        return {c["summary"]: f"Queue {state}: {len(queued)} waiting{now}. The file: `{run_queue.queue_path(self.out)}`."
                              + problem,
                c["table"]: queue_rows(q), c["entry"]: gr.update(choices=choices, value=keep),
                c["stop_on_failure"]: q.stop_on_failure, c["events"]: events}

    def _act(self, data: dict, action: Any, done: str) -> dict:
        try:
            message = action() or done
        except QueueRefused as e:
            message = "✖ **Not queued**:\n" + "\n".join(f"- {line}" for line in e.lines)
        except QueueError as e:
            message = f"✖ {e}"
        return {**self._view(data.get(self.c["entry"])), self.c["result"]: message}

    def on_add(self, data: dict) -> dict:
        try:
            cfg = form_to_config(self.page.form.values(data))
        except FormError as e:
            return {self.c["result"]: f"✖ Not queued: the Setup tab's settings have {len(e.errors)} problem(s); press "
                                      "Validate there to see them."}
        return self._act(data, lambda: f"Queued **{cfg.run_name}** as {run_queue.add(self.out, cfg)}.", "")

    def on_move(self, data: dict, step: int) -> dict:
        entry = data.get(self.c["entry"])

        def go() -> str:
            ids = [e.id for e in run_queue.load(self.out).queued()]
            if entry not in ids:
                raise QueueError("choose a queued entry first")
            position = min(max(ids.index(entry) + 1 + step, 1), len(ids))
            run_queue.move(self.out, entry, position)
            return f"Moved {entry} to position {position}."
        return self._act(data, go, "")

    def on_remove(self, data: dict) -> dict:
        entry = data.get(self.c["entry"])
        return self._act(data, lambda: f"Removed **{run_queue.remove(self.out, entry or '').label}**.", "")

    def wire(self, blocks: gr.Blocks) -> None:
        c, form = self.c, self.page.form
        view_out = [c["summary"], c["table"], c["entry"], c["stop_on_failure"], c["events"]]
        act_out = [*view_out, c["result"]]
        c["timer"].tick(lambda data: reply(self._view(data.get(c["entry"]))), inputs={c["entry"]}, outputs=view_out,
                        show_progress="hidden", queue=False)
        for tab_id, item in self.page.tab_items.items():
            item.select(_timer_update(c["timer"], tab_id == "queue"), inputs=set(), outputs=[c["timer"]], queue=False,
                        show_progress="hidden")
        self.page.tab_items["queue"].select(lambda data: self._view(data.get(c["entry"])), inputs={c["entry"]},
                                            outputs=view_out, show_progress="hidden")
        c["add"].click(self.on_add, inputs=form.inputs | {c["entry"]}, outputs=act_out)
        c["pause"].click(lambda data: self._act(data, lambda: run_queue.pause(self.out), "The queue is paused: a "
                                                "running entry runs on, nothing more starts."),
                         inputs={c["entry"]}, outputs=act_out)
        c["resume"].click(lambda data: self._act(data, lambda: run_queue.resume(self.out), "The queue goes on."),
                          inputs={c["entry"]}, outputs=act_out)
        c["stop_on_failure"].input(
            lambda data: self._act(data, lambda: run_queue.set_stop_on_failure(self.out, bool(data[c["stop_on_failure"]])),
                                   "Saved."), inputs={c["entry"], c["stop_on_failure"]}, outputs=act_out)
        c["up"].click(lambda data: self.on_move(data, -1), inputs={c["entry"]}, outputs=act_out)
        c["down"].click(lambda data: self.on_move(data, 1), inputs={c["entry"]}, outputs=act_out)
        c["remove"].click(self.on_remove, inputs={c["entry"]}, outputs=act_out)
        c["clear"].click(lambda data: self._act(data, lambda: f"Cleared {run_queue.clear_finished(self.out)} finished "
                                                "entries.", ""), inputs={c["entry"]}, outputs=act_out)


def build(page: Page) -> QueueTab:
    tab = QueueTab(page)
    tab.build()
    return tab
