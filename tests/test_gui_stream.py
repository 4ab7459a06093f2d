"""How a run reaches the Run tab without a Timer: the progress channel (a long-polled server function)
and the session's stream (an async generator), driven here the way Gradio drives them, on a folder
that a stand-in trainer writes (tests.gui_helpers.LiveRun). The browser tests see the same page live."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import gradio as gr
import pytest

from tests.gui_helpers import big_live_run


@pytest.fixture
def live(tmp_path):
    run = big_live_run(tmp_path / "runs", total_steps=10, log_lines=20, checkpoints=2)
    yield run
    run.stop()


@pytest.fixture
def gui(tmp_path, live):
    from gui.ui import build_ui

    _, page = build_ui(tmp_path / "runs")
    return page.tabs["run"]


def later(seconds: float, fn) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(seconds), fn()), daemon=True)
    t.start()
    return t


def test_the_progress_channel_answers_with_a_new_step_at_once_and_only_for_runs_inside(gui, live, tmp_path):
    first = asyncio.run(gui.live_progress({"version": str(live.v), "key": ""}))
    assert 'data-step="0"' in first["html"] and f'data-version="{live.v}"' in first["html"]
    later(0.5, lambda: live.step())
    t0 = time.monotonic()
    second = asyncio.run(gui.live_progress({"version": str(live.v), "key": first["key"]}))
    assert 'data-step="1"' in second["html"] and second["key"] != first["key"]
    assert time.monotonic() - t0 < 5  # answered when the step came, not at the long poll's end (10 s)
    for outside in ("/etc", str(tmp_path), str(live.v.parent.parent.parent), "", None, 7):
        assert asyncio.run(gui.live_progress({"version": outside, "key": ""})) is None, outside
    assert asyncio.run(gui.live_progress("not a dict")) is None


def test_the_stream_sends_what_changed_and_ends_when_the_session_attaches_elsewhere(gui, live, monkeypatch):
    import gui.tabs.run as R

    monkeypatch.setattr(R, "STREAM_S", 0.05)
    monkeypatch.setattr(R, "SLOW_S", 0.3)
    request = SimpleNamespace(session_hash="session-1")
    follow = gui.c["follow"]
    attached = gui.on_load({follow: None}, request)
    assert attached[follow]["version"] == str(live.v)

    async def drive() -> tuple[list[dict], bool]:
        got, ended = [], False
        stream = gui.stream({follow: attached[follow]}, request)
        first = await stream.__anext__()
        assert first == {follow: gr.skip()}  # the page gets a message at once
        assert await gui.stream({follow: attached[follow]}, request).__anext__() == {follow: gr.skip()}  # a second one quits
        later(0.2, lambda: [live.step(log_lines=2) for _ in range(3)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = await asyncio.wait_for(stream.__anext__(), 20)
            got.append(out)
            if gui.c["progress"] in out and 'data-step="3"' in out[gui.c["progress"]]:
                break
        gui.on_choice({gui.c["choice"]: str(live.v)}, request)  # attaching again retires this stream
        try:
            await asyncio.wait_for(stream.__anext__(), 5)
        except StopAsyncIteration:
            ended = True
        return got, ended

    got, ended = asyncio.run(drive())
    assert ended, "a stream kept running after its session attached a new one"
    last = got[-1]
    assert 'data-step="3"' in last[gui.c["progress"]]
    assert last[gui.c["log"]].splitlines()[-1] == "live step 3 line 1"
    loss = last[gui.c["loss"]]
    assert sorted(loss.dropna()["step"]) == [1.0, 2.0, 3.0]
    # what had not changed was not sent again: the banner (running all along) went out once at most
    assert sum(gui.c["banner"] in out for out in got) <= 1
    assert all(set(out) <= set(gui.live_outputs) for out in got)


def test_a_stream_whose_page_went_away_is_restarted_by_the_watchdog(gui, live, monkeypatch):
    from gui import streams

    monkeypatch.setattr(streams, "STALE_S", 0.2)
    request = SimpleNamespace(session_hash="session-2")
    follow = gui.c["follow"]
    state = gui.on_load({follow: None}, request)[follow]
    assert gui.on_watch({follow: state}, request) == {}  # just claimed: not stalled
    time.sleep(0.3)  # nobody streamed it (the page's connection dropped)
    renewed = gui.on_watch({follow: state}, request)[follow]
    assert renewed["stream"] != state["stream"] and renewed["version"] == state["version"]


def test_long_curves_are_thinned_to_what_a_plot_can_show(tmp_path):
    from gui.live import MAX_POINTS, Views

    v = tmp_path / "runs" / "long" / "version_0"
    v.mkdir(parents=True)
    (v / "status.json").write_text(json.dumps({"state": "finished", "step": 50_000}))
    with open(v / "events.jsonl", "w") as fh:
        for s in range(1, 50_001):
            fh.write(json.dumps({"event": "step", "step": s, "loss": 1.0 / s, "lr": 1e-4, "time": float(s)}) + "\n")
    view = Views().get(v)
    view.poll(force=True)
    rows = view.curve_rows(("loss",))
    assert len(view.curves["loss"]) == 50_000
    assert MAX_POINTS // 2 <= len(rows) <= MAX_POINTS + 1
    assert rows[0][0] == 1.0 and rows[-1][0] == 50_000.0  # the first and the newest point are always drawn
