"""The GUI with a long log (100k lines), many checkpoints (200) and several browser sessions following
one run: what every session sees is right. Functional assertions only; bench/gui_load.py measures
the speed (never asserted here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.gui_helpers import BROWSER_ARGS, AppServer, big_live_run, chromium_or_skip, wait_until

LINES, CHECKPOINTS, SESSIONS = 100_000, 200, 4


def last_line(path: Path) -> str:
    with open(path, "rb") as fh:
        fh.seek(-4096, 2)
        return fh.read().decode().splitlines()[-1]


@pytest.fixture
def live(tmp_path):
    run = big_live_run(tmp_path / "runs", total_steps=10, log_lines=LINES, checkpoints=CHECKPOINTS)
    yield run
    run.stop()


def test_handlers_show_the_logs_tail_and_every_checkpoint(live, tmp_path):
    from gui.ui import build_ui

    _, page = build_ui(tmp_path / "runs")
    run, ck = page.tabs["run"], page.tabs["checkpoints"]
    out = run.on_load({run.c["follow"]: None})
    assert out[run.c["follow"]]["version"] == str(live.v)
    shown = out[run.c["log"]].splitlines()
    assert shown[-1] == last_line(live.v / "train.log") == f"step {LINES - 1:06d} loss {1.0 / LINES:.6f} some padding " \
                                                           "text to look like a real log line"
    assert shown == [f"step {i:06d} loss {1.0 / (i + 1):.6f} some padding text to look like a real log line"
                     for i in range(LINES - len(shown), LINES)], "the shown lines are the file's last lines, whole"
    state = out[run.c["follow"]]
    for _ in range(3):
        live.step(log_lines=2)
        state["revs"], state = {}, {**state}
        out = run.render(state, force=True)
    assert out[run.c["log"]].splitlines()[-1] == last_line(live.v / "train.log") == "live step 3 line 1"
    assert 'data-step="3"' in out[run.c["progress"]]
    picks = {ck.c["version"]: None, ck.c["choice"]: None, ck.c["state"]: None}
    table = ck.on_refresh(picks)[ck.c["table"]]
    folders = sorted(p.name for p in (live.v / "checkpoints").iterdir())
    assert len(table) == CHECKPOINTS and sorted(table["Checkpoint"]) == folders
    assert set(table["Status"]) == {"valid"}
    polled = ck.on_tick({**picks, ck.c["version"]: str(live.v)})[ck.c["table"]]
    assert len(polled) == CHECKPOINTS


@pytest.mark.browser
def test_several_sessions_follow_one_run_and_see_the_same(live, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = chromium_or_skip()
    server = AppServer(tmp_path, tmp_path / "runs", tmp_path / "app.log")
    try:
        server.wait_ready()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium or shutil.which("chromium"), args=BROWSER_ARGS)
            pages = [browser.new_context().new_page() for _ in range(SESSIONS)]
            for pg in pages:
                pg.set_default_timeout(60_000)
                pg.goto(server.url)
                pg.get_by_role("tab", name="Run", exact=True).click()
            for _ in range(3):
                step = live.step(log_lines=3)
                for pg in pages:
                    pg.wait_for_selector(f"#run-progress .lathe-progress[data-step='{step}']")
            live.finish()
            for pg in pages:
                pg.wait_for_selector("#run-banner .lathe-banner[data-state='finished']")
            seen = {(pg.locator("#run-progress .lathe-progress").get_attribute("data-step"),
                     pg.locator("#run-progress .lathe-progress").get_attribute("data-total")) for pg in pages}
            assert seen == {("3", "10")}
            tail = last_line(live.v / "train.log")
            wait_until(lambda: all(pg.locator("#run-log textarea").first.input_value().splitlines()[-1] == tail
                                   for pg in pages), 30, 0.3, "every session showing the log's last line")
            browser.close()
    finally:
        server.stop()
